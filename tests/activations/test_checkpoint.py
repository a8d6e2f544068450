import copy

import pytest
import torch
from torch import nn

from lightning_memkit.activations import apply_checkpointing, is_checkpointed, remove_checkpointing
from lightning_memkit.models import Transformer, find_blocks
from tests.helpers.models import UserModule


def _grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def saved_activation_bytes(fn) -> int:
    """Bytes of distinct tensors autograd saves for backward while ``fn`` runs (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_reference_model_gradients_equal_plain_bit_for_bit(every, tie):
    model = Transformer.from_name("tiny", tie_embeddings=tie, n_layers=3)
    ids = torch.randint(0, 258, (2, 41))
    loss_plain, grads_plain = _grads(model, ids)
    changed = apply_checkpointing(list(model.blocks), every=every)
    assert len(changed) == len(range(0, 3, every))
    loss_ckpt, grads_ckpt = _grads(model, ids)
    assert torch.equal(loss_plain, loss_ckpt)
    for name, grad in grads_plain.items():
        assert torch.equal(grad, grads_ckpt[name]), name


def test_dropout_is_replayed_in_recomputation():
    module = UserModule(d=16, n_blocks=3).train()
    x = torch.randn(5, 8)

    def run(m):
        torch.manual_seed(11)
        m.zero_grad(set_to_none=True)
        m(x).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = run(module)
    apply_checkpointing(list(module.layers))
    ckpt = run(module)
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


def test_checkpointing_keeps_fewer_activations():
    model = Transformer.from_name("tiny", n_layers=4)
    ids = torch.randint(0, 258, (4, 129))
    plain = saved_activation_bytes(lambda: model(ids))
    apply_checkpointing(list(model.blocks))
    ckpt = saved_activation_bytes(lambda: model(ids))
    assert ckpt < plain / 4


def test_remove_restores_forward_and_state_dict_keys_unchanged():
    model = Transformer.from_name("tiny")
    keys = list(model.state_dict())
    apply_checkpointing(list(model.blocks))
    assert all(is_checkpointed(b) for b in model.blocks)
    assert list(model.state_dict()) == keys
    copied = copy.deepcopy(model)  # deep copies keep working and stay checkpointed
    assert all(is_checkpointed(b) for b in copied.blocks)
    remove_checkpointing(list(model.blocks))
    assert not any(is_checkpointed(b) for b in model.blocks)
    assert "forward" not in model.blocks[0].__dict__


def test_apply_twice_is_a_no_op_and_no_grad_runs_plain():
    model = Transformer.from_name("tiny")
    assert len(apply_checkpointing(list(model.blocks))) == 2
    assert apply_checkpointing(list(model.blocks)) == []
    ids = torch.randint(0, 258, (1, 9))
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (1, 9, 258)


def test_invalid_every():
    with pytest.raises(ValueError, match="every=0"):
        apply_checkpointing([nn.Linear(2, 2)], every=0)


def test_find_blocks_structural_and_declared():
    model = Transformer.from_name("tiny")
    assert find_blocks(model) == list(model.blocks)
    user = UserModule(n_blocks=4)
    assert find_blocks(user) == list(user.layers)
    # a list of leaf modules (plain Linear layers) is not a list of blocks
    assert find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == []
    # nested containers: only the outermost block list counts
    outer = nn.ModuleList(nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(3))
    assert find_blocks(nn.ModuleDict({"x": outer})) == list(outer)


def test_checkpointing_a_hugging_face_model_turns_its_kv_cache_off_and_back():
    """A checkpointed block recomputed in backward would write the KV cache twice (with a padded mask: a shape
    error); the cache is off while the technique is installed, and restored at teardown."""
    transformers = pytest.importorskip("transformers")
    from lightning_memkit.activations.checkpoint import CheckpointTechnique
    from lightning_memkit.config import ActivationsConfig

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    assert model.config.use_cache is True
    technique = CheckpointTechnique(ActivationsConfig(checkpoint="blocks"))
    technique.setup_module(model)
    assert model.config.use_cache is False
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()  # a shape error in backward with the cache on
    technique.teardown(model)
    assert model.config.use_cache is True

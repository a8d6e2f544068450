"""cross_entropy="fused": same gradients as the plain step, and no logits tensor is ever allocated."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_memkit import CrossEntropyConfig, MemKitStrategy
from lightning_memkit.loss import active_cross_entropy, causal_lm_loss, use_cross_entropy
from lightning_memkit.module import CausalLMModule

transformers = pytest.importorskip("transformers")


class LargestWithLastDim(TorchDispatchMode):
    """Records the largest newly allocated tensor (in elements) whose last dimension is ``v``.

    Views (outputs sharing an input's storage, such as ``weight.t()``) allocate nothing and are skipped.
    """

    def __init__(self, v: int) -> None:
        super().__init__()
        self.v, self.largest = v, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.v \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def _grads(module, loss_fn, v):
    module.zero_grad(set_to_none=True)
    with LargestWithLastDim(v) as probe:
        loss = loss_fn()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}, probe.largest


def _batch(b=2, t=48, v=258):
    ids = torch.randint(0, v, (b, t + 1))
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_causal_lm_module_same_gradients_and_no_logits(impl):
    if impl == "triton" and torch.cuda.is_available():
        pytest.skip("this test counts CPU tensor sizes; on CUDA the kernels are checked by the loss tests and "
                    "benchmarks/cuda_check.py")
    module = CausalLMModule(model="tiny")
    batch = _batch()
    n_logits = 2 * 48 * 258
    plain_loss, plain, plain_largest = _grads(module, lambda: module.loss(batch), 258)
    assert plain_largest >= n_logits  # the plain step materializes (B, T, V) logits
    with use_cross_entropy(CrossEntropyConfig(impl=impl, chunk_size=16)):
        fused_loss, fused, fused_largest = _grads(module, lambda: module.loss(batch), 258)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fused_largest < n_logits
    if impl == "chunked":
        assert fused_largest <= 16 * 258  # one chunk of logits at a time
    else:
        assert fused_largest <= 258  # the kernels keep logits in registers; only the bias-sized vectors


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


class HFUserModule(pl.LightningModule):
    """A user's module that calls a Hugging Face model with labels, as the HF docs show."""

    def __init__(self):
        super().__init__()
        self.lm = _tiny_llama()
        self.seen = []

    def training_step(self, batch, batch_idx):
        out = self.lm(input_ids=batch, labels=batch)
        self.seen.append((active_cross_entropy(), out.logits))
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, 97, (8, 20)), batch_size=4)


def test_hf_model_with_labels_fused_equals_hf_loss():
    module = HFUserModule()
    ids = torch.randint(0, 97, (3, 20))
    from lightning_memkit.loss.causal_lm import patch_hf_causal_lm, unpatch_hf_causal_lm

    hf_loss, hf_grads, hf_largest = _grads(module, lambda: module.lm(input_ids=ids, labels=ids).loss, 97)
    assert patch_hf_causal_lm(module.lm)
    with use_cross_entropy(CrossEntropyConfig(chunk_size=8)):
        out = module.lm(input_ids=ids, labels=ids)
        assert out.logits is None
        fused_loss, fused_grads, fused_largest = _grads(module, lambda: module.lm(input_ids=ids, labels=ids).loss, 97)
    torch.testing.assert_close(fused_loss, hf_loss, rtol=1e-6, atol=1e-6)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert hf_largest >= 3 * 20 * 97 and fused_largest <= 8 * 97
    with use_cross_entropy(CrossEntropyConfig(chunk_size=8)):
        positional = module.lm(ids, None, labels=ids)  # input_ids, attention_mask given by position
        assert positional.logits is None
        torch.testing.assert_close(positional.loss, hf_loss, rtol=1e-6, atol=1e-6)
    assert module.lm(input_ids=ids).logits.shape == (3, 20, 97)  # without labels: logits as usual
    unpatch_hf_causal_lm(module.lm)
    assert "forward" not in module.lm.__dict__


def test_strategy_installs_and_removes_the_toggle(trainer_kwargs):
    module = HFUserModule()
    trainer = pl.Trainer(strategy=MemKitStrategy(cross_entropy={"impl": "chunked", "chunk_size": 16}),
                         **{**trainer_kwargs, "max_steps": 2})
    trainer.fit(module)
    assert [cfg.chunk_size for cfg, _ in module.seen] == [16, 16]
    assert all(logits is None for _, logits in module.seen)
    assert "forward" not in module.lm.__dict__ and active_cross_entropy() is None


def test_plain_leaves_the_model_alone(trainer_kwargs):
    module = HFUserModule()
    pl.Trainer(strategy=MemKitStrategy(cross_entropy="plain"), **{**trainer_kwargs, "max_steps": 1}).fit(module)
    assert module.seen[0][0] is None and module.seen[0][1] is not None


def test_no_head_warns_once_and_leaves_step_unchanged(trainer_kwargs):
    from tests.helpers.models import UserModule

    module = UserModule()
    with pytest.warns(UserWarning, match="found no LM head in UserModule.*left unchanged") as record:
        pl.Trainer(strategy="memkit", **{**trainer_kwargs, "max_steps": 2}).fit(module)
    assert sum("no LM head" in str(w.message) for w in record) == 1


def test_causal_lm_loss_without_strategy_is_plain_cross_entropy():
    module = CausalLMModule(model="tiny")
    batch = _batch()
    expected = torch.nn.functional.cross_entropy(
        module.model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten()
    )
    torch.testing.assert_close(causal_lm_loss(module.model, batch["input_ids"], batch["labels"]), expected)


def test_cross_entropy_config_errors():
    from lightning_memkit import MemKitConfigError

    with pytest.raises(MemKitConfigError, match="cross_entropy='fast'.*'fused', 'plain'"):
        MemKitStrategy(cross_entropy="fast")
    with pytest.raises(MemKitConfigError, match="cross_entropy.impl='cuda'"):
        MemKitStrategy(cross_entropy={"impl": "cuda"})
    with pytest.raises(MemKitConfigError, match="unknown key.*'chunk'"):
        MemKitStrategy(cross_entropy={"chunk": 4})
    with pytest.raises(MemKitConfigError, match="filter_eps is a Triton-only option"):
        MemKitStrategy(cross_entropy={"impl": "chunked", "filter_eps": 1e-4})
    with pytest.raises(MemKitConfigError, match="cross_entropy.chunk_size=0"):
        MemKitStrategy(cross_entropy={"chunk_size": 0})


def test_hf_fallbacks_keep_hf_semantics():
    from lightning_memkit.loss.causal_lm import patch_hf_causal_lm

    lm = _tiny_llama()
    ids = torch.randint(0, 97, (2, 12))
    shifted = torch.randint(0, 97, (2, 12))
    expected = lm(input_ids=ids, labels=ids, shift_labels=shifted).loss
    as_tuple = lm(input_ids=ids, labels=ids, return_dict=False)
    patch_hf_causal_lm(lm)
    with use_cross_entropy(CrossEntropyConfig()):
        torch.testing.assert_close(lm(input_ids=ids, labels=ids, shift_labels=shifted).loss, expected)
        out = lm(input_ids=ids, labels=ids, return_dict=False)
        assert len(out) == len(as_tuple) and out[1].shape == (2, 12, 97)


def test_unsupported_hf_family_is_left_alone_with_a_warning(trainer_kwargs):
    class GraniteModule(HFUserModule):
        def __init__(self):
            super().__init__()
            config = transformers.GraniteConfig(
                vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, logits_scaling=8.0,
            )
            self.lm = transformers.GraniteForCausalLM(config)

    module = GraniteModule()
    with pytest.warns(UserWarning, match=r"leaves Hugging Face model type\(s\) \['granite'\] unchanged"):
        pl.Trainer(strategy="memkit", **{**trainer_kwargs, "max_steps": 1}).fit(module)
    assert module.seen[0][1] is not None  # HF's own forward: logits built, its scaling applied
    assert "forward" not in module.lm.__dict__


def test_head_present_but_loss_not_fused_warns_once(trainer_kwargs):
    class OwnLoss(CausalLMModule):
        def training_step(self, batch, batch_idx):
            logits = self.model(batch["input_ids"])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def train_dataloader(self):
            rows = [_batch(1, 16) for _ in range(4)]
            data = [{"input_ids": r["input_ids"][0], "labels": r["labels"][0]} for r in rows]
            return torch.utils.data.DataLoader(data, batch_size=2)

    with pytest.warns(UserWarning, match="computed its loss without it") as record:
        trainer = pl.Trainer(strategy="memkit", **{**trainer_kwargs, "max_steps": 2, "limit_val_batches": 0})
        trainer.fit(OwnLoss(model="tiny"))
    assert sum("without it" in str(w.message) for w in record) == 1


def test_positional_arguments_named_by_the_class_forward_behind_any_wrapper():
    """Another library's ``(*args, **kwargs)`` wrapper under the fused one (accelerate hooks, a user's decorator):
    the positional arguments are still named by ``LlamaForCausalLM.forward``."""
    from lightning_memkit.loss.causal_lm import _as_keywords, patch_hf_causal_lm

    lm = _tiny_llama()
    ids = torch.randint(0, 97, (2, 12))
    expected = lm(input_ids=ids, labels=ids).loss
    inner = lm.forward
    lm.forward = lambda *args, **kwargs: inner(*args, **kwargs)
    patch_hf_causal_lm(lm)
    with use_cross_entropy(CrossEntropyConfig(chunk_size=8)):
        out = lm(ids, torch.ones_like(ids), labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert _as_keywords(lambda *a, **k: None, (ids,), {}) is None  # unnamed: the caller keeps the call as it is

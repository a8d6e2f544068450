"""The fused cross-entropy for every Hugging Face family in the table equals the family's own loss.

Each family is built tiny from its config (no download) and trained 2 steps with ``MemKitStrategy()`` (fused)
and ``MemKitStrategy(cross_entropy="plain")`` (the model's own forward and loss); losses and final weights
must agree within fp32 tolerance, and the fused path must have computed every loss without logits.
"""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_memkit import CrossEntropyConfig, MemKitStrategy
from lightning_memkit.loss import causal_lm_loss, use_cross_entropy
from lightning_memkit.loss.causal_lm import fused_call_count, is_fusable_hf_causal_lm, patch_hf_causal_lm
from lightning_memkit.models import HFCausalLM
from lightning_memkit.models.families import HF_FAMILIES, hf_family

transformers = pytest.importorskip("transformers")

V = 97
_LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
#: model_type -> (config class, model class, config kwargs). Softcaps are small so that a missing one shows.
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "pad_token_id": 0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {**_LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 3.0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=64,
                                                             max_position_embeddings=64)),
}


def tiny(model_type: str) -> nn.Module:
    config_cls, model_cls, kwargs = CONFIGS[model_type]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))


def test_every_family_in_the_table_is_tested():
    assert sorted(CONFIGS) == sorted(HF_FAMILIES)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_table_entry_matches_the_model(model_type):
    """The table's paths lead to the model's parts, and its ``tied`` is the config's default."""
    lm = tiny(model_type)
    family = hf_family(lm)
    assert family is HF_FAMILIES[model_type] and is_fusable_hf_causal_lm(lm)
    body = family.decoder(lm)
    assert isinstance(getattr(body, family.blocks), nn.ModuleList) and len(getattr(body, family.blocks)) == 2
    assert isinstance(getattr(body, family.final_norm), nn.Module)
    assert (family.head(lm).weight is getattr(body, family.embed).weight) == family.tied


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_patched_forward_equals_the_family_loss_and_gradients(model_type):
    lm = tiny(model_type).train()
    ids = torch.randint(0, V, (2, 15))
    labels = ids.clone()
    labels[0, :4] = -100

    def loss_and_grads():
        lm.zero_grad(set_to_none=True)
        out = lm(input_ids=ids, labels=labels)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    own, own_grads = loss_and_grads()
    assert patch_hf_causal_lm(lm)
    before = fused_call_count()
    with use_cross_entropy(CrossEntropyConfig(impl="chunked", chunk_size=8)):
        fused, fused_grads = loss_and_grads()
    assert fused.logits is None and fused_call_count() == before + 1
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == own_grads.keys()
    for name, grad in own_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class FamilyModule(pl.LightningModule):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.losses: list[float] = []
        self.logits: list = []

    def training_step(self, batch, batch_idx):
        out = self.lm(input_ids=batch, labels=batch)
        self.losses.append(out.loss.item())
        self.logits.append(out.logits)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(1)),
                                           batch_size=2)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_strategy_fused_trains_as_the_family_loss(model_type, trainer_kwargs):
    lm = tiny(model_type)
    fused, plain = FamilyModule(lm), FamilyModule(copy.deepcopy(lm))
    kwargs = {**trainer_kwargs, "max_steps": 2, "limit_val_batches": 0}
    before = fused_call_count()
    pl.Trainer(strategy=MemKitStrategy(cross_entropy="plain"), **kwargs).fit(plain)
    assert fused_call_count() == before and all(x is not None for x in plain.logits)
    pl.Trainer(strategy=MemKitStrategy(), **kwargs).fit(fused)
    assert fused_call_count() == before + 2 and fused.logits == [None, None]  # the fused path ran, no logits
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    for (name, p), q in zip(fused.lm.named_parameters(), plain.lm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert "forward" not in fused.lm.__dict__  # unpatched after the fit


def test_hf_adapter_fused_loss_applies_the_softcap():
    """``causal_lm_loss`` on ``HFCausalLM(Gemma 2)``: the fused loss softcaps the logits as Gemma's forward does."""
    model = HFCausalLM(tiny("gemma2"))
    assert model.logit_softcap == 2.0
    ids = torch.randint(0, V, (2, 13))
    plain = causal_lm_loss(model, ids, ids, shift=True)
    before = fused_call_count()
    with use_cross_entropy(CrossEntropyConfig(impl="chunked", chunk_size=8)):
        fused = causal_lm_loss(model, ids, ids, shift=True)
    assert fused_call_count() == before + 1
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_hf_adapter_with_logit_scaling_keeps_the_plain_loss():
    """Granite divides its logits by ``logits_scaling``, which the fused loss does not: the plain loss is kept."""
    config = transformers.GraniteConfig(**_LLAMA_LIKE, logits_scaling=8.0)
    model = HFCausalLM(transformers.GraniteForCausalLM(config))
    ids = torch.randint(0, V, (2, 13))
    plain = causal_lm_loss(model, ids, ids, shift=True)
    before = fused_call_count()
    with use_cross_entropy(CrossEntropyConfig(impl="chunked", chunk_size=8)):
        kept = causal_lm_loss(model, ids, ids, shift=True)
    assert fused_call_count() == before
    torch.testing.assert_close(kept, plain)

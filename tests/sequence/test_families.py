"""StreamBP and SeCO drive every family of the table that has a block layout, exactly; the rest are refused.

Each family is built tiny from its config (no download), with the settings that make each of its extras matter
(Gemma 2's attention softcap small enough to bite, Gemma 3's local and global RoPE bases on alternate layers,
Phi-3's partial rotary and long RoPE, Qwen3's and Gemma 3's q/k norms). The loss and every gradient must equal the
model's own forward and backward (Hugging Face's loss) to fp32 rounding, for the plain and the fused per-chunk loss.
"""

import pytest
import torch

from lightning_memkit.config import CrossEntropyConfig, MemKitConfigError
from lightning_memkit.models.families import HF_FAMILIES
from lightning_memkit.sequence import get_adapter, sequence_loss
from tests.loss.test_families import CONFIGS

transformers = pytest.importorskip("transformers")

T = 24  # sequence length; chunks of 10 leave a shorter last one
#: name -> (model_type, config overrides): every family with a layout, and the variants whose extras need a case
CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 32}),  # a window that covers the sequence
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "phi3_partial_rotary": ("phi3", {"partial_rotary_factor": 0.5}),
    "phi3_longrope": ("phi3", {"original_max_position_embeddings": 16,  # T > 16: the long factors are in force
                               "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 4.0, 8.0]}}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"attn_logit_softcapping": 0.05, "query_pre_attn_scalar": 1, "sliding_window": 32,
                          "final_logit_softcapping": 0.1}),
    "gemma3_text": ("gemma3_text", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 32}),
}


def build(model_type: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls, kwargs = CONFIGS[model_type]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**kwargs, **overrides})).train()


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))


def _own(hf) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    hf.zero_grad(set_to_none=True)
    loss = hf(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}


def test_every_family_with_a_layout_has_a_case():
    assert {mt for mt, _ in CASES.values()} == {mt for mt, f in HF_FAMILIES.items() if f.sequence is not None}


@pytest.mark.parametrize("fused", [False, True], ids=["plain_ce", "fused_ce"])
@pytest.mark.parametrize("method", ["streambp", "seco"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_equals_its_own_backprop(case, method, fused):
    model_type, overrides = CASES[case]
    hf = build(model_type, **overrides)
    exact_loss, exact = _own(hf)
    hf.zero_grad(set_to_none=True)
    loss = sequence_loss(hf, _ids(), _ids(), method=method, chunk_size=10, shift=True,
                         cross_entropy=CrossEntropyConfig() if fused else None)
    loss.backward()
    torch.testing.assert_close(loss.detach(), exact_loss, rtol=1e-6, atol=1e-6)
    for name, p in hf.named_parameters():
        scale = exact[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(p.grad / scale, exact[name] / scale, rtol=0, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case,change", [
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma3_text", {"layer_types": ["full_attention", "full_attention"]}),  # one RoPE base for both layers
    ("phi3_partial_rotary", {"partial_rotary_factor": 1.0}),
    ("phi3_longrope", {"original_max_position_embeddings": 64}),  # the short factors instead
])
def test_each_extra_changes_the_loss_the_cases_compare(case, change):
    """The cases exercise what they claim to: without the extra, the model's own loss moves by more than 20 times
    the loss tolerance of :func:`test_family_equals_its_own_backprop` (1e-6)."""
    model_type, overrides = CASES[case]
    with torch.no_grad():
        with_it = build(model_type, **overrides)(input_ids=_ids(), labels=_ids()).loss
        without = build(model_type, **{**overrides, **change})(input_ids=_ids(), labels=_ids()).loss
    assert abs(float(with_it) - float(without)) > 2e-5


def test_qk_norms_are_applied():
    """Qwen3's q/k norms: scaling their weights changes the sequence method's loss as it changes the model's."""
    hf = build("qwen3")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_norm.weight.mul_(3.0)
            layer.self_attn.k_norm.weight.mul_(0.5)
        own = hf(input_ids=_ids(), labels=_ids()).loss
        chunked = sequence_loss(hf, _ids(), _ids(), method="seco", chunk_size=10, shift=True)
    torch.testing.assert_close(chunked, own, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type,reason", [
    ("gpt2", "positions are learned embeddings"),
    ("gpt_neox", "in parallel"),
])
def test_families_without_a_layout_are_refused_with_the_reason(model_type, reason):
    with pytest.raises(MemKitConfigError, match=f"cannot drive the Hugging Face model type '{model_type}': .*{reason}"
                       ".*Fix: train it without sequence="):
        get_adapter(build(model_type))


def test_a_family_not_in_the_table_is_refused():
    olmo = transformers.OlmoForCausalLM(transformers.OlmoConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(MemKitConfigError, match="'olmo'.*not in memkit's family table.*Fix:.*HF_FAMILIES"):
        get_adapter(olmo)


def test_sliding_windows_shorter_than_the_sequence_are_refused():
    adapter = get_adapter(build("gemma2", sliding_window=16))
    assert adapter.window == 16
    adapter.check_length(16)  # the window covers the sequence: full causal attention
    with pytest.raises(ValueError, match="longer than the model's sliding attention window \\(16\\)"):
        adapter.check_length(17)
    assert get_adapter(build("qwen2", sliding_window=16)).window is None  # use_sliding_window is off by default


def test_block_dropout_is_refused_naming_the_key():
    with pytest.raises(MemKitConfigError, match="resid_pdrop=0.1.*Fix: set resid_pdrop=0"):
        get_adapter(build("phi3", resid_pdrop=0.1))


def test_peft_lora_on_a_new_family_trains_as_its_own_backprop():
    """A LoRA Gemma 2 (the adapters on the attention projections): the wrapped model is driven, the frozen base
    gets no gradient, and the adapters' gradients equal the plain backward's."""
    peft = pytest.importorskip("peft")
    model_type, overrides = CASES["gemma2"]
    torch.manual_seed(1)
    lora = peft.get_peft_model(build(model_type, **overrides),
                               peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    exact_loss, exact = _own(lora)
    lora.zero_grad(set_to_none=True)
    inner = lora.base_model.model
    loss = sequence_loss(inner, _ids(), _ids(), method="streambp", chunk_size=10, shift=True,
                         cross_entropy=CrossEntropyConfig())
    loss.backward()
    torch.testing.assert_close(loss.detach(), exact_loss, rtol=1e-6, atol=1e-6)
    trained = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in lora.named_parameters() if p.requires_grad} and all("lora_" in n for n in trained)
    for name in trained:
        torch.testing.assert_close(dict(lora.named_parameters())[name].grad, exact[name], rtol=1e-5, atol=1e-7)

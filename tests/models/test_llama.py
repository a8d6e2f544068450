import pytest
import torch

from lightning_memkit.models import NAMED_CONFIGS, KVCache, LlamaConfig, Transformer, from_hf, get_config

transformers = pytest.importorskip("transformers")

HF_FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
}


def tiny_hf(family: str, **extra):
    config_cls, model_cls, defaults = HF_FAMILIES[family]
    config = config_cls(
        vocab_size=101, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=5000.0,
        **{**defaults, **extra},
    )
    return model_cls(config).eval()


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_reference_model_with_hf_weights_gives_the_same_logits(family):
    hf = tiny_hf(family)
    ref = from_hf(hf).eval()
    ids = torch.randint(0, 101, (3, 45))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ref(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hf_llama_with_tied_embeddings_and_head_dim():
    hf = tiny_hf("llama", tie_word_embeddings=True, head_dim=16)
    ref = from_hf(hf).eval()
    assert ref.lm_head.weight is ref.embed_tokens.weight
    assert ref.config.resolved_head_dim == 16
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    model = Transformer.from_name("tiny").eval()
    ids = torch.randint(0, 258, (2, 23))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.n_layers)
        parts = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 10), (10, 11), (11, 23))]
    assert cache.seq_len == 23
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_matches_argmax_of_full_forward():
    model = Transformer.from_name("tiny").eval()
    prompt = torch.randint(0, 258, (1, 6))
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    assert out.shape == (1, 11)
    with torch.no_grad():
        for i in range(6, 11):
            assert out[0, i] == model(out[:, :i])[0, -1].argmax()
    sampled = model.generate(prompt, 4, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 10)


def test_interface_for_techniques():
    model = Transformer.from_name("tiny", tie_embeddings=True)
    assert model.memkit_blocks() is model.blocks
    assert model.final_norm is model.norm
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 258, (1, 7))
    torch.testing.assert_close(model.lm_head(model.forward_hidden(ids)), model(ids))


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configs_parameter_counts(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_published_sizes():
    assert round(get_config("llama-3-8b").num_parameters() / 1e9, 2) == 8.03
    assert round(get_config("qwen2.5-1.5b").num_parameters() / 1e9, 2) == 1.54
    assert round(get_config("llama-2-7b").num_parameters() / 1e9, 2) == 6.74


def test_sequence_longer_than_max_is_refused():
    model = Transformer.from_name("tiny", max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_errors():
    with pytest.raises(ValueError, match="model='llama-9b'.*tiny"):
        get_config("llama-9b")
    with pytest.raises(ValueError, match="unknown LlamaConfig key"):
        get_config("tiny", n_layer=3)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        LlamaConfig(vocab_size=10, dim=16, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)
    with pytest.raises(ValueError, match="dim=16 is not divisible by n_heads=3"):
        LlamaConfig(vocab_size=10, dim=16, n_layers=1, n_heads=3, n_kv_heads=3, ffn_dim=8)


def test_sliding_window_configs_are_refused():
    hf = tiny_hf("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window attention.*HF adapter"):
        from_hf(hf)


def test_kv_cache_with_gradients_and_checkpointing():
    """The cache is differentiable, and a checkpointed block's recomputation does not append twice."""
    from lightning_memkit.activations import apply_checkpointing

    ids = torch.randint(0, 258, (2, 12))

    def run(checkpointed: bool):
        torch.manual_seed(0)
        model = Transformer.from_name("tiny")
        if checkpointed:
            apply_checkpointing(list(model.blocks))
        cache = KVCache(model.config.n_layers)
        out = torch.cat([model(ids[:, :5], kv_cache=cache), model(ids[:, 5:], kv_cache=cache)], dim=1)
        out.square().mean().backward()
        assert cache.seq_len == 12
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_out, plain_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)

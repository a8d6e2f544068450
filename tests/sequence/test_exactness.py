"""SeCO / StreamBP gradients equal full backprop; SpaCO is unbiased; memory follows the chunk size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_memkit import MemKitConfigError
from lightning_memkit.memory import LiveBytes
from lightning_memkit.models.hf import HFCausalLM
from lightning_memkit.models.llama import Transformer, get_config
from lightning_memkit.sequence import get_adapter, sequence_loss
from tests.models.test_llama import tiny_hf

EXACT = ["streambp", "seco"]


def _batch(vocab, b=2, t=45, pad=7, seed=0):
    """Ids and labels with a prompt masked out in row 1 and right padding in row 0 (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    if pad:
        ids[0, t - pad:] = 0  # padding token
        labels[0, t - pad:] = -100
    labels[1, :5] = -100
    return ids, labels


def _full(model, ids, labels, params=None):
    """Plain backprop; ``model`` maps ids to logits (``params``: the module, when ``model`` is a function)."""
    params = model if params is None else params
    params.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                           labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


def _chunked(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = sequence_loss(model, ids, labels, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_rel(a, b):
    return max(((a[n].double() - b[n].double()).abs().max() / b[n].double().abs().max()).item() for n in b)


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    return Transformer(get_config("tiny", n_layers=3))


@pytest.mark.parametrize("method", EXACT)
# 45 tokens: uneven chunks, one chunk, a chunk longer than T; chunk 6 (8 chunks) takes > 10 s on 2 CPU cores: slow
@pytest.mark.parametrize("chunk", [pytest.param(6, marks=pytest.mark.slow), 16, 45, 64])
def test_gradients_equal_full_backprop_fp32(method, chunk, fp32_model):
    ids, labels = _batch(fp32_model.vocab_size)
    loss0, exact = _full(fp32_model, ids, labels)
    loss, grads = _chunked(fp32_model, ids, labels, method=method, chunk_size=chunk)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    assert grads.keys() == exact.keys()
    for name in exact:  # every parameter, embeddings and head included
        torch.testing.assert_close(grads[name], exact[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", EXACT)
def test_fp64_agrees_to_rounding(method, fp32_model):
    model = Transformer(get_config("tiny", n_layers=3)).double()
    model.load_state_dict(fp32_model.state_dict())
    ids, labels = _batch(model.vocab_size)
    _, exact = _full(model, ids, labels)
    _, grads = _chunked(model, ids, labels, method=method, chunk_size=7)
    assert _max_rel(grads, exact) < 1e-12  # measured: 1e-15


@pytest.mark.parametrize("method", EXACT)
def test_bf16_within_the_dtypes_own_error(method, fp32_model):
    """bf16 chunked gradients are as close to the fp32 truth as bf16 full backprop is."""
    ids, labels = _batch(fp32_model.vocab_size, t=64)
    _, truth = _full(fp32_model, ids, labels)
    model = Transformer(get_config("tiny", n_layers=3)).to(torch.bfloat16)
    model.load_state_dict(fp32_model.state_dict())
    _, full_bf16 = _full(model, ids, labels)
    _, chunked = _chunked(model, ids, labels, method=method, chunk_size=16)
    rel = lambda g: max(((g[n].float() - truth[n]).norm() / truth[n].norm()).item() for n in truth)  # noqa: E731
    assert rel(full_bf16) < 0.05
    assert rel(chunked) < 1.5 * rel(full_bf16) + 0.01


@pytest.mark.parametrize("method", EXACT)
def test_autocast_forward_backward_outside(method, fp32_model):
    """As Lightning's bf16-mixed runs it: the loss under autocast, backward outside; the method re-enters
    autocast for its recomputation, so its gradients are as close to the fp32 truth as autocast backprop's."""
    ids, labels = _batch(fp32_model.vocab_size, t=64)
    _, truth = _full(fp32_model, ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss = F.cross_entropy(fp32_model(ids).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    fp32_model.zero_grad(set_to_none=True)
    plain_loss.backward()
    plain = {n: p.grad.clone() for n, p in fp32_model.named_parameters()}
    fp32_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sequence_loss(fp32_model, ids, labels, method=method, chunk_size=16)
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in fp32_model.named_parameters()}
    rel = lambda g: max(((g[n] - truth[n]).norm() / truth[n].norm()).item() for n in truth)  # noqa: E731
    assert 1e-4 < rel(plain) < 0.05  # autocast did act
    # measured: 0.0075 for autocast backprop, 0.0076 for both methods; a recomputation in fp32 would be closer
    assert 0.5 * rel(plain) < rel(chunked) < 1.5 * rel(plain) + 0.01
    torch.testing.assert_close(loss, plain_loss, rtol=1e-2, atol=0)


def test_fused_cross_entropy_per_chunk_is_exact(fp32_model):
    from lightning_memkit.config import CrossEntropyConfig

    ids, labels = _batch(fp32_model.vocab_size)
    _, exact = _full(fp32_model, ids, labels)
    for method in EXACT:
        _, grads = _chunked(fp32_model, ids, labels, method=method, chunk_size=10,
                            cross_entropy=CrossEntropyConfig(impl="chunked"))
        assert _max_rel(grads, exact) < 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_shifted_labels_and_tied_embeddings(fused):
    from lightning_memkit.config import CrossEntropyConfig

    torch.manual_seed(1)
    model = Transformer(get_config("tiny", tie_embeddings=True))
    ids = torch.randint(0, model.vocab_size, (2, 30))
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    exact = {n: p.grad.clone() for n, p in model.named_parameters()}
    for method in EXACT:
        ce = CrossEntropyConfig(impl="chunked") if fused else None
        _, grads = _chunked(model, ids, ids, method=method, chunk_size=8, shift=True, cross_entropy=ce)
        assert _max_rel(grads, exact) < 1e-4, method


def test_frozen_parameters_get_no_gradient(fp32_model):
    model = Transformer(get_config("tiny", n_layers=3))
    model.load_state_dict(fp32_model.state_dict())
    model.embed_tokens.weight.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    ids, labels = _batch(model.vocab_size)
    _, exact = _full(model, ids, labels)
    for method in EXACT:
        model.zero_grad(set_to_none=True)
        sequence_loss(model, ids, labels, method=method, chunk_size=9).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, exact[n], rtol=1e-4, atol=1e-6)
            else:
                assert p.grad is None, n


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", ["streambp", "seco", "spaco"])  # SpaCO with keep=1 back-propagates every chunk
def test_frozen_head_embeddings_and_blocks(method, fused):
    """A frozen LM head (PEFT LoRA, lm_head.requires_grad_(False)), frozen embeddings, frozen blocks: the trainable
    parameters get plain backprop's gradients (StreamBP with the fused loss crashed on a head with nothing to train)."""
    from lightning_memkit.config import CrossEntropyConfig

    ids, labels = _batch(101, t=30)
    ce = CrossEntropyConfig(impl="chunked") if fused else None
    for frozen in (["lm_head"], ["model.embed_tokens"], ["lm_head", "model.embed_tokens", "model.layers.0"]):
        torch.manual_seed(0)
        hf = tiny_hf("llama").train()
        for name in frozen:
            hf.get_submodule(name).requires_grad_(False)
        _, exact = _full(lambda x: hf(input_ids=x).logits, ids, labels, hf)
        loss, grads = _chunked(hf, ids, labels, method=method, chunk_size=8, cross_entropy=ce,
                               keep=1.0 if method == "spaco" else None)
        assert set(grads) == set(exact) == {n for n, p in hf.named_parameters() if p.requires_grad}, frozen
        for name in exact:
            torch.testing.assert_close(grads[name], exact[name], rtol=1e-4, atol=1e-6, msg=f"{frozen} {name}")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", EXACT)
def test_hugging_face_families_equal_their_own_backprop(family, method):
    hf = tiny_hf(family).train()
    ids, labels = _batch(101, t=33)

    def hf_grads(**kwargs):
        hf.zero_grad(set_to_none=True)
        out = hf(input_ids=ids, labels=labels) if not kwargs else None
        loss = out.loss if out is not None else sequence_loss(hf, ids, labels, **kwargs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in hf.named_parameters()}

    loss0, exact = hf_grads()  # Hugging Face's own forward and loss (labels shifted inside)
    loss, grads = hf_grads(method=method, chunk_size=8, shift=True)
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
    for name in exact:
        torch.testing.assert_close(grads[name], exact[name], rtol=1e-4, atol=1e-6, msg=name)
    assert get_adapter(HFCausalLM(hf)).n_kv_heads == 2


def _spaco_mask(seed, n, keep):
    """The chunks SpaCO back-propagates for (seed, step 0): the draw sequence_loss makes."""
    import random

    rng = random.Random(seed * 1_000_003)
    return tuple(rng.random() < keep for _ in range(n))


@pytest.mark.slow  # 80-100 s each on the 2-core CPU machine
@pytest.mark.parametrize("keep", [0.5, 0.7])
def test_spaco_is_unbiased_exactly_over_all_chunk_subsets(keep):
    """The estimator's expectation, summed over every subset of the 4 chunks with its probability, is the
    exact gradient; keep=1 is SeCO bit for bit; a mean over seeds approaches it."""
    torch.manual_seed(2)
    model = Transformer(get_config("tiny", n_layers=2))
    ids, labels = _batch(model.vocab_size, b=2, t=32, pad=0)
    _, exact = _chunked(model, ids, labels, method="seco", chunk_size=8)
    _, same = _chunked(model, ids, labels, method="spaco", chunk_size=8, keep=1.0)
    for n in exact:
        torch.testing.assert_close(same[n], exact[n], rtol=0, atol=0)
    # a draw that keeps no chunk leaves every gradient None: zero
    flat = lambda g: torch.cat([g.get(n, torch.zeros_like(exact[n])).flatten() for n in exact]).double()  # noqa: E731
    truth = flat(exact)
    seeds: dict[tuple, int] = {}
    for seed in range(2000):  # one seed per subset of the 4 chunks
        seeds.setdefault(_spaco_mask(seed, 4, keep), seed)
    assert len(seeds) == 16
    expectation = torch.zeros_like(truth)
    for mask, seed in seeds.items():
        kept = sum(mask)
        _, g = _chunked(model, ids, labels, method="spaco", chunk_size=8, keep=keep, seed=seed)
        expectation += keep**kept * (1 - keep) ** (4 - kept) * flat(g)
    torch.testing.assert_close(expectation, truth, rtol=1e-5, atol=1e-7)
    draws = torch.stack([flat(_chunked(model, ids, labels, method="spaco", chunk_size=8, keep=keep, seed=s)[1])
                         for s in range(100)])
    single = ((draws - truth).norm(dim=1) / truth.norm()).mean().item()
    mean = ((draws.mean(0) - truth).norm() / truth.norm()).item()
    assert single > 0.2  # one draw is far off (measured 0.5 to 1.0) ...
    assert mean < 3 * single / 100**0.5  # ... the mean of 100 draws shrinks like 1/sqrt(100)


def _peak_activation_bytes(method, t, chunk):
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", n_layers=2, max_seq_len=2048, dim=64, ffn_dim=256))
    ids = torch.randint(0, model.vocab_size, (1, t))
    with LiveBytes() as counted:  # bytes of the tensors the step creates (weights exist before)
        if method == "full":
            logits = model(ids)
            F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        else:
            sequence_loss(model, ids, ids, method=method, chunk_size=chunk).backward()
    return counted.peak - sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())


@pytest.mark.parametrize("method", EXACT)
def test_peak_memory_follows_the_chunk_not_the_sequence(method):
    cfg = get_config("tiny", n_layers=2, dim=64, ffn_dim=256)
    per_token_state = {  # what the methods keep for every token (bytes, fp32), beyond one chunk's graph
        "seco": cfg.n_layers * 2 * cfg.n_kv_heads * cfg.resolved_head_dim * (4 + 4),  # K/V and their fp32 gradients
        "streambp": (cfg.n_layers + 3) * cfg.dim * 4 + 2 * cfg.n_kv_heads * cfg.resolved_head_dim * 8,
    }[method]
    short, long = _peak_activation_bytes(method, 512, 64), _peak_activation_bytes(method, 1024, 64)
    full_short, full_long = _peak_activation_bytes("full", 512, 0), _peak_activation_bytes("full", 1024, 0)
    # doubling the sequence adds at most the per-token state of the extra tokens (plus the chunk's (c, T) mask);
    # measured: 725 KB for SeCO, 1085 KB for StreamBP (the bounds: 786 KB and 1180 KB); full backprop: 8.9 MB
    assert long - short <= 512 * per_token_state + 64 * 512 * 4 * 2
    assert long - short < 0.2 * (full_long - full_short)
    # the chunk's graph is what grows with the chunk size
    assert _peak_activation_bytes(method, 1024, 256) > long + 256 * 1024


def test_validation_loss_without_gradients_matches(fp32_model):
    ids, labels = _batch(fp32_model.vocab_size)
    with torch.no_grad():
        plain = F.cross_entropy(fp32_model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
        for method in ("streambp", "seco", "spaco"):
            got = sequence_loss(fp32_model, ids, labels, method=method, chunk_size=7)
            torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)


def test_bad_input_is_named():
    model = Transformer(get_config("tiny"))
    ids = torch.randint(0, 10, (1, 8))
    with pytest.raises(MemKitConfigError, match="sequence.chunk_size=0 is below 1"):
        sequence_loss(model, ids, ids, chunk_size=0)
    with pytest.raises(MemKitConfigError, match="sequence.method='stream' is not a known name"):
        sequence_loss(model, ids, ids, method="stream")
    with pytest.raises(MemKitConfigError, match="sequence.keep=0.5 is a SpaCO setting"):
        sequence_loss(model, ids, ids, method="seco", keep=0.5)
    with pytest.raises(MemKitConfigError, match=r"sequence.keep=1.5 must be a probability in \(0, 1\]"):
        sequence_loss(model, ids, ids, method="spaco", keep=1.5)
    with pytest.raises(MemKitConfigError, match="cannot drive Sequential.*memkit_sequence_adapter"):
        sequence_loss(torch.nn.Sequential(torch.nn.Linear(2, 2)), ids, ids)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=512"):
        sequence_loss(model, torch.zeros(1, 600, dtype=torch.long), torch.zeros(1, 600, dtype=torch.long))
    loss = sequence_loss(model, ids, ids, method="seco", chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        loss.backward()


def test_models_the_methods_cannot_drive_say_why():
    transformers = pytest.importorskip("transformers")
    qwen2 = get_adapter(tiny_hf("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0))
    with pytest.raises(ValueError, match="longer than the model's sliding attention window \\(16\\)"):
        qwen2.check_length(17)
    mistral = get_adapter(tiny_hf("mistral", sliding_window=16))
    with pytest.raises(ValueError, match="longer than the model's sliding attention window \\(16\\)"):
        mistral.check_length(20)
    with pytest.raises(MemKitConfigError, match="attention_dropout=0.1"):
        get_adapter(tiny_hf("llama", attention_dropout=0.1))
    noncausal = tiny_hf("llama")
    noncausal.model.layers[1].self_attn.is_causal = False
    with pytest.raises(MemKitConfigError, match="layer 1 of the model has non-causal attention"):
        get_adapter(noncausal)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert get_adapter is not None and gpt2 is not None
    with pytest.raises(MemKitConfigError, match="cannot drive the Hugging Face model type 'gpt2'"):
        get_adapter(gpt2)


@pytest.mark.parametrize("method", EXACT)
def test_each_parameter_gets_one_gradient_hook_call(method, fp32_model):
    calls: dict[str, int] = {}
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, p in fp32_model.named_parameters()]
    try:
        ids, labels = _batch(fp32_model.vocab_size)
        fp32_model.zero_grad(set_to_none=True)
        sequence_loss(fp32_model, ids, labels, method=method, chunk_size=9).backward()
    finally:
        for h in handles:
            h.remove()
    assert calls == {n: 1 for n, _ in fp32_model.named_parameters()}


def test_streambp_hands_each_block_over_before_the_blocks_below():
    """With a step-in-backward optimizer the upper blocks' gradients are gone before the lower blocks finish."""
    from lightning_memkit.optim import AdamW, StepInBackward

    model = Transformer(get_config("tiny", n_layers=3))
    opt = StepInBackward(AdamW(model.parameters(), lr=1e-3))
    seen = []
    model.blocks[0].mlp.down_proj.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append([q.grad is None for q in model.blocks[2].parameters()]))
    ids = torch.randint(0, model.vocab_size, (1, 24))
    opt.step(lambda: sequence_loss(model, ids, ids, method="streambp", chunk_size=8).backward())
    assert seen == [[True] * len(list(model.blocks[2].parameters()))]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", EXACT)
def test_gradients_returned_through_the_outer_backward_under_ddp(method, fp32_model, monkeypatch):
    """Several processes: the loss's node returns the gradients (DDP's reducer hooks see them there)."""
    import lightning_memkit.sequence.loss as api

    ids, labels = _batch(fp32_model.vocab_size)
    _, exact = _full(fp32_model, ids, labels)
    monkeypatch.setattr(api, "_several_processes", lambda: True)
    _, grads = _chunked(fp32_model, ids, labels, method=method, chunk_size=9)
    assert _max_rel(grads, exact) < 1e-4


@pytest.mark.parametrize("method", EXACT)
def test_gradients_are_taken_over_not_copied(method):
    """The gradient buffers built in the backward become the parameters' .grad: no second copy at the peak."""
    model = Transformer(get_config("tiny", vocab_size=20000))  # weights dominated by embedding and head
    ids = torch.randint(0, 20000, (1, 8))
    # one chunk: no per-chunk head gradient is added into another, so what would double the peak is a copy
    with LiveBytes() as counted:
        sequence_loss(model, ids, ids, method=method, chunk_size=8).backward()
    grad_bytes = sum(p.grad.numel() * 4 for p in model.parameters())
    assert counted.peak < 1.3 * grad_bytes  # a copied set of gradients would make it >= 2x


@pytest.mark.parametrize("method", ["streambp", "seco", "spaco"])
def test_a_loss_combined_with_other_terms_gets_one_hook_call_and_the_sum(method, fp32_model):
    ids, labels = _batch(fp32_model.vocab_size)
    reg = lambda: 1e-2 * sum(p.pow(2).sum() for p in fp32_model.parameters())  # noqa: E731
    fp32_model.zero_grad(set_to_none=True)
    (F.cross_entropy(fp32_model(ids).flatten(0, 1), labels.flatten()) + reg()).backward()
    exact = {n: p.grad.clone() for n, p in fp32_model.named_parameters()}
    calls: dict[str, int] = {}
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, p in fp32_model.named_parameters()]
    try:
        fp32_model.zero_grad(set_to_none=True)
        keep = {"keep": 1.0} if method == "spaco" else {}
        (sequence_loss(fp32_model, ids, labels, method=method, chunk_size=9, **keep) + reg()).backward()
    finally:
        for h in handles:
            h.remove()
    assert set(calls.values()) == {1}
    assert _max_rel({n: p.grad for n, p in fp32_model.named_parameters()}, exact) < 1e-4


def test_spaco_on_fake_tensors():
    from lightning_memkit.memory import fake_training_step

    r = fake_training_step("tiny", seq_len=64, sequence={"method": "spaco", "chunk_size": 16, "keep": 0.5})
    assert r.peak > 0


def test_adapters_do_not_keep_models_alive():
    import gc
    import weakref

    model = Transformer(get_config("tiny"))
    get_adapter(model)
    ids = torch.randint(0, 10, (1, 8))
    sequence_loss(model, ids, ids, chunk_size=4).backward()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
])
def test_hugging_face_rope_scaling_is_the_models_own(rope):
    hf = tiny_hf("llama", rope_parameters={"rope_theta": 5000.0, **rope}).train()
    assert hf.model.rotary_emb.rope_type == rope["rope_type"]
    ids, labels = _batch(101, t=40)
    hf.zero_grad(set_to_none=True)
    loss0 = hf(input_ids=ids, labels=labels).loss
    loss0.backward()
    exact = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    loss = sequence_loss(hf, ids, labels, method="streambp", chunk_size=12, shift=True)
    loss.backward()
    torch.testing.assert_close(loss, loss0.detach(), rtol=1e-5, atol=1e-6)
    for n, p in hf.named_parameters():
        torch.testing.assert_close(p.grad, exact[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_model_with_its_own_adapter(fp32_model):
    """The documented way for other architectures: memkit_sequence_adapter() returning a SequenceAdapter."""
    from lightning_memkit.sequence import ReferenceAdapter, SequenceAdapter

    class Wrapped(torch.nn.Module):  # an architecture memkit does not know, exposing its pieces
        def __init__(self):
            super().__init__()
            self.net = Transformer(get_config("tiny", n_layers=3))
            self.net.load_state_dict(fp32_model.state_dict())

        def forward(self, ids):
            return self.net(ids)

        def memkit_sequence_adapter(self):
            return ReferenceAdapter(self.net)

    model = Wrapped()
    ids, labels = _batch(model.net.vocab_size)
    _, exact = _full(model, ids, labels)
    _, grads = _chunked(model, ids, labels, method="seco", chunk_size=10)
    assert _max_rel(grads, exact) < 1e-4

    class Incomplete(SequenceAdapter):  # forgets most pieces
        def embed(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    model.memkit_sequence_adapter = lambda: object()
    with pytest.raises(MemKitConfigError, match="must return a lightning_memkit.sequence.SequenceAdapter"):
        get_adapter(model)

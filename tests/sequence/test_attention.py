"""memkit's chunked online-softmax attention equals SDPA (and the eager softcapped formula), forward and every
gradient, without saving a (c, e)-sized tensor; the dispatcher names the kernel each call runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from lightning_memkit.sequence import attention as attention_mod
from lightning_memkit.sequence.adapter import _softcapped_attention, causal_bias, chunk_attention
from lightning_memkit.sequence.attention import (
    LowerRight,
    attention_backend,
    chunked_attention,
    chunked_attention_above,
)


def _inputs(b, heads, kv_heads, c, e, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, c, dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, kv_heads, e, dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, kv_heads, e, dim, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(b, heads, c, dim, generator=g).to(dtype)
    return q, k, v, grad


def _sdpa(q, k, v, scale=None):
    """SDPA's math kernel with an explicit lower-right mask (the reference)."""
    c, e = q.shape[2], k.shape[2]
    keep = torch.ones(c, e, dtype=torch.bool).tril(diagonal=e - c)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _both(fn_a, fn_b, q, k, v, grad):
    out_a = fn_a(q, k, v)
    grads_a = torch.autograd.grad(out_a, (q, k, v), grad)
    out_b = fn_b(q, k, v)
    grads_b = torch.autograd.grad(out_b, (q, k, v), grad)
    return (out_a, *grads_a), (out_b, *grads_b)


CASES = {  # (B, H, K, c, e, block)
    "plain causal": (2, 3, 3, 11, 11, 4),
    "lower right": (2, 3, 3, 5, 19, 8),
    "gqa": (2, 4, 2, 6, 17, 5),
    "uneven blocks": (1, 2, 2, 7, 23, 10),  # 23 keys in blocks of 10, 10, 3
    "one block": (1, 2, 1, 4, 9, 64),
    "block of one key": (1, 2, 1, 3, 6, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scale", [None, 0.3])
def test_equals_sdpa_fp32(case, scale):
    b, heads, kv_heads, c, e, block = CASES[case]
    q, k, v, grad = _inputs(b, heads, kv_heads, c, e)
    got, want = _both(lambda *a: chunked_attention(*a, scale=scale, block_size=block),
                      lambda *a: _sdpa(*a, scale=scale), q, k, v, grad)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["lower right", "gqa", "plain causal"])
def test_softcap_equals_the_eager_formula(case):
    b, heads, kv_heads, c, e, block = CASES[case]
    q, k, v, grad = _inputs(b, heads, kv_heads, c, e)
    q = (q.detach() * 4).requires_grad_()  # scores large enough for the cap to bend them
    got, want = _both(lambda *a: chunked_attention(*a, scale=0.5, softcap=2.0, block_size=block),
                      lambda *a: _softcapped_attention(*a, 0.5, 2.0), q, k, v, grad)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
    uncapped = chunked_attention(q, k, v, scale=0.5, block_size=block)
    assert (uncapped - got[0]).abs().max() > 1e-2  # the cap did something


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fp64_agrees_to_rounding(softcap):
    q, k, v, grad = _inputs(2, 4, 2, 9, 26, dtype=torch.float64)
    reference = (lambda *a: _sdpa(*a)) if softcap is None else (lambda *a: _softcapped_attention(*a, None, softcap))
    got, want = _both(lambda *a: chunked_attention(*a, softcap=softcap, block_size=7), reference, q, k, v, grad)
    for x, y in zip(got, want):
        assert x.dtype == torch.float64
        assert ((x - y).abs().max() / y.abs().max()).item() < 1e-12


def test_bf16_within_the_dtypes_own_error():
    """Against an fp64 reference, the chunked kernel's bf16 error is no larger than SDPA's own in bf16."""
    q, k, v, grad = _inputs(2, 4, 2, 16, 40, dim=16, dtype=torch.float64)
    exact, _ = _both(_sdpa, _sdpa, q, k, v, grad)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    got, sdpa = _both(lambda *a: chunked_attention(*a, block_size=12), _sdpa, *low, grad.to(torch.bfloat16))
    for name, x, s, y in zip(("out", "dq", "dk", "dv"), got, sdpa, exact):
        assert x.dtype == torch.bfloat16, name
        err, err_sdpa = (x.double() - y).abs().max().item(), (s.double() - y).abs().max().item()
        assert err <= 2 * err_sdpa + 1e-3, (name, err, err_sdpa)


def test_no_chunk_by_keys_tensor_is_saved():
    """The graph saves q, k, v, the output and the logsumexp: nothing with c * e entries (SDPA with a mask does)."""
    c, e, block = 32, 96, 16
    q, k, v, grad = _inputs(1, 4, 2, c, e)

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(q, k, v)
        out.backward(grad)
        return sizes

    chunked = saved_sizes(lambda *a: chunked_attention(*a, block_size=block))
    assert max(chunked) <= max(q.numel(), k.numel())
    assert sum(chunked) <= 2 * q.numel() + 2 * k.numel() + 4 * c  # q, output, k, v, the logsumexp (H x c rows)
    assert max(saved_sizes(_sdpa)) >= c * e  # the reference saves its (c, e) mask or (B, H, c, e) scores


def test_backend_names_the_kernel():
    small = _inputs(1, 4, 2, 8, 24)[:3]
    large = [torch.empty(1, 4, n, 8) for n in (2048, 4096, 4096)]
    mask = causal_bias(8, 24, small[0])
    assert type(mask) is torch.Tensor and mask.shape == (8, 24)  # small chunks off CUDA: an explicit mask, as before
    assert attention_backend(*small, mask) in ("flash", "math")
    assert attention_backend(*small, None, softcap=2.0) == "eager"
    mask = causal_bias(2048, 4096, large[0])  # off CUDA, by default: an explicit mask for PyTorch's CPU kernel
    assert type(mask) is torch.Tensor and attention_backend(*large, mask) in ("flash", "memkit-chunked")
    assert attention_backend(*large, mask, softcap=2.0) == "memkit-chunked"  # eager would build (B, H, c, e) scores
    with chunked_attention_above(2**22):
        bias = causal_bias(2048, 4096, large[0])
        assert isinstance(bias, LowerRight) and (bias.c, bias.e) == (2048, 4096)  # nothing of (c, e) built
        assert attention_backend(*large, bias) == "memkit-chunked"
    with chunked_attention_above(0):
        assert attention_backend(*small, causal_bias(8, 24, small[0])) == "memkit-chunked"
    assert attention_mod.CHUNKED_ABOVE == 2**22  # restored


def test_long_chunks_plan_on_fake_tensors():
    """The planner runs the step under FakeTensorMode: the lower-right marker (torch's CausalBias, a Tensor subclass,
    cannot be created there) goes to the chunked kernel, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), chunked_attention_above(2**22):
        q = torch.randn(1, 4, 2048, 64, requires_grad=True)
        k, v = torch.randn(1, 2, 8192, 64, requires_grad=True), torch.randn(1, 2, 8192, 64, requires_grad=True)
        out = chunk_attention(q, k, v, causal_bias(2048, 8192, q))
        out.sum().backward()
        assert out.shape == q.shape and k.grad.shape == k.shape


def test_chunk_attention_dispatches_and_small_shapes_are_unchanged():
    q, k, v, _ = _inputs(1, 4, 2, 8, 24)
    mask = causal_bias(8, 24, q)
    before = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(chunk_attention(q, k, v, mask), before)  # bit for bit: the same SDPA call
    with chunked_attention_above(0):
        bias = causal_bias(8, 24, q)
        out = chunk_attention(q, k, v, bias)
        assert out.grad_fn.name().endswith("_ChunkedAttentionBackward")
        capped = chunk_attention(q, k, v, bias, scale=0.4, softcap=1.5)
        assert capped.grad_fn.name().endswith("_ChunkedAttentionBackward")
    torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(capped, _softcapped_attention(q, k, v, 0.4, 1.5), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    q, k, v, _ = _inputs(1, 3, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of K"):
        chunked_attention(q, k, v)
    q, k, v, _ = _inputs(1, 2, 2, 4, 8)
    with pytest.raises(ValueError, match="block_size=0"):
        chunked_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="pairs=-1"):
        with chunked_attention_above(-1):
            pass


def test_streambp_with_the_chunked_kernel_gives_sdpas_gradients():
    from lightning_memkit.sequence import sequence_loss
    from tests.models.test_llama import tiny_hf

    torch.manual_seed(0)
    hf = tiny_hf("llama").train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 101, (2, 30), generator=g)
    labels = torch.randint(0, 101, (2, 30), generator=g)

    def grads():
        hf.zero_grad(set_to_none=True)
        loss = sequence_loss(hf, ids, labels, method="streambp", chunk_size=8, shift=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in hf.named_parameters()}

    calls = []
    real = attention_mod._ChunkedAttention.apply

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    loss0, exact = grads()
    assert not calls
    attention_mod._ChunkedAttention.apply = counted
    try:
        with chunked_attention_above(0):
            loss, chunked = grads()
    finally:
        attention_mod._ChunkedAttention.apply = real
    assert calls  # the chunks after the first went through memkit's kernel
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    for name in exact:
        torch.testing.assert_close(chunked[name], exact[name], rtol=1e-4, atol=1e-6, msg=name)


def test_plain_causal_chunks_keep_sdpa_on_cpu():
    """c == e needs no mask: SDPA's is_causal kernel runs it whatever its size (on CPU its blocked 'flash' kernel)."""
    q, k = torch.empty(1, 4, 4096, 8), torch.empty(1, 2, 4096, 8)
    assert causal_bias(4096, 4096, q) is None
    assert attention_backend(q, k, k, None) == "flash"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_lower_right_chunks_on_flash_or_efficient():
    q, k, v, grad = (t.cuda() for t in _inputs(1, 4, 2, 64, 320, dim=64, dtype=torch.bfloat16))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    bias = causal_bias(64, 320, q)
    assert isinstance(bias, CausalBias)
    assert attention_backend(q, k, v, bias) in ("flash", "efficient")
    with chunked_attention_above(0):
        assert attention_backend(q, k, v, bias) in ("flash", "efficient")  # SDPA's fused kernels come first
    got, want = _both(lambda *a: chunk_attention(*a, bias), lambda *a: chunked_attention(*a, block_size=100),
                      q, k, v, grad)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["streambp", "seco"])
def test_gemma2_softcapped_attention_through_the_chunked_kernel_equals_its_own_backprop(method):
    """Every chunk (the first, c == e, included) through memkit's kernel with Gemma 2's attention softcap."""
    from lightning_memkit.sequence import sequence_loss
    from tests.sequence.test_families import CASES, _ids, _own, build

    model_type, overrides = CASES["gemma2"]
    hf = build(model_type, **overrides)
    exact_loss, exact = _own(hf)
    hf.zero_grad(set_to_none=True)
    with chunked_attention_above(0):
        loss = sequence_loss(hf, _ids(), _ids(), method=method, chunk_size=10, shift=True)
        loss.backward()
    torch.testing.assert_close(loss.detach(), exact_loss, rtol=1e-6, atol=1e-6)
    for name, p in hf.named_parameters():
        scale = exact[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(p.grad / scale, exact[name] / scale, rtol=0, atol=2e-6, msg=name)


def test_a_planned_step_counts_what_a_gpu_runs_no_mask():
    """Fake tensors (the planner's step, for a GPU): the lower-right bias stays mask-free, as CUDA's flash/efficient
    kernels take it, and SDPA's fused kernel runs (not memkit's Python-blocked kernel, slow on fake tensors): no
    (c, e) mask or scores are created, only the output and its softmax statistics."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.planner.tracker import CategoryTracker

    c, e = 2048, 24576
    with FakeTensorMode():
        q, k = torch.randn(1, 32, c, 128, dtype=torch.bfloat16), torch.randn(1, 8, e, 128, dtype=torch.bfloat16)
        with CategoryTracker() as tracker:
            bias = causal_bias(c, e, q)
            out = chunk_attention(q, k, k, bias)
        assert attention_backend(q, k, k, bias) == "flash"
        assert out.shape == q.shape
        assert tracker.peak < c * e  # nothing of the (c, e) size: less than one byte per query-key pair

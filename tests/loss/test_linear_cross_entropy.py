"""linear_cross_entropy against the fp32 reference: every implementation, option and reduction.

The rule: an implementation in a dtype may make no more error against the fp32 reference than
PyTorch's own materialized computation makes in that dtype, plus a small tolerance (the table).
"""

import pytest
import torch

from lightning_memkit.loss import linear_cross_entropy, reference_linear_cross_entropy

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# dtype -> extra tolerance, relative to the largest magnitude of the reference value
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2}

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.15},
    "softcap": {"softcap": 2.5},
    "z_loss": {"z_loss": 1e-2},
    "bias": {"bias": True},
    "all": {"label_smoothing": 0.1, "softcap": 3.0, "z_loss": 1e-3, "bias": True},
}

N, D, V = 37, 29, 83  # odd shapes, not powers of two
# CUDA where there is one (the Triton kernels compiled), else the CPU (Triton in its interpreter)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

triton_available = True
try:  # triton runs under TRITON_INTERPRET=1 on CPU (set in conftest)
    import triton  # noqa: F401
except Exception:  # pragma: no cover
    triton_available = False


def _inputs(dtype, with_bias, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g) if with_bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[::ignore_every] = -100
    return h.to(DEVICE), w.to(DEVICE), (b.to(DEVICE) if b is not None else None), t.to(DEVICE)


def _run(fn, h, w, b, t, dtype, grad_out, **kw):
    leaves = [h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()]
    if b is not None:
        leaves.append(b.to(dtype).requires_grad_())
    loss = fn(leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None, **kw)
    grads = torch.autograd.grad(loss, leaves, grad_out.to(loss.device))
    return [loss.detach().float()] + [g.float() for g in grads]


def _err(a, b):
    return (a - b).abs().max().item()


def _check_against_reference(impl, dtype, reduction, options, **extra):
    opts = dict(options)
    with_bias = opts.pop("bias", False)
    h, w, b, t = _inputs(dtype, with_bias)
    grad_out = torch.randn(N) if reduction == "none" else torch.tensor(1.7)

    def ref(*a, **k):
        return reference_linear_cross_entropy(*a, **k)

    kw = dict(reduction=reduction, **opts)
    exact = _run(ref, h, w, b, t, torch.float32, grad_out, **kw)
    baseline = _run(ref, h, w, b, t, dtype, grad_out, **kw)
    got = _run(lambda *a, **k: linear_cross_entropy(*a, impl=impl, **extra, **k), h, w, b, t, dtype, grad_out, **kw)
    names = ["loss", "d_hidden", "d_weight", "d_bias"]
    for name, e, base, g in zip(names, exact, baseline, got):
        allowed = _err(base, e) + TOLERANCE[dtype] * max(1.0, e.abs().max().item())
        assert _err(g, e) <= allowed, (
            f"{impl} {dtype} {reduction} {options}: {name} error {_err(g, e):.3g} > {allowed:.3g}")


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_matches_reference(dtype, reduction, options):
    _check_against_reference("chunked", dtype, reduction, options, chunk_size=8)


@pytest.mark.skipif(not triton_available, reason="triton is not installed")
@pytest.mark.parametrize("options", [OPTIONS["plain"], OPTIONS["all"]], ids=["plain", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(dtype, reduction, options):
    _check_against_reference("triton", dtype, reduction, options)


@pytest.mark.skipif(not triton_available, reason="triton is not installed")
def test_triton_several_vocabulary_slabs(monkeypatch):
    import lightning_memkit.kernels.linear_cross_entropy as kernels

    monkeypatch.setattr(kernels, "_slab_rows", lambda d: 32)  # V=83: three launches, the last partial
    _check_against_reference("triton", torch.bfloat16, "none", OPTIONS["all"])
    _check_against_reference("triton", torch.float32, "mean", OPTIONS["all"])


def test_chunked_low_precision_head_by_slabs(monkeypatch):
    import lightning_memkit.loss.chunked as chunked

    monkeypatch.setattr(chunked, "_slab_rows", lambda d: 16)  # V=83: six slabs
    for reduction in ("mean", "none"):
        _check_against_reference("chunked", torch.bfloat16, reduction, OPTIONS["all"], chunk_size=8)


@pytest.mark.skipif(not triton_available, reason="triton is not installed")
def test_triton_sum_smoothing_softcap_each():
    for options in (OPTIONS["smoothing"], OPTIONS["softcap"], OPTIONS["z_loss"], OPTIONS["bias"]):
        _check_against_reference("triton", torch.float32, "sum", options)


@pytest.mark.skipif(not triton_available, reason="triton is not installed")
def test_triton_gradient_filtering_is_close_and_documented_as_approximate():
    h, w, b, t = _inputs(torch.float32, False)
    exact = _run(lambda *a, **k: linear_cross_entropy(*a, impl="triton", **k), h, w, b, t,
                 torch.float32, torch.tensor(1.0))
    filtered = _run(lambda *a, **k: linear_cross_entropy(*a, impl="triton", filter_eps=2**-12, **k), h, w, b, t,
                    torch.float32, torch.tensor(1.0))
    assert torch.equal(exact[0], filtered[0])  # the loss is untouched
    for e, f in zip(exact[1:], filtered[1:]):
        assert _err(e, f) < 2**-12 * N  # each dropped entry is below filter_eps (scaled by 1/N here)


@pytest.mark.parametrize("impl", ["torch", "chunked"] + (["triton"] if triton_available else []))
def test_all_ignored_batch_has_pytorch_semantics(impl):
    h, w, _, _ = _inputs(torch.float32, False)
    t = torch.full((N,), -100, device=DEVICE)
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, t, reduction=reduction, impl=impl)
        assert (loss.isnan().item() if expected != expected else loss.item() == expected)
        loss.backward()
        assert torch.equal(hh.grad, torch.zeros_like(h)) and torch.equal(ww.grad, torch.zeros_like(w))
    none = linear_cross_entropy(h, w, t, reduction="none", impl=impl)
    assert torch.equal(none, torch.zeros(N, device=DEVICE))


@pytest.mark.parametrize("impl", ["chunked"] + (["triton"] if triton_available else []))
def test_shift_and_batch_shape(impl):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 9, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    labels = torch.randint(0, V, (2, 9), generator=g)
    h, w, labels = h.to(DEVICE), w.to(DEVICE), labels.to(DEVICE)
    got = linear_cross_entropy(h, w, labels, shift=True, reduction="none", impl=impl)
    assert got.shape == (2, 8)
    logits = (h @ w.t())[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(got.flatten(), expected, rtol=1e-5, atol=1e-5)


def test_auto_picks_chunked_on_cpu_and_no_grad_work_in_eval():
    h, w, _, t = _inputs(torch.float32, False)
    hh = h.clone().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hh, w, t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference_linear_cross_entropy(h, w, t))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"impl": "cuda"}, "impl='cuda' is not an implementation.*'chunked'"),
        ({"reduction": "avg"}, "reduction='avg'"),
        ({"softcap": 0.0}, "softcap=0.0 must be > 0"),
        ({"softcap": -1.0}, "softcap=-1.0 must be > 0"),
        ({"label_smoothing": 1.5}, "label_smoothing=1.5"),
        ({"z_loss": -1.0}, "z_loss=-1.0"),
        ({"filter_eps": 1e-3, "impl": "chunked"}, "filter_eps=0.001 needs impl='triton'"),
    ],
)
def test_bad_options(kwargs, match):
    h, w, _, t = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, t, **kwargs)


def test_bad_shapes_dtypes_and_targets():
    h, w, _, t = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match="does not match weight's D"):
        linear_cross_entropy(h[:, :-1], w, t)
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="must share one floating dtype"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="targets must be int64 or int32"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match=r"bias must be \(83,\)"):
        linear_cross_entropy(h, w, t, bias=torch.zeros(5))
    bad = t.clone()
    bad[3] = V
    with pytest.raises(ValueError, match=r"outside \[0, 83\) that are not ignore_index=-100 \(first: 83\)"):
        linear_cross_entropy(h, w, bad)
    bad[3] = -7
    with pytest.raises(ValueError, match="first: -7"):
        linear_cross_entropy(h, w, bad, impl="torch")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40), d=st.integers(1, 24), v=st.integers(2, 70), chunk=st.integers(1, 50),
    reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0.0, 0.3]),
    softcap=st.sampled_from([None, 1.5]), z_loss=st.sampled_from([0.0, 0.05]), bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16),
)
def test_chunked_property(n, d, v, chunk, reduction, smoothing, softcap, z_loss, bias, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    kw = dict(reduction=reduction, label_smoothing=smoothing, softcap=softcap, z_loss=z_loss)
    grad_out = torch.randn(n, dtype=torch.float32, generator=g) if reduction == "none" else torch.tensor(0.7)

    def grads(fn):
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        leaves += [b.clone().requires_grad_()] if bias else []
        loss = fn(leaves[0], leaves[1], t, bias=leaves[2] if bias else None, **kw)
        return [loss.detach()] + list(torch.autograd.grad(loss, leaves, grad_out.to(loss.dtype), allow_unused=True))

    ref = grads(lambda *a, **k: linear_cross_entropy(*a, impl="torch", **k))
    got = grads(lambda *a, **k: linear_cross_entropy(*a, impl="chunked", chunk_size=chunk, **k))
    for r, c in zip(ref, got):
        torch.testing.assert_close(c.double(), r.double(), rtol=2e-5, atol=2e-5, equal_nan=True)


def test_review_edge_cases(monkeypatch):
    h, w, _, t = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match="chunk_size=-1 must be an integer >= 1"):
        linear_cross_entropy(h, w, t, impl="chunked", chunk_size=-1)
    # int32 targets work in every implementation
    expected = linear_cross_entropy(h, w, t, impl="torch")
    for impl in ["torch", "chunked"] + (["triton"] if triton_available else []):
        torch.testing.assert_close(linear_cross_entropy(h, w, t.int(), impl=impl), expected)
    # filter_eps with "auto" on CPU: no Triton, so exact chunked gradients
    h, w, t, expected = h.cpu(), w.cpu(), t.cpu(), expected.cpu()
    torch.testing.assert_close(linear_cross_entropy(h, w, t, impl="auto", filter_eps=1e-4), expected)
    with pytest.raises(ValueError, match="impl='triton' takes float32, bfloat16 or float16"):
        linear_cross_entropy(h.double(), w.double(), t, impl="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        linear_cross_entropy(h, w, t, impl="triton")


def test_chunked_second_backward_is_a_clear_error():
    h, w, _, t = _inputs(torch.float32, False)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, t, impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="supports one backward pass per forward"):
        loss.backward()
    # reduction="none" recomputes, so it supports it
    per_token = linear_cross_entropy(hh, w, t, impl="chunked", reduction="none").sum()
    per_token.backward(retain_graph=True)
    per_token.backward()


def test_auto_resolution_per_device():
    from lightning_memkit.loss.linear_ce import resolve_impl

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_impl("auto", cpu, torch.bfloat16) == "chunked"
    # the chunked path is the faster exact one on CUDA too (H100 timings in docs/benchmarks.md)
    assert resolve_impl("auto", cuda, torch.bfloat16) == "chunked"
    # gradient filtering exists only in the Triton kernels
    assert resolve_impl("auto", cuda, torch.bfloat16, filter_eps=1e-4) == "triton"
    assert resolve_impl("auto", cuda, torch.float64, filter_eps=1e-4) == "chunked"
    assert resolve_impl("triton", cpu) == "triton"


def test_chunked_loss_under_a_bf16_default_dtype():
    """Lightning's bf16-true precision makes bf16 the default dtype inside the step; the chunked path's
    weight-gradient slabs once built a target mask in the default dtype and failed (found by memkit plan)."""
    from lightning_memkit.loss import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(258, 32, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 258, (64,))
    expected = linear_cross_entropy(h.float(), w.float(), t, impl="torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        loss = linear_cross_entropy(h, w, t, impl="chunked")
        loss.backward()
    finally:
        torch.set_default_dtype(previous)
    assert torch.allclose(loss, expected, rtol=2e-2) and torch.isfinite(w.grad.float()).all()

"""COSMOS: the update rule against a hand-written float64 reference of the authors' rule, resume, state bytes,
SVD failures, bad settings, and step in backward."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lightning_memkit.config import MemKitConfigError, parse_optimizer
from lightning_memkit.optim import OPTIMIZER_CLASSES, Cosmos
from lightning_memkit.optim.cosmos import newton_schulz, predicted_state_bytes
from tests.optim.helpers import assert_step_in_backward_is_exact, loss_of, make_batches, tiny_model

LR, BETAS, EPS, WD = 0.01, (0.9, 0.95), 1e-8, 0.1


def _grads(shape, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


def _ns_reference(x, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = x / (x.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        s = x @ x.T
        x = a * x + b * s @ x + c * s @ s @ x
    return x.T if tall else x


def _reference(w, grads, rank, gamma, ratio, nesterov=True, gap=1):
    """The authors' rule, written from the paper/code in float64 (sum-form momentum, eigenvectors by eigh)."""
    b1, b2 = BETAS
    w = w.double().clone()
    m_sum = torch.zeros_like(w)
    rows, cols = w.shape
    scale = math.sqrt(rows * cols)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m_sum = b1 * m_sum + g
        if t == 1:
            vals, vecs = torch.linalg.eigh(g.T @ g)
            p = vecs[:, vals.argsort(descending=True)[:rank]]
            s = (1 - b2) * (g @ p).T @ (g @ p)
            v = torch.zeros(rows, rank, dtype=torch.float64)
        elif (t - 1) % gap == 0:
            old = p
            p = torch.linalg.qr(b2 * old @ s + (1 - b2) * g.T @ (g @ old)).Q
            tt = old.T @ p
            s = b2 * tt.T @ s @ tt + (1 - b2) * (g @ p).T @ (g @ p)
        else:
            s = b2 * s + (1 - b2) * (g @ p).T @ (g @ p)
        v = b2 * v + (1 - b2) * (g @ p) ** 2
        bc1 = (1 - b1**t) / (1 - b1)
        g_t = (g + b1 * m_sum) / (1 + b1 * bc1) if nesterov else m_sum / bc1
        a = g_t @ p
        u1 = (a / ((v / (1 - b2**t)).sqrt() + EPS)) @ p.T
        o = _ns_reference(g_t - a @ p.T)
        u = u1 + gamma * scale * o / (o.norm() + EPS)
        w = w * (1 - LR * WD) - LR * ratio * scale * u / (u.norm() + EPS)
    return w


def _run(shape, grads, dtype=torch.float32, **kw):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype))
    start = w.detach().clone()
    opt = Cosmos([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return start, w, opt


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_cosmos_matches_the_reference_rule(shape, nesterov):
    grads = _grads(shape, 5)
    start, w, _ = _run(shape, grads, rank=3, scale=0.2, lr_ratio=0.5, nesterov=nesterov)
    expected = _reference(start, grads, 3, 0.2, 0.5, nesterov=nesterov)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(start, w.detach(), atol=1e-3)  # it moved


def test_cosmos_update_gap_keeps_the_basis_between_refreshes_float64():
    grads = _grads((7, 9), 5, dtype=torch.float64)
    start, w, opt = _run((7, 9), grads, dtype=torch.float64, rank=2, update_gap=2, lr_ratio=0.3)
    torch.testing.assert_close(w.detach(), _reference(start, grads, 2, 0.2, 0.3, gap=2), rtol=1e-5, atol=1e-5)
    assert opt.state[w]["projector"]["refreshes"] == 3  # steps 0, 2, 4
    assert opt.state[w]["exp_avg"].dtype == torch.float64  # the first moment in the weight's dtype


def test_newton_schulz_approximates_the_orthogonal_factor():
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g)
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.6 and sv.max() < 1.25  # the quintic's band around 1, as MUON
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.95
    torch.testing.assert_close(newton_schulz(g.T), o.T)


def test_cosmos_at_full_rank_has_no_muon_part():
    grads = _grads((5, 4), 3)
    a = _run((5, 4), grads, rank=4, scale=0.2)[1]
    b = _run((5, 4), grads, rank=4, scale=0.7)[1]
    assert torch.equal(a, b)  # the rest G̃ − G̃PPᵀ is zero: the MUON scale has nothing to scale


def test_cosmos_resumes_exactly():
    batches = make_batches(5)
    a = tiny_model()
    opt_a = Cosmos(a.parameters(), lr=0.01, rank=3, update_gap=2)
    for batch in batches[:3]:
        opt_a.zero_grad()
        loss_of(a, batch).backward()
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = tiny_model(seed=5)
    b.load_state_dict(saved["model"])
    opt_b = Cosmos(b.parameters(), lr=0.01, rank=3, update_gap=2)
    opt_b.load_state_dict(saved["optim"])
    for batch in batches[3:]:
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosmos_state_bytes_match_the_prediction(dtype):
    model = tiny_model().to(dtype)
    opt = Cosmos(model.parameters(), lr=0.01, rank=3)
    x, y = make_batches(1)[0]
    loss_of(model, (x.to(dtype), y.to(dtype))).backward()
    opt.step()
    predicted = sum(predicted_state_bytes(tuple(p.shape), dtype, rank=3, lowrank=p.ndim == 2)
                    for p in model.parameters())
    assert opt.state_bytes() == predicted
    assert predicted_state_bytes((16, 12), dtype) == predicted_state_bytes((16, 12), dtype, rank=12)  # min(64, m, n)


def test_cosmos_svd_failure_is_handled_as_galore():
    w = torch.nn.Parameter(torch.randn(6, 8))
    opt = Cosmos([w], rank=2)
    w.grad = torch.full((6, 8), float("nan"))
    with pytest.raises(RuntimeError, match="SVD of its gradient failed"):
        opt.step()  # no basis to keep: never a silent zero update
    w2 = torch.nn.Parameter(torch.randn(6, 8))
    opt2 = Cosmos([w2], rank=2)
    w2.grad = torch.randn(6, 8)
    opt2.step()
    basis = opt2.state[w2]["projector"]["basis"].clone()
    w2.grad = torch.full((6, 8), float("nan"))
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt2.step()
    assert torch.equal(opt2.state[w2]["projector"]["basis"], basis)


def test_cosmos_svd_retries_in_float64(monkeypatch):
    calls = []
    svd = torch.linalg.svd

    def flaky(x, *args, **kwargs):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("no convergence")
        return svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    w = torch.nn.Parameter(torch.randn(6, 8))
    opt = Cosmos([w], rank=2)
    w.grad = torch.randn(6, 8)
    opt.step()
    assert calls == [torch.float32, torch.float64] and torch.isfinite(w).all()


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=7), dict(update_gap=0), dict(scale=-1.0),
                                    dict(lr_ratio=0.0), dict(ns_steps=0), dict(nesterov="yes"),
                                    dict(scale=float("nan"))])
def test_cosmos_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        Cosmos([torch.nn.Parameter(torch.randn(6, 8))], **kwargs)


def test_cosmos_refuses_a_bad_group_setting():
    w, d = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(8))
    with pytest.raises(MemKitConfigError, match="lr_ratio"):
        Cosmos([{"params": [d]}, {"params": [w], "lr_ratio": 0.0}])


def test_cosmos_config_refuses_bad_settings_and_registers():
    assert OPTIMIZER_CLASSES["cosmos"] is Cosmos
    with pytest.raises(MemKitConfigError, match="optimizer.rank"):
        parse_optimizer({"name": "cosmos", "rank": 0})
    with pytest.raises(MemKitConfigError, match="history"):
        parse_optimizer({"name": "cosmos", "history": 3})


def test_cosmos_step_in_backward_gives_the_ordinary_parameters_exactly():
    assert_step_in_backward_is_exact(lambda params: Cosmos(params, lr=0.01, rank=3))

"""Natural GaLore: the Woodbury solve against a direct inverse, the update rule against a hand-written reference of
the authors' rule, resume, state bytes, SVD failures, bad settings, and step in backward."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_memkit.config import MemKitConfigError, parse_optimizer
from lightning_memkit.optim import OPTIMIZER_CLASSES, NaturalGaLore, NaturalGaLore8bit, StepInBackward
from lightning_memkit.optim.natural_galore import predicted_state_bytes, woodbury_natural_gradient
from lightning_memkit.optim.projectors import choose_side
from tests.optim.helpers import assert_step_in_backward_is_exact, loss_of, make_batches, tiny_model

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-6, 0.1


def _authors_natural_gradient(hist, g, lam):
    """λ⁻¹g − λ⁻²G(I + λ⁻¹GᵀG)⁻¹Gᵀg, G's columns the history (the current gradient included)."""
    big_g = torch.stack(hist, dim=1)
    s = torch.eye(len(hist), dtype=g.dtype) + big_g.T @ big_g / lam
    return g / lam - big_g @ torch.linalg.solve(s, big_g.T @ g) / lam**2


@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_woodbury_equals_the_direct_inverse_float64(lam):
    gen = torch.Generator().manual_seed(0)
    hist = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    for j in range(5):
        got = woodbury_natural_gradient(hist @ hist.T, hist, j, lam)
        direct = torch.linalg.solve(lam * torch.eye(30, dtype=torch.float64) + hist.T @ hist, hist[j])
        torch.testing.assert_close(got, direct, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got, _authors_natural_gradient(list(hist), hist[j], lam), rtol=1e-6, atol=1e-9)


def test_woodbury_push_through_form_is_more_accurate_in_fp32_than_the_authors_form():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=gen, dtype=torch.float64)
    hist = torch.stack([base + 0.1 * torch.randn(200, generator=gen, dtype=torch.float64) for _ in range(6)]).float()
    lam, h = 1e-3, hist.double()
    direct = torch.linalg.solve(lam * torch.eye(200, dtype=torch.float64) + h.T @ h, h[-1])
    got = woodbury_natural_gradient(hist @ hist.T, hist, 5, lam).double()
    authors = _authors_natural_gradient(list(hist), hist[5], lam).double()  # cancels two terms of size |g|/λ
    error = lambda x: float((x - direct).norm() / direct.norm())  # noqa: E731
    assert error(got) < 1e-4 < 1e-3 < error(authors)  # measured: 1.1e-5 vs 1.5e-2


def test_woodbury_falls_back_when_cholesky_fails():
    hist = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    gram = hist @ hist.T
    gram[0, 0] = -5.0  # not positive definite: rounding gone wild
    got = woodbury_natural_gradient(gram, hist, 1, 1e-3)
    assert torch.isfinite(got).all()


def _reference(w, grads, rank, scale, history, lam):
    """The authors' rule in float64: GaLore's basis (refreshed at step 0 only here), natural gradient of the
    projected gradient from the last ``history`` ones, Adam (torch's eps placement), decay first (memkit's)."""
    w = w.double().clone()
    left = choose_side(tuple(w.shape)) == "left"
    u, _, vh = torch.linalg.svd(grads[0].double(), full_matrices=False)
    p = u[:, :rank] if left else vh[:rank].T
    hist, m, v = [], 0, 0
    for t, g in enumerate(grads, 1):
        r = p.T @ g.double() if left else g.double() @ p
        hist = (hist + [r.reshape(-1)])[-history:]
        ng = _authors_natural_gradient(hist, r.reshape(-1), lam).view(r.shape)
        m = BETAS[0] * m + (1 - BETAS[0]) * ng
        v = BETAS[1] * v + (1 - BETAS[1]) * ng * ng
        n = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        w = w * (1 - LR * WD) - LR * scale * (p @ n if left else n @ p.T)
    return w


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _run(cls, shape, grads, **kw):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    start = w.detach().clone()
    opt = cls([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return start, w, opt


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
@pytest.mark.parametrize("lam", [1e-3, 1.0])
def test_natural_galore_matches_the_reference_rule(shape, lam):
    grads = _grads(shape, 6)  # history 3: the ring wraps twice
    start, w, opt = _run(NaturalGaLore, shape, grads, rank=3, scale=0.25, history=3, damping=lam, update_gap=100)
    expected = _reference(start, grads, 3, 0.25, 3, lam)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-4, atol=1e-5)
    assert opt.state[w]["fisher_count"] == 6


def test_natural_galore_differs_from_galore():
    from lightning_memkit.optim import GaLoreAdamW

    grads = _grads((6, 10), 3)
    natural = _run(NaturalGaLore, (6, 10), grads, rank=3, update_gap=100, damping=1e-3)[1]
    plain = _run(GaLoreAdamW, (6, 10), grads, rank=3, update_gap=100)[1]
    assert not torch.allclose(natural, plain, atol=1e-4)  # the Fisher changes steps 2 and 3


@pytest.mark.parametrize("cls", [NaturalGaLore, NaturalGaLore8bit])
def test_natural_galore_resumes_exactly(cls):
    batches = make_batches(6)
    a = tiny_model()
    opt_a = cls(a.parameters(), lr=0.01, rank=3, update_gap=2, history=2)
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
    opt_b = cls(b.parameters(), lr=0.01, rank=3, update_gap=2, history=2)
    opt_b.load_state_dict(saved["optim"])
    for batch in batches[3:]:
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("cls", [NaturalGaLore, NaturalGaLore8bit])
def test_natural_galore_state_bytes_match_the_prediction(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 80))  # 64x128: k 4096
    opt = cls(model.parameters(), lr=0.01, rank=32, history=4)
    torch.nn.functional.mse_loss(model(torch.randn(4, 128)), torch.randn(4, 80)).backward()
    opt.step()
    eight_bit = cls is NaturalGaLore8bit
    predicted = sum(predicted_state_bytes(tuple(p.shape), rank=32, history=4, eight_bit=eight_bit,
                                          lowrank=p.ndim == 2) for p in model.parameters())
    assert opt.state_bytes() == predicted
    if eight_bit:
        assert "exp_avg_q" in opt.state[model[0].weight] and "exp_avg" in opt.state[model[2].weight]  # 32*80 < 4096


def test_natural_galore_svd_failure_is_handled_as_galore(monkeypatch):
    w = torch.nn.Parameter(torch.randn(6, 8))
    opt = NaturalGaLore([w], rank=2, update_gap=1)
    w.grad = torch.full((6, 8), float("nan"))
    with pytest.raises(RuntimeError, match="SVD of its gradient failed"):
        opt.step()
    w2 = torch.nn.Parameter(torch.randn(6, 8))
    opt2 = NaturalGaLore([w2], rank=2, update_gap=1)
    w2.grad = torch.randn(6, 8)
    opt2.step()
    basis = opt2.state[w2]["projector"]["basis"].clone()

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(torch.linalg, "svd", failing)
    w2.grad = torch.randn(6, 8)
    with pytest.warns(UserWarning, match="keeping the previous projection basis"):
        opt2.step()
    assert torch.equal(opt2.state[w2]["projector"]["basis"], basis) and torch.isfinite(w2).all()


@pytest.mark.parametrize("kwargs", [dict(history=0), dict(history=2.5), dict(history=True), dict(damping=0.0),
                                    dict(damping=-1e-3), dict(damping=float("nan")), dict(rank=7),
                                    dict(update_gap=0), dict(scale=0.0)])
def test_natural_galore_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        NaturalGaLore([torch.nn.Parameter(torch.randn(6, 8))], **kwargs)


def test_natural_galore_refuses_a_bad_group_setting():
    w, d = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(8))
    with pytest.raises(MemKitConfigError, match="damping"):
        NaturalGaLore([{"params": [d]}, {"params": [w], "damping": 0.0}])


def test_natural_galore_config_and_registry():
    assert OPTIMIZER_CLASSES["natural_galore"] is NaturalGaLore
    assert OPTIMIZER_CLASSES["natural_galore8bit"] is NaturalGaLore8bit
    for bad in ({"history": 0}, {"damping": 0}):
        with pytest.raises(MemKitConfigError):
            parse_optimizer({"name": "natural_galore", **bad})


@pytest.mark.parametrize("cls", [NaturalGaLore, NaturalGaLore8bit])
def test_natural_galore_step_in_backward_gives_the_ordinary_parameters_exactly(cls):
    assert_step_in_backward_is_exact(lambda params: cls(params, lr=0.01, rank=3, history=2))


def test_natural_galore_accumulates_projected_gradients_in_backward():
    a, b = tiny_model(), tiny_model()
    opt_a = NaturalGaLore(a.parameters(), lr=0.01, rank=3, history=2, update_gap=100)
    opt_b = StepInBackward(NaturalGaLore(b.parameters(), lr=0.01, rank=3, history=2, update_gap=100))
    for step, (x, y) in enumerate(make_batches(3)):
        opt_a.zero_grad()
        torch.nn.functional.mse_loss(a(x), y).backward()
        opt_a.step()
        if step == 0:  # the basis comes from the first full gradient in both runs
            opt_b.step(lambda: torch.nn.functional.mse_loss(b(x), y).backward())
            continue
        torch.nn.functional.mse_loss(b(x[:4]), y[:4]).div(2).backward()
        assert b[0].weight.grad is None  # projected and freed
        opt_b.step(lambda: torch.nn.functional.mse_loss(b(x[4:]), y[4:]).div(2).backward())
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)

"""One or two steps of each optimizer against a hand-written reference of the paper's rule."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_memkit.optim import AdamW, Apollo, ApolloMini, Frugal, GaLoreAdamW, GaLoreAdamW8bit
from lightning_memkit.optim.projectors import RandomProjector, projection_seed, robust_svd_basis

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-8, 0.1


def _grads(shape, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _run(opt_cls, shape, grads, **kw):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    opt = opt_cls([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt, w


def _adam(r, m, v, t):
    m = BETAS[0] * m + (1 - BETAS[0]) * r
    v = BETAS[1] * v + (1 - BETAS[1]) * r * r
    n = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
    return n, m, v


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)], ids=["left", "right", "square"])
def test_galore_matches_reference(shape):
    rank, scale = 3, 0.25
    grads = _grads(shape)
    got, _, _ = _run(GaLoreAdamW, shape, grads, rank=rank, scale=scale, update_gap=10)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(grads[0], full_matrices=False)  # basis from the first gradient, kept
    left = shape[0] < shape[1]  # a square weight projects the right side
    p = u[:, :rank] if left else vh[:rank].t()
    m = v = 0
    for t, g in enumerate(grads, 1):
        r = p.t() @ g if left else g @ p
        n, m, v = _adam(r, m, v, t)
        w = w * (1 - LR * WD) - LR * scale * (p @ n if left else n @ p.t())
    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def test_galore_refreshes_its_basis_every_update_gap_steps():
    grads = _grads((6, 10), steps=5)
    _, opt, w = _run(GaLoreAdamW, (6, 10), grads, rank=2, update_gap=2)
    state = opt.state[w]["projector"]
    assert state["refreshes"] == 3  # steps 0, 2, 4
    expected = torch.linalg.svd(grads[4], full_matrices=False)[0][:, :2]
    torch.testing.assert_close(state["basis"].abs(), expected.abs())  # signs of singular vectors are arbitrary


@pytest.mark.parametrize("limiter_on", ["raw", "corrected"])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)], ids=["left", "right", "square"])
def test_apollo_matches_reference(shape, scale_type, limiter_on):
    rank, scale, gamma = 3, 4.0, 1.01
    grads = _grads(shape, steps=3)
    grads[2] = grads[2] * 5  # a jump the norm-growth limiter must cap
    got, opt, param = _run(Apollo, shape, grads, rank=rank, scale=scale, scale_type=scale_type, update_gap=10,
                           norm_growth_limit=gamma, limiter_on=limiter_on, seed=7)
    proj = opt.projector(param)
    assert "basis" not in opt.state[param]["projector"]  # regenerated from the seed, never stored
    left = shape[0] < shape[1]  # a square weight projects the right side
    rows = shape[0] if left else shape[1]
    seed = projection_seed(projection_seed(7, 0, 0), 0, 1)
    p = torch.randn(rows, rank, generator=torch.Generator().manual_seed(seed)) / math.sqrt(rank)
    torch.testing.assert_close(proj.basis(torch.device("cpu")), p)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    m = v = 0
    last = None
    for t, g in enumerate(grads, 1):
        r = p.t() @ g if left else g @ p
        n, m, v = _adam(r, m, v, t)
        if scale_type == "tensor":
            s = n.norm() / (r.norm() + 1e-8)
        elif left:  # one factor per column (the kept dimension n)
            s = n.norm(dim=0) / (r.norm(dim=0) + 1e-8)
        else:  # one factor per row
            s = (n.norm(dim=1) / (r.norm(dim=1) + 1e-8))[:, None]
        u = g * s
        # "raw": the limiter watches the update before bias correction (apollo-torch); "corrected": after it
        c = (1 - BETAS[0] ** t) / math.sqrt(1 - BETAS[1] ** t) if limiter_on == "raw" else 1.0
        if last is not None and c * u.norm() > gamma * last:
            u = u * (gamma * last / (c * u.norm()))
        last = c * u.norm()
        w = w * (1 - LR * WD) - LR * math.sqrt(scale) * u
    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def test_apollo_mini_is_rank_one_tensor_wise_with_scale_128():
    opt = ApolloMini([torch.nn.Parameter(torch.zeros(4, 8))])
    group = opt.param_groups[0]
    assert (group["rank"], group["scale_type"], group["scale"]) == (1, "tensor", 128.0)


@pytest.mark.parametrize("state_free", ["signsgd", "sgd"])
def test_frugal_matches_reference(state_free):
    shape, rank, free = (6, 10), 2, 0.5
    grads = _grads(shape, steps=2)
    got, _, _ = _run(Frugal, shape, grads, rank=rank, update_gap=10, state_free=state_free, free_lr_scale=free)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    p = torch.linalg.svd(grads[0], full_matrices=False)[0][:, :rank]
    m = v = 0
    for t, g in enumerate(grads, 1):
        r = p.t() @ g
        n, m, v = _adam(r, m, v, t)
        resid = g - p @ r
        resid = resid.sign() if state_free == "signsgd" else resid
        w = w * (1 - LR * WD) - LR * (p @ n + free * resid)
    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def test_frugal_resets_moments_when_the_basis_changes():
    grads = _grads((6, 10), steps=3)
    _, opt, w = _run(Frugal, (6, 10), grads, rank=2, update_gap=2)
    assert opt.state[w]["moment_step"] == 1  # reset at step 2
    _, opt, w = _run(Frugal, (6, 10), grads, rank=2, update_gap=2, reset_on_refresh=False)
    assert opt.state[w]["moment_step"] == 3


def test_memkit_adamw_equals_torch_adamw_bit_for_bit():
    grads = _grads((5, 7), steps=3)
    got, _, _ = _run(AdamW, (5, 7), grads)
    w = torch.nn.Parameter(torch.randn((5, 7), generator=torch.Generator().manual_seed(1)))
    ref = torch.optim.AdamW([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for g in grads:
        w.grad = g.clone()
        ref.step()
    assert torch.equal(got, w.detach())


def test_dense_parameters_of_low_rank_optimizers_use_adamw():
    bias = torch.nn.Parameter(torch.randn(7))
    weight = torch.nn.Parameter(torch.randn(7, 9))
    opt = GaLoreAdamW([weight, bias], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rank=2)
    ref_bias = torch.nn.Parameter(bias.detach().clone())
    ref = torch.optim.AdamW([ref_bias], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for g in _grads((7,), steps=2):
        bias.grad, weight.grad, ref_bias.grad = g.clone(), torch.randn(7, 9), g.clone()
        opt.step()
        ref.step()
    assert opt.is_lowrank(weight) and not opt.is_lowrank(bias)
    assert torch.equal(bias.detach(), ref_bias.detach())


def test_galore_8bit_tracks_fp32_galore_and_stores_uint8():
    shape = (64, 128)  # rank x max(m, n) = 8 x 128 = 1024 < 4096: make the moments big enough for 8 bits
    grads = _grads(shape, steps=4)
    w32, _, _ = _run(GaLoreAdamW, shape, grads, rank=40, update_gap=10)
    w8, opt, param = _run(GaLoreAdamW8bit, shape, grads, rank=40, update_gap=10)
    state = opt.state[param]
    assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_sq_q"].dtype == torch.uint8
    assert "exp_avg" not in state
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    moved = (w32 - start).abs().max()
    assert (w8 - w32).abs().max() < 0.05 * moved  # 8-bit moments: within 5% of the fp32 run's movement


def test_bitsandbytes_adamw8bit_by_name_tracks_torch_adamw():
    from lightning_memkit.optim.eight_bit import bnb_optimizer

    w = torch.nn.Parameter(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)))
    ref = torch.nn.Parameter(w.detach().clone())
    opt = bnb_optimizer("adamw8bit", [{"params": [w]}], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    torch_opt = torch.optim.AdamW([ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for g in _grads((64, 128), steps=3):
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    assert opt.state[w]["state1"].dtype == torch.uint8
    assert (w - ref).abs().max() < 0.05 * 3 * LR


def test_robust_svd_retries_then_keeps_the_previous_basis(monkeypatch):
    from lightning_memkit.optim.projectors import SVDProjector

    g = torch.randn(6, 10)
    real_svd = torch.linalg.svd
    calls = {"n": 0}

    def flaky(x, full_matrices=True):
        calls["n"] += 1
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_svd(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    basis = robust_svd_basis(g, 2, "left")  # float32 fails, float64 succeeds
    torch.testing.assert_close(basis.abs(), real_svd(g, full_matrices=False)[0][:, :2].abs())
    assert calls["n"] == 2

    state: dict = {}
    proj = SVDProjector(state, (6, 10), 2, 1)
    proj.refresh(g, 0)
    kept = state["basis"].clone()
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("no")))
    with pytest.warns(UserWarning, match="keeping the previous projection basis"):
        proj.refresh(g, 1)
    assert torch.equal(state["basis"], kept) and state["refreshes"] == 2
    with pytest.raises(RuntimeError, match="no earlier basis"):
        SVDProjector({}, (6, 10), 2, 1).refresh(g, 0, "blocks.0.q.weight")


def test_random_projector_basis_depends_only_on_seed_and_refresh():
    a = RandomProjector({}, (6, 10), 3, 5, seed=11)
    b = RandomProjector({}, (6, 10), 3, 5, seed=11)
    a.refresh(None, 0)
    b.refresh(None, 0)
    assert torch.equal(a.basis(torch.device("cpu")), b.basis(torch.device("cpu")))
    b.refresh(None, 5)
    assert not torch.equal(a.basis(torch.device("cpu")), b.basis(torch.device("cpu")))


def test_dense_updates_in_slices_change_no_value(monkeypatch):
    import lightning_memkit.optim.base as base

    grads = _grads((33, 129), steps=3)  # 4257 values: >= 4096, so 8-bit moments
    whole = [_run(AdamW, (33, 129), grads)[0], _run(GaLoreAdamW8bit, (33, 129), grads, rank=2, lowrank_params=[])[0]]
    monkeypatch.setattr(base, "DENSE_CHUNK", 1024)  # five slices, whole 8-bit blocks each
    sliced = [_run(AdamW, (33, 129), grads)[0], _run(GaLoreAdamW8bit, (33, 129), grads, rank=2, lowrank_params=[])[0]]
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


def test_svd_out_of_memory_is_not_retried(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.linalg, "svd", oom)
    with pytest.raises(torch.OutOfMemoryError):
        robust_svd_basis(torch.randn(6, 10), 2, "left")


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)], ids=["left", "right", "square"])
def test_frugal_random_projection_is_orthonormal_and_matches_reference(shape):
    rank = 2
    grads = _grads(shape, steps=2)
    got, opt, param = _run(Frugal, shape, grads, rank=rank, update_gap=10, proj="random", state_free="sgd", seed=3)
    p = opt.projector(param).basis(torch.device("cpu"))
    torch.testing.assert_close(p.t() @ p, torch.eye(rank), atol=1e-5, rtol=0)
    left = shape[0] < shape[1]  # a square weight projects the right side
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    m = v = 0
    for t, g in enumerate(grads, 1):
        r = p.t() @ g if left else g @ p
        n, m, v = _adam(r, m, v, t)
        full = p @ n if left else n @ p.t()
        resid = g - (p @ r if left else r @ p.t())
        w = w * (1 - LR * WD) - LR * (full + resid)
    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)

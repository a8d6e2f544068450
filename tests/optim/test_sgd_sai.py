"""SGD-SaI: the update rule against a hand-written reference of the paper's rule (gSNR scales fixed at the first
step, normalized by their maximum as in the authors' v1.0.4), the authors' PyPI package where installed, the step in
backward, exact resume, state bytes, bad input."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_memkit.config import MemKitConfigError, OptimizerConfig, parse_optimizer
from lightning_memkit.optim import SGDSaI, StepInBackward
from lightning_memkit.optim import base as optim_base
from lightning_memkit.optim.memory import predict_state_bytes
from lightning_memkit.optim.sgd_sai import gsnr
from tests.optim.helpers import mixed_dtype_loss as _loss
from tests.optim.helpers import mixed_dtype_model as _model

LR, MU, EPS, WD = 0.05, 0.9, 1e-8, 0.1
SHAPES = [(6, 10), (10,), (2,), (3, 4, 5)]


def _params():
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(steps):
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(s, generator=g) * (1 + i) + 0.3 * i for i, s in enumerate(SHAPES)] for _ in range(steps)]


def _run(grads, params=None, **kw):
    params = params or _params()
    opt = SGDSaI(params, lr=LR, betas=(MU, 0.999), eps=EPS, weight_decay=WD, **kw)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _reference(grads):
    """The rule written out: gSNR_i = ||g_i|| / (std(g_i) + eps) at step 1, lr_i = lr gSNR_i / max_j gSNR_j."""
    params = [p.detach().clone() for p in _params()]
    snr = []
    for g in grads[0]:
        std = g.std() if g.numel() > 1 else torch.tensor(0.0)
        snr.append(float(g.norm() / (std + EPS)))
    bufs = [None] * len(params)
    for step in grads:
        for i, g in enumerate(step):
            bufs[i] = g.clone() if bufs[i] is None else MU * bufs[i] + (1 - MU) * g
            params[i] = params[i] * (1 - LR * WD) - LR * snr[i] / max(snr) * bufs[i]
    return params, snr


def test_matches_the_rule_with_scales_fixed_at_the_first_step():
    grads = _grads(6)
    got, opt = _run(grads)
    expected, snr = _reference(grads)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    assert opt.max_gsnr == pytest.approx(max(snr), rel=1e-6)
    assert max(snr) / min(snr) > 2  # the tensors get different scales
    later = _grads(7)  # the scales are fixed: changing the gradients after step 1 does not change them
    later[1:] = [[g * 100 for g in step] for step in later[1:]]
    _, opt2 = _run(later)
    assert [opt2.state[p]["gsnr"] for p in opt2.state] == [opt.state[p]["gsnr"] for p in opt.state]


def test_a_one_entry_tensor_has_std_zero_as_in_the_authors_code():
    assert gsnr(torch.tensor([-0.5]), EPS) == pytest.approx(0.5 / EPS)


def test_large_tensors_compute_the_gsnr_in_slices_like_torch(monkeypatch):
    g = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    whole = gsnr(g, EPS)
    monkeypatch.setattr("lightning_memkit.optim.sgd_sai.DENSE_CHUNK", 1024)
    assert gsnr(g, EPS) == pytest.approx(whole, rel=1e-6)
    assert gsnr(g.bfloat16(), EPS) == pytest.approx(float(g.bfloat16().float().norm() / g.bfloat16().float().std()),
                                                    rel=1e-5)
    assert optim_base.DENSE_CHUNK > 1024


def test_matches_the_authors_pypi_package_up_to_its_missing_normalization():
    """sgd-sai 1.0.3 (PyPI) steps by lr·gSNR; v1.0.4 (the authors' GitHub, which memkit follows) by lr·gSNR/max. So
    memkit with (lr, wd) equals the package with (lr/max, wd·max)."""
    sgd_sai = pytest.importorskip("sgd_sai")
    grads = _grads(5)
    ours, opt = _run(grads)
    params = _params()
    theirs = sgd_sai.SGD_sai(params, lr=LR / opt.max_gsnr, momentum=MU, eps=EPS, weight_decay=WD * opt.max_gsnr)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        theirs.step()
    for a, b in zip(ours, params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_step_in_backward_defers_the_first_step_and_gives_the_ordinary_parameters_exactly():
    a, b = _model(), _model()
    opt_a = SGDSaI(a.parameters(), lr=0.05)
    opt_b = StepInBackward(SGDSaI(b.parameters(), lr=0.05))
    for i in range(5):
        opt_a.zero_grad()
        _loss(a, i).backward()
        opt_a.step()
        opt_b.step(lambda: _loss(b, i).backward())
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb), i
        assert all(p.grad is None for p in b.parameters())


def test_a_parameter_first_trained_later_uses_the_first_steps_maximum():
    params = _params()
    opt = SGDSaI(params, lr=LR, weight_decay=0.0)
    for p, g in zip(params[:2], _grads(1)[0][:2]):
        p.grad = g
    opt.step()
    before = params[3].detach().clone()
    params[3].grad = torch.ones(3, 4, 5) + torch.arange(60.0).view(3, 4, 5)
    opt.step()
    expected = before - LR * gsnr(params[3].grad, 1e-8) / opt.max_gsnr * params[3].grad
    torch.testing.assert_close(params[3].detach(), expected)


def test_resume_from_a_weights_only_state_dict_is_exact():
    a = _model()
    opt_a = SGDSaI(a.parameters(), lr=0.05)
    for i in range(3):
        opt_a.zero_grad()
        _loss(a, i).backward()
        opt_a.step()
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = _model()
    b.load_state_dict(saved["model"])
    opt_b = SGDSaI(b.parameters(), lr=0.05)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.max_gsnr == opt_a.max_gsnr  # not recomputed from the first gradient after the resume
    for model, opt in ((a, opt_a), (b, opt_b)):
        for i in range(3, 6):
            opt.zero_grad()
            _loss(model, i).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_bytes_are_as_predicted_and_half_of_adamw():
    model = _model()
    opt = SGDSaI(model.parameters())
    opt.zero_grad()
    _loss(model, 0).backward()
    opt.step()
    params = [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]
    predicted = predict_state_bytes(params, OptimizerConfig(name="sgd_sai"))
    assert opt.state_bytes() == predicted
    assert 2 * predicted == predict_state_bytes(params, OptimizerConfig(name="adamw"))


def test_plans_on_fake_tensors():
    from lightning_memkit.memory import fake_training_step

    adamw = fake_training_step("tiny", seq_len=32, optimizer="adamw")
    sai = fake_training_step("tiny", seq_len=32, optimizer={"name": "sgd_sai", "in_backward": True})
    assert 2 * sai.by_category["optimizer_state"] == adamw.by_category["optimizer_state"]
    assert sai.peak < adamw.peak


def test_bad_input_is_refused():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no low-rank rule"):
        SGDSaI([w], lowrank_params=[w])
    with pytest.raises(MemKitConfigError, match=r"betas\[0\]=1.0"):
        SGDSaI([w], betas=(1.0, 0.999))
    with pytest.raises(MemKitConfigError, match="optimizer.density=0.5 does not apply to optimizer 'sgd_sai'"):
        parse_optimizer({"name": "sgd_sai", "density": 0.5})
    assert parse_optimizer({"name": "sgd_sai", "in_backward": True}).in_backward

"""SPAM: the update rule against a hand-written reference of the paper's rule (and the pieces of the authors'
code: their cosine warm-up is torch's CosineAnnealingLR), sparse momentum, exact resume, state bytes, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lightning_memkit.config import MemKitConfigError, OptimizerConfig, parse_optimizer
from lightning_memkit.optim import SPAM, StepInBackward
from lightning_memkit.optim.memory import predict_state_bytes
from lightning_memkit.optim.spam import sparse_count, warmup_scale
from tests.optim.helpers import mixed_dtype_loss as _loss
from tests.optim.helpers import mixed_dtype_model as _model

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-8, 0.1
RULE = dict(reset_interval=10, reset_warmup=4, spike_threshold=50.0, clip_delay=3)


def _grads(shape, steps, seed=0, spikes=()):
    """Gradients with entries blown up 1000x at the ``spikes`` steps (0-based)."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=g) for _ in range(steps)]
    for t in spikes:
        grads[t].view(-1)[::3] *= 1000.0
    return grads


def _weight(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _run(grads, shape, lowrank=False, **kw):
    w = torch.nn.Parameter(_weight(shape))
    opt = SPAM([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, lowrank_params=[w] if lowrank else [], **kw)
    masks = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        index = opt.state[w].get("index")
        masks.append(None if index is None else torch.zeros(w.numel(), dtype=torch.bool).index_fill_(
            0, index.long(), True).view(shape))
    return w.detach(), opt, masks


def _reference(grads, shape, reset_interval, reset_warmup, spike_threshold, clip_delay, masks=None):
    """The paper's Algorithm 1 written out on whole tensors (masks: the sparse entries of each step, or None)."""
    w = _weight(shape)
    m = v = torch.zeros(shape)
    clipped = 0
    for t, g in enumerate(grads, 1):
        w = w * (1 - LR * WD)
        if t % reset_interval == 0:
            m, v = torch.zeros(shape), torch.zeros(shape)
        if spike_threshold and t >= clip_delay and t % reset_interval >= clip_delay:
            spike = g * g > spike_threshold * v
            clipped += int(spike.sum())
            g = torch.where(spike, g.sign() * (spike_threshold * v).sqrt(), g)
        keep = torch.ones(shape, dtype=torch.bool) if masks is None else masks[t - 1]
        m = torch.where(keep, BETAS[0] * m + (1 - BETAS[0]) * g, 0.0)
        v = torch.where(keep, BETAS[1] * v + (1 - BETAS[1]) * g * g, 0.0)
        c = t % reset_interval
        ramp = 1 - 0.99 * (1 + math.cos(math.pi * c / (reset_warmup + 1))) / 2
        s = 1.0 if t < reset_interval or c >= reset_warmup else ramp
        update = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        w = w - LR * s * torch.where(keep, update, 0.0)
    return w, clipped


def test_dense_spam_matches_the_papers_rule_through_resets_warmups_and_spikes():
    grads = _grads((6, 10), steps=35, spikes=(12, 24, 31))
    got, opt, _ = _run(grads, (6, 10), **RULE)
    expected, clipped = _reference(grads, (6, 10), **RULE)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert clipped > 20  # the spikes were clipped (so the test covers the clipping)
    no_clip, _ = _reference(grads, (6, 10), **{**RULE, "spike_threshold": 0.0})
    assert (no_clip - expected).abs().max() > 1e-2  # and clipping changed the result
    no_reset, _ = _reference(grads, (6, 10), **{**RULE, "reset_interval": 1000})
    assert (no_reset - expected).abs().max() > 1e-3


def test_warmup_is_the_authors_cosine_decay_of_torch_cosine_annealing():
    """The authors' multiplier is 1 - CosineAnnealingLR(base 0.99, T_max=W+1) at c steps after a reset, 1 from c=W."""
    warmup, interval = 150, 500
    holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.99)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(holder, warmup + 1, 0.0)
    for c in range(warmup + 5):
        expected = 1 - holder.param_groups[0]["lr"] if c < warmup else 1.0
        assert warmup_scale(interval + c, interval, warmup) == pytest.approx(expected, abs=1e-9), c
        assert warmup_scale(3 * interval + c, interval, warmup) == pytest.approx(expected, abs=1e-9)
        holder.step()
        scheduler.step()
    assert warmup_scale(interval - 1, interval, warmup) == 1.0 and warmup_scale(1, interval, warmup) == 1.0
    assert warmup_scale(interval, interval, warmup) == pytest.approx(0.01)


def test_authors_clipping_bound_is_sqrt_theta_v_of_the_previous_second_moment():
    """One spike after steady steps: the clipped entry enters the moments as sign(g)·√(θ·v_prev)."""
    shape, theta = (4, 4), 5.0
    grads = [torch.full(shape, 0.1) for _ in range(5)] + [torch.full(shape, -100.0)]
    _, opt, _ = _run(grads[:5], shape, reset_interval=1000, reset_warmup=0, spike_threshold=theta, clip_delay=1)
    w = next(iter(opt.state))
    v_prev = opt.state[w]["exp_avg_sq"].clone()
    m_prev = opt.state[w]["exp_avg"].clone()
    w.grad = grads[5].clone()
    opt.step()
    g = -(theta * v_prev).sqrt()
    torch.testing.assert_close(opt.state[w]["exp_avg"], BETAS[0] * m_prev + (1 - BETAS[0]) * g)


def test_sparse_momentum_keeps_moments_on_a_fixed_count_mask_renewed_at_each_reset():
    shape, density = (8, 12), 0.25
    grads = _grads(shape, steps=25, spikes=(15,))
    got, opt, masks = _run(grads, shape, lowrank=True, density=density, seed=3, **RULE)
    k = sparse_count(96, density)
    assert k == 24 and all(int(mk.sum()) == k for mk in masks)
    state = opt.state[next(iter(opt.state))]
    assert state["exp_avg"].shape == (k,) and state["exp_avg"].dtype == torch.float32
    assert state["index"].dtype == torch.int32 and torch.equal(state["index"], state["index"].sort().values)
    assert torch.equal(masks[0], masks[8]) and not torch.equal(masks[8], masks[9])  # renewed at step 10
    assert torch.equal(masks[9], masks[18]) and not torch.equal(masks[18], masks[19])  # and at step 20
    expected, _ = _reference(grads, shape, **RULE, masks=masks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    _, again, masks_again = _run(grads, shape, lowrank=True, density=density, seed=3, **RULE)
    assert all(torch.equal(a, b) for a, b in zip(masks, masks_again))  # masks come from the seed
    _, _, other = _run(grads, shape, lowrank=True, density=density, seed=4, **RULE)
    assert not torch.equal(masks[0], other[0])


def test_sparse_momentum_of_a_transposed_weight_equals_the_contiguous_one():
    shape, settings = (8, 12), dict(density=0.3, **RULE)
    grads = _grads(shape, steps=12)
    plain, _, _ = _run(grads, shape, lowrank=True, **settings)
    w = torch.nn.Parameter(_weight(shape).t().contiguous().t())  # same values, column-major storage
    opt = SPAM([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, lowrank_params=[w], **settings)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert not w.is_contiguous() and torch.equal(w.detach(), plain)


def test_sparse_momentum_plans_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.nn.Parameter(torch.randn(64, 32))
        opt = SPAM([w], lowrank_params=[w], density=0.25)
        w.grad = torch.randn(64, 32)
        opt.step()
        assert opt.state[w]["exp_avg"].shape == (512,)


def test_density_one_is_dense_even_for_chosen_weights():
    grads = _grads((6, 10), steps=12)
    dense, _, _ = _run(grads, (6, 10), **RULE)
    chosen, opt, masks = _run(grads, (6, 10), lowrank=True, density=1.0, **RULE)
    assert torch.equal(dense, chosen) and masks[-1] is None and not opt._lowrank


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_resume_from_a_weights_only_state_dict_is_exact(density):
    settings = dict(reset_interval=6, reset_warmup=3, spike_threshold=5.0, clip_delay=2, density=density)
    a = _model()
    opt_a = SPAM(a.parameters(), lr=0.01, lowrank_params=[a[0].weight], **settings)
    _train(a, opt_a, 8)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = _model()
    b.load_state_dict(saved["model"])
    opt_b = SPAM(b.parameters(), lr=0.01, lowrank_params=[b[0].weight], **settings)
    opt_b.load_state_dict(saved["opt"])
    _train(a, opt_a, 7, start=8)  # crosses the reset at step 12
    _train(b, opt_b, 7, start=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="reset_interval"):
        SPAM(_model().parameters(), **{**settings, "reset_interval": 7}).load_state_dict(saved["opt"])


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_step_in_backward_gives_the_ordinary_step_exactly(density):
    settings = dict(reset_interval=5, reset_warmup=2, spike_threshold=5.0, clip_delay=2, density=density)
    a, b = _model(), _model()
    opt_a = SPAM(a.parameters(), lr=0.01, lowrank_params=[a[0].weight], **settings)
    opt_b = StepInBackward(SPAM(b.parameters(), lr=0.01, lowrank_params=[b[0].weight], **settings))
    _train(a, opt_a, 12)
    for i in range(12):
        opt_b.step(lambda: _loss(b, i).backward())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
def test_state_bytes_are_as_predicted(density):
    model = _model()
    names = {p: n for n, p in model.named_parameters()}
    opt = SPAM(model.parameters(), lowrank_params=[model[0].weight, model[2].weight], density=density)
    _train(model, opt, 2)
    params = [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]
    config = OptimizerConfig(name="spam", density=density)
    predicted = predict_state_bytes(params, config, lowrank={names[model[0].weight], names[model[2].weight]})
    assert opt.state_bytes() == predicted
    dense = predict_state_bytes(params, OptimizerConfig(name="adamw"))
    assert (predicted == dense) if density == 1.0 else predicted < dense


@pytest.mark.parametrize("kwargs, fragment", [
    ({"density": 0.0}, "optimizer.density=0.0"),
    ({"density": 1.5}, "optimizer.density=1.5"),
    ({"reset_interval": 0}, "optimizer.reset_interval=0"),
    ({"reset_interval": 100, "reset_warmup": 150}, "optimizer.reset_warmup=150"),
    ({"spike_threshold": -1.0}, "optimizer.spike_threshold=-1.0"),
    ({"spike_threshold": float("nan")}, "optimizer.spike_threshold=nan"),
    ({"seed": -1}, "optimizer.seed=-1"),
])
def test_bad_settings_are_refused_at_construction(kwargs, fragment):
    with pytest.raises(MemKitConfigError) as err:
        SPAM([torch.nn.Parameter(torch.zeros(3, 3))], **kwargs)
    assert fragment in str(err.value) and "Fix:" in str(err.value)


def test_sparse_momentum_needs_2d_weights_and_config_refuses_bad_values():
    bias = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        SPAM([bias], density=0.5, lowrank_params=[bias])
    with pytest.raises(MemKitConfigError, match="optimizer.rank=4 does not apply to optimizer 'spam'"):
        parse_optimizer({"name": "spam", "rank": 4})
    with pytest.raises(MemKitConfigError, match="reset_warmup=600 is longer"):
        parse_optimizer({"name": "spam", "reset_warmup": 600, "reset_interval": 500})
    assert parse_optimizer({"name": "spam", "density": 0.25, "in_backward": True}).density == 0.25

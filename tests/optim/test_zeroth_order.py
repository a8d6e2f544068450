"""Zeroth-order training (MeZO's SPSA ZO-SGD, ZO-Adam, block-wise): update rule, restoration, no gradients,
Lightning fit with an unchanged training_step, exact resume, refusals."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import pytest
import torch

from lightning_memkit import MemKitConfigError, MemKitStrategy
from lightning_memkit.optim.zeroth_order import ZerothOrderAdam, ZerothOrderOptimizer

EPS = 1e-3


def _model(seed=0):
    torch.manual_seed(seed)  # float64: a finite difference over ε = 1e-3 amplifies fp32 rounding 500-fold
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _reference_step(params, loss_at, noise, lr, wd, n, betas=None, state=None, eps_adam=1e-8):
    """The paper's SPSA step written out, with the z's stored (what MeZO avoids): n directions at the same θ,
    ĝ = mean_k (L(θ+εz_k) - L(θ-εz_k)) / (2ε) · z_k; ZO-SGD θ ← θ - lr(ĝ + wd θ); ZO-Adam: AdamW on ĝ."""
    theta = [p.detach().clone() for p in params]
    estimate = [torch.zeros_like(t) for t in theta]
    for k in range(n):
        z = noise(k)
        plus = loss_at([t + EPS * zi for t, zi in zip(theta, z)])
        minus = loss_at([t - EPS * zi for t, zi in zip(theta, z)])
        g = (plus - minus) / (2 * EPS)
        for e, zi in zip(estimate, z):
            e.add_(g / n * zi)
    if betas is None:
        return [t - lr * (e + wd * t) for t, e in zip(theta, estimate)]
    out = []
    state["t"] = state.get("t", 0) + 1
    t_ = state["t"]
    for i, (t, e) in enumerate(zip(theta, estimate)):
        m, v = state.setdefault(i, (torch.zeros_like(t), torch.zeros_like(t)))
        m = betas[0] * m + (1 - betas[0]) * e
        v = betas[1] * v + (1 - betas[1]) * e * e
        state[i] = (m, v)
        mhat, vhat = m / (1 - betas[0] ** t_), v / (1 - betas[1] ** t_)
        out.append(t * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps_adam))
    return out


def _functional_loss(model, x, y):
    names = [n for n, _ in model.named_parameters()]

    def loss_at(values):
        return float(torch.func.functional_call(model, dict(zip(names, values)), (x,)).sub(y).pow(2).mean())

    return loss_at


@pytest.mark.parametrize(("cls", "n", "blockwise"), [(ZerothOrderOptimizer, 1, False), (ZerothOrderOptimizer, 3, False),
                                                     (ZerothOrderAdam, 2, False), (ZerothOrderOptimizer, 2, True),
                                                     (ZerothOrderAdam, 1, True)])
def test_update_equals_the_hand_written_spsa_rule(cls, n, blockwise):
    x, y = _data()
    model, ref_model = _model(), _model()
    params = list(model.parameters())
    lr, wd = 1e-2, 0.05
    opt = cls(params, lr=lr, weight_decay=wd, perturbation=EPS, n_perturbations=n, blockwise=blockwise, seed=7)
    loss_at = _functional_loss(ref_model, x, y)
    state: dict = {}
    for step in range(4):
        theta = [p.detach().clone() for p in params]
        if blockwise:  # one block per tensor: block b is perturbed alone, all at the same θ
            expected = []
            for b, p in enumerate(params):
                def noise(k, b=b):
                    return [opt.noise(p, opt._key(step, b, k, p)) if i == b else torch.zeros_like(q)
                            for i, q in enumerate(params)]
                new = _reference_step(params, loss_at, noise, lr, 0.0, n, **(
                    {"betas": (0.9, 0.999), "state": {}} if cls is ZerothOrderAdam else {}))
                expected.append(new[b])
            if cls is ZerothOrderAdam:  # Adam's state is per tensor: redo with the running state
                expected = _blockwise_adam(opt, params, theta, loss_at, step, n, lr, wd, state)
            else:
                expected = [e - lr * wd * t for e, t in zip(expected, theta)]
        else:
            def noise(k):
                return [opt.noise(p, opt._key(step, 0, k, p)) for p in params]
            expected = _reference_step(params, loss_at, noise, lr, wd, n, **(
                {"betas": (0.9, 0.999), "state": state} if cls is ZerothOrderAdam else {}))
        opt.step(lambda: _loss(model, x, y))
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-11)
    assert opt.param_groups[0]["zo_step"] == 4


def _blockwise_adam(opt, params, theta, loss_at, step, n, lr, wd, state):
    out = []
    state["t"] = state.get("t", 0) + 1
    for b, (p, t) in enumerate(zip(params, theta)):
        e = torch.zeros_like(t)
        for k in range(n):
            z = opt.noise(p, opt._key(step, b, k, p))
            vals = [th.clone() for th in theta]
            vals[b] = t + EPS * z
            plus = loss_at(vals)
            vals[b] = t - EPS * z
            minus = loss_at(vals)
            e += (plus - minus) / (2 * EPS) / n * z
        m, v = state.get(b, (torch.zeros_like(t), torch.zeros_like(t)))
        m, v = 0.9 * m + 0.1 * e, 0.999 * v + 0.001 * e * e
        state[b] = (m, v)
        tt = state["t"]
        out.append(t * (1 - lr * wd) - lr * (m / (1 - 0.9 ** tt)) / ((v / (1 - 0.999 ** tt)).sqrt() + 1e-8))
    return out


def test_the_closure_sees_theta_plus_and_minus_eps_z_and_theta_is_restored():
    x, y = _data()
    model = _model()
    params = list(model.parameters())
    opt = ZerothOrderOptimizer(params, lr=0.0, perturbation=EPS, n_perturbations=2, seed=3)
    theta = [p.detach().clone() for p in params]
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in params])
        return _loss(model, x, y)

    opt.step(closure)
    assert len(seen) == 4  # two evaluations per perturbation
    for k in range(2):
        z = [opt.noise(p, opt._key(0, 0, k, p)) for p in params]
        for t, zi, plus, minus in zip(theta, z, seen[2 * k], seen[2 * k + 1]):
            torch.testing.assert_close(plus, t + EPS * zi, rtol=0, atol=1e-15)
            torch.testing.assert_close(minus, t - EPS * zi, rtol=0, atol=1e-15)
    for t, p in zip(theta, params):  # restored up to fp rounding (MeZO's in-place scheme), lr=0: no update
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-15)
        assert not torch.equal(z[0], torch.zeros_like(z[0]))


def test_restored_after_an_error_in_the_closure():
    model = _model()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    opt = ZerothOrderOptimizer(params, lr=1.0)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom")
        return torch.tensor(1.0, dtype=torch.float64)

    with pytest.raises(ValueError, match="boom"):
        opt.step(closure)
    for t, p in zip(theta, params):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-6)
    assert opt.param_groups[0]["zo_step"] == 0


@pytest.mark.parametrize("cls", [ZerothOrderOptimizer, ZerothOrderAdam])
def test_no_gradient_and_no_graph(cls):
    x, y = _data()
    model = _model()
    opt = cls(model.parameters(), lr=1e-3)

    def closure():
        assert not torch.is_grad_enabled()
        loss = _loss(model, x, y)
        assert loss.grad_fn is None
        return loss

    for _ in range(2):
        opt.step(closure)
    assert all(p.grad is None for p in model.parameters())


def test_noise_is_sliced_and_regenerated_identically(monkeypatch):
    import lightning_memkit.optim.zeroth_order as zo

    monkeypatch.setattr(zo, "NOISE_CHUNK", 7)  # several slices per tensor
    p = torch.nn.Parameter(torch.zeros(5, 6))
    opt = ZerothOrderOptimizer([p])
    z = opt.noise(p, 123)
    assert torch.equal(z, opt.noise(p, 123)) and not torch.equal(z, opt.noise(p, 124))
    with torch.no_grad():
        opt.add_noise_(p, 123, 2.0)
        torch.testing.assert_close(p, 2.0 * z)
        q = torch.zeros(6, 5).t()  # non-contiguous: same values
        opt.add_noise_(q, 123, 1.0)
    assert torch.equal(q, z)
    assert abs(float(z.std()) - 1.0) < 0.5


@pytest.mark.parametrize("cls", [ZerothOrderOptimizer, ZerothOrderAdam])
def test_resume_from_a_weights_only_state_dict_is_exact(cls):
    x, y = _data()

    def run(model, opt, steps):
        for _ in range(steps):
            opt.step(lambda: _loss(model, x, y))

    a = _model()
    opt_a = cls(a.parameters(), lr=1e-2, n_perturbations=2, seed=5)
    run(a, opt_a, 3)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = _model(seed=99)
    b.load_state_dict(saved["model"])
    opt_b = cls(b.parameters(), lr=1e-2, n_perturbations=2, seed=5)
    opt_b.load_state_dict(saved["opt"])
    run(a, opt_a, 3)
    run(b, opt_b, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert opt_b.param_groups[0]["zo_step"] == 6
    assert opt_a.state_bytes() == (0 if cls is ZerothOrderOptimizer else
                                   2 * 8 * sum(p.numel() for p in a.parameters()))
    other = cls(_model().parameters(), lr=1e-2, n_perturbations=2, seed=6)  # another seed: another trajectory
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(opt_a.state_dict())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"perturbation": 0.0}, "optimizer.perturbation"), ({"n_perturbations": 0}, "n_perturbations=0"),
    ({"blockwise": 1}, "blockwise=1"), ({"seed": -1}, "seed=-1"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(MemKitConfigError, match=match):
        ZerothOrderOptimizer(_model().parameters(), **kwargs)


def test_step_without_closure_is_refused():
    with pytest.raises(RuntimeError, match="needs a closure"):
        ZerothOrderOptimizer(_model().parameters()).step()


# ----- through Lightning ----------------------------------------------------------------------------------------
def _fit(corpus, optimizer, steps, lr, root=None, ckpt_path=None, callbacks=(), strategy_kwargs=None, data=None,
         **trainer_kwargs):
    from lightning_memkit.data import TextDataModule
    from lightning_memkit.module import CausalLMModule

    pl.seed_everything(0, verbose=False)
    data = data or TextDataModule(paths=[corpus], seq_len=64, batch_size=4)
    module = CausalLMModule(model="tiny", vocab_size=258, learning_rate=lr, warmup_steps=2)
    losses, grad_modes, grads = [], [], []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # the first linear layer: runs in every forward pass
            first = next(m for m in pl_module.modules() if isinstance(m, torch.nn.Linear))
            first.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            grads.append(any(p.grad is not None for p in pl_module.parameters()))

    kwargs = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=4, val_check_interval=steps,
                  num_sanity_val_steps=0, callbacks=[Record(), *callbacks], default_root_dir=root)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(strategy=MemKitStrategy(optimizer=optimizer, **(strategy_kwargs or {})), **kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module, losses, grad_modes, grads


# measured on this machine (tiny model from scratch, stdlib email text, lr 3e-3, 200 steps): zo_sgd's training loss
# falls from 5.55 to ~4.6 (validation 4.99); AdamW reaches 3.26 in 30 steps, so ZO is ~1.7 nats behind with 6.7x the
# steps (it needs orders of magnitude more steps, as MeZO reports); the test asks for a fall of 0.2 and val < 5.2
def test_lightning_fit_trains_forward_only_with_an_unchanged_training_step(small_corpus_dir):
    trainer, module, losses, grad_modes, grads = _fit(small_corpus_dir, {"name": "zo_sgd"}, steps=200, lr=3e-3)
    opt = trainer.strategy.optimizers[0]
    assert isinstance(opt, ZerothOrderOptimizer) and opt.param_groups[0]["zo_step"] == 200
    assert len(grad_modes) >= 400 and not any(grad_modes[:400])  # two forwards per step, all without grad
    assert not any(grads) and all(p.grad is None for p in module.parameters())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2
    assert float(trainer.callback_metrics["val_loss"]) < 5.2  # ln(258) = 5.55 at the start
    # the step's output is the mean of the losses it evaluated
    assert losses[-1] == pytest.approx(sum(opt.last_losses[-1]) / 2, rel=1e-6)
    # the scheduler drives the ZO optimizer's learning rate
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is opt and opt.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])


def test_lightning_resume_through_a_checkpoint_is_exact(small_corpus_dir, tmp_path):
    from tests.optim.test_strategy_optimizer import OneBatchPerEpoch

    setting = {"name": "zo_adam", "n_perturbations": 2, "seed": 3}
    kwargs = dict(steps=6, lr=1e-2, val_check_interval=None, limit_val_batches=0)
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    _, straight, full, _, _ = _fit(small_corpus_dir, setting, callbacks=[every_epoch], enable_checkpointing=True,
                                   data=OneBatchPerEpoch(small_corpus_dir), **kwargs)
    path = tmp_path / "epoch=2-step=3.ckpt"
    saved = torch.load(path, weights_only=True)  # moments and the step count: plain tensors and numbers
    assert saved["optimizer_states"][0]["param_groups"][0]["zo_step"] == 3
    trainer, resumed, rest, _, _ = _fit(small_corpus_dir, setting, ckpt_path=str(path),
                                        data=OneBatchPerEpoch(small_corpus_dir), **kwargs)
    assert rest == full[3:]
    assert trainer.strategy.optimizers[0].param_groups[0]["zo_step"] == 6
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_activation_checkpointing_is_harmless(small_corpus_dir):
    _, plain, losses, _, _ = _fit(small_corpus_dir, {"name": "zo_sgd"}, steps=3, lr=3e-3)
    _, ckpt, ckpt_losses, _, _ = _fit(small_corpus_dir, {"name": "zo_sgd"}, steps=3, lr=3e-3,
                                      strategy_kwargs={"activations": "checkpoint"})
    assert losses == ckpt_losses
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("strategy_kwargs", "trainer_kwargs", "match"), [
    ({}, {"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
    ({}, {"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
    ({"sequence": "streambp"}, {}, "sequence='streambp'"),
])
def test_lightning_refuses_what_cannot_work(strategy_kwargs, trainer_kwargs, match, small_corpus_dir):
    with pytest.raises(MemKitConfigError, match=match):
        _fit(small_corpus_dir, {"name": "zo_sgd"}, steps=1, lr=1e-3, strategy_kwargs=strategy_kwargs,
             **trainer_kwargs)


def test_refuses_in_backward_and_manual_optimization(small_corpus_dir):
    with pytest.raises(MemKitConfigError, match="in_backward"):
        MemKitStrategy(optimizer={"name": "zo_sgd", "in_backward": True})

    from lightning_memkit.module import CausalLMModule

    class Manual(CausalLMModule):
        def __init__(self):
            super().__init__(model="tiny", vocab_size=258)
            self.automatic_optimization = False

    from lightning_memkit.data import TextDataModule

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         strategy=MemKitStrategy(optimizer="zo_sgd"))
    with pytest.raises(MemKitConfigError, match="automatic_optimization=False"):
        trainer.fit(Manual(), TextDataModule(paths=[small_corpus_dir], seq_len=64, batch_size=4))


def test_zero_stages_are_refused():
    from types import SimpleNamespace

    from lightning_memkit.config import OptimizerConfig, parse_zero
    from lightning_memkit.optim.zo_technique import ZerothOrderTechnique

    technique = ZerothOrderTechnique(OptimizerConfig(name="zo_sgd"))
    for stage in (1, 2, 3):
        trainer = SimpleNamespace(lightning_module=None, accumulate_grad_batches=1, gradient_clip_val=None,
                                  world_size=1, strategy=SimpleNamespace(zero=parse_zero(stage, None, None, None,
                                                                                         True, None)))
        with pytest.raises(MemKitConfigError, match=f"zero_stage={stage}"):
            technique.setup_trainer(trainer)
    trainer.strategy, trainer.world_size = None, 2
    with pytest.raises(MemKitConfigError, match="2 processes"):
        technique.setup_trainer(trainer)

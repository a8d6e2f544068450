import contextlib
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

import lightning_memkit
from lightning_memkit import PRESETS, MemKitConfigError, MemKitStrategy
from lightning_memkit.activations import is_checkpointed
from lightning_memkit.technique import Technique
from tests.helpers.models import NoBlocksModule, UserModule

HERE = os.path.dirname(__file__)


def test_presets_are_registered_with_lightning():
    for name, (description, init_params) in PRESETS.items():
        assert name in StrategyRegistry
        entry = StrategyRegistry[name]
        assert entry["strategy"] is MemKitStrategy
        assert entry["description"] == description
        if "nvme" in name:  # needs an NVMe folder and libaio: tests/test_zero.py
            continue
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, MemKitStrategy)
        assert strategy.activations == lightning_memkit.config.parse_activations(init_params.get("activations"))
    assert StrategyRegistry.get("memkit_checkpoint").activations.checkpoint == "blocks"
    assert [t.name for t in StrategyRegistry.get("memkit").techniques] == ["fused_cross_entropy"]


def test_register_is_idempotent():
    lightning_memkit.register()
    lightning_memkit.register()
    assert "memkit" in StrategyRegistry


def test_trainer_accepts_preset_names(trainer_kwargs):
    trainer = pl.Trainer(strategy="memkit_checkpoint", **trainer_kwargs)
    assert isinstance(trainer.strategy, MemKitStrategy)
    assert trainer.strategy.activations.checkpoint == "blocks"


def test_unknown_preset_name_lists_choices(trainer_kwargs):
    with pytest.raises(ValueError, match="memkit_nope"):
        pl.Trainer(strategy="memkit_nope", **trainer_kwargs)


def test_strategy_rejects_bad_settings_at_construction():
    with pytest.raises(MemKitConfigError, match="activations='int4'"):
        MemKitStrategy(activations="int4")
    with pytest.raises(MemKitConfigError, match="unknown key"):
        MemKitStrategy(activations={"checkpoint": "blocks", "every": 2})


def test_misspelled_argument_is_refused():
    with pytest.raises(MemKitConfigError, match=r"unknown argument\(s\) \['activation'\].*'activations'"):
        MemKitStrategy(activation="checkpoint")
    MemKitStrategy(find_unused_parameters=True)  # a real DistributedDataParallel argument


def _fit(strategy, trainer_kwargs, module=None, **overrides):
    module = module or UserModule()
    trainer = pl.Trainer(strategy=strategy, **{**trainer_kwargs, **overrides})
    trainer.fit(module)
    return trainer, module


def test_memkit_without_techniques_equals_plain_lightning(trainer_kwargs):
    """One process, no techniques: the same losses and weights as Lightning's default strategy."""
    pl.seed_everything(7)
    _, plain = _fit("auto", trainer_kwargs, max_steps=6)
    pl.seed_everything(7)
    trainer, memkit = _fit(MemKitStrategy(cross_entropy="plain"), trainer_kwargs, max_steps=6)
    assert trainer.strategy.techniques == []
    assert not isinstance(trainer.strategy.model, DistributedDataParallel)
    assert trainer.strategy.launcher is None
    assert plain.losses == memkit.losses
    for a, b in zip(plain.parameters(), memkit.parameters()):
        assert torch.equal(a, b)


def test_checkpointing_fit_is_exact_and_undone_at_teardown(trainer_kwargs):
    """An ordinary user module: blocks found structurally, same losses, forwards restored after fit."""
    pl.seed_everything(3)
    _, plain = _fit("memkit", trainer_kwargs, max_steps=5)
    pl.seed_everything(3)
    seen = []
    module = UserModule()
    original = module.layers[0].forward

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([is_checkpointed(layer) for layer in pl_module.layers])

    _fit(MemKitStrategy(activations="checkpoint"), trainer_kwargs, module, max_steps=5, callbacks=[Probe()])
    assert seen and all(s == [True, True, True] for s in seen)
    assert plain.losses == module.losses  # dropout replays identically in the recomputation
    for a, b in zip(plain.parameters(), module.parameters()):
        assert torch.equal(a, b)
    assert not any(is_checkpointed(layer) for layer in module.layers)
    assert module.layers[0].forward == original


def test_checkpoint_every_k(trainer_kwargs):
    module = UserModule(n_blocks=5)
    flags = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            flags.extend(is_checkpointed(layer) for layer in pl_module.layers)

    _fit(MemKitStrategy(activations={"checkpoint": "blocks", "checkpoint_every": 2}), trainer_kwargs, module,
         callbacks=[Probe()])
    assert flags == [True, False, True, False, True]


def test_checkpointing_without_blocks_fails_at_setup(trainer_kwargs):
    module = NoBlocksModule()
    trainer = pl.Trainer(strategy="memkit_checkpoint", **trainer_kwargs)
    with pytest.raises(MemKitConfigError) as err:
        trainer.fit(module)
    message = str(err.value)
    assert "NoBlocksModule" in message and "memkit_blocks()" in message and "activations.checkpoint='none'" in message
    assert module.losses == []  # nothing trained


class _SwapOptimizer(Technique):
    """A test technique using the optimizer and step-context points."""

    name = "swap"

    def __init__(self):
        self.entered = 0
        self.new = None

    def setup_optimizers(self, optimizers):
        old = optimizers[0]
        self.new = torch.optim.SGD(old.param_groups[0]["params"], lr=old.param_groups[0]["lr"])
        for group in self.new.param_groups:
            group["initial_lr"] = group["lr"]
        return [self.new]

    @contextlib.contextmanager
    def _ctx(self):
        self.entered += 1
        yield

    def step_context(self):
        return self._ctx()


class _ModuleWithScheduler(UserModule):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def test_optimizer_and_step_points(trainer_kwargs):
    strategy = MemKitStrategy(cross_entropy="plain")
    technique = _SwapOptimizer()
    strategy.techniques.append(technique)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "optimizer.step() has been overridden"
        trainer, module = _fit(strategy, trainer_kwargs, _ModuleWithScheduler(), max_steps=3, limit_train_batches=1,
                               max_epochs=3)
    assert trainer.optimizers == [technique.new]
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is technique.new
    # StepLR ran on the new optimizer: 0.01 halved once per epoch
    assert technique.new.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert technique.entered == 3  # once per training step


def _ddp_fits(tmp_path, *extra: str, devices: tuple[int, ...] = (1, 2)) -> dict:
    script = os.path.join(HERE, "helpers", "ddp_fit.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    outs = {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for n in devices:
        out = tmp_path / f"weights_{n}.pt"
        proc = subprocess.run(
            [sys.executable, script, "--devices", str(n), "--out", str(out), *extra],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs[n] = torch.load(out, weights_only=True)
    return outs


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """2 processes (gloo), half the batch each, give the weights of one process on the whole batch."""
    outs = _ddp_fits(tmp_path)
    assert outs[2]["world_size"] == 2 and outs[1]["world_size"] == 1
    assert outs[2]["wrapped_in_ddp"] and not outs[1]["wrapped_in_ddp"]
    assert outs[2]["checkpointed_blocks"] == outs[1]["checkpointed_blocks"] == 2
    for name, value in outs[1]["state"].items():
        torch.testing.assert_close(outs[2]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_forward_wrappers_stack_and_unwrap_in_any_order():
    """Two techniques wrapping one module's forward: each can be removed alone, the other stays."""
    from lightning_memkit.activations import apply_checkpointing, remove_checkpointing
    from lightning_memkit.loss.causal_lm import _FusedHFForward, patch_hf_causal_lm, unpatch_hf_causal_lm
    from lightning_memkit.technique import find_forward_wrapper

    block = torch.nn.Sequential(torch.nn.Linear(3, 3))
    x = torch.randn(2, 3)
    expected = block(x)
    for first_removed in ("checkpoint", "patch"):
        apply_checkpointing([block, block])  # the second entry is already checkpointed: no-op
        patch_hf_causal_lm(block)
        assert is_checkpointed(block) and find_forward_wrapper(block, _FusedHFForward) is not None
        torch.testing.assert_close(block(x), expected)
        if first_removed == "checkpoint":
            remove_checkpointing([block])
            assert not is_checkpointed(block) and find_forward_wrapper(block, _FusedHFForward) is not None
            unpatch_hf_causal_lm(block)
        else:
            unpatch_hf_causal_lm(block)
            assert is_checkpointed(block) and find_forward_wrapper(block, _FusedHFForward) is None
            remove_checkpointing([block])
        assert "forward" not in block.__dict__
        torch.testing.assert_close(block(x), expected)


@pytest.mark.slow
def test_ddp_with_sequence_chunked_backprop(tmp_path):
    """StreamBP under DDP (gradients returned through the outer backward to DDP's reducer): 2 processes give
    the weights of one process, which equal plain backprop's."""
    outs = _ddp_fits(tmp_path, "--sequence", '{"method": "streambp", "chunk_size": 10}')
    assert outs[2]["wrapped_in_ddp"] and outs[2]["world_size"] == 2
    plain = _ddp_fits(tmp_path / "plain", devices=(1,))
    for name, value in plain[1]["state"].items():
        torch.testing.assert_close(outs[1]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(outs[2]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)

"""Settings recorded in checkpoints: a resume with other optimizer settings is refused at setup with both
settings and the two fixes (never a KeyError, never the new setting silently ignored); resume="weights"
starts from the weights alone; settings without state may change and are logged."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_memkit import MemKitConfigError, MemKitStrategy
from lightning_memkit.module import CausalLMModule
from lightning_memkit.resume import CHECKPOINT_KEY


def _data() -> DataLoader:
    """One batch per epoch (Lightning resumes a plain DataLoader at epoch boundaries only)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 258, (4, 33), generator=g)
    return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=4, shuffle=False)


class Recorder(CausalLMModule):
    """Records every training step it runs (to show a refusal comes before the first)."""

    def __init__(self, **kwargs):
        super().__init__(model="tiny", vocab_size=258, learning_rate=3e-3, warmup_steps=0, **kwargs)
        self.steps_run: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.steps_run.append(float(loss))
        return loss


def _fit(tmp_path, strategy, steps, ckpt_path=None, save=False, module=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = module or Recorder()
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)] if save else []
    callbacks += kwargs.pop("callbacks", [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=str(tmp_path), **kwargs)
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer, module


GALORE8 = {"name": "galore_adamw8bit", "rank": 8, "update_gap": 2}
APOLLO_IB = {"name": "apollo_mini", "in_backward": True}

#: (saved setting, resumed setting, fragments of the message): the findings of the issue, each a crash or a
#: silently ignored setting before settings were recorded
CHANGES = [
    (None, "galore_adamw8bit", ["optimizer='none'", "galore_adamw8bit"]),  # was KeyError: 'rank'
    (GALORE8, APOLLO_IB, ["galore_adamw8bit", "apollo_mini"]),  # was KeyError: 'seed'
    ("apollo_mini", None, ["apollo_mini", "optimizer='none'"]),  # was a broadcast error in torch's adam.py, step 1
    (GALORE8, {**GALORE8, "rank": 4}, ["rank: 8 -> 4"]),  # was silently kept at rank 8
]


@pytest.mark.parametrize("saved, resumed, fragments", CHANGES, ids=["adamw-galore8", "galore8-apollo_ib",
                                                                     "apollo-adamw", "galore-rank"])
def test_changed_optimizer_settings_are_refused_before_any_step(tmp_path, saved, resumed, fragments):
    _fit(tmp_path, MemKitStrategy(optimizer=saved), steps=2, save=True)
    path = tmp_path / "epoch=1-step=2.ckpt"
    assert torch.load(path, weights_only=True)[CHECKPOINT_KEY]["optimizer"]["name"] == (
        "none" if saved is None else (saved if isinstance(saved, str) else saved["name"]))
    module = Recorder()
    with pytest.raises(MemKitConfigError) as error:
        _fit(tmp_path / "resumed", MemKitStrategy(optimizer=resumed), steps=4, ckpt_path=str(path), module=module)
    message = str(error.value)
    for fragment in fragments + ["resume with the saved setting", "resume='weights'", str(path)]:
        assert fragment in message, (fragment, message)
    assert module.steps_run == []


def test_same_settings_resume_exactly_and_in_backward_may_change(tmp_path, caplog):
    """The control: the same optimizer resumes bit for bit; turning in_backward on (no state of its own) is allowed
    and said."""
    setting = {"name": "apollo_mini"}
    _, full = _fit(tmp_path, MemKitStrategy(optimizer=setting), steps=4, save=True)
    path = tmp_path / "epoch=1-step=2.ckpt"
    _, same = _fit(tmp_path / "a", MemKitStrategy(optimizer=setting), steps=4, ckpt_path=str(path))
    assert same.steps_run == full.steps_run[2:]
    for a, b in zip(full.parameters(), same.parameters()):
        assert torch.equal(a, b)
    with caplog.at_level(logging.INFO):
        _, ib = _fit(tmp_path / "b", MemKitStrategy(optimizer={**setting, "in_backward": True}), steps=4,
                     ckpt_path=str(path))
    assert "optimizer.in_backward: False -> True" in caplog.text
    assert ib.steps_run == pytest.approx(full.steps_run[2:], rel=1e-5)


def test_changed_activation_settings_take_effect_and_are_logged(tmp_path, caplog):
    _fit(tmp_path, MemKitStrategy(), steps=2, save=True)
    with caplog.at_level(logging.INFO):
        trainer, _ = _fit(tmp_path / "r", MemKitStrategy(activations="checkpoint"), steps=3,
                          ckpt_path=str(tmp_path / "epoch=1-step=2.ckpt"))
    assert "activations: activations='none' -> activations={'checkpoint': 'blocks'}" in caplog.text
    assert trainer.global_step == 3


def test_resume_weights_starts_fresh_from_the_weights(tmp_path):
    _, first = _fit(tmp_path, MemKitStrategy(), steps=2, save=True)
    path = tmp_path / "epoch=1-step=2.ckpt"
    saved = torch.load(path, weights_only=True)["state_dict"]

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.step = trainer.global_step
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.state = trainer.optimizers[0].state_dict()["state"]

    check = Check()
    trainer, module = _fit(tmp_path / "w", MemKitStrategy(optimizer=GALORE8, resume="weights"), steps=3,
                           ckpt_path=str(path), callbacks=[check])
    assert check.step == 0 and check.state == {}  # counters and optimizer state fresh
    assert all(torch.equal(check.weights[k], v) for k, v in saved.items())
    assert trainer.global_step == 3 and len(module.steps_run) == 3


@pytest.mark.parametrize("value", ["weight", "", None, 1])
def test_resume_setting_is_validated(value):
    with pytest.raises(MemKitConfigError, match="resume"):
        MemKitStrategy(resume=value)


def test_a_checkpoint_without_memkit_settings_is_checked_by_the_optimizer_state(tmp_path):
    """Checkpoints written without memkit (here: Lightning's own strategy) record no settings; the optimizer
    state itself is then checked when it loads, still before the first step."""
    _fit(tmp_path, "auto", steps=2, save=True)
    path = tmp_path / "epoch=1-step=2.ckpt"
    assert CHECKPOINT_KEY not in torch.load(path, weights_only=True)
    module = Recorder()
    with pytest.raises(MemKitConfigError, match="records no memkit settings") as error:
        _fit(tmp_path / "r", MemKitStrategy(optimizer="apollo_mini"), steps=4, ckpt_path=str(path), module=module)
    assert "rank" in str(error.value) and module.steps_run == []


def test_a_memkit_optimizer_state_is_refused_by_torch_adamw(tmp_path):
    """An APOLLO-Mini state in a checkpoint stripped of its settings record, resumed with the module's own AdamW:
    refused at load (it used to fail in step 1 with a broadcast error)."""
    _fit(tmp_path, MemKitStrategy(optimizer="apollo_mini"), steps=2, save=True)
    path = tmp_path / "epoch=1-step=2.ckpt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt[CHECKPOINT_KEY]
    torch.save(ckpt, tmp_path / "old.ckpt")
    module = Recorder()
    with pytest.raises(MemKitConfigError, match="ApolloMini"):
        _fit(tmp_path / "r", MemKitStrategy(), steps=4, ckpt_path=str(tmp_path / "old.ckpt"), module=module)
    assert module.steps_run == []


def test_a_zero_checkpoint_folder_on_the_ddp_backend_is_named(tmp_path):
    folder = tmp_path / "last.ckpt" / "checkpoint"
    folder.mkdir(parents=True)
    with pytest.raises(MemKitConfigError, match="DeepSpeed .ZeRO. checkpoint folder"):
        _fit(tmp_path / "r", MemKitStrategy(), steps=1, ckpt_path=str(tmp_path / "last.ckpt"))


def test_validate_from_a_checkpoint_ignores_optimizer_settings(tmp_path):
    _fit(tmp_path, MemKitStrategy(optimizer=GALORE8), steps=2, save=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MemKitStrategy(), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.validate(Recorder(), _data(), ckpt_path=str(tmp_path / "epoch=1-step=2.ckpt"))
    assert "val_loss" in trainer.callback_metrics  # and memkit validate on one process works at all (it raised
    # "Default process group has not been initialized" before)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_checkpoint_is_named_with_the_fix(tmp_path, damage):
    _fit(tmp_path, MemKitStrategy(), steps=2, save=True)
    good = (tmp_path / "epoch=1-step=2.ckpt").read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"not a checkpoint" * 64}[damage])
    module = Recorder()
    with pytest.raises(MemKitConfigError, match="cannot be read") as error:
        _fit(tmp_path / "r", MemKitStrategy(), steps=3, ckpt_path=str(bad), module=module)
    assert "earlier checkpoint" in str(error.value) and module.steps_run == []
    if damage == "empty":
        assert "an empty file" in str(error.value)


def test_checkpoints_are_written_atomically_by_default():
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from lightning_memkit.checkpoint_io import AtomicCheckpointIO

    assert isinstance(MemKitStrategy().checkpoint_io, AtomicCheckpointIO)
    wrapped = MemKitStrategy(checkpoint_io=AsyncCheckpointIO())
    assert isinstance(wrapped.checkpoint_io.checkpoint_io, AtomicCheckpointIO)  # the wrapper writes through it

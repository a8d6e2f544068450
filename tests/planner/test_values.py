"""A module that reads tensor values in its step (loss.item(), .tolist(), `if t:`, float(), print) is planned:
fake tensors have no values, so the planner gives a stand-in and says so once; the memory is counted as before."""

from __future__ import annotations

import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from lightning_memkit import MemKitStrategy
from lightning_memkit.planner.auto import fake_weights
from lightning_memkit.planner.step import STAND_IN_NOTE, Setting, StepRunner
from tests.helpers.models import UserModule
from tests.helpers.planning import ReadingModule


def _fake_step(module):
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        batch = torch.empty(16, 64)
    with fake_weights(module, fake_mode, None, torch.device("cpu")):
        with fake_mode:
            return StepRunner(module, None, batch).run(Setting(cross_entropy="plain"), measure=True, warm=True)


def test_reads_get_a_stand_in_the_caveat_names_the_place_and_the_accounting_is_unchanged(capsys):
    torch.manual_seed(0)
    reading = ReadingModule(reads=True)
    torch.manual_seed(0)
    plain = ReadingModule(reads=False)
    read, same = _fake_step(reading), _fake_step(plain)
    assert read.at_peak == same.at_peak and read.maximum == same.maximum and read.peak > 0
    notes = [n for n in read.notes if n.startswith(STAND_IN_NOTE)]
    assert len(notes) == 1 and not [n for n in same.notes if n.startswith(STAND_IN_NOTE)]
    assert "self.history.append(loss.item()) at tests/helpers/planning.py:" in notes[0]
    assert "and 4 more place(s)" in notes[0] and "stand-in value (1)" in notes[0]
    assert "step 0: loss 1.0000 (1.00) FakeTensor" in capsys.readouterr().out  # print and f-strings work
    assert reading.history == []  # the stand-in recorded by the planned step is taken back
    assert not hasattr(FakeTensor, "__format__") or "__format__" not in FakeTensor.__dict__  # restored


def test_auto_mode_plans_and_trains_a_module_that_calls_item(trainer_kwargs):
    module = UserModule()
    trainer = pl.Trainer(strategy=MemKitStrategy(memory_budget="64MiB"), **{**trainer_kwargs, "max_steps": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    assert trainer.strategy.memory_choice.fits and trainer.global_step == 2
    assert len(module.losses) == 2 and all(v != 1.0 for v in module.losses)  # the real steps' values only
    caveats = [str(w.message) for w in caught if STAND_IN_NOTE in str(w.message)]
    assert len(caveats) == 1 and "loss.item()" in caveats[0] and "models.py:" in caveats[0]


def test_memkit_plan_and_verify_on_a_module_that_reads_values(tmp_path, capsys, monkeypatch):
    from lightning_memkit.cli import main

    monkeypatch.setattr(sys, "argv", ["memkit"])
    recipe = tmp_path / "reads.yaml"
    recipe.write_text("trainer: {logger: false, strategy: memkit, enable_checkpointing: false}\n"
                      "model: {class_path: tests.helpers.planning.ReadingModule}\n"
                      "data: {class_path: tests.helpers.planning.VectorLoaderData}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", str(recipe), "--gpu-memory", "1GiB"])
    captured = capsys.readouterr()
    assert exit_.value.code == 0, captured.err
    assert f"note: {STAND_IN_NOTE} (self.history.append(loss.item())" in captured.out
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--config", str(recipe)])
    captured = capsys.readouterr()
    assert exit_.value.code == 0, captured.err
    assert "ok" in captured.out and "FAIL" not in captured.out

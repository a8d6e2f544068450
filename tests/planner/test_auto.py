"""MemKitStrategy(memory_budget=...): the cheapest combination that fits is chosen at setup."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch

from lightning_memkit import CausalLMModule, MemKitStrategy
from lightning_memkit.config import MemKitConfigError


class _Data(pl.LightningDataModule):
    seq_len, batch_size = 64, 2

    def train_dataloader(self):
        ids = torch.randint(0, 258, (8, self.seq_len + 1), generator=torch.Generator().manual_seed(0))
        items = [{"input_ids": i[:-1], "labels": i[1:]} for i in ids]
        return torch.utils.data.DataLoader(items, batch_size=self.batch_size)


def _fit(trainer_kwargs, **strategy):
    module = CausalLMModule(model="tiny", warmup_steps=0)
    trainer = pl.Trainer(strategy=MemKitStrategy(**strategy), **{**trainer_kwargs, "max_steps": 2})
    trainer.fit(module, datamodule=_Data())
    return trainer


def test_auto_mode_picks_the_cheapest_combination_that_fits(trainer_kwargs, caplog):
    with caplog.at_level(logging.INFO):
        trainer = _fit(trainer_kwargs, memory_budget="2MiB", memory_search="any")
    row = trainer.strategy.memory_choice
    assert row.fits and row.peak <= 2 * 2**20
    assert "chose" in caplog.text and "does not fit" in caplog.text  # cheaper ones were tried and refused
    # the chosen techniques are the ones installed
    names = {t.name for t in trainer.strategy.techniques}
    chosen = row.candidate.setting.strategy_arguments()
    assert ("optimizer" in chosen) == ("optimizer" in names)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])


def test_a_roomy_budget_keeps_the_configuration(trainer_kwargs):
    trainer = _fit(trainer_kwargs, memory_budget="1GiB")
    assert trainer.strategy.memory_choice.candidate.name == "your optimizer"  # nothing added: it fits as it is
    assert [t.name for t in trainer.strategy.techniques] == ["fused_cross_entropy"]


def test_exact_search_never_chooses_an_approximate_optimizer(trainer_kwargs):
    trainer = _fit(trainer_kwargs, memory_budget="2.5MiB")  # memory_search="exact" is the default
    assert trainer.strategy.memory_choice.candidate.exact
    assert trainer.strategy.optimizer_config.name in ("none", "adamw")


def test_families_set_by_the_user_are_kept(trainer_kwargs):
    trainer = _fit(trainer_kwargs, memory_budget="2MiB", optimizer="adamw8bit")
    assert trainer.strategy.optimizer_config.name == "adamw8bit"


@pytest.mark.slow  # 8-10 s on the 2-core CPU machine (tries all 18 combinations)
def test_an_impossible_budget_fails_before_training_naming_the_closest(trainer_kwargs):
    with pytest.raises(MemKitConfigError, match=r"memory_budget=1.00 MiB: none of the 18 combinations tried fits\. "
                                                r"The closest is '.+' \(.+\) at 1\.\d\d MiB"):
        _fit(trainer_kwargs, memory_budget="1MiB", memory_search="any")


def test_budget_below_the_weights_and_bad_sizes(trainer_kwargs):
    with pytest.raises(MemKitConfigError, match=r"memory_budget=100.00 KiB is smaller than the model's weights alone: "
                                                r"0.48 MiB \(0.13M parameters in float32\)"):
        _fit(trainer_kwargs, memory_budget="100KiB")
    with pytest.raises(MemKitConfigError, match=r"memory_budget='lots' is not a memory size"):
        MemKitStrategy(memory_budget="lots")
    with pytest.raises(MemKitConfigError, match=r"memory_search='fast'"):
        MemKitStrategy(memory_budget="1GiB", memory_search="fast")
    with pytest.raises(MemKitConfigError, match=r"memory_budget='auto' reads the CUDA device's free memory.*cpu"):
        _fit(trainer_kwargs, memory_budget="auto")

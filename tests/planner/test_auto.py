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


@pytest.mark.slow  # 10-14 s on the 2-core CPU machine (tries all 24 combinations)
def test_an_impossible_budget_fails_before_training_naming_the_closest(trainer_kwargs):
    # the forward-only ZO-SGD needs the least: the weights and one forward (0.84 MiB here)
    with pytest.raises(MemKitConfigError, match=r"memory_budget=0.68 MiB: none of the 24 combinations tried fits\. "
                                                r"The closest is 'ZO-SGD \(forward only\)' \(.+\) at 0\.\d\d MiB"):
        _fit(trainer_kwargs, memory_budget="700KiB", memory_search="any")


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


@pytest.mark.slow  # ~10 s on the 2-core CPU machine (24 combinations, then 2 ZO steps)
def test_when_only_the_forward_only_optimizer_fits_it_is_chosen_and_its_note_warned(trainer_kwargs):
    """1 MiB: every backpropagating combination needs more (the closest, StreamBP with APOLLO-Mini on every weight,
    1.06 MiB); ZO-SGD keeps no gradients and no activations. It trains through Lightning's loop, and the choice warns
    that it converges far more slowly. An exact search never offers it."""
    with pytest.warns(UserWarning, match=r"chose 'ZO-SGD \(forward only\)': ZO-SGD \(MeZO\) runs two forward passes.*"
                                         r"converges far more slowly"):
        trainer = _fit(trainer_kwargs, memory_budget="1MiB", memory_search="any")
    row = trainer.strategy.memory_choice
    assert row.candidate.name == "ZO-SGD (forward only)" and not row.candidate.exact and row.peak <= 2**20
    assert row.candidate.overhead == 20.0  # ranked after every other combination: tried last
    assert trainer.strategy.optimizer_config.name == "zo_sgd"
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])
    with pytest.raises(MemKitConfigError, match=r"none of the \d+ combinations tried fits"):
        _fit(trainer_kwargs, memory_budget="1MiB")  # memory_search="exact"

"""Nothing silently wrong: every numeric setting is a finite number in range, checks happen at setup (before
the first step), settings that would have no effect are refused, and defaults fit small models."""

from __future__ import annotations

import math
import os
import sys

import lightning.pytorch as pl
import pytest
import torch

from lightning_memkit import MemKitConfigError, MemKitStrategy
from lightning_memkit.config import check_int, check_number, parse_size
from lightning_memkit.data import TextDataModule, stdlib_dir
from lightning_memkit.module import CausalLMModule

NAN, INF = float("nan"), float("inf")
ROOT = os.path.dirname(os.path.dirname(__file__))


class Recorded(CausalLMModule):
    """The tiny reference model; remembers whether a training step ran."""

    def __init__(self, **kwargs):
        super().__init__(**{"model": "tiny", "vocab_size": 258, "learning_rate": 3e-3, "warmup_steps": 1, **kwargs})
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


def _fit(module=None, steps=2, seq_len=32, **strategy):
    pl.seed_everything(0, verbose=False)
    module = module or Recorded()
    trainer = pl.Trainer(
        strategy=MemKitStrategy(**strategy), accelerator="cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    data = TextDataModule(paths=[os.path.join(stdlib_dir(), "email")], seq_len=seq_len, batch_size=2, num_workers=0)
    trainer.fit(module, data)
    return trainer, module


# ----- finding 3: one check for every numeric setting ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "kwargs", "fragment"),
    [
        (True, {"minimum": 0}, "has type bool"),
        ("1e-3", {"minimum": 0}, "has type str"),
        (NAN, {}, "is not a finite number"),
        (INF, {"minimum": 0}, "is not a finite number"),
        (-INF, {"maximum": 0}, "is not a finite number"),
        (2.0, {"integer": True, "minimum": 1}, "has type float, expected an integer >= 1"),
        (0, {"integer": True, "minimum": 1}, "is below 1"),
        (0.0, {"minimum": 0, "min_exclusive": True}, "must be a number > 0"),
        (1.0, {"minimum": 0, "maximum": 1, "max_exclusive": True}, r"must be a number in \[0, 1\)"),
        (7, {"maximum": 5}, "is above 5"),
    ],
)
def test_check_number_refuses_with_key_value_and_fix(value, kwargs, fragment):
    with pytest.raises(MemKitConfigError, match=fragment) as err:
        check_number("family.key", value, **kwargs)
    assert f"family.key={value!r}" in str(err.value) and "Fix: " in str(err.value)


def test_check_number_returns_python_numbers():
    import numpy as np

    assert check_number("k", np.float32(0.5), minimum=0) == 0.5 and type(check_number("k", np.float32(0.5))) is float
    assert type(check_int("k", np.int64(3), minimum=1)) is int
    assert check_int("k", 10**400, minimum=1) == 10**400  # a huge int is finite: no OverflowError


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"optimizer": {"name": "apollo_mini", "scale": NAN}}, "optimizer.scale=nan is not a finite number"),
        ({"optimizer": {"name": "galore_adamw", "scale": INF}}, "optimizer.scale=inf is not a finite number"),
        ({"optimizer": {"name": "apollo", "norm_growth_limit": INF}}, "optimizer.norm_growth_limit=inf"),
        ({"optimizer": {"name": "apollo", "norm_growth_limit": NAN}}, "optimizer.norm_growth_limit=nan"),
        ({"optimizer": {"name": "frugal", "free_lr_scale": NAN}}, "optimizer.free_lr_scale=nan"),
        ({"optimizer": {"name": "frugal", "free_lr_scale": -INF}}, "optimizer.free_lr_scale=-inf"),
        ({"optimizer": {"name": "galore_adamw", "rank": NAN}}, "optimizer.rank=nan has type float"),
        ({"optimizer": {"name": "apollo", "update_gap": INF}}, "optimizer.update_gap=inf has type float"),
        ({"optimizer": {"name": "apollo", "seed": NAN}}, "optimizer.seed=nan has type float"),
        ({"optimizer": {"name": "apollo_mini", "scale": "nan"}}, "optimizer.scale='nan' has type str"),
        ({"activations": {"checkpoint": "blocks", "checkpoint_every": NAN}}, "activations.checkpoint_every=nan"),
        ({"activations": {"compress": "int8", "min_numel": INF}}, "activations.min_numel=inf"),
        ({"activations": {"checkpoint": "budget", "activation_budget": NAN}}, "activation_budget=nan is not a memory"),
        ({"activations": {"checkpoint": "budget", "activation_budget": "infGiB"}}, "activation_budget='infGiB'"),
        ({"activations": {"checkpoint": "budget", "activation_budget": 1e400}}, "activation_budget=inf is not a"),
        ({"activations": {"offload": True, "offload_host_memory": "9" * 400 + "GiB"}}, "is not a memory size"),
        ({"cross_entropy": {"chunk_size": NAN}}, "cross_entropy.chunk_size=nan"),
        ({"cross_entropy": {"impl": "triton", "filter_eps": NAN}}, "cross_entropy.filter_eps=nan is not a finite"),
        ({"cross_entropy": {"impl": "triton", "filter_eps": INF}}, "cross_entropy.filter_eps=inf is not a finite"),
        ({"cross_entropy": {"impl": "triton", "filter_eps": 1.0}}, r"cross_entropy.filter_eps=1.0 must be .*\(0, 1\)"),
        ({"sequence": {"method": "seco", "chunk_size": INF}}, "sequence.chunk_size=inf has type float"),
        ({"sequence": {"method": "spaco", "keep": NAN}}, "sequence.keep=nan is not a finite number"),
        ({"sequence": {"method": "spaco", "seed": INF}}, "sequence.seed=inf has type float"),
        ({"zero_stage": NAN}, "zero_stage=nan has type float"),
        ({"memory_budget": "nan"}, "memory_budget='nan' is not a memory size"),
        ({"memory_budget": 1e400}, "memory_budget=inf is not a memory size"),
    ],
)
def test_non_finite_settings_are_refused_at_construction(kwargs, fragment):
    with pytest.raises(MemKitConfigError, match=fragment) as err:
        MemKitStrategy(**kwargs)
    assert "Fix:" in str(err.value)


@pytest.mark.parametrize("value", ["nan", "infGiB", "NaN GiB", 1e400, NAN, -1, 0, "0.4B", True, "9" * 400 + "GiB"])
def test_parse_size_refuses_what_is_not_a_size(value):
    with pytest.raises(MemKitConfigError, match="is not a memory size"):
        parse_size("activations.activation_budget", value)


def test_parse_size_takes_whole_floats_as_yaml_writes_them():
    assert parse_size("k", 2e9) == 2_000_000_000 and parse_size("k", "1.5GB") == 1_500_000_000
    with pytest.raises(MemKitConfigError, match="is not a memory size"):
        parse_size("k", 1.5)  # a fraction of a byte


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("optimizer: {name: apollo_mini, scale: .nan}", "optimizer.scale=nan is not a finite number"),
        ("optimizer: {name: apollo_mini, scale: nan}", "optimizer.scale='nan' has type str"),
        ("optimizer: {name: apollo_mini, scale: .inf}", "optimizer.scale=inf is not a finite number"),
        ("optimizer: {name: apollo_mini, scale: 1e400}", "optimizer.scale=inf is not a finite number"),
        ("optimizer: {name: galore_adamw, scale: -.inf}", "optimizer.scale=-inf is not a finite number"),
        ("optimizer: {name: apollo, norm_growth_limit: .inf}", "optimizer.norm_growth_limit=inf is not a finite"),
        ("sequence: {method: spaco, keep: .nan}", "sequence.keep=nan is not a finite number"),
        ("cross_entropy: {impl: triton, filter_eps: .nan}", "cross_entropy.filter_eps=nan is not a finite"),
    ],
)
def test_non_finite_settings_in_a_recipe_are_refused(line, fragment, monkeypatch, tmp_path):
    from lightning_memkit.cli import MemKitCLI

    monkeypatch.setattr(sys, "argv", ["memkit"])
    recipe = open(os.path.join(ROOT, "recipes", "quickstart.yaml")).read()
    assert "      cross_entropy: fused" in recipe
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.replace("      cross_entropy: fused", f"      {line}"))
    with pytest.raises(MemKitConfigError, match=fragment) as err:
        MemKitCLI(args=["--config", str(path)], run=False)
    assert "Fix: " in str(err.value)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        ("GaLoreAdamW(ps, scale=math.nan)", "scale=nan is not a finite number"),
        ("GaLoreAdamW(ps, rank=4.0)", "rank=4.0 has type float"),
        ("GaLoreAdamW(ps, update_gap=0)", "update_gap=0 is below 1"),
        ("Apollo(ps, norm_growth_limit=math.inf)", "norm_growth_limit=inf is not a finite number"),
        ("Apollo(ps, scale=-1.0)", "scale=-1.0 must be a number > 0"),
        ("ApolloMini(ps, seed=-1)", "seed=-1 is below 0"),
        ("Frugal(ps, free_lr_scale=math.nan)", "free_lr_scale=nan is not a finite number"),
    ],
)
def test_optimizer_classes_refuse_non_finite_settings(make, fragment):
    from lightning_memkit.optim import Apollo, ApolloMini, Frugal, GaLoreAdamW  # noqa: F401

    ps = [torch.nn.Parameter(torch.randn(8, 8))]  # noqa: F841
    with pytest.raises(ValueError, match=fragment):
        eval(make)


@pytest.mark.parametrize(("key", "value"), [("lr", INF), ("eps", INF), ("weight_decay", INF), ("lr", NAN)])
def test_conversion_refuses_non_finite_group_settings(key, value):
    from lightning_memkit.config import OptimizerConfig
    from lightning_memkit.optim.convert import convert_optimizer

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.param_groups[0][key] = value  # as a scheduler or a hand-edited group could leave it
    with pytest.raises(MemKitConfigError, match=rf"AdamW param group 0: {key}={value!r} is not a finite number"):
        convert_optimizer(optimizer, OptimizerConfig(name="galore_adamw", rank=2), {}, {})


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"lr": INF}, "lr=inf is not a finite number"), ({"eps": NAN}, "eps=nan is not a finite number"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 is below 0"), ({"betas": (0.9, 1.0)}, r"betas\[1\]=1.0 must be"),
    ({"betas": (0.9,)}, "betas=.0.9,. must be two numbers")])
def test_optimizer_classes_refuse_bad_adamw_settings(kwargs, fragment):
    """The AdamW settings every memkit optimizer shares, given to the class directly (torch accepts an inf lr)."""
    from lightning_memkit.optim import GaLoreAdamW

    with pytest.raises(MemKitConfigError, match=fragment):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(8, 8))], rank=2, **kwargs)


def test_memory_report_settings_are_checked():
    from lightning_memkit.callbacks import MemoryReport

    with pytest.raises(MemKitConfigError, match="MemoryReport.print_every='yes' has type str"):
        MemoryReport(print_every="yes")
    with pytest.raises(MemKitConfigError, match="MemoryReport.every_n_steps=inf has type float"):
        MemoryReport(every_n_steps=INF)


# ----- finding 4: compression of checkpointed blocks only -----------------------------------------------------------

def test_compressing_only_checkpointed_blocks_is_refused_at_setup():
    module = Recorded()
    with pytest.raises(MemKitConfigError, match=r"every module that activations.modules=\['model.blocks.\*'\] names "
                                                r"lies inside a checkpointed block.*Fix: "):
        _fit(module, activations={"checkpoint": "blocks", "compress": "int8", "modules": ["model.blocks.*"]})
    assert module.steps_run == 0


def test_a_pattern_with_no_effect_next_to_one_that_acts_is_warned_about():
    setting = {"checkpoint": "blocks", "checkpoint_every": 2, "compress": "int8",
               "modules": ["model.blocks.0.*", "model.blocks.1.mlp"]}  # block 0 is checkpointed, block 1 is not
    with pytest.warns(UserWarning, match=r"pattern\(s\) \['model.blocks.0.\*'\] match only modules inside "
                                         "checkpointed blocks"):
        trainer, module = _fit(activations=setting, steps=1)
    assert module.steps_run == 1
    # the setup line says what the checkpoint takes over (block 0's 4 sub-modules the first pattern names)
    assert "4 inside checkpointed blocks left to the checkpoint" in trainer.strategy.techniques[1].describe()


# ----- finding 8: checks at setup, not in the first step ------------------------------------------------------------

def test_triton_cross_entropy_on_cpu_is_refused_at_setup(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = Recorded()
    with pytest.raises(MemKitConfigError, match=r"cross_entropy.impl='triton' runs Triton kernels on CUDA, but the "
                                                r"model is on cpu.*Fix: cross_entropy.impl='chunked'"):
        _fit(module, cross_entropy={"impl": "triton"})
    assert module.steps_run == 0


def test_galore_8bit_without_bitsandbytes_is_refused_at_setup(monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")] + ["bitsandbytes"]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails
    module = Recorded()
    with pytest.raises(MemKitConfigError, match=r"optimizer='galore_adamw8bit' .*needs the optional backend "
                                                r"'bitsandbytes'.*Fix: pip install .*'galore_adamw'"):
        _fit(module, optimizer={"name": "galore_adamw8bit", "rank": 4})
    assert module.steps_run == 0


# ----- finding 9: defaults fit small models -------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "default"), [("galore_adamw", 128), ("apollo", 256), ("frugal", 128)])
def test_default_rank_is_lowered_to_fit_a_small_model(name, default):
    trainer, module = _fit(optimizer=name, steps=2)  # the tiny model is 64 wide: its k_proj is 32 x 64
    assert module.steps_run == 2
    optimizer = trainer.strategy.optimizers[0]
    technique = trainer.strategy.techniques[-1]
    assert f"default rank {default} lowered to min(m, n)" in technique.describe()
    names = {p: n for n, p in module.named_parameters()}
    for p in technique._lowrank:
        proj = optimizer.projector(p)
        assert proj.rank == min(default, *p.shape), names[p]
        assert all(math.isfinite(v) for v in p.detach().flatten().tolist()[:8])


def test_an_explicit_rank_that_does_not_fit_is_still_refused():
    module = Recorded()
    with pytest.raises(MemKitConfigError, match=r"rank=128 does not fit its shape \(64, 64\).*Fix: lower rank to"):
        _fit(module, optimizer={"name": "galore_adamw", "rank": 128})
    assert module.steps_run == 0


def test_default_rank_of_the_optimizer_class_fits_each_weight():
    from lightning_memkit.optim import GaLoreAdamW

    narrow, wide = torch.nn.Parameter(torch.randn(16, 40)), torch.nn.Parameter(torch.randn(200, 300))
    opt = GaLoreAdamW([narrow, wide], lr=1e-2)
    assert opt.projector(narrow).rank == 16 and opt.projector(wide).rank == 128
    assert opt.param_groups[0]["rank"] == 128 and type(opt.param_groups[0]["rank"]) is int  # plain in state dicts
    with pytest.raises(ValueError, match=r"rank=128 does not fit its shape \(16, 40\)"):
        GaLoreAdamW([narrow], lr=1e-2, rank=128)
    with pytest.raises(ValueError, match=r"rank=32 does not fit its shape \(16, 40\)"):  # a group's rank: explicit
        GaLoreAdamW([{"params": [narrow], "rank": 32}], lr=1e-2)
    # the flag is a group key, not one of the defaults; a state dict saved without it loads as an explicit rank
    assert "rank_is_default" not in opt.defaults and opt.param_groups[0]["rank_is_default"] is True
    (narrow.grad, wide.grad) = (torch.randn_like(narrow), torch.randn_like(wide))
    opt.step()
    saved = opt.state_dict()
    again = GaLoreAdamW([narrow, wide], lr=1e-2)
    again.load_state_dict(saved)
    assert again.projector(narrow).rank == 16 and again.state[narrow]["projector"]["basis"].shape == (16, 16)


def test_default_sequence_chunk_is_clamped_to_the_model():
    trainer, module = _fit(Recorded(max_seq_len=256), sequence="streambp", seq_len=64, steps=2)
    assert module.steps_run == 2
    described = trainer.strategy.techniques[-1].describe()
    assert "chunks of 256 tokens (the default 2048, clamped to the model's max_seq_len)" in described
    with pytest.raises(MemKitConfigError, match=r"sequence.chunk_size=2048 is longer than .* max_seq_len=256"):
        _fit(Recorded(max_seq_len=256), sequence={"method": "streambp", "chunk_size": 2048}, seq_len=64)

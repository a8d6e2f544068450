import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from lightning_memkit import MemKitConfigError, MemKitStrategy
from lightning_memkit.cli import MemKitCLI, main
from lightning_memkit.data import stdlib_dir

ROOT = os.path.dirname(os.path.dirname(__file__))
RECIPE = os.path.join(ROOT, "recipes", "quickstart.yaml")


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    """LightningCLI warns when both args= and sys.argv (pytest's flags here) carry arguments."""
    monkeypatch.setattr(sys, "argv", ["memkit"])


def fast_overrides(tmp_path):
    return [
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--model.init_args.model=tiny", f"--data.init_args.paths={os.path.join(stdlib_dir(), 'email')}",
        "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
    ]


def test_fit_from_the_recipe(tmp_path):
    cli = MemKitCLI(args=["--config", RECIPE, *fast_overrides(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy, MemKitStrategy)
    assert cli.trainer.strategy.activations.checkpoint == "blocks"
    assert cli.model.hparams.vocab_size == 258  # filled in from the tokenizer
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    assert len(cli.model.val_history) == 1
    report = [c for c in cli.trainer.callbacks if type(c).__name__ == "MemoryReport"][0]
    assert report.reports and report.reports[0].by_category["parameters"] > 0


def test_optimizer_and_scheduler_overrides(tmp_path):
    cli = MemKitCLI(
        args=["--config", RECIPE, *fast_overrides(tmp_path), "--optimizer=torch.optim.SGD", "--optimizer.lr=0.05",
              "--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=1"],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert isinstance(cli.trainer.optimizers[0], torch.optim.SGD)
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)


def test_unknown_recipe_key_is_named(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(open(RECIPE).read().replace("    learning_rate: 0.002", "    learning_rat: 0.002"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(recipe)])
    assert "learning_rat" in capsys.readouterr().err


def test_unknown_technique_name_in_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(open(RECIPE).read().replace("checkpoint: blocks", "checkpoint: sometimes"))
    # jsonargparse re-raises the strategy's MemKitConfigError inside its own ValueError, message kept
    with pytest.raises(ValueError, match="activations.checkpoint='sometimes' is not a known name.*'blocks'"):
        MemKitCLI(args=["--config", str(recipe)], run=False)


def test_unknown_memkit_preset_lists_presets(tmp_path):
    with pytest.raises(MemKitConfigError, match="memkit_turbo.*'memkit', 'memkit_checkpoint'"):
        MemKitCLI(args=["--config", RECIPE, "--trainer.strategy=memkit_turbo"], run=False)


def test_preset_name_on_the_command_line(tmp_path):
    cli = MemKitCLI(args=["--config", RECIPE, *fast_overrides(tmp_path), "--trainer.strategy=memkit"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, MemKitStrategy)
    assert strategy.cross_entropy.fused and strategy.activations.checkpoint == "none"


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", RECIPE, "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "lightning_memkit.MemKitStrategy" in out and "checkpoint: blocks" in out


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    exe = shutil.which("memkit") or os.path.join(os.path.dirname(sys.executable), "memkit")
    proc = subprocess.run(
        [exe, "fit", "--config", RECIPE, *fast_overrides(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation perplexity: first evaluation" in proc.stdout + proc.stderr
    assert "MemoryReport" in proc.stdout + proc.stderr


def test_optimizer_from_the_recipe(tmp_path):
    from lightning_memkit.optim import StepInBackward

    recipe = tmp_path / "galore.yaml"
    recipe.write_text(open(RECIPE).read().replace(
        "      cross_entropy: fused",
        "      optimizer: {name: galore_adamw8bit, rank: 8, update_gap: 2, in_backward: true,\n"
        "                  target_modules: ['*.mlp.*', '*.attn.*']}\n      cross_entropy: fused"))
    cli = MemKitCLI(args=["--config", str(recipe), *fast_overrides(tmp_path)], run=False)
    config = cli.trainer.strategy.optimizer_config
    assert (config.name, config.rank, config.target_modules) == ("galore_adamw8bit", 8, ("*.mlp.*", "*.attn.*"))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert isinstance(cli.trainer.optimizers[0], StepInBackward)
    assert cli.trainer.global_step == 3


def test_unknown_optimizer_in_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(open(RECIPE).read().replace("      cross_entropy: fused",
                                                  "      optimizer: galore\n      cross_entropy: fused"))
    with pytest.raises(ValueError, match="optimizer='galore' is not a known name.*'galore_adamw'"):
        MemKitCLI(args=["--config", str(recipe)], run=False)


def test_long_context_recipe(tmp_path):
    recipe = os.path.join(ROOT, "recipes", "long_context.yaml")
    cli = MemKitCLI(args=["--config", recipe, *fast_overrides(tmp_path), "--data.init_args.seq_len=64",
                          "--trainer.strategy.init_args.sequence.chunk_size=16"], run=False)
    config = cli.trainer.strategy.sequence
    assert (config.method, config.chunk_size) == ("streambp", 16)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3


def test_unknown_sequence_method_in_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(open(RECIPE).read().replace("      cross_entropy: fused",
                                                  "      sequence: streambp2\n      cross_entropy: fused"))
    with pytest.raises(ValueError, match="sequence='streambp2' is not a known name"):
        MemKitCLI(args=["--config", str(recipe)], run=False)


BAD_VALUES = {  # how a bad MemKitStrategy / model value reaches the CLI -> memkit's own message
    "override": (["--trainer.strategy.init_args.optimizer=bogus"], "optimizer='bogus' is not a known name. Fix: set"),
    "yaml": (None, "activations.checkpoint='blockz' is not a known name. Fix: set activations.checkpoint"),
    "model": (["--model.init_args.model=tinny"], "model.model='tinny' is not a named model shape. Fix: use one of"),
}


def _blockz(tmp_path) -> list[str]:
    extra = tmp_path / "blockz.yaml"
    extra.write_text("trainer:\n  strategy:\n    class_path: lightning_memkit.MemKitStrategy\n"
                     "    init_args:\n      activations: {checkpoint: blockz}\n")
    return ["--config", str(extra)]


@pytest.mark.parametrize("command", ["fit", "validate", "plan", "verify"])
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_bad_value_in_a_recipe_ends_with_memkits_message_in_a_few_lines(tmp_path, capsys, command, case):
    args, message = BAD_VALUES[case]
    args = _blockz(tmp_path) if args is None else args
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", RECIPE, *args, *(["--model.init_args.model=tiny"] if case != "model" else [])])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) <= 5, err
    assert "Traceback" not in err and "Union subtypes" not in err and "Expected a <class" not in err
    assert "--debug or MEMKIT_DEBUG=1 shows the full traceback" in err


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_whole_error(monkeypatch, how):
    args = ["fit", "--config", RECIPE, "--trainer.strategy.init_args.optimizer=bogus"]
    if how == "flag":
        args.append("--debug")  # memkit's flag: LightningCLI never sees it
    else:
        monkeypatch.setenv("MEMKIT_DEBUG", "1")
    with pytest.raises(MemKitConfigError, match="optimizer='bogus' is not a known name") as info:
        main(args)
    assert "Union subtypes" in str(info.value.__cause__)  # jsonargparse's error is kept as the cause


@pytest.mark.parametrize("args, expected", [
    (["--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz=3"),
    (["--trainer.max_steps=abc"], "Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: abc"),
    ("yaml", "does not accept option 'trainer.max_stepz'"),
], ids=["unknown-option", "bad-type", "yaml-typo"])
def test_plain_jsonargparse_errors_are_short(tmp_path, capsys, args, expected):
    if args == "yaml":
        typo = tmp_path / "typo.yaml"
        typo.write_text("trainer:\n  max_stepz: 3\n")
        args = ["--config", str(typo)]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", RECIPE, *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert expected in err and len(err.strip().splitlines()) <= 5 and "usage:" not in err, err
    assert "memkit fit --help lists the accepted options" in err


def test_help_lists_memkits_own_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None)
    lines = out.splitlines()
    for name in ("plan", "verify", "recipes", "--debug", "--config"):
        assert sum(line.split()[:1] == [name] for line in lines) == 1, out  # one line each
    assert "{fit,validate,test,predict}" in out  # and LightningCLI's


@pytest.mark.slow
def test_console_script_reports_a_bad_value_in_two_lines(tmp_path):
    exe = shutil.which("memkit") or os.path.join(os.path.dirname(sys.executable), "memkit")
    args = [exe, "fit", "--config", RECIPE, "--trainer.strategy.init_args.optimizer=bogus"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 5 and "memkit fit: optimizer='bogus' is not a known name" in proc.stderr, proc.stderr
    proc = subprocess.run([*args, "--debug"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "lightning_memkit.config.MemKitConfigError: optimizer='bogus'" in proc.stderr


# --- the shipped recipes: memkit recipes, --config NAME (issue 16, finding 7) ---

def test_memkit_recipes_prints_a_table_from_the_headers(capsys):
    from lightning_memkit.recipes import list_recipes

    with pytest.raises(SystemExit) as exit_:
        main(["recipes"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert rows["name"].split()[:4] == ["name", "budget", "planned", "peak"]
    shipped = sorted(f[: -len(".yaml")] for f in os.listdir(os.path.join(ROOT, "recipes")) if f.endswith(".yaml"))
    assert [r.name for r in list_recipes()] == shipped and set(shipped) <= set(rows)
    full = rows["llama3_8b_full_24gb"]
    assert "24 GiB GPU" in full and "21.14 GiB" in full and "Llama-3-8B, every weight trained" in full
    zero = rows["llama2_13b_zero_offload_24gb"]
    assert "24 GiB GPU, 64 GiB host, ~180 GiB NVMe" in zero and "4.78 GiB GPU, 48.49 GiB host" in zero
    assert rows["quickstart"].split()[1:3] == ["-", "-"]  # no budget line in its header
    assert "Quickstart: a small Llama-style model" in rows["quickstart"]


def test_memkit_recipes_name_prints_the_yaml(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recipes", "quickstart"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == open(RECIPE).read()
    with pytest.raises(SystemExit) as exit_:
        main(["recipes", "quickstrat"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "memkit recipes: NAME 'quickstrat': no such file" in err, err


@pytest.mark.parametrize("config", [["--config", "quickstart"], ["--config=quickstart.yaml"],
                                    ["-c", "recipes/quickstart.yaml"]])
def test_config_finds_a_shipped_recipe_by_name(tmp_path, monkeypatch, capsys, config):
    monkeypatch.chdir(tmp_path)  # no such file here
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *config, "--print_config"])
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None), out
    assert "checkpoint: blocks" in out and "learning_rate: 0.002" in out  # quickstart.yaml's values


def test_plan_and_verify_find_a_shipped_recipe_by_name(tmp_path, monkeypatch, capsys):
    import lightning_memkit.cli as cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", "quickstart"])  # a real plan: quickstart's full-size step, on fake tensors
    assert exit_.value.code == 0
    assert "peak (device)" in capsys.readouterr().out
    seen = []
    monkeypatch.setitem(cli._MEMKIT_MAINS, "verify", lambda args: seen.append(args) or 0)
    with pytest.raises(SystemExit):
        main(["verify", "--config", "quickstart.yaml", "--model.init_args.model=tiny"])
    assert seen == [["--config", os.path.realpath(RECIPE), "--model.init_args.model=tiny"]]


@pytest.mark.parametrize("command", ["fit", "validate", "plan", "verify"])
def test_an_unknown_recipe_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", "quickstrat"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert len(err.strip().splitlines()) <= 3, err
    assert f"memkit {command}: --config 'quickstrat': no such file" in err
    assert "quickstart, qwen2.5_1.5b_8gb" in err and "memkit recipes" in err and "Traceback" not in err


def test_a_file_in_the_current_folder_wins_over_a_shipped_name(tmp_path, monkeypatch, capsys):
    from lightning_memkit.cli import resolve_configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("seed_everything: 7\n")
    assert resolve_configs(["fit", "--config", "quickstart.yaml"]) == ["fit", "--config", "quickstart.yaml"]
    assert resolve_configs(["fit", "--config", "quickstart"])[2] == os.path.realpath(RECIPE)
    inline = "{trainer: {max_steps: 3}}"  # jsonargparse's --config also takes a YAML document
    assert resolve_configs(["fit", "--config", inline]) == ["fit", "--config", inline]


def test_recipe_names_in_the_cli_docs_exist():
    import lightning_memkit.cli as cli

    text = "\n".join(getattr(cli, name, "") for name in ("__doc__", "PLAN_HELP", "VERIFY_HELP", "RECIPES_HELP"))
    named = set(re.findall(r"recipes/([\w.\-]+\.yaml)", text))
    assert named and all(os.path.isfile(os.path.join(ROOT, "recipes", n)) for n in named), named


def test_memkit_export_is_a_subcommand(capsys, tmp_path):
    from lightning_memkit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["export", "--help"])
    assert stop.value.code == 0 and "--ckpt" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--to", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("memkit export: ") and len(err.strip().splitlines()) <= 3
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "export" in capsys.readouterr().out

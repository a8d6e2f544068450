"""The consumer-GPU recipes: each fits its stated budget per `memkit plan` and trains at a tiny size on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from lightning_memkit.planner.plans import plan

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
TINY = ["--model.init_args.model=tiny", "--model.init_args.vocab_size=258", "--model.init_args.max_seq_len=128",
        "--data.init_args.seq_len=64", "--data.init_args.batch_size=2", "--data.init_args.max_tokens=20000",
        "--data.init_args.num_workers=0", "--trainer.max_steps=3", "--trainer.logger=false",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
#: recipe -> (what makes it train at a tiny size on this CPU, beyond TINY)
CONSUMER = {
    "llama3_8b_full_24gb.yaml": [],
    "llama3_8b_long_context_24gb.yaml": ["--trainer.strategy.init_args.sequence={method: streambp, chunk_size: 16}"],
    # on this CPU sequence.offload has no effect (one warning); the plan above counts it as on a GPU
    "llama3_8b_128k_24gb.yaml": ["--trainer.strategy.init_args.sequence={method: streambp, chunk_size: 16, "
                                 "offload: true}"],
    "qwen2.5_1.5b_8gb.yaml": [],
    # no libaio here (DeepSpeed's NVMe op cannot build): the tiny run offloads to the CPU instead
    "llama2_13b_zero_offload_24gb.yaml": ["--trainer.strategy.init_args.offload_optimizer=cpu",
                                          "--trainer.strategy.init_args.offload_parameters=cpu",
                                          "--trainer.strategy.init_args.cpu_adam=false"],
}


def _header(name: str) -> tuple[str, str | None, float]:
    text = open(os.path.join(RECIPES, name)).read()
    gpu = re.search(r"Budget: (\d+) GiB of GPU memory", text)
    host = re.search(r"(\d+) GiB of host memory", text)
    stated = re.search(r"`memkit plan` measures (?:this recipe's step|the GPU) at (\d+\.\d+) GiB", text)
    assert gpu and stated, f"{name}: the header states the budget and the planned peak"
    assert "memkit fit --config recipes/" + name in text, f"{name}: the header gives the command that runs it"
    return f"{gpu.group(1)}GiB", (f"{host.group(1)}GiB" if host else None), float(stated.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONSUMER))
def test_recipe_fits_its_budget_per_memkit_plan(name, monkeypatch):
    monkeypatch.delenv("MEMKIT_NVME_PATH", raising=False)  # planning does not need this machine's NVMe folder
    gpu, host, stated = _header(name)
    result = plan(os.path.join(RECIPES, name), ["--trainer.logger=false"], gpu_memory=gpu, cpu_memory=host)
    assert result.recipe.fits, result.table()
    assert abs(result.recipe.peak / 2**30 - stated) < 0.01, (name, result.recipe.peak / 2**30, stated)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in sorted(CONSUMER) if "zero" not in n])
def test_recipe_trains_at_a_tiny_size(name, tmp_path):
    from lightning_memkit.cli import MemKitCLI

    cli = MemKitCLI(args=["fit", "--config", os.path.join(RECIPES, name), *TINY, *CONSUMER[name],
                          f"--trainer.default_root_dir={tmp_path}"], save_config_callback=None)
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])


@pytest.mark.slow
def test_zero_offload_recipe_trains_at_a_tiny_size(tmp_path):
    name = "llama2_13b_zero_offload_24gb.yaml"
    env = {**os.environ, "MEMKIT_NVME_PATH": ""}
    out = subprocess.run([sys.executable, "-m", "lightning_memkit.cli", "fit", "--config", os.path.join(RECIPES, name),
                          *TINY, *CONSUMER[name], f"--trainer.default_root_dir={tmp_path}"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=3` reached" in out.stderr + out.stdout

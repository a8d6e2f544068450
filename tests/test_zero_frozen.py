"""Frozen parts of the model under ZeRO-2 and ZeRO-3 (2 CPU processes): a frozen LM head, frozen embeddings, a
frozen first block, PEFT LoRA. The fits run in a subprocess (tests/helpers/zero_frozen_fit.py) and are compared
with memkit's DDP backend on the same global batch, as tests/test_zero.py does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("lm_head", "embeddings", "first_block", "lora")
#: ZeRO-3 partitions every parameter of the tiny models (as tests/test_zero.py's PARTITION_ALL)
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
STAGES = {"ddp": {}, "zero2": {"zero_stage": 2}, "zero3": {"zero_stage": 3, "deepspeed_config": PARTITION_ALL}}


def _launch(runs: list[dict], workdir: str) -> dict:
    out = os.path.join(workdir, "results.pt")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "helpers", "zero_frozen_fit.py"), "--devices", "2",
                           "--runs", json.dumps(runs), "--out", out],
                          capture_output=True, text=True, timeout=600, env=env, cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_frozen_parts_under_zero_train_like_ddp(tmp_path):
    """memkit's AdamW over every parameter (frozen ones in the group): under ZeRO-2/3 the frozen parameters stay
    bit for bit and the trainable ones train as under DDP (losses to 1e-5; weights to fp32 rounding)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    runs = [{"name": f"{stage}/{case}", "strategy": {**kwargs, "optimizer": "adamw"}, "steps": 3, "freeze": case,
             "hf": case == "lora"} for case in CASES for stage, kwargs in STAGES.items()]
    results = _launch(runs, str(tmp_path))
    for case in CASES:
        reference = results[f"ddp/{case}"]
        for stage in ("zero2", "zero3"):
            run, what = results[f"{stage}/{case}"], f"{stage}/{case}"
            assert run["strategy"] == "MemKitDeepSpeedStrategy" and run["world_size"] == 2, what
            assert run["frozen"] == reference["frozen"] and run["frozen"], what
            for name in run["frozen"]:  # PEFT renames q_proj.weight to q_proj.base_layer.weight
                assert torch.equal(run["state"][name], run["initial"][name.replace(".base_layer", "")]), (what, name)
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5,
                                       atol=0, msg=what)
            for name in run["trainable"]:
                start = run["initial"].get(name)
                if start is not None:
                    assert not torch.equal(run["state"][name], start), (what, name)
                torch.testing.assert_close(run["state"][name], reference["state"][name], rtol=0, atol=2e-5,
                                           msg=f"{what}: {name}")


@pytest.mark.slow
def test_param_groups_without_trainable_parameters_under_zero(tmp_path):
    """A LoRA model with CausalLMModule's optimizer trains under ZeRO-2/3: its no-decay group would be empty (every
    norm is frozen), so the module leaves it out; DeepSpeed would drop it and the LR scheduler built over two groups
    would fail at its first step. A group of frozen parameters only (the decay / no-decay split over every
    parameter), which ZeRO-1/2 cannot flatten, is refused at setup with the fix."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    runs = [{"name": f"{groups}/{stage}", "strategy": {**STAGES[stage], "optimizer": "adamw"}, "steps": 2,
             "freeze": "lora", "hf": True, "groups": groups, "expect_error": True}
            for groups in ("module", "split") for stage in ("zero2", "zero3")]
    results = _launch(runs, str(tmp_path))
    for stage in ("zero2", "zero3"):
        assert results[f"module/{stage}"]["error"] is None, results[f"module/{stage}"]["error"]
        assert len(results[f"module/{stage}"]["losses"]) == 2
        error = results[f"split/{stage}"]["error"]
        assert error is not None and error.startswith("MemKitConfigError: param group 1 of the optimizer"), error
        assert "frozen parameter(s) only" in error and "Fix: leave that group out" in error

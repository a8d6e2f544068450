"""The DeepSpeed backend of ``MemKitStrategy``: ZeRO-1/2/3 and offload, with memkit's techniques on top.

``MemKitStrategy(zero_stage=1|2|3, ...)`` builds a :class:`MemKitDeepSpeedStrategy`, which is both a
``MemKitStrategy`` and Lightning's ``DeepSpeedStrategy``: Lightning's DeepSpeed integration does
the engine, the precision, gradient accumulation and clipping, and the sharded checkpoints; memkit
adds

- its techniques, installed exactly as on the DDP backend (the optimizer technique converts what
  ``configure_optimizers`` returned *before* DeepSpeed wraps it);
- the rules of which technique can live with which ZeRO stage (:func:`check_compatibility`), checked
  when the strategy is built;
- CPU support (gloo), for tests and laptops: Lightning's strategy accepts only CUDA and DeepSpeed
  reads a device index, so CPU devices get explicit indices (``cpu:0``, ``cpu:1``, ...), and
  DeepSpeed's shared-memory all-reduce op (a JIT-compiled speed-up for CPU clusters) is skipped;
- ``cpu_adam``: with the optimizer offloaded, torch ``Adam``/``AdamW`` steps run as DeepSpeed's
  vectorized ``DeepSpeedCPUAdam`` (same update); any other optimizer is kept as it is;
- :func:`export_consolidated`: one file with the full fp32 (or cast) weights of a sharded checkpoint;
- checkpoints written whole or not at all: the shards go to ``<path>.partial`` and the folder takes the
  checkpoint's name once every rank has written (a kill mid-write leaves the previous one), with the
  memkit settings record beside the shards, checked before DeepSpeed loads any state.

Layout: :mod:`~lightning_memkit.zero.rules` (which technique goes with which stage, the memory formula, the
DeepSpeed config; no Lightning or DeepSpeed import), :mod:`~lightning_memkit.zero.strategy` (the strategy) and
:mod:`~lightning_memkit.zero.checkpoint` (sharded checkpoints published whole, and consolidated). The names below
are importable from ``lightning_memkit.zero`` too, each loaded with its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "check_compatibility": "rules", "zero_memory": "rules", "build_deepspeed_config": "rules",
    "check_elementwise": "rules", "ELEMENTWISE_OPTIMIZERS": "rules", "ELEMENTWISE_CLASSES": "rules",
    "OPTIMIZER_BYTES_PER_PARAM": "rules",
    "MemKitDeepSpeedStrategy": "strategy", "to_cpu_adam": "strategy", "check_trainer_against_config": "strategy",
    "export_consolidated": "checkpoint", "publish_folder": "checkpoint", "PARTIAL_SUFFIX": "checkpoint",
    "OLD_SUFFIX": "checkpoint",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'lightning_memkit.zero' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lightning_memkit.zero.{where}"), name)

"""Peak memory of one training step of a full-size model, by category, for each technique.

Runs under FakeTensorMode on the CPU (nothing is allocated; about a minute for Llama-3-8B): the planner's
step (``fake_training_step``: StepRunner, CategoryTracker counting tensor bytes). Later technique issues
add rows to TECHNIQUES.

    python benchmarks/memory_step.py                       # Llama-3-8B, bf16, seq 4096, micro-batch 1
    python benchmarks/memory_step.py --model qwen2.5-1.5b --seq-len 8192
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_memkit.memory import CATEGORIES, fake_training_step, format_table
from lightning_memkit.units import in_unit, table_unit
from lightning_memkit.models import NAMED_CONFIGS

#: technique name -> keyword arguments of fake_training_step
TECHNIQUES: dict[str, dict] = {
    "baseline (AdamW, full activations)": {},
    "activation checkpointing (every block)": {"checkpoint_every": 1},
    "activation checkpointing (every 2nd block)": {"checkpoint_every": 2},
    "fused cross-entropy (chunked)": {"fused_cross_entropy": True},
    "checkpointing + fused cross-entropy": {"checkpoint_every": 1, "fused_cross_entropy": True},
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(model: str, seq_len: int, batch_size: int, dtype: str) -> tuple[str, list[tuple[str, ...]]]:
    reports = []
    for name, kwargs in TECHNIQUES.items():
        start = time.perf_counter()
        report = fake_training_step(model, seq_len=seq_len, batch_size=batch_size, dtype=DTYPES[dtype], **kwargs)
        reports.append((name, report, time.perf_counter() - start))
    unit, scale = table_unit(max(r.peak for _, r, _ in reports))
    rows = []
    for name, report, seconds in reports:
        cats = [in_unit(report.by_category[c], scale) for c in CATEGORIES if c not in ("buffers", "other")]
        rows.append((name, *cats, in_unit(report.peak, scale), f"{seconds:.1f}"))
    return unit, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(NAMED_CONFIGS))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    args = parser.parse_args()
    unit, rows = run(args.model, args.seq_len, args.batch_size, args.dtype)
    header = ("technique", *(c for c in CATEGORIES if c not in ("buffers", "other")), "peak", "measure s")
    print(
        f"{args.model}, {args.dtype}, sequence {args.seq_len}, micro-batch {args.batch_size}: {unit} of tensors at the "
        "step's peak (the planner's step under FakeTensorMode)"
    )
    print(format_table(rows, header))


if __name__ == "__main__":
    main()

"""Activation memory per mode: saved-activation bytes, step peak, step time.

For each mode (plain, checkpointing of every block, selective checkpointing, int8, fp8, int8 with
running scales; with --cuda also offload, offload + int8, checkpointing + offload):

- **saved bytes**: bytes the step's forward saves for its backward through autograd's saved-tensor
  mechanism and keeps on the device (an outermost ``saved_tensors_hooks`` counts what is saved
  outside memkit's hooks; memkit's hooks report what they keep on the device after packing).
  Checkpointed blocks save nothing this way (their inputs are held by the checkpoint), so for
  checkpointing the peak column is the one to read.
- **peak**: the step's peak (on CUDA the second step's, as the first one also holds one-time
  buffers; fake tensors + StepMemoryTracker for the Llama-3-8B shape, where only the peak
  is read: fake tensors have no storages to count saved bytes by, and do not model what selective
  checkpointing keeps; StepMemoryTracker (the planner's CategoryTracker) on CPU; the caching
  allocator on CUDA).
- **time**: forward + backward, as a ratio to the plain run, the modes taking turns, best of
  --repeats (measured runs only; not for fake tensors).

    python benchmarks/activations.py              # Llama-3-8B at 4096 (fake) and the small model on CPU
    python benchmarks/activations.py --cuda       # on a GPU: measured, offload included
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Any

import torch

from lightning_memkit.memory import StepMemoryTracker, format_table
from lightning_memkit.units import GIB, MIB

MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "checkpoint (every block)": {"checkpoint": "blocks"},
    "selective checkpoint": {"checkpoint": "selective"},
    "memory-targeted checkpoint (64 MiB)": {"checkpoint": "budget", "activation_budget": "64MiB"},
    "int8": {"compress": "int8"},
    "int8, running scales": {"compress": "int8", "scales": "running"},
    "fp8": {"compress": "fp8"},
}
CUDA_MODES: dict[str, dict[str, Any]] = {
    "offload": {"offload": True},
    "offload + int8": {"offload": True, "compress": "int8"},
    "checkpoint + offload of inputs": {"checkpoint": "blocks", "offload": True},
}


def apply_mode(model: torch.nn.Module, setting: dict[str, Any]) -> Any:
    """Install the activation techniques of ``setting`` on the reference model (as the strategy does)."""
    from lightning_memkit.activations.checkpoint import CheckpointTechnique
    from lightning_memkit.activations.technique import SavedTensorsTechnique
    from lightning_memkit.config import parse_activations

    config = parse_activations(setting)
    techniques = []
    if config.checkpoint != "none":
        techniques.append(CheckpointTechnique(config))
    if config.compress != "none" or config.offload:
        techniques.append(SavedTensorsTechnique(config))
    for t in techniques:
        t.setup_module(model)
    return techniques


def step(model: torch.nn.Module, ids: torch.Tensor, techniques: list[Any]) -> int:
    """Forward + backward (fused cross-entropy); returns the saved bytes kept on the device."""
    from lightning_memkit.loss import linear_cross_entropy

    outer = [0]
    seen: set[int] = set()

    def count(x: torch.Tensor) -> torch.Tensor:  # each storage once (several ops save the same tensor)
        if not isinstance(x, torch.nn.Parameter):
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                outer[0] += x.untyped_storage().nbytes()
        return x

    with contextlib.ExitStack() as stack:
        for t in techniques:
            stack.enter_context(t.step_context())
        with torch.autograd.graph.saved_tensors_hooks(count, lambda x: x):
            hidden = model.forward_hidden(ids[:, :-1])
            loss = linear_cross_entropy(hidden, model.lm_head.weight, ids[:, 1:], impl="chunked")
        loss.backward()
    inner = sum(t.manager.device_bytes for t in techniques if getattr(t, "manager", None) is not None)
    return outer[0] + inner


def fake_8b(seq_len: int) -> list[tuple[str, ...]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.models.llama import Transformer, get_config

    cfg = get_config("llama-3-8b")
    rows = []
    for name, setting in MODES.items():
        if name == "selective checkpoint" or "memory-targeted" in name:  # fake tensors do not model the
            continue  # outputs selective checkpointing keeps, nor have storages for the budget's measurement
        with FakeTensorMode():
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = Transformer(cfg)
            finally:
                torch.set_default_dtype(previous)
            techniques = apply_mode(model, setting)
            ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))
            with StepMemoryTracker(model) as tracker:
                step(model, ids, techniques)
            result = tracker.result()
        c = result.by_category
        rows.append((name, f"{result.peak / GIB:.2f}", f"{(c['activations'] + c['temporaries']) / GIB:.2f}"))
    return rows


def measured(device: str, repeats: int, modes: dict[str, dict[str, Any]], cfg_name: str, seq_len: int,
             batch: int, dtype: torch.dtype) -> list[tuple[str, ...]]:
    from lightning_memkit.models.llama import Transformer, get_config

    torch.manual_seed(0)
    base = Transformer(get_config(cfg_name)).to(device=device, dtype=dtype)
    ids = torch.randint(0, base.vocab_size, (batch, seq_len + 1), device=device)
    models = {}
    for name, setting in modes.items():
        m = copy.deepcopy(base)
        models[name] = (m, apply_mode(m, setting))
    stats: dict[str, dict[str, Any]] = {name: {"times": []} for name in modes}
    for r in range(repeats + 1):
        for name, (m, techniques) in models.items():
            m.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            if device == "cpu" and r == 0:
                with StepMemoryTracker(m) as tracker:
                    saved = step(m, ids, techniques)
                stats[name]["peak"] = tracker.result().peak
            else:
                saved = step(m, ids, techniques)
            if device == "cuda":
                torch.cuda.synchronize()
                if r == 1:  # the second step: the first one also holds one-time buffers (kernel builds, caches)
                    stats[name]["peak"] = torch.cuda.max_memory_allocated() - before
            elapsed = time.perf_counter() - start
            if r == 0:
                stats[name]["saved"] = saved
            else:
                stats[name]["times"].append(elapsed)
    plain = min(stats["plain"]["times"])
    return [(name, f"{s['saved'] / MIB:.1f}", f"{s['peak'] / MIB:.1f}", f"{min(s['times']) / plain:.2f}x")
            for name, s in stats.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--skip-fake", action="store_true")
    args = parser.parse_args()
    if args.cuda:
        rows = measured("cuda", args.repeats, {**MODES, **CUDA_MODES}, "llama-3.2-1b", 4096, 1, torch.bfloat16)
        print(f"Llama-3.2-1B shape, seq 4096, batch 1, bf16, on {torch.cuda.get_device_name()}: forward + backward "
              f"(fused CE); peak over the weights and inputs (allocator); time best of {args.repeats}")
        print(format_table(rows, ("mode", "saved MiB on device", "peak MiB", "time vs plain")))
        return
    if not args.skip_fake:
        print("Llama-3-8B shape, seq 4096, batch 1, bf16, fake tensors: forward + backward (fused CE)")
        print(format_table(fake_8b(4096), ("mode", "peak GiB", "activations+temporaries at peak, GiB")))
    rows = measured("cpu", args.repeats, MODES, "small", 512, 4, torch.float32)
    print(f"\n'small' model on CPU, seq 512, batch 4, fp32, measured (StepMemoryTracker); time best of {args.repeats} "
          f"({torch.get_num_threads()} threads)")
    print(format_table(rows, ("mode", "saved MiB on device", "peak MiB", "time vs plain")))


if __name__ == "__main__":
    main()

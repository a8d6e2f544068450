"""Model-state memory per GPU (and per process on the host) for the Llama-2-13B and Llama-3-8B shapes
under each memkit ZeRO preset, from the partition sizes (``lightning_memkit.zero.zero_memory``).

The formula's partition terms are checked against what DeepSpeed really allocates, on the tiny
model with 2 processes (``tests/test_zero.py::test_partition_sizes_match_the_memory_formula``: the
16-bit parameters and the master + optimizer partitions, within 1% -- the padding). Model states
only: activations depend on the sequence length and the activation techniques (see
``benchmarks/activations.py`` and ``benchmarks/sequence.py``); communication buckets use memkit's
bucket sizes.

    python benchmarks/zero_memory.py [--gpus 1 2 8] [--optimizer adamw]
"""

from __future__ import annotations

import argparse

import torch

from lightning_memkit.memory import format_table
from lightning_memkit.units import GIB
from lightning_memkit.strategy import PRESETS
from lightning_memkit.zero import zero_memory

MODELS = ("llama-2-13b", "llama-3-8b")
ROWS = ("memkit", "memkit_zero1", "memkit_zero2", "memkit_zero2_offload", "memkit_zero3", "memkit_zero3_offload",
        "memkit_zero3_offload_nvme")


def shape(name: str) -> tuple[int, int]:
    """(parameters, parameters of one transformer block) of a named reference shape."""
    from lightning_memkit.models.llama import Transformer, get_config

    with torch.device("meta"):
        model = Transformer(get_config(name))
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.blocks[0].parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    args = parser.parse_args()
    for model in MODELS:
        n_params, block = shape(model)
        rows = []
        for preset in ROWS:
            kwargs = PRESETS[preset][1]
            for gpus in args.gpus:
                m = zero_memory(n_params, world_size=gpus, stage=kwargs.get("zero_stage", 0),
                                offload_optimizer=kwargs.get("offload_optimizer", "none"),
                                offload_parameters=kwargs.get("offload_parameters", "none"),
                                optimizer=args.optimizer, largest_block_params=block)
                d, h, nvme = m["device"], m["host"], m["nvme"]
                rows.append([
                    preset, str(gpus),
                    f"{d['parameters'] / GIB:.1f}", f"{d['gradients'] / GIB:.1f}", f"{d['optimizer'] / GIB:.1f}",
                    f"{d['buffers'] / GIB:.2f}", f"{d['total'] / GIB:.1f}", f"{h['total'] / GIB:.1f}",
                    f"{nvme['total'] / GIB:.1f}",
                    "yes" if d["total"] < 24 * GIB else "no",
                ])
        print(f"\n{model}: {n_params / 1e9:.2f}B parameters, optimizer {args.optimizer}; "
              "GiB of model states per process"
              " (bf16 parameters under ZeRO; memkit = DDP, bf16-mixed)")
        print(format_table(rows, ("preset", "GPUs", "params", "grads", "optim", "buffers", "device", "host",
                                  "NVMe", "< 24 GiB")))


if __name__ == "__main__":
    main()

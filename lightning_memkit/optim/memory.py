"""Predicted optimizer-state bytes, per optimizer, from parameter shapes alone (no allocation).

Used by the benchmark (Llama-3-8B shapes) and checked against ``state_bytes()`` of real optimizers
in the tests. The rules follow the implementations:

- torch AdamW / memkit ``adamw``: two moments in the parameter's dtype.
- bitsandbytes ``adamw8bit``: tensors of >= 4096 values: two uint8 moments, one fp32 absmax per block of
  256 values each, and two 256-entry fp32 quantization maps; smaller tensors: two fp32 moments.
- memkit low-rank optimizers: dense parameters as memkit ``adamw`` (8-bit as above for
  ``galore_adamw8bit``, without the maps); a low-rank weight (m, n) of rank r keeps two moments of
  r x max(m, n) in fp32 (8-bit in ``galore_adamw8bit``), plus the SVD basis r x min(m, n) fp32 (GaLore,
  FRUGAL "svd") or nothing (seeded random bases are regenerated), plus APOLLO's last update norm.
- SPAM: as ``adamw``; with ``density < 1`` each sparse weight keeps 2 x floor(density * numel) fp32 moments and
  their int32 indices.
- SGD-SaI: one momentum buffer in the parameter's dtype.
- COSMOS: a low-rank weight (m, n) of rank r keeps its first moment m x n in the weight's dtype and, in fp32, the
  basis n x r, the statistics in the basis r x r and the second moment m x r (:func:`.cosmos.predicted_state_bytes`).
- Natural GaLore: GaLore's state (8-bit moments in ``natural_galore8bit``) plus the history of s projected
  gradients, s x r·max(m, n) fp32, and its s x s Gram matrix (:func:`.natural_galore.predicted_state_bytes`).
- zeroth-order: none (``zo_sgd``); two moments in the parameter's dtype (``zo_adam``).
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable, Optional

import torch

from lightning_memkit.config import OptimizerConfig
from lightning_memkit.optim import OPTIMIZER_CLASSES
from lightning_memkit.optim.base import MIN_8BIT_SIZE, moment_bytes
from lightning_memkit.optim.eight_bit import quantized_bytes


def _default(name: str, key: str) -> object:
    """The optimizer class's default for ``key`` (looked up the class hierarchy: APOLLO-Mini sets only
    what differs from APOLLO)."""
    for cls in OPTIMIZER_CLASSES[name].__mro__:
        param = inspect.signature(cls.__init__).parameters.get(key) if "__init__" in vars(cls) else None
        if param is not None:
            return param.default
    raise KeyError(f"{name} has no setting {key!r}")


def predict_state_bytes(params: Iterable[tuple[str, tuple[int, ...], torch.dtype]], config: OptimizerConfig,
                        lowrank: Optional[set[str]] = None) -> int:
    """Bytes of optimizer state after the first step.

    Args:
        params: (name, shape, dtype) of every trainable parameter.
        config: the optimizer (``name="none"`` means torch AdamW).
        lowrank: names of the low-rank weights (ignored by optimizers without a low-rank rule).
    """
    name = config.name
    lowrank = lowrank or set()
    total = 0
    if name in ("adamw8bit", "paged_adamw8bit"):
        for _, shape, _dtype in params:
            numel = math.prod(shape)
            total += 2 * quantized_bytes(numel) + 2 * 256 * 4 if numel >= MIN_8BIT_SIZE else 2 * numel * 4
        return total
    if name == "sgd_sai":  # one momentum buffer in the parameter's dtype (the gSNR is a Python float)
        return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in params)
    if name == "spam":
        return _spam_bytes(params, config, lowrank)
    if name in ("zo_sgd", "zo_adam"):
        from lightning_memkit.optim.zeroth_order import predict_zo_state_bytes

        return predict_zo_state_bytes(name, params)
    if name == "cosmos":
        from lightning_memkit.optim.cosmos import predicted_state_bytes as cosmos_bytes

        return sum(cosmos_bytes(shape, dtype, rank=config.rank, lowrank=pname in lowrank)
                   for pname, shape, dtype in params)
    if name in ("natural_galore", "natural_galore8bit"):
        from lightning_memkit.optim.natural_galore import predicted_state_bytes as natural_bytes

        history = config.history if config.history is not None else _default(name, "history")
        return sum(natural_bytes(shape, dtype, rank=config.rank, history=history, eight_bit=name.endswith("8bit"),
                                 lowrank=pname in lowrank) for pname, shape, dtype in params)
    eight_bit = name == "galore_adamw8bit"
    rank = config.rank if config.rank is not None else (_default(name, "rank") if name in OPTIMIZER_CLASSES and
                                                        name != "adamw" else None)
    for pname, shape, dtype in params:
        numel = math.prod(shape)
        if name in ("none", "adamw") or pname not in lowrank:
            if eight_bit and numel >= MIN_8BIT_SIZE:
                total += 2 * quantized_bytes(numel)
            else:
                total += 2 * numel * torch.empty((), dtype=dtype).element_size()
            continue
        m, n = shape
        r = rank if config.rank is not None else min(rank, m, n)  # an unset rank is lowered to fit each weight
        total += moment_bytes(r * max(m, n), eight_bit)
        if name.startswith("galore") or (name == "frugal" and (config.proj or _default("frugal", "proj")) == "svd"):
            total += r * min(m, n) * 4
        if name.startswith("apollo"):
            limiter = config.norm_growth_limit
            if limiter is None:
                limiter = _default(name, "norm_growth_limit")
            total += 4 if limiter else 0
    return total


def _spam_bytes(params: Iterable[tuple[str, tuple[int, ...], torch.dtype]], config: OptimizerConfig,
                lowrank: set[str]) -> int:
    """SPAM: two moments in the parameter's dtype; with ``density < 1`` a sparse weight keeps two fp32 moments of
    ``sparse_count`` entries and their indices (int32; int64 from 2**31 entries)."""
    from lightning_memkit.optim.spam import index_dtype, sparse_count

    density = config.density if config.density is not None else _default("spam", "density")
    total = 0
    for pname, shape, dtype in params:
        numel = math.prod(shape)
        if density < 1 and pname in lowrank:
            k = sparse_count(numel, density)
            total += 2 * k * 4 + k * torch.empty((), dtype=index_dtype(numel)).element_size()
        else:
            total += 2 * numel * torch.empty((), dtype=dtype).element_size()
    return total

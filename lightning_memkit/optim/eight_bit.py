"""8-bit optimizer states through bitsandbytes.

- :func:`quantize_state` / :func:`dequantize_state`: blockwise dynamic quantization (blocks of 256
  values, one fp32 absmax each; the signed dynamic map for first moments, the unsigned one for
  second moments, as bitsandbytes' 8-bit Adam). memkit's GaLore-AdamW-8bit keeps its moments so.
- :func:`bnb_optimizer`: bitsandbytes' own ``AdamW8bit`` / ``PagedAdamW8bit``, built by name from
  param groups (paged optimizers fall back to non-paged memory on CPU, with bitsandbytes' warning).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from lightning_memkit._imports import require
from lightning_memkit._tensors import is_symbolic

BLOCKSIZE = 256

_CODES: dict[tuple[bool, torch.device], Tensor] = {}


def _bnb_functional() -> Any:
    return require("bitsandbytes.functional", feature="8-bit optimizer states")


def _code(signed: bool, device: torch.device) -> Tensor:
    key = (signed, device)
    if key not in _CODES:
        _CODES[key] = _bnb_functional().create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def quantized_bytes(numel: int) -> int:
    """Bytes of one quantized tensor of ``numel`` values: one byte each plus an fp32 scale per block."""
    return numel + 4 * math.ceil(numel / BLOCKSIZE)


def quantize_state(x: Tensor, *, signed: bool) -> tuple[Tensor, Tensor]:
    """fp32 tensor -> (uint8 codes of x's numel, fp32 absmax per block of 256)."""
    if is_symbolic(x):  # memory planning on fake tensors: right shapes and dtypes, no values
        return (torch.empty(x.numel(), dtype=torch.uint8, device=x.device),
                torch.empty(math.ceil(x.numel() / BLOCKSIZE), dtype=torch.float32, device=x.device))
    codes, qstate = _bnb_functional().quantize_blockwise(
        x.detach().float().contiguous().view(-1), code=_code(signed, x.device), blocksize=BLOCKSIZE
    )
    return codes, qstate.absmax.float()


def dequantize_state(codes: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """Inverse of :func:`quantize_state`: a flat fp32 tensor."""
    if is_symbolic(codes):
        return torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    return _bnb_functional().dequantize_blockwise(
        codes, absmax=absmax, code=_code(signed, codes.device), blocksize=BLOCKSIZE
    ).float()


BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}


def bnb_optimizer(name: str, param_groups: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                  eps: float, weight_decay: float) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (``"adamw8bit"``) or its paged variant (``"paged_adamw8bit"``)."""
    if name not in BNB_OPTIMIZERS:
        raise ValueError(
            f"{name!r} is not a bitsandbytes optimizer memkit exposes; use one of {sorted(BNB_OPTIMIZERS)}.")
    optim = require("bitsandbytes.optim", feature=f"optimizer={name!r}")
    cls = getattr(optim, BNB_OPTIMIZERS[name])
    return cls(list(param_groups), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

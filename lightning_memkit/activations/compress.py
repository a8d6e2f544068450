"""Saved-activation compression: the forward is exact, the copy kept for the backward is 8-bit.

Packers (pure functions with a PyTorch reference path; on CUDA, per-channel int8 and per-group fp8
packing run the Triton kernels of ``kernels/quantize.py``, which compute the same codes):

- ``int8`` (Mesa): symmetric int8 with one fp32 scale per channel (the last dimension) for 2-D/3-D
  tensors and one per head for 4-D attention tensors (B, H, S, E), q = round(x / s), s = absmax/127.
  With ``scales="running"`` the scale of each saved-tensor slot is a running estimate of its absmax
  (momentum 0.9, as Mesa learns its quantization parameters); values beyond it are clipped.
- ``fp8`` (COAT): float8 e4m3 with mixed granularity: one scale per group of 128 values along the
  last dimension for the inputs of linear layers, one scale per tensor elsewhere; s = absmax/448.

What is packed: floating tensors that are part of the autograd graph (``requires_grad``), with at
least ``min_numel`` values, that are neither parameters nor views of them. Masks, RoPE tables,
buffers, integer tensors and small tensors are kept as they are. Unpacking returns the original
dtype and shape; values carry the quantization error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_GROUP = 128


def fp8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


@dataclass
class Packed:
    """A compressed saved tensor: codes, fp32 scales broadcastable to the (regrouped) codes, and
    how to give the original back."""

    codes: Tensor
    scale: Tensor
    dtype: torch.dtype
    shape: torch.Size
    grouped: bool = False  # fp8 per-group: codes are (..., D/128, 128)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions a scale is shared over: all but the head (4-D) or the channel (last) dimension."""
    if x.ndim == 4:  # (B, H, S, E): one scale per head
        return (0, 2, 3)
    return tuple(range(x.ndim - 1))  # one scale per channel of the last dimension


def int8_absmax(x: Tensor) -> Tensor:
    """Per-channel (per-head for 4-D) absolute maximum, fp32, keepdim."""
    return x.detach().abs().amax(dim=_reduce_dims(x), keepdim=True).float()


def _kernels() -> Any:
    from lightning_memkit._imports import require

    return require("lightning_memkit.kernels.quantize", feature="Triton quantization kernels")


def pack_int8(x: Tensor, absmax: Optional[Tensor] = None) -> Packed:
    """int8 codes of ``x`` with per-channel / per-head scales (from ``absmax``, or x's own). On CUDA,
    per-channel packing with the tensor's own scales runs the Triton kernels."""
    if x.is_cuda and absmax is None and x.ndim in (2, 3):
        codes, scale = _kernels().int8_pack(x.detach())
        return Packed(codes, scale.view([1] * (x.ndim - 1) + [-1]), x.dtype, x.shape)
    amax = int8_absmax(x) if absmax is None else absmax
    scale = (amax / INT8_MAX).clamp_(min=1e-12)
    codes = torch.round(x.detach().float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Packed(codes, scale, x.dtype, x.shape)


def pack_fp8(x: Tensor, per_group: bool) -> Packed:
    """float8 e4m3 codes of ``x``: per group of 128 along the last dimension, or per tensor."""
    grouped = per_group and x.ndim >= 1 and x.shape[-1] % FP8_GROUP == 0
    if grouped and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9):  # Triton's fp8e4nv: Ada+
        # one Triton pass: each group's absmax and its codes
        codes, scale = _kernels().fp8_pack_groups(x.detach())
        groups = x.shape[-1] // FP8_GROUP
        return Packed(codes.view(*x.shape[:-1], groups, FP8_GROUP), scale.view(*x.shape[:-1], groups, 1), x.dtype,
                      x.shape, grouped=True)
    xf = x.detach().float()
    if grouped:
        xf = xf.reshape(*x.shape[:-1], x.shape[-1] // FP8_GROUP, FP8_GROUP)
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif per_group:  # last dimension not a multiple of 128: one scale per row
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax().reshape([1] * x.ndim)
    scale = (amax / FP8_MAX).clamp_(min=1e-12)
    codes = (xf / scale).to(torch.float8_e4m3fn)
    return Packed(codes, scale, x.dtype, x.shape, grouped=grouped)


def unpack(packed: Packed) -> Tensor:
    """The tensor back: original dtype and shape."""
    x = packed.codes.float() * packed.scale
    return x.reshape(packed.shape).to(packed.dtype)


class RunningScales:
    """Mesa's running estimates of each saved-tensor slot's absmax (per channel / per head)."""

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.values: dict[Any, Tensor] = {}

    def absmax(self, slot: Any, x: Tensor) -> Tensor:
        current = int8_absmax(x)
        previous = self.values.get(slot)
        if previous is None or previous.shape != current.shape or previous.device != current.device:
            estimate = current
        else:
            estimate = previous.mul(self.momentum).add_(current, alpha=1 - self.momentum)
        self.values[slot] = estimate
        return estimate

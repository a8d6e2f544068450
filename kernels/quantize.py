"""Triton kernels for saved-activation compression (the PyTorch reference is
``lightning_memkit.activations.compress``).

- int8 per channel: :func:`int8_pack` runs a column-wise absmax kernel over the rows of the
  (rows, D) view, then one kernel that scales, rounds (half to even, as ``torch.round``), clamps
  and packs to int8.
- fp8 per group of 128 along the last dimension: :func:`fp8_pack_groups` computes each group's
  absmax and its e4m3 codes in one pass (the scale computation is fused with the packing).
- :func:`int8_unpack` / :func:`fp8_unpack_groups`: codes x scale in the original dtype.

This module imports only torch and triton. On a machine without a GPU, set ``TRITON_INTERPRET=1``
before importing it to run the kernels in Triton's interpreter (slow; small shapes only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT8_MAX = 127.0
FP8_MAX = 448.0
GROUP = 128


@triton.jit
def _round_half_even(x):
    """As torch.round: x - floor(x) is exact in fp32 for |x| < 2**23 (codes are within ±127 here)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _col_absmax_kernel(X, OUT, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < R) & cmask[None, :], other=0.0)
        acc = tl.maximum(acc, tl.max(tl.abs(x.to(tl.float32)), axis=0))
    tl.store(OUT + cols, acc, mask=cmask)


@triton.jit
def _int8_quant_kernel(X, SCALE, Q, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pr, pd = tl.program_id(0), tl.program_id(1)
    rows = (pr * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    x = tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SCALE + cols, mask=cols < D, other=1.0)
    q = _round_half_even(x / s[None, :])
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(Q + rows[:, None] * D + cols[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _dequant_kernel(Q, SCALE, OUT, R, D, GROUPED: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    pr, pd = tl.program_id(0), tl.program_id(1)
    rows = (pr * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    q = tl.load(Q + rows[:, None] * D + cols[None, :], mask=mask).to(tl.float32)  # masked lanes are not stored
    if GROUPED:  # one scale per (row, group of G columns)
        s = tl.load(SCALE + rows[:, None] * (D // G) + cols[None, :] // G, mask=mask, other=1.0)
    else:  # one scale per column
        s = tl.load(SCALE + cols, mask=cols < D, other=1.0)[None, :]
    tl.store(OUT + rows[:, None] * D + cols[None, :], (q * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_group_kernel(X, SCALE, Q, R, D, G: tl.constexpr, FP8MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * G + tl.arange(0, G)
    x = tl.load(X + row * D + cols).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8MAX, 1e-12)
    tl.store(SCALE + row * (D // G) + g, s)
    tl.store(Q + row * D + cols, (x / s).to(Q.dtype.element_ty))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


def int8_pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like x, fp32 per-channel scale of shape (D,)) -- one scale per channel of
    the last dimension, as ``pack_int8`` for 2-D/3-D tensors."""
    x2 = _rows(x)
    r, d = x2.shape
    amax = torch.empty(d, dtype=torch.float32, device=x.device)
    _col_absmax_kernel[(triton.cdiv(d, 64),)](x2, amax, r, d, BLOCK_R=32, BLOCK_D=64)
    scale = (amax / INT8_MAX).clamp_(min=1e-12)
    q = torch.empty((r, d), dtype=torch.int8, device=x.device)
    _int8_quant_kernel[(triton.cdiv(r, 32), triton.cdiv(d, 64))](x2, scale, q, r, d, BLOCK_R=32, BLOCK_D=64)
    return q.view(x.shape), scale


def int8_unpack(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q2 = q.contiguous().view(-1, q.shape[-1])
    r, d = q2.shape
    out = torch.empty((r, d), dtype=dtype, device=q.device)
    _dequant_kernel[(triton.cdiv(r, 32), triton.cdiv(d, 64))](q2, scale, out, r, d, GROUPED=False, G=1,
                                                                BLOCK_R=32, BLOCK_D=64)
    return out.view(q.shape)


def fp8_pack_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes shaped like x, fp32 scales (rows, D/128)); D must be a multiple of 128."""
    x2 = _rows(x)
    r, d = x2.shape
    if d % GROUP:
        raise ValueError(f"fp8_pack_groups needs the last dimension to be a multiple of {GROUP}; got {d}.")
    scale = torch.empty((r, d // GROUP), dtype=torch.float32, device=x.device)
    q = torch.empty((r, d), dtype=torch.float8_e4m3fn, device=x.device)
    _fp8_group_kernel[(r, d // GROUP)](x2, scale, q, r, d, G=GROUP, FP8MAX=FP8_MAX)
    return q.view(x.shape), scale


def fp8_unpack_groups(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q2 = q.contiguous().view(-1, q.shape[-1])
    r, d = q2.shape
    out = torch.empty((r, d), dtype=dtype, device=q.device)
    _dequant_kernel[(triton.cdiv(r, 32), triton.cdiv(d, 64))](q2, scale, out, r, d, GROUPED=True, G=GROUP,
                                                                BLOCK_R=32, BLOCK_D=64)
    return out.view(q.shape)

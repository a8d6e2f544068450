"""Fused linear cross-entropy in Triton (Cut Cross-Entropy style): logits never reach global memory.

Forward: one program per block of tokens walks the vocabulary in blocks, computes each logit block
``h @ W[v].T`` in fp32 registers (optional bias and softcap) and keeps an online log-sum-exp, the
target's logit and (for label smoothing) the sum of the logits. Memory: three fp32 numbers per token.

Backward: one program per (token block, vocabulary block) recomputes its logit block, forms the
gradient of the loss with respect to it in fp32 and adds ``g @ W[v]`` into dh and ``g.T @ h`` into
dW (and ``sum(g)`` into db) with atomic fp32 adds; the fp32 accumulators are cast to the input dtype
at the end. With ``filter_eps`` set, gradient entries smaller than it are dropped and blocks that
are all dropped skip their matrix products (CCE's gradient filtering; approximate, off by default).

The per-token loss is assembled from those statistics in PyTorch (see ``lightning_memkit.loss``):
    loss = lse - (1-ε)·z_t - (ε/V)·Σ_j z_j + ζ·lse²
and its gradient with respect to a logit (before the softcap c) is
    p_j·(1 + 2ζ·lse) - (1-ε)·[j = t] - ε/V,   times 1 - (z_j/c)² under softcapping.

This module imports only torch and triton. On a machine without a GPU, set ``TRITON_INTERPRET=1``
before importing it to run the kernels in Triton's interpreter (slow; small shapes only).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: exact fp32 products (no TF32) for fp32 inputs. UPCAST:
    compute in fp32 from the (bf16/fp16) inputs, for Triton's CPU interpreter, whose low-precision
    dot is wrong; the result equals the native dot's up to summation order."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _logit_block(
    H, W, B, n_offs, v_offs, N, V, D, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """fp32 logits (after bias and softcap) of tokens n_offs against vocabulary rows v_offs."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(H + n_offs[:, None] * stride_hn + d_offs[None, :],
                    mask=(n_offs[:, None] < N) & (d_offs[None, :] < D), other=0.0)
        w = tl.load(W + v_offs[:, None] * stride_wv + d_offs[None, :],
                    mask=(v_offs[:, None] < V) & (d_offs[None, :] < D), other=0.0)
        acc += _dot(h, tl.trans(w), IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B + v_offs, mask=v_offs < V, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_forward_kernel(
    H, W, B, T, LSE, ZT, ZSUM, N, V, D, stride_hn, stride_wv, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n_offs = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N*D may pass 2**31
    n_mask = n_offs < N
    t = tl.load(T + n_offs, mask=n_mask, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v_offs = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = v_offs < V
        z = _logit_block(H, W, B, n_offs, v_offs, N, V, D, stride_hn, stride_wv, HAS_BIAS, SOFTCAP, softcap,
                         BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST)
        z_masked = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_masked, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_masked - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(v_offs[None, :] == t[:, None], z, 0.0), axis=1)
        if WANT_SUM:
            zsum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
    tl.store(LSE + n_offs, m + tl.log(s), mask=n_mask)
    tl.store(ZT + n_offs, zt, mask=n_mask)
    if WANT_SUM:
        tl.store(ZSUM + n_offs, zsum, mask=n_mask)


@triton.jit
def _lce_backward_kernel(
    H, W, B, T, LSE, G, DH, DW, DB, N, V, D, stride_hn, stride_wv, softcap, smoothing, z_loss, filter_eps,
    V0, V_TOTAL,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_offs = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N*D and V*D may pass 2**31
    v_offs = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    n_mask = n_offs < N
    v_mask = v_offs < V
    z = _logit_block(H, W, B, n_offs, v_offs, N, V, D, stride_hn, stride_wv, HAS_BIAS, SOFTCAP, softcap,
                     BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST)
    lse = tl.load(LSE + n_offs, mask=n_mask, other=0.0)
    w_tok = tl.load(G + n_offs, mask=n_mask, other=0.0)  # incoming gradient per token, 0 where ignored
    t = tl.load(T + n_offs, mask=n_mask, other=-1)
    g = tl.exp(z - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]
    g = g - (1.0 - smoothing) * ((v_offs[None, :] + V0) == t[:, None]).to(tl.float32) - smoothing / V_TOTAL
    g = g * w_tok[:, None]
    if SOFTCAP:
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = tl.where(n_mask[:, None] & v_mask[None, :], g, 0.0)
    if FILTER:
        g = tl.where(tl.abs(g) < filter_eps, 0.0, g)
        work = tl.max(tl.abs(g)) > 0.0
    else:
        work = True
    if work:
        g_in = g.to(H.dtype.element_ty)
        if NEED_DB:
            tl.atomic_add(DB + v_offs, tl.sum(g, axis=0), mask=v_mask)
        for d0 in range(0, D, BLOCK_D):
            d_offs = d0 + tl.arange(0, BLOCK_D)
            d_mask = d_offs < D
            if NEED_DH:
                w = tl.load(W + v_offs[:, None] * stride_wv + d_offs[None, :],
                            mask=v_mask[:, None] & d_mask[None, :], other=0.0)
                dh = _dot(g_in, w, IEEE, UPCAST)
                tl.atomic_add(DH + n_offs[:, None] * D + d_offs[None, :], dh, mask=n_mask[:, None] & d_mask[None, :])
            if NEED_DW:
                h = tl.load(H + n_offs[:, None] * stride_hn + d_offs[None, :],
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                dw = _dot(tl.trans(g_in), h, IEEE, UPCAST)
                tl.atomic_add(DW + v_offs[:, None] * D + d_offs[None, :], dw, mask=v_mask[:, None] & d_mask[None, :])


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def _blocks(n: int, v: int, d: int, kind: str = "forward") -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D). On a GPU: the fastest of the configurations timed on an H100 at
    Gemma-2-2B and Llama-3-8B head shapes (benchmarks/cuda_check.py); 256-wide blocks exceed the
    shared memory. Under the interpreter: 64 (tests use small shapes)."""
    if _INTERPRET:
        return _block(n, 64), _block(v, 64), _block(d, 64)
    return _block(n, 128), _block(v, 128), _block(d, 64 if kind == "forward" else 32)


def _launch(kind: str) -> dict:
    """Launch options of the forward or backward kernel (see :func:`_blocks`)."""
    if _INTERPRET:
        return {}
    return {"num_warps": 8, "num_stages": 3} if kind == "forward" else {"num_warps": 4, "num_stages": 4}


def lce_forward(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor, *, softcap: Optional[float],
    want_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-sum-exp, target logit and (if ``want_sum``) logit sum, all fp32 (N,)."""
    n, d = h.shape
    v = w.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    zt = torch.empty_like(lse)
    zsum = torch.empty_like(lse) if want_sum else lse
    bn, bv, bd = _blocks(n, v, d)
    _lce_forward_kernel[(triton.cdiv(n, bn),)](
        h, w, b if b is not None else h, t, lse, zt, zsum, n, v, d, h.stride(0), w.stride(0),
        float(softcap or 1.0), HAS_BIAS=b is not None, SOFTCAP=softcap is not None, WANT_SUM=want_sum,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, IEEE=h.dtype == torch.float32, UPCAST=_INTERPRET, **_launch("forward"),
    )
    return lse, zt, (zsum if want_sum else None)


def _slab_rows(d: int) -> int:
    """Vocabulary rows per backward launch: an fp32 (rows, D) dW accumulator of about 64 MiB."""
    return max(64, (16 * 2**20) // d)


def lce_backward(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor, lse: torch.Tensor,
    grad: torch.Tensor, *, softcap: Optional[float], smoothing: float, z_loss: float, filter_eps: Optional[float],
    need: tuple[bool, bool, bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients (dh, dW, db) of ``sum(grad * loss)``; ``grad`` is fp32 (N,), 0 for ignored tokens.

    The vocabulary is processed in slabs (one launch each): dW's fp32 accumulator holds one slab and
    is cast into dW before the next, so no fp32 copy of the whole head exists; dh accumulates in an
    fp32 (N, D) buffer across slabs.
    """
    n, d = h.shape
    v = w.shape[0]
    dh = torch.zeros((n, d), dtype=torch.float32, device=h.device) if need[0] else None
    dw = torch.empty_like(w) if need[1] else None
    db = torch.zeros((v,), dtype=torch.float32, device=h.device) if (need[2] and b is not None) else None
    rows = _slab_rows(d)
    for v0 in range(0, v, rows):
        v1 = min(v, v0 + rows)
        dw_acc = torch.zeros((v1 - v0, d), dtype=torch.float32, device=h.device) if dw is not None else None
        bn, bv, bd = _blocks(n, v1 - v0, d, "backward")
        _lce_backward_kernel[(triton.cdiv(n, bn), triton.cdiv(v1 - v0, bv))](
            h, w[v0:v1], b[v0:v1] if b is not None else h, t, lse, grad,
            dh if dh is not None else lse, dw_acc if dw_acc is not None else lse,
            db[v0:v1] if db is not None else lse, n, v1 - v0, d, h.stride(0), w.stride(0),
            float(softcap or 1.0), float(smoothing), float(z_loss), float(filter_eps or 0.0), v0, v,
            HAS_BIAS=b is not None, SOFTCAP=softcap is not None, NEED_DH=dh is not None, NEED_DW=dw is not None,
            NEED_DB=db is not None, FILTER=filter_eps is not None,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, IEEE=h.dtype == torch.float32, UPCAST=_INTERPRET,
            **_launch("backward"),
        )
        if dw is not None:
            dw[v0:v1] = dw_acc.to(w.dtype)
    return (
        dh.to(h.dtype) if dh is not None else None,
        dw,
        db.to(b.dtype) if db is not None else None,
    )


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token loss (N,) fp32 from (N, D) hidden states, (V, D) weight and (N,) targets.

    ``targets`` must already be in [0, V) (ignored tokens mapped to any valid class) and ``valid``
    marks the tokens that have a loss; ignored tokens get loss 0 and no gradient.
    """

    @staticmethod
    def forward(ctx: Any, h, w, b, targets, valid, softcap, smoothing, z_loss, filter_eps):  # noqa: ANN001
        h, w = h.contiguous(), w.contiguous()
        b = b.contiguous() if b is not None else None
        lse, zt, zsum = lce_forward(h, w, b, targets, softcap=softcap, want_sum=smoothing > 0)
        loss = lse - (1.0 - smoothing) * zt
        if smoothing > 0:
            loss = loss - (smoothing / w.shape[0]) * zsum
        if z_loss:
            loss = loss + z_loss * lse.square()
        ctx.save_for_backward(h, w, b, targets, valid, lse)
        ctx.options = (softcap, smoothing, z_loss, filter_eps)
        return torch.where(valid, loss, 0.0)

    @staticmethod
    def backward(ctx: Any, grad_loss):  # noqa: ANN001
        h, w, b, targets, valid, lse = ctx.saved_tensors
        softcap, smoothing, z_loss, filter_eps = ctx.options
        grad = torch.where(valid, grad_loss.float(), 0.0).contiguous()
        dh, dw, db = lce_backward(
            h, w, b, targets, lse, grad, softcap=softcap, smoothing=smoothing, z_loss=z_loss,
            filter_eps=filter_eps, need=tuple(ctx.needs_input_grad[:3]),
        )
        return dh, dw, db, None, None, None, None, None, None

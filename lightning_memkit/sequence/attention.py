"""Attention of a chunk of queries against all earlier keys without a (c, e) score matrix.

The sequence methods attend ``c`` queries (positions ``e-c .. e-1``) to the ``e`` keys up to the chunk's end.
:func:`chunked_attention` computes the same thing as

.. code-block:: python

    scores = (q @ k.transpose(-1, -2)) * scale           # (B, H, c, e), k repeated per query group
    scores = softcap * tanh(scores / softcap)             # when softcap is given
    scores = scores.masked_fill(~lower_right_causal, -inf)
    out = softmax(scores.float(), -1).to(q.dtype) @ v

with an online softmax over key blocks (flash-attention style): the forward keeps a running max, sum and
output in fp32 (fp64 for fp64 inputs) and saves only q, k, v, the output and the per-row logsumexp; the
backward recomputes each block's scores. Neither pass holds more than (B, H, c, block) scores at once.

:func:`attention_backend` says which kernel :func:`~lightning_memkit.sequence.adapter.chunk_attention` uses for
a call; :data:`CHUNKED_ABOVE` sets the size ``c * e`` above which memkit's kernel replaces SDPA where SDPA would
materialize the scores (its math kernel, the eager softcapped formula). Inside :func:`chunked_attention_above` memkit's
kernel takes every chunk above the given size off CUDA, so not even the (c, e) mask is built.

Shapes: B batch, H query heads, K key/value heads (H a multiple of K), c queries, e keys, E head dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

#: off CUDA (or where SDPA's flash/efficient kernels cannot run the call), memkit's chunked kernel replaces SDPA
#: for chunks with ``c * e`` above this many query-key pairs (a (c, e) fp32 mask of 2**22 entries is 16 MiB, its
#: (B, H, c, e) scores H times that per row of the batch); smaller chunks keep SDPA, bit for bit as before
CHUNKED_ABOVE = 2**22

#: keys per block of the chunked kernel: its scores hold (B, H, c, DEFAULT_BLOCK) entries at a time
DEFAULT_BLOCK = 1024

#: inside chunked_attention_above: memkit's kernel takes every chunk above the threshold off CUDA
_PREFER_CHUNKED = False

_FUSED = {1: "flash", 2: "efficient", 3: "cudnn", 0: "math"}


@contextlib.contextmanager
def chunked_attention_above(pairs: int) -> Iterator[None]:
    """Within the block, use memkit's chunked kernel for chunks with more than ``pairs`` query-key pairs
    (0: for every chunk SDPA's flash/efficient kernels do not take on CUDA), with no (c, e) mask built off CUDA.
    Outside it, off CUDA, PyTorch's blocked CPU kernel with an explicit mask runs them (faster on CPU).
    Restores :data:`CHUNKED_ABOVE` on exit.

    Raises:
        ValueError: ``pairs`` is negative.
    """
    global CHUNKED_ABOVE, _PREFER_CHUNKED
    if pairs < 0:
        raise ValueError(f"pairs={pairs}: the threshold counts query-key pairs. Fix: pass an integer >= 0.")
    previous = CHUNKED_ABOVE, _PREFER_CHUNKED
    CHUNKED_ABOVE, _PREFER_CHUNKED = int(pairs), True
    try:
        yield
    finally:
        CHUNKED_ABOVE, _PREFER_CHUNKED = previous


def _fake(t: Tensor) -> bool:
    """A fake tensor (the planner's step): SDPA's dispatcher answers "math" for it whatever the real device would
    run, so the dispatch keeps SDPA, as on the real device (a lower-right bias: SDPA's fused kernel, as on a GPU)."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def prefers_chunked(c: int, e: int) -> bool:
    """Inside :func:`chunked_attention_above`: a chunk above the threshold goes to memkit's kernel, mask-free."""
    return _PREFER_CHUNKED and uses_chunked(c, e)


def uses_chunked(c: int, e: int) -> bool:
    """Whether a chunk of ``c`` queries against ``e`` keys is above :data:`CHUNKED_ABOVE`."""
    return c * e > CHUNKED_ABOVE


@dataclasses.dataclass(frozen=True)
class LowerRight:
    """The lower-right causal mask of ``c`` queries against ``e`` keys, not materialized: memkit's chunked kernel
    runs it. Off CUDA :func:`~lightning_memkit.sequence.adapter.causal_bias` returns this rather than torch's
    ``CausalBias``, a Tensor subclass that cannot be created while a ``FakeTensorMode`` is active (the planner)."""

    c: int
    e: int


def _is_lower_right(bias: Any) -> bool:
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if isinstance(bias, LowerRight):
        return True
    return isinstance(bias, CausalBias) and bias.variant == CausalVariant.LOWER_RIGHT


def attention_backend(q: Tensor, k: Tensor, v: Tensor, bias: Any = None, scale: Optional[float] = None,
                      softcap: Optional[float] = None) -> str:
    """The kernel :func:`~lightning_memkit.sequence.adapter.chunk_attention` runs for these arguments.

    Args:
        q: (B, H, c, E) queries.
        k: (B, K, e, E) keys.
        v: (B, K, e, E) values.
        bias: what :func:`~lightning_memkit.sequence.adapter.causal_bias` returned: None (``c == e``, plain
            causal), a lower-right ``CausalBias``, or an additive (c, e) mask.
        scale: the score scale (None: 1/sqrt(E)).
        softcap: the attention logit softcap, or None.

    Returns:
        ``"flash"``, ``"efficient"``, ``"cudnn"`` or ``"math"`` (PyTorch SDPA's kernel, as its dispatcher picks it;
        on CPU ``"flash"`` is PyTorch's blocked CPU kernel, which reads an explicit mask), ``"eager"`` (the
        materialized softcapped formula, small chunks) or ``"memkit-chunked"`` (:func:`chunked_attention`).
    """
    c, e = q.shape[-2], k.shape[-2]
    if isinstance(bias, LowerRight):  # nothing materialized to hand to SDPA
        # a planned step (fake tensors) runs SDPA's fused kernel, as a GPU does for a lower-right bias
        return "flash" if _fake(q) and softcap is None else "memkit-chunked"
    if softcap is not None:
        return "memkit-chunked" if uses_chunked(c, e) else "eager"
    gqa = q.shape[1] != k.shape[1]
    lower_right = _is_lower_right(bias)  # a CausalBias is a Tensor subclass: test for it first
    if isinstance(bias, Tensor) and not lower_right:  # an explicit mask (causal_bias's): SDPA's choice with it
        fused = _FUSED.get(int(torch._fused_sdp_choice(q, k, v, bias, 0.0, False, scale=scale, enable_gqa=gqa)),
                           "math")
        return "memkit-chunked" if fused == "math" and uses_chunked(c, e) and not _fake(q) else fused
    if bias is None or c == e:
        fused = _FUSED.get(int(torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=gqa)),
                           "math")
        return "memkit-chunked" if fused == "math" and uses_chunked(c, e) and not _fake(q) else fused
    if not lower_right:
        raise ValueError(f"bias={bias!r}: expected None, a lower-right CausalBias or a (c, e) mask tensor. "
                         "Fix: build it with lightning_memkit.sequence.adapter.causal_bias.")
    if q.device.type == "cuda":  # what CausalBias._dispatch does with a lower-right bias
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

        params = SDPAParams(q, k, v, None, 0.0, False, gqa)
        if can_use_flash_attention(params):
            return "flash"
        if can_use_efficient_attention(params):
            return "efficient"
    return "memkit-chunked" if uses_chunked(c, e) else "math"


def _check(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected 4-d (B, heads, n, E). "
                         "Fix: pass q (B, H, c, E) and k, v (B, K, e, E).")
    b, heads, c, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or heads % k.shape[1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v need q's batch and "
                         "head dim, and H a multiple of K. Fix: pass q (B, H, c, E) and k, v (B, K, e, E).")
    if c > k.shape[2]:
        raise ValueError(f"{c} queries against {k.shape[2]} keys: the queries are the last c of the e positions. "
                         "Fix: pass the keys up to the chunk's end.")
    if int(block_size) < 1:
        raise ValueError(f"block_size={block_size}: it counts keys. Fix: pass an integer >= 1.")


def _block_scores(qg: Tensor, k: Tensor, s: int, stop: int, c: int, e: int, scale: float,
                  softcap: Optional[float], keep_tanh: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Masked scores (B, K, G*c, stop-s) of the grouped queries against keys s..stop-1 (one fresh buffer), and
    tanh's value when softcapped and ``keep_tanh`` (None otherwise)."""
    scores = torch.matmul(qg, k[:, :, s:stop].to(qg.dtype).transpose(-1, -2)).mul_(scale)
    tanh = None
    if softcap is not None:
        if keep_tanh:
            tanh = scores.div_(softcap).tanh_()
            scores = tanh * softcap
        else:
            scores.div_(softcap).tanh_().mul_(softcap)
    if stop - 1 > e - c:  # some key of the block comes after the first query's position
        b, kv_heads, rows, width = scores.shape
        drop = torch.ones(c, width, dtype=torch.bool, device=scores.device).triu_(diagonal=e - c - s + 1)
        scores.view(b, kv_heads, rows // c, c, width).masked_fill_(drop, float("-inf"))
    return scores, tanh


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: Optional[float],
                block_size: int) -> Tensor:
        b, heads, c, head_dim = q.shape
        kv_heads, e = k.shape[1], k.shape[2]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            qg = q.reshape(b, kv_heads, heads // kv_heads * c, head_dim).to(acc_dtype)  # rows: (group, query)
            rows = qg.shape[2]
            top = qg.new_full((b, kv_heads, rows), float("-inf"))  # running max
            total = qg.new_zeros(b, kv_heads, rows)  # running sum of exp(score - top)
            acc = qg.new_zeros(b, kv_heads, rows, v.shape[-1])
            for s in range(0, e, block_size):
                stop = min(s + block_size, e)
                scores, _ = _block_scores(qg, k, s, stop, c, e, scale, softcap, keep_tanh=False)
                new_top = torch.maximum(top, scores.amax(-1))
                alpha = torch.exp(top - new_top)  # 0 on the first block (top = -inf, new_top finite: key 0 is seen)
                weights = scores.sub_(new_top[..., None]).exp_()  # in place: one (B, H, c, block) buffer
                total = total.mul_(alpha).add_(weights.sum(-1))
                acc = acc.mul_(alpha[..., None]).add_(torch.matmul(weights, v[:, :, s:stop].to(acc_dtype)))
                top = new_top
            out = (acc / total[..., None]).to(q.dtype).view(b, heads, c, v.shape[-1])
            lse = top + torch.log(total)  # (B, K, G*c)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.softcap, ctx.block_size = scale, softcap, block_size
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, block_size = ctx.scale, ctx.softcap, ctx.block_size
        b, heads, c, head_dim = q.shape
        kv_heads, e = k.shape[1], k.shape[2]
        rows = heads // kv_heads * c
        acc_dtype = lse.dtype
        with torch.autocast(q.device.type, enabled=False):
            qg = q.reshape(b, kv_heads, rows, head_dim).to(acc_dtype)
            dout = grad_out.reshape(b, kv_heads, rows, -1).to(acc_dtype)
            delta = (dout * out.reshape(dout.shape).to(acc_dtype)).sum(-1)  # rowsum(dO * O) = rowsum(P * dP)
            dq = torch.zeros_like(qg)
            dk = torch.empty(k.shape, dtype=acc_dtype, device=k.device)
            dv = torch.empty(v.shape, dtype=acc_dtype, device=v.device)
            for s in range(0, e, block_size):
                stop = min(s + block_size, e)
                scores, tanh = _block_scores(qg, k, s, stop, c, e, scale, softcap, keep_tanh=True)
                weights = scores.sub_(lse[..., None]).exp_()  # the softmax, 0 where masked (in place)
                vb = v[:, :, s:stop].to(acc_dtype)
                dv[:, :, s:stop] = torch.matmul(weights.transpose(-1, -2), dout)  # sums over the query groups
                dscores = torch.matmul(dout, vb.transpose(-1, -2)).sub_(delta[..., None]).mul_(weights)
                del weights, scores
                if tanh is not None:
                    dscores.mul_(tanh.mul_(tanh).neg_().add_(1))  # d/dx softcap * tanh(x / softcap) = 1 - tanh^2
                    del tanh
                dscores.mul_(scale)
                dq += torch.matmul(dscores, k[:, :, s:stop].to(acc_dtype))
                dk[:, :, s:stop] = torch.matmul(dscores.transpose(-1, -2), qg)
        return (dq.view(b, heads, c, head_dim).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                      softcap: Optional[float] = None, block_size: Optional[int] = None) -> Tensor:
    """Lower-right causal attention of q (B, H, c, E) on k, v (B, K, e, E), by key blocks (see the module).

    Equal to ``F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right_mask, scale=scale, enable_gqa=True)``
    (and, with ``softcap``, to the eager softcapped formula) up to rounding; the query heads of a group share their
    key/value head without copies.

    Args:
        q: (B, H, c, E) queries at positions ``e-c .. e-1``.
        k: (B, K, e, E) keys at positions ``0 .. e-1`` (H a multiple of K).
        v: (B, K, e, Ev) values.
        scale: the score scale (None: 1/sqrt(E)).
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the mask (None: not capped).
        block_size: keys per block (None: :data:`DEFAULT_BLOCK`, read at call time); the scores of one block,
            (B, H, c, block_size), are all either pass holds (with two or three such buffers at its peak).

    Returns:
        (B, H, c, Ev) in q's dtype (accumulated in fp32, fp64 for fp64 inputs).

    Raises:
        ValueError: shapes that do not fit, or ``block_size`` < 1.
    """
    block_size = DEFAULT_BLOCK if block_size is None else block_size
    _check(q, k, v, block_size)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _ChunkedAttention.apply(q, k, v, scale, None if softcap is None else float(softcap), int(block_size))


__all__ = ["CHUNKED_ABOVE", "DEFAULT_BLOCK", "LowerRight", "attention_backend", "chunked_attention",
           "chunked_attention_above", "prefers_chunked", "uses_chunked"]

"""Pieces SeCO and StreamBP share: one block on one chunk, and the key/value join.

A chunk covers positions ``[s, e)``. Its queries attend to the keys and values of positions
``[0, e)``, read from a per-layer buffer (``kbuf``/``vbuf``, (B, K, T, E)) that a no-grad pass
filled. With gradients on, :class:`_Join` hands attention the buffer's prefix *as a view* (no copy,
whatever the number of layers in the graph) and routes the gradient that arrives at it:

- positions ``[s, e)`` are the chunk's own keys: their gradient, plus what later chunks already sent
  there (``acc[s:e]``, times the chunk's compensation factor), flows back into the tensor that
  computed them, and from there into the projections and the block's input;
- positions ``[0, s)`` belong to earlier chunks: their gradient is added into ``acc`` (fp32), to be
  picked up when those chunks are processed.

Processing chunks last-first therefore gives every key and value its complete gradient before its
chunk is back-propagated: the result equals full backprop (the chain rule split along the sequence).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_memkit.sequence.adapter import SequenceAdapter


class _Join(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, new: Tensor, buf: Tensor, acc: Tensor, start: int, comp: float) -> Tensor:  # type: ignore[override]
        ctx.acc, ctx.start, ctx.comp = acc, start, comp
        return buf[..., : start + new.shape[-2], :]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        acc, s = ctx.acc, ctx.start
        if s:
            acc[..., :s, :] += grad[..., :s, :]
        own = acc[..., s:, :][..., : grad.shape[-2] - s, :]
        if ctx.comp != 1.0:
            own = own * ctx.comp
        own = own + grad[..., s:, :]
        return own.to(grad.dtype), None, None, None, None


def join(new: Tensor, buf: Tensor, acc: Tensor, start: int, comp: float = 1.0) -> Tensor:
    """``buf[..., :start+c, :]`` as seen by attention, with ``new`` (the chunk's own c entries, equal to
    ``buf[..., start:start+c, :]``) receiving their gradient; see the module docstring."""
    return _Join.apply(new, buf, acc, start, comp)


class LayerKV:
    """One layer's key/value buffers (B, K, T, E), allocated on first use in the projections' dtype, and
    their gradient accumulators (fp32, or fp64 for an fp64 model) (allocated by :meth:`start_backward`)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.acc_k: Optional[Tensor] = None
        self.acc_v: Optional[Tensor] = None

    def write(self, start: int, k: Tensor, v: Tensor) -> None:
        if self.k is None:
            b, heads, _, e = k.shape
            self.k, self.v = k.new_empty(b, heads, self.length, e), v.new_empty(b, heads, self.length, e)
        end = start + k.shape[-2]
        self.k[..., start:end, :].copy_(k)
        self.v[..., start:end, :].copy_(v)

    def start_backward(self) -> None:
        assert self.k is not None and self.v is not None
        dtype = torch.promote_types(self.k.dtype, torch.float32)  # fp32, or fp64 for fp64 models
        self.acc_k = torch.zeros(self.k.shape, dtype=dtype, device=self.k.device)
        self.acc_v = torch.zeros(self.v.shape, dtype=dtype, device=self.v.device)

    def free(self) -> None:
        self.k = self.v = self.acc_k = self.acc_v = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.acc_k, self.acc_v) if t is not None)


def block_chunk(
    ad: SequenceAdapter, block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, start: int, kv: LayerKV,
    bias: Any, comp: Optional[float] = None,
) -> Tensor:
    """One block on the chunk ``x`` (B, c, D) at positions ``[start, start+c)``; returns (B, c, D).

    ``comp`` None (no-grad passes): the chunk's keys/values are written into ``kv``. Otherwise the
    buffers already hold them, :func:`join` routes their gradients, and what later chunks sent to this
    chunk's keys/values is scaled by ``comp`` (1 except under SpaCO).
    """
    h = ad.attn_norm(block, x)
    q, k, v = ad.qkv(block, h, cos, sin)
    end = start + x.shape[1]
    if comp is None:
        kv.write(start, k, v)
        keys, values = kv.k[..., :end, :], kv.v[..., :end, :]
    else:
        keys, values = join(k, kv.k, kv.acc_k, start, comp), join(v, kv.v, kv.acc_v, start, comp)
    y = ad.attend(block, q, keys, values, bias)  # (B, H, c, E)
    b, heads, c, e = y.shape
    x = x + ad.attn_out(block, y.transpose(1, 2).reshape(b, c, heads * e))
    return x + ad.mlp(block, ad.mlp_norm(block, x))


def chunks(length: int, size: int) -> list[tuple[int, int]]:
    """``[(0, size), (size, 2*size), ..., (k*size, length)]``: the last chunk may be shorter."""
    return [(s, min(s + size, length)) for s in range(0, length, size)]


BlockCall = Callable[..., Tensor]


def direct_call(block: nn.Module, fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """Run ``fn(*args)`` as the block's computation, with nothing around it."""
    return fn(*args)

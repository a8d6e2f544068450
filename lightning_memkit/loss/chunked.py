"""Chunked linear cross-entropy in pure PyTorch (``impl="chunked"``): runs everywhere, CPU included.

Tokens are processed ``chunk_size`` at a time, so neither the logits nor their gradient exist for
more than one chunk: extra memory is O(chunk_size x V) plus an fp32 accumulator for the head's
gradient when the head is not fp32.

- ``reduction="mean"``/``"sum"`` with gradients needed: the gradients are computed in the forward
  pass, chunk by chunk (the loss is a scalar, so its gradient is known up to the scalar that
  arrives in the backward, which only scales them). Three matrix products in all, like the
  materialized computation.
- ``reduction="none"``: the forward keeps each token's log-sum-exp; the backward recomputes each
  chunk's logits and applies the incoming per-token gradient. Four matrix products.

Math per token (logits z, after the optional softcap z = c·tanh(x/c); p = softmax(z); ε the label
smoothing; ζ the z-loss weight):
    loss = lse - (1-ε)·z_t - (ε/V)·Σ_j z_j + ζ·lse²
    ∂loss/∂z_j = p_j·(1 + 2ζ·lse) - (1-ε)·[j = t] - ε/V           (times 1 - (z_j/c)² under softcap)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    z_loss: float = 0.0


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 32 MiB (at least 16 tokens)."""
    return max(16, (8 * 2**20) // vocab_size)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], opts: LossOptions) -> Tensor:
    z = F.linear(h, weight, bias).float()  # same rounding as the materialized head: matmul in the input dtype
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    return z


def _chunk_loss(z: Tensor, t: Tensor, valid: Tensor, opts: LossOptions) -> tuple[Tensor, Tensor]:
    """Per-token loss (0 where ignored) and log-sum-exp of one chunk's logits z (n, V)."""
    lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, t.unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - opts.label_smoothing) * zt
    if opts.label_smoothing:
        loss = loss - (opts.label_smoothing / z.shape[-1]) * z.sum(-1)
    if opts.z_loss:
        loss = loss + opts.z_loss * lse.square()
    return torch.where(valid, loss, 0.0), lse


def _chunk_grad_logits(z: Tensor, lse: Tensor, t: Tensor, w: Tensor, opts: LossOptions) -> Tensor:
    """∂(Σ w_i loss_i)/∂x for one chunk, in fp32 (n, V); x are the logits before the softcap."""
    g = torch.exp(z - lse.unsqueeze(1))  # softmax
    if opts.z_loss:
        g.mul_((1.0 + 2.0 * opts.z_loss * lse).unsqueeze(1))
    g.scatter_add_(1, t.unsqueeze(1), torch.full_like(lse, -(1.0 - opts.label_smoothing)).unsqueeze(1))
    if opts.label_smoothing:
        g.sub_(opts.label_smoothing / z.shape[-1])
    g.mul_(w.unsqueeze(1))
    if opts.softcap is not None:
        g.mul_(1.0 - (z / opts.softcap).square())
    return g


def _accumulate_grads(
    g: Tensor, h: Tensor, weight: Tensor, sl: slice, grads: dict[str, Optional[Tensor]]
) -> None:
    g_in = g.to(h.dtype)  # as autograd casts the logits' gradient back to the head's dtype
    if grads["hidden"] is not None:
        grads["hidden"][sl] = g_in @ weight
    if grads["weight"] is not None:
        if grads["weight"].dtype == g_in.dtype:  # fp32 head: accumulate in place, no (V, D) temporary
            grads["weight"].addmm_(g_in.t(), h)
        else:
            grads["weight"].add_(g_in.t() @ h)
    if grads["bias"] is not None:
        grads["bias"].add_(g.sum(0))


def _new_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need: tuple[bool, bool, bool]) -> dict:
    return {
        "hidden": torch.empty_like(hidden) if need[0] else None,
        "weight": torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None,
        "bias": torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (bias is not None and need[2]) else None,
    }


def _finish(grads: dict, weight: Tensor, bias: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    dw = grads["weight"].to(weight.dtype) if grads["weight"] is not None else None
    db = grads["bias"].to(bias.dtype) if grads["bias"] is not None else None
    return grads["hidden"], dw, db


class _ReducedLoss(torch.autograd.Function):
    """Scalar loss ("mean" or "sum"); gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, opts, reduction, chunk_size, need):  # noqa: ANN001
        n = hidden.shape[0]
        n_valid = valid.sum()
        grads = _new_grads(hidden, weight, bias, need) if any(need) else None
        if reduction == "mean":
            w_all = torch.where(valid, 1.0 / n_valid.clamp(min=1).float(), 0.0)
        else:
            w_all = valid.float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(n, start + chunk_size))
            z = _chunk_logits(hidden[sl], weight, bias, opts)
            loss, lse = _chunk_loss(z, targets[sl], valid[sl], opts)
            total = total + loss.sum()
            if grads is not None:
                g = _chunk_grad_logits(z, lse, targets[sl], w_all[sl], opts)
                _accumulate_grads(g, hidden[sl], weight, sl, grads)
            del z
        if reduction == "mean":
            total = total / n_valid  # 0/0 = nan when every token is ignored, as F.cross_entropy
        ctx.grads = _finish(grads, weight, bias) if grads is not None else (None, None, None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        dh, dw, db = (None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads)
        ctx.grads = None
        return dh, dw, db, None, None, None, None, None, None


class _PerTokenLoss(torch.autograd.Function):
    """Loss per token (``reduction="none"``); the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, opts, chunk_size):  # noqa: ANN001
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(n, start + chunk_size))
            losses[sl], lses[sl] = _chunk_loss(_chunk_logits(hidden[sl], weight, bias, opts), targets[sl], valid[sl], opts)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lses)
        ctx.opts, ctx.chunk_size = opts, chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        hidden, weight, bias, targets, valid, lses = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        grads = _new_grads(hidden, weight, bias, need)
        w_all = torch.where(valid, grad_out.float(), 0.0)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, min(hidden.shape[0], start + ctx.chunk_size))
            z = _chunk_logits(hidden[sl], weight, bias, ctx.opts)
            g = _chunk_grad_logits(z, lses[sl], targets[sl], w_all[sl], ctx.opts)
            _accumulate_grads(g, hidden[sl], weight, sl, grads)
        dh, dw, db = _finish(grads, weight, bias)
        return dh, dw, db, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor], opts: LossOptions,
    reduction: str, chunk_size: Optional[int] = None,
) -> Tensor:
    """Chunked loss of (N, D) ``hidden`` against (N,) ``targets``; inputs already validated."""
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    valid = targets != opts.ignore_index
    safe_targets = torch.where(valid, targets, 0)
    if reduction == "none":
        return _PerTokenLoss.apply(hidden, weight, bias, safe_targets, valid, opts, chunk)
    need = (False, False, False)
    if torch.is_grad_enabled():  # no gradient work in validation / under no_grad
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return _ReducedLoss.apply(hidden, weight, bias, safe_targets, valid, opts, reduction, chunk, need)

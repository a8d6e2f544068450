"""Chunked linear cross-entropy in pure PyTorch (``impl="chunked"``): runs everywhere, CPU included.

Tokens are processed ``chunk_size`` at a time, so neither the logits nor their gradient exist for
more than one chunk: extra memory is O(chunk_size x V).

- ``reduction="mean"``/``"sum"`` with gradients needed: the gradients are computed in the forward
  pass, chunk by chunk (the loss is a scalar, so its gradient is known up to the scalar that
  arrives in the backward, which only scales them). Three matrix products in all for an fp32 head,
  like the materialized computation.
- ``reduction="none"``: the forward keeps each token's log-sum-exp; the backward recomputes each
  chunk's logits and applies the incoming per-token gradient.
- A low-precision (bf16/fp16) head's gradient is summed one vocabulary slab at a time in fp32 and
  rounded once, so no fp32 copy of the whole head exists (one more logits product).

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


def default_chunk_size(vocab_size: int, device: Optional[torch.device] = None) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 64 MiB (256 MiB on CUDA, where
    larger matrix products pay: 1.4x faster at V=256000 on an H100), at least 16 tokens."""
    budget = 256 * 2**20 if (device is not None and device.type == "cuda") else 64 * 2**20
    return max(16, budget // (4 * vocab_size))


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], opts: LossOptions) -> Tensor:
    z = F.linear(h, weight, bias).float()  # same rounding as the materialized head: matmul in the input dtype
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    return z


def _slab_rows(d: int) -> int:
    """Vocabulary rows per slab of the head-gradient pass: an fp32 (rows, D) accumulator of ~16 MiB."""
    return max(16, (4 * 2**20) // d)


def _token_pass(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, valid: Tensor, opts: LossOptions,
    chunk_size: int, need: tuple[bool, bool, bool], w_all: Optional[Tensor] = None, lse_in: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One pass over token chunks.

    Returns (per-token losses or None when ``lse_in`` is given, per-token lse, dh, dW, db). The
    gradients are those of ``sum(w_all * loss)``; dW is produced here only for an fp32 head (in place,
    no temporary); for a low-precision head see :func:`_weight_grad_by_slabs`. Each chunk's logits
    live in one (n, V) fp32 buffer that becomes the softmax and then the gradient in place (a second
    one only under softcapping, whose derivative needs the logits).
    """
    n = hidden.shape[0]
    losses = None if lse_in is not None else torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse_all = lse_in if lse_in is not None else torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need[0] else None
    dw = torch.zeros_like(weight) if need[1] and weight.dtype == torch.float32 else None
    db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (need[2] and bias is not None) else None
    want_grads = dh is not None or dw is not None or db is not None
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        t = targets[sl]
        z = _chunk_logits(hidden[sl], weight, bias, opts)  # (n, V) fp32
        capped = z.clone() if (want_grads and opts.softcap is not None) else None
        if lse_in is None:
            zt = z.gather(1, t.unsqueeze(1)).squeeze(1)
            zsum = z.sum(-1) if opts.label_smoothing else None
            m = z.amax(dim=1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, 0.0)
            p = z.sub_(m).exp_()  # exp(z - max), in place
            s = p.sum(1)
            lse = m.squeeze(1) + s.log()
            loss = lse - (1.0 - opts.label_smoothing) * zt
            if zsum is not None:
                loss = loss - (opts.label_smoothing / z.shape[-1]) * zsum
            if opts.z_loss:
                loss = loss + opts.z_loss * lse.square()
            losses[sl] = torch.where(valid[sl], loss, 0.0)
            lse_all[sl] = lse
            if not want_grads:
                continue
            p.div_(s.unsqueeze(1))  # softmax, in place
        else:
            if not want_grads:
                continue
            p = z.sub_(lse_all[sl].unsqueeze(1)).exp_()  # softmax from the saved lse, in place
        g = _softmax_to_grad(p, lse_all[sl], t, w_all[sl], opts, capped)
        g_in = g.to(hidden.dtype)  # as autograd casts the logits' gradient back to the head's dtype
        if dh is not None:
            dh[sl] = g_in @ weight
        if dw is not None:
            dw.addmm_(g_in.t(), hidden[sl])
        if db is not None:
            db.add_(g.sum(0))
        del z, p, g, g_in
    return losses, lse_all, dh, dw, (db.to(bias.dtype) if db is not None else None)


def _softmax_to_grad(
    p: Tensor, lse: Tensor, t: Tensor, w: Tensor, opts: LossOptions, capped: Optional[Tensor]
) -> Tensor:
    """Turn the softmax ``p`` (n, V) into ∂(Σ w_i loss_i)/∂x in place; ``capped``: the softcapped logits."""
    if opts.z_loss:
        p.mul_((1.0 + 2.0 * opts.z_loss * lse).unsqueeze(1))
    p.scatter_add_(1, t.unsqueeze(1), torch.full_like(lse, -(1.0 - opts.label_smoothing)).unsqueeze(1))
    if opts.label_smoothing:
        p.sub_(opts.label_smoothing / p.shape[-1])
    p.mul_(w.unsqueeze(1))
    if capped is not None:
        p.mul_(1.0 - (capped / opts.softcap).square())
    return p


def _add_product_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` for low-precision a, b with fp32 products and sums (exact products, one rounding
    at the end of the caller's sum). On CUDA the matmul runs in the inputs' dtype with an fp32 output
    (tensor cores); elsewhere the inputs are upcast first."""
    if a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


def _weight_grad_by_slabs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, w_all: Tensor,
    opts: LossOptions, chunk_size: int,
) -> Tensor:
    """dW for a low-precision head, one vocabulary slab at a time.

    Each slab's gradient is summed over all tokens in an fp32 accumulator of the slab's size only and
    rounded once to the head's dtype (as one big matmul would), so no (V, D) fp32 buffer exists.
    Costs one more logits product than the token pass.
    """
    v, d = weight.shape
    dw = torch.empty_like(weight)
    rows = _slab_rows(d)
    tokens = max(chunk_size, (8 * 2**20) // rows)  # a slab is narrower than V: take more tokens at once
    for v0 in range(0, v, rows):
        v1 = min(v, v0 + rows)
        acc = torch.zeros((v1 - v0, d), dtype=torch.float32, device=weight.device)
        w_slab = weight[v0:v1]
        b_slab = bias[v0:v1] if bias is not None else None
        for start in range(0, hidden.shape[0], tokens):
            sl = slice(start, min(hidden.shape[0], start + tokens))
            z = _chunk_logits(hidden[sl], w_slab, b_slab, opts)  # (n, slab)
            capped = z.clone() if opts.softcap is not None else None
            g = z.sub_(lse[sl].unsqueeze(1)).exp_()  # this slab's softmax columns, in place
            if opts.z_loss:
                g.mul_((1.0 + 2.0 * opts.z_loss * lse[sl]).unsqueeze(1))
            t = targets[sl] - v0
            # the target in this slab (g's dtype: bf16-true precision makes bf16 the default dtype inside the step)
            hit = ((t >= 0) & (t < v1 - v0)).to(g.dtype) * -(1.0 - opts.label_smoothing)
            g.scatter_add_(1, t.clamp(0, v1 - v0 - 1).unsqueeze(1), hit.unsqueeze(1))
            if opts.label_smoothing:
                g.sub_(opts.label_smoothing / v)
            g.mul_(w_all[sl].unsqueeze(1))
            if capped is not None:
                g.mul_(1.0 - (capped / opts.softcap).square())
            _add_product_fp32(acc, g.to(hidden.dtype).t(), hidden[sl])
        dw[v0:v1] = acc.to(weight.dtype)
    return dw


def _grads(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, valid: Tensor, opts: LossOptions,
    chunk_size: int, need: tuple[bool, bool, bool], w_all: Tensor, lse_in: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], Tensor, tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """(losses, lse, (dh, dW, db)) of ``sum(w_all * loss)``."""
    losses, lse, dh, dw, db = _token_pass(hidden, weight, bias, targets, valid, opts, chunk_size, need, w_all, lse_in)
    if need[1] and dw is None:
        dw = _weight_grad_by_slabs(hidden, weight, bias, targets, lse, w_all, opts, chunk_size)
    return losses, lse, (dh, dw, db)


class _ReducedLoss(torch.autograd.Function):
    """Scalar loss ("mean" or "sum"); gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, opts, reduction, chunk_size, need):  # noqa: ANN001
        n_valid = valid.sum()
        if reduction == "mean":
            w_all = torch.where(valid, 1.0 / n_valid.clamp(min=1).float(), 0.0)
        else:
            w_all = valid.float()
        losses, _, grads = _grads(hidden, weight, bias, targets, valid, opts, chunk_size, need, w_all)
        total = losses.sum()
        if reduction == "mean":
            total = total / n_valid  # 0/0 = nan when every token is ignored, as F.cross_entropy
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked fused cross-entropy computes its gradients in the forward pass and supports one "
                "backward pass per forward (retain_graph / repeated autograd.grad are not supported). Fix: use "
                "impl='torch', or reduction='none' (which recomputes in the backward), or run the forward again."
            )
        # in place: the gradients are ours and not yet handed out, so no second copy of dW exists
        dh, dw, db = (None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return dh, dw, db, None, None, None, None, None, None


class _PerTokenLoss(torch.autograd.Function):
    """Loss per token (``reduction="none"``); the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, opts, chunk_size):  # noqa: ANN001
        losses, lse, _ = _grads(hidden, weight, bias, targets, valid, opts, chunk_size, (False, False, False), None)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse)
        ctx.opts, ctx.chunk_size = opts, chunk_size
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return losses

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        hidden, weight, bias, targets, valid, lse = ctx.saved_tensors
        w_all = torch.where(valid, grad_out.float(), 0.0)
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # recompute the logits as the forward did
            _, _, grads = _grads(hidden, weight, bias, targets, valid, ctx.opts, ctx.chunk_size,
                                 tuple(ctx.needs_input_grad[:3]), w_all, lse_in=lse)
        return (*grads, None, None, None, None)


def chunked_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor], opts: LossOptions,
    reduction: str, chunk_size: Optional[int] = None,
) -> Tensor:
    """Chunked loss of (N, D) ``hidden`` against (N,) ``targets``; inputs already validated."""
    chunk = chunk_size or default_chunk_size(weight.shape[0], weight.device)
    valid = targets != opts.ignore_index
    safe_targets = torch.where(valid, targets, 0)
    if reduction == "none":
        return _PerTokenLoss.apply(hidden, weight, bias, safe_targets, valid, opts, chunk)
    need = (False, False, False)
    if torch.is_grad_enabled():  # no gradient work in validation / under no_grad
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return _ReducedLoss.apply(hidden, weight, bias, safe_targets, valid, opts, reduction, chunk, need)

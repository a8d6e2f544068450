"""``linear_cross_entropy``: the LM head and the cross-entropy loss in one call, without logits."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from lightning_memkit._imports import require
from lightning_memkit._tensors import is_symbolic
from lightning_memkit.loss.chunked import LossOptions, chunked_linear_cross_entropy
from lightning_memkit.loss.reference import reference_linear_cross_entropy
from lightning_memkit.step_context import note_head_input

IMPLS = ("auto", "triton", "chunked", "torch")
REDUCTIONS = ("mean", "sum", "none")


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], reduction: str, impl: str,
           label_smoothing: float, softcap: Optional[float], z_loss: float, ignore_index: int) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not an implementation. Fix: use one of {', '.join(map(repr, IMPLS))}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported. Fix: use one of "
            f"{', '.join(map(repr, REDUCTIONS))}.")
    if weight.ndim != 2:
        raise ValueError(f"weight must be (V, D); got shape {tuple(weight.shape)}.")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) does not match weight's D ({weight.shape[1]}); "
            f"hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)} (V, D)."
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}."
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype.")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 class indices; got {targets.dtype}.")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) of dtype {weight.dtype}; got {tuple(bias.shape)} "
            f"{bias.dtype}.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be > 0 (or None for no softcapping).")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must lie in [0, 1].")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss!r} must be >= 0.")
    v = weight.shape[0]
    if is_symbolic(targets):  # fake / meta tensors (memory planning): values are unknown
        return
    bad = ((targets < 0) | (targets >= v)) & (targets != ignore_index)
    if bool(bad.any()):  # a clear error here instead of a device-side assert later
        first = targets[bad][0].item()
        raise ValueError(
            f"targets contain {int(bad.sum())} value(s) outside [0, {v}) that are not ignore_index={ignore_index} "
            f"(first: {first})."
        )


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 filter_eps: Optional[float] = None) -> str:
    """``"auto"`` -> ``"chunked"``, except with ``filter_eps`` on CUDA (fp32/bf16/fp16) -> ``"triton"``
    (only the Triton path filters); other names unchanged.

    Why not Triton by default on CUDA: measured on an H100 (docs/benchmarks.md), the Triton backward (fp32
    atomics per block pair) takes 600-950 ms for a Gemma-2-2B head where the chunked path takes
    ~220 ms and the materialized one 74 ms; its forward is fast (42 ms vs 30 ms).
    """
    if impl == "auto":
        triton_ok = device.type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16)
        return "triton" if (triton_ok and filter_eps is not None) else "chunked"
    return impl


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    shift: bool = False,
    impl: str = "auto",
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
) -> Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` without materializing them.

    Defined as this PyTorch expression (``impl="torch"`` computes exactly it)::

        if shift:                     # next-token prediction: position i predicts targets[i + 1]
            hidden, targets = hidden[..., :-1, :], targets[..., 1:]
        logits = F.linear(hidden, weight, bias).float()          # (..., V)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                               reduction="none", label_smoothing=label_smoothing)
        loss += z_loss * logits.logsumexp(-1).flatten() ** 2 * (targets.flatten() != ignore_index)
        # "mean": loss.sum() / (targets != ignore_index).sum()  (nan if every token is ignored)
        # "sum": loss.sum();  "none": loss.view(targets.shape)

    Args:
        hidden: (..., D) hidden states (after the final norm).
        weight: (V, D) classifier (LM head) weight.
        targets: (...) class indices; ``ignore_index`` marks tokens without a loss.
        bias: optional (V,) classifier bias.
        ignore_index, reduction, label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        softcap: Gemma-2-style logit softcapping ``c * tanh(logits / c)``; must be > 0.
        z_loss: weight of the PaLM z-loss ``logsumexp(logits)**2`` per non-ignored token.
        shift: drop the last position of ``hidden`` and the first of ``targets`` (causal LM labels).
        impl: ``"triton"`` (fused GPU kernels), ``"chunked"`` (PyTorch, any device), ``"torch"`` (the
            materialized reference), or ``"auto"``: Triton on CUDA, chunked elsewhere.
        chunk_size: tokens per chunk for ``"chunked"``; default: about 64 MiB of fp32 logits.
        filter_eps: ``"triton"`` (or ``"auto"`` where it picks Triton) only: drop gradient entries (of the logits)
            smaller than this and skip blocks where all are dropped (Cut Cross-Entropy's gradient filtering;
            approximate). None (default) keeps the gradient exact. ``2**-12`` is below bf16's resolution of the
            gradient.

    Returns:
        fp32 loss: a scalar, or ``targets``' shape (after ``shift``) with ``reduction="none"``.

    Raises:
        ValueError: unknown ``impl``/``reduction``, shape or dtype mismatch, ``softcap <= 0``, or a
            target outside ``[0, V)`` that is not ``ignore_index``.
    """
    _check(hidden, weight, targets, bias, reduction, impl, label_smoothing, softcap, z_loss, ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1 (or None for the default).")
    if filter_eps is not None and (impl not in ("triton", "auto") or not filter_eps > 0):
        raise ValueError(f"filter_eps={filter_eps!r} needs impl='triton' (or 'auto', where it applies on CUDA) and a "
                         "value > 0 (or None to keep exact gradients).")
    kind = resolve_impl(impl, hidden.device, hidden.dtype, filter_eps)
    note_head_input(hidden)  # the planner's memory categories: what follows is logits/loss
    if kind == "triton":
        if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"impl='triton' takes float32, bfloat16 or float16 inputs, not {hidden.dtype}. "
                             "Fix: use impl='chunked' for this dtype.")
        if hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' needs CUDA tensors (got {hidden.device.type}); on CPU set "
                "TRITON_INTERPRET=1 "
                             "before importing lightning_memkit (slow; for tests) or use impl='chunked'.")
    else:
        filter_eps = None  # "auto" resolved to a path without filtering: gradients stay exact
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    out_shape = targets.shape
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    if kind == "torch":
        loss = reference_linear_cross_entropy(
            h2, weight, t1, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
        )
    else:
        opts = LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
        if kind == "chunked":
            loss = chunked_linear_cross_entropy(h2, weight, t1, bias=bias, opts=opts, reduction=reduction,
                                                chunk_size=chunk_size)
        else:
            loss = _triton(h2, weight, t1, bias, opts, reduction, filter_eps)
    return loss.view(out_shape) if reduction == "none" else loss


def _triton(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], opts: LossOptions,
            reduction: str, filter_eps: Optional[float]) -> Tensor:
    kernels = require("lightning_memkit.kernels.linear_cross_entropy", feature='linear_cross_entropy(impl="triton")')
    valid = targets != opts.ignore_index
    per_token = kernels.TritonLinearCrossEntropy.apply(
        hidden, weight, bias, torch.where(valid, targets, 0).contiguous(), valid, opts.softcap,
        float(opts.label_smoothing), float(opts.z_loss), filter_eps,
    )
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum()  # nan when every token is ignored, as F.cross_entropy

"""The plain PyTorch expression every linear cross-entropy implementation must equal.

This is ``impl="torch"``: it materializes the full logits (N x V) and is the yardstick of the tests
and benchmarks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_linear_cross_entropy(
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
) -> Tensor:
    """``F.cross_entropy(softcap(F.linear(hidden, weight, bias).float()), targets, ...)`` plus z-loss.

    ``hidden`` is (N, D), ``targets`` (N,). With ``z_loss > 0`` each non-ignored token adds
    ``z_loss * logsumexp(logits)**2`` to its loss before the reduction ("mean" divides by the number of
    non-ignored tokens, as ``F.cross_entropy`` does).
    """
    logits = F.linear(hidden, weight, bias).float()  # (N, V), computed in the input dtype like any LM head
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if not z_loss:
        return F.cross_entropy(
            logits, targets, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
    valid = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    loss = loss + torch.where(valid, z_loss * logits.logsumexp(-1).square(), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()

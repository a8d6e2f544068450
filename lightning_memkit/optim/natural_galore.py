"""Natural GaLore: GaLore's projected gradient preconditioned by the inverse empirical Fisher of its
recent history, then Adam.

For a low-rank weight, GaLore's projected gradient R (r x n or m x r, from
:class:`~lightning_memkit.optim.projectors.SVDProjector`, refreshed every ``update_gap`` steps) is
flattened to g (k = r·max(m, n) values) and pushed into a history of the last s = ``history``
projected gradients (the current one included), the columns of G (k x s). The natural gradient is

    g̃ = F⁻¹ g with F = λI + G Gᵀ (the empirical Fisher, damped by λ = ``damping``),

applied with the Woodbury identity, F⁻¹ = λ⁻¹I − λ⁻¹G(λI + GᵀG)⁻¹Gᵀ: only an s x s system is solved.
Since g is the newest column of G (g = G e_j), this simplifies exactly (the push-through identity
F⁻¹G = G(λI + GᵀG)⁻¹) to g̃ = G y with (λI + GᵀG) y = e_j -- the same value as the authors'
λ⁻¹g − λ⁻²G(I + λ⁻¹GᵀG)⁻¹Gᵀg, without its cancellation of two terms of size ‖g‖/λ. The Gram matrix
GᵀG is kept up to date one row per step (the new row is Gᵀg), and the s x s system is solved in
float64 by Cholesky (eigenvalues clamped at λ should it fail). Then, as GaLore: Adam moments of g̃ in R's
shape give N, and W ← W − lr·scale·(P N) (or N Pᵀ).

As the authors' code (github selfsupervised-ai/Natural-GaLore), the history and the Adam moments
are kept when the basis is refreshed. Differences, as memkit's GaLore: ε is added after the bias
correction (torch AdamW's placement; theirs before) and weight decay is applied before the update
(theirs after). ``eight_bit=True`` (``NaturalGaLore8bit``) keeps the Adam moments in 8 bits as
GaLore-AdamW-8bit does; the history stays fp32.

g̃ depends on the gradient only through R, so step-in-backward accumulates R over micro-batches
(as GaLore) and the history receives one R per optimizer step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_memkit.config import check_int, check_number
from lightning_memkit.optim.base import MIN_8BIT_SIZE, MemKitOptimizer, moment_bytes
from lightning_memkit.optim.eight_bit import quantized_bytes
from lightning_memkit.optim.galore import GaLoreAdamW
from lightning_memkit.optim.projectors import DefaultRank, check_rank_and_gap


def woodbury_natural_gradient(gram: Tensor, history: Tensor, j: int, damping: float) -> Tensor:
    """F⁻¹ g for F = λI + G Gᵀ, where G's columns are the rows of ``history`` (s x k) and g = history[j].

    Args:
        gram: GᵀG (s x s; any float dtype, solved in float64).
        history: the s stored gradients as rows (fp32).
        j: the row of the current gradient.
        damping: λ > 0.

    Returns:
        G y with (λI + GᵀG) y = e_j (k values, fp32): F⁻¹ g by the push-through form of the Woodbury identity.
    """
    s = gram.shape[0]
    a = gram.double() + damping * torch.eye(s, dtype=torch.float64, device=gram.device)
    e = torch.zeros(s, 1, dtype=torch.float64, device=gram.device)
    e[j] = 1.0
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        y = torch.cholesky_solve(e, chol)
    else:  # not numerically positive definite (rounding in an ill-conditioned Gram): its eigenvalues are >= λ
        vals, vecs = torch.linalg.eigh(a)
        y = vecs @ ((vecs.t() @ e) / vals.clamp(min=damping).unsqueeze(1))
    return y.squeeze(1).to(history.dtype) @ history


class NaturalGaLore(GaLoreAdamW):
    """Natural GaLore with AdamW (defaults: GaLore's rank 128, refresh every 200 steps, scale 0.25; a history
    of 10 projected gradients, damping 1e-3 and ε 1e-6 as the authors' code).

    Args:
        params, lr, betas, eps, weight_decay, lowrank_params, names, eight_bit: see
            :class:`~lightning_memkit.optim.base.MemKitOptimizer`.
        rank, update_gap, scale: GaLore's (see :class:`~lightning_memkit.optim.galore.GaLoreAdamW`).
        history: s, the number of projected gradients kept for the empirical Fisher (>= 1).
        damping: λ > 0, the Fisher's damping.

    Raises:
        MemKitConfigError: a setting out of range (a ValueError).
    """

    name = "natural_galore"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int = DefaultRank(128),
                 update_gap: int = 200, scale: float = 0.25, history: int = 10, damping: float = 1e-3,
                 lowrank_params: Optional[Iterable[Tensor]] = None, names: Optional[dict[Tensor, str]] = None,
                 eight_bit: bool = False) -> None:
        rank, self._rank_is_default = check_rank_and_gap(rank, update_gap)
        scale = check_number("scale", scale, minimum=0, min_exclusive=True)
        history = check_int("history", history, minimum=1)
        damping = check_number("damping", damping, minimum=0, min_exclusive=True)
        MemKitOptimizer.__init__(self, params, lr, betas, eps, weight_decay, lowrank_params=lowrank_params,
                                 names=names, eight_bit=eight_bit, rank=rank, update_gap=update_gap, scale=scale,
                                 history=history, damping=damping)

    def _check_lowrank(self, p: Tensor, group: dict[str, Any]) -> None:
        super()._check_lowrank(p, group)
        check_int("history", group["history"], minimum=1)  # a param group may set its own
        check_number("damping", group["damping"], minimum=0, min_exclusive=True)

    def _projected_update(self, p: Tensor, r: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        super()._projected_update(p, self._natural_gradient(r, group, state), group, state)

    def _natural_gradient(self, r: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
        """Push R into the history (a ring of ``history`` rows) and return F⁻¹R (fp32, R's shape)."""
        s = group["history"]
        g = r.reshape(-1).float()
        if "fisher_history" not in state:
            state["fisher_history"] = torch.zeros(s, g.numel(), device=g.device)
            state["fisher_gram"] = torch.zeros(s, s, device=g.device)
            state["fisher_count"] = 0  # gradients pushed so far
        hist, gram = state["fisher_history"], state["fisher_gram"]
        j = state["fisher_count"] % s
        filled = min(state["fisher_count"] + 1, s)
        hist[j] = g
        dots = hist[:filled] @ g  # the new row of GᵀG
        gram[j, :filled] = dots
        gram[:filled, j] = dots
        state["fisher_count"] += 1
        return woodbury_natural_gradient(gram[:filled, :filled], hist[:filled], j, group["damping"]).view(r.shape)


class NaturalGaLore8bit(NaturalGaLore):
    """Natural GaLore with 8-bit Adam moments (bitsandbytes blockwise quantization)."""

    name = "natural_galore8bit"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("eight_bit", True)
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


def predicted_state_bytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *, rank: Optional[int] = None,
                          history: int = 10, eight_bit: bool = False, lowrank: bool = True) -> int:
    """Bytes of Natural GaLore's state for one parameter after its first step.

    Args:
        shape: the parameter's shape.
        dtype: the parameter's dtype (a dense parameter's moments have it, or 8 bits).
        rank: the rank the weight uses (None: the default, min(128, m, n)).
        history: s.
        eight_bit: 8-bit moments (``natural_galore8bit``).
        lowrank: whether the parameter gets the Natural GaLore rule (else AdamW).

    Returns:
        Low-rank (m, n) of rank r, k = r·max(m, n): GaLore's (two moments of k values, fp32 or 8-bit, and the
        basis r·min(m, n) fp32) + 4·s·k (history) + 4·s² (its Gram matrix). Dense: as GaLore's.
    """
    numel = math.prod(shape)
    if not lowrank:
        if eight_bit and numel >= MIN_8BIT_SIZE:
            return 2 * quantized_bytes(numel)
        return 2 * numel * torch.empty((), dtype=dtype).element_size()
    m, n = shape
    r = min(128, m, n) if rank is None else rank
    k = r * max(m, n)
    return moment_bytes(k, eight_bit) + 4 * r * min(m, n) + 4 * history * k + 4 * history * history


__all__ = ["NaturalGaLore", "NaturalGaLore8bit", "predicted_state_bytes", "woodbury_natural_gradient"]

"""GaLore-AdamW (and 8-bit): Adam on the gradient projected to its top singular subspace.

For a low-rank weight W (m x n) with gradient G, every ``update_gap`` steps the basis P is remade
from the SVD of G (:class:`~lightning_memkit.optim.projectors.SVDProjector`); each step
R = Pᵀ G (or G P), the Adam direction N of R is taken with moments of R's shape (r x max(m, n),
kept across refreshes as in the paper), and W ← W − lr·scale·(P N). Dense parameters use AdamW.
``eight_bit=True`` (``GaLoreAdamW8bit``) stores every moment of at least 4096 values in 8 bits.

The update depends on G only through R, so step-in-backward can accumulate R over micro-batches
(r x n instead of m x n): :attr:`accumulates_projected` is True.

Against galore-torch 1.0 (``proj_type="std"``): the same side (square weights on the right), basis, refresh
steps and update, with two documented differences: ε is added after bias correction, as torch's AdamW does
(the reference adds it before, i.e. ε/√(1 − β₂ᵗ) in bias-corrected terms: larger in the first steps), and
weight decay is applied before the update (the reference: after it, a difference of order lr·wd).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import Tensor

from lightning_memkit.config import check_number
from lightning_memkit.optim.base import MemKitOptimizer
from lightning_memkit.optim.projectors import (
    DefaultRank,
    LowRankSettings,
    SVDProjector,
    check_rank_and_gap,
    weight_rank,
)


class GaLoreAdamW(LowRankSettings, MemKitOptimizer):
    """GaLore with AdamW (defaults from the paper: rank 128, refresh every 200 steps, scale 0.25).

    Args:
        params, lr, betas, eps, weight_decay, lowrank_params, names, eight_bit: see
            :class:`~lightning_memkit.optim.base.MemKitOptimizer`.
        rank: dimension of the subspace (1 <= rank <= min(m, n) for every low-rank weight). Left at its
            default, each weight uses min(128, m, n).
        update_gap: steps between SVD refreshes of the basis.
        scale: α, the factor of the projected-back update.
    """

    name = "galore_adamw"
    accumulates_projected = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int = DefaultRank(128),
                 update_gap: int = 200, scale: float = 0.25, lowrank_params: Optional[Iterable[Tensor]] = None,
                 names: Optional[dict[Tensor, str]] = None, eight_bit: bool = False) -> None:
        rank, self._rank_is_default = check_rank_and_gap(rank, update_gap)
        scale = check_number("scale", scale, minimum=0, min_exclusive=True)
        super().__init__(params, lr, betas, eps, weight_decay, lowrank_params=lowrank_params, names=names,
                         eight_bit=eight_bit, rank=rank, update_gap=update_gap, scale=scale)

    def projector(self, p: Tensor) -> SVDProjector:
        group = self.group_of(p)
        shape = tuple(p.shape)
        return SVDProjector(self.state[p].setdefault("projector", {}), shape, weight_rank(group, shape),
                            group["update_gap"])

    def project_grad(self, p: Tensor, grad: Tensor) -> Tensor:
        return self._project(p, grad, self.state[p].get("step", 0))  # the 0-based index of the next step

    def _project(self, p: Tensor, grad: Tensor, step: int) -> Tensor:
        proj = self.projector(p)
        if proj.due(step):
            proj.refresh(grad, step, self.param_name(p))
        return proj.project(grad)

    def _lowrank_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        self._projected_update(p, self._project(p, grad, state["step"] - 1), group, state)

    def _projected_update(self, p: Tensor, r: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        n = self._adam_direction(r, group, state)
        proj = self.projector(p)
        basis = proj.basis(p.device).to(p.dtype)
        # W -= lr·α·(P N) (or N Pᵀ) as one addmm_ in W's dtype: no m x n temporary
        if proj.side == "left":
            p.addmm_(basis, n.to(p.dtype), alpha=-group["lr"] * group["scale"])
        else:
            p.addmm_(n.to(p.dtype), basis.t(), alpha=-group["lr"] * group["scale"])


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore-AdamW with 8-bit moments (bitsandbytes blockwise quantization)."""

    name = "galore_adamw8bit"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("eight_bit", True)
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class AdamW(MemKitOptimizer):
    """Plain AdamW as a memkit optimizer (every parameter dense), so that step-in-backward can drive
    it one parameter at a time. Same update as ``torch.optim.AdamW``'s single-tensor path."""

    name = "adamw"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, names: Optional[dict[Tensor, str]] = None,
                 eight_bit: bool = False, lowrank_params: Optional[Iterable[Tensor]] = None) -> None:
        if lowrank_params:
            raise ValueError("adamw has no low-rank rule; lowrank_params must be empty.")
        super().__init__(params, lr, betas, eps, weight_decay, lowrank_params=[], names=names, eight_bit=eight_bit)


__all__ = ["AdamW", "GaLoreAdamW", "GaLoreAdamW8bit"]

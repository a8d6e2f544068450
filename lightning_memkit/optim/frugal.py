"""FRUGAL: full-rank updates by splitting the gradient into a state-full and a state-free part.

For a low-rank weight with gradient G and an orthonormal basis P of rank r (``proj="svd"``: GaLore's
SVD basis; ``"random"``: the Q factor of a seeded Gaussian draw), remade every ``update_gap`` steps:

- state-full part: R = Pᵀ G (or G P), Adam on R, mapped back: U₁ = P·N (or N·Pᵀ);
- state-free part: the rest of the gradient, G − P Pᵀ G (or G − G P Pᵀ), with no state:
  U₂ = sign(·) (``state_free="signsgd"``) or the residual itself (``"sgd"``);
- W ← W − lr·U₁ − lr·free_lr_scale·U₂.

When the basis changes the Adam moments are reset (``reset_on_refresh=True``, the default: moments
in the old coordinates mean nothing in the new ones); set it False to keep them as GaLore does.
Dense parameters (embeddings, norms, the head) use AdamW, as in the paper. The projected side is the
authors' code's ``proj_side="std"`` (the left when m < n, else the right: square weights on the right).
The update needs the full gradient, so step-in-backward cannot accumulate it projected.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import Tensor

from lightning_memkit.config import check_int, check_number
from lightning_memkit.optim.base import MemKitOptimizer
from lightning_memkit.optim.projectors import (
    DefaultRank,
    LowRankSettings,
    RandomProjector,
    SVDProjector,
    check_rank_and_gap,
    projection_seed,
    weight_rank,
)

PROJECTIONS = ("svd", "random")
STATE_FREE = ("signsgd", "sgd")


class Frugal(LowRankSettings, MemKitOptimizer):
    """FRUGAL with Adam in the state-full subspace.

    Args:
        params, lr, betas, eps, weight_decay, lowrank_params, names, eight_bit: see
            :class:`~lightning_memkit.optim.base.MemKitOptimizer`.
        rank: dimension of the state-full subspace. Left at its default, each weight uses min(128, m, n).
        update_gap: steps between new bases.
        proj: ``"svd"`` or ``"random"``.
        state_free: ``"signsgd"`` or ``"sgd"``.
        free_lr_scale: learning rate of the state-free part as a multiple of ``lr``.
        reset_on_refresh: reset the Adam moments when the basis changes.
        seed: base seed of the random bases.
    """

    name = "frugal"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int = DefaultRank(128), update_gap: int = 200,
                 proj: str = "svd", state_free: str = "signsgd", free_lr_scale: float = 1.0,
                 reset_on_refresh: bool = True, seed: int = 0, lowrank_params: Optional[Iterable[Tensor]] = None,
                 names: Optional[dict[Tensor, str]] = None, eight_bit: bool = False) -> None:
        if proj not in PROJECTIONS:
            raise ValueError(f"proj={proj!r} is not one of {PROJECTIONS}.")
        if state_free not in STATE_FREE:
            raise ValueError(f"state_free={state_free!r} is not one of {STATE_FREE}.")
        rank, self._rank_is_default = check_rank_and_gap(rank, update_gap)
        free_lr_scale = check_number("free_lr_scale", free_lr_scale, minimum=0)
        seed = check_int("seed", seed, minimum=0)
        super().__init__(params, lr, betas, eps, weight_decay, lowrank_params=lowrank_params, names=names,
                         eight_bit=eight_bit, rank=rank, update_gap=update_gap, proj=proj, state_free=state_free,
                         free_lr_scale=free_lr_scale, reset_on_refresh=reset_on_refresh, seed=seed)

    def projector(self, p: Tensor) -> SVDProjector | RandomProjector:
        group = self.group_of(p)
        state = self.state[p].setdefault("projector", {})
        rank = weight_rank(group, tuple(p.shape))
        if group["proj"] == "svd":
            return SVDProjector(state, tuple(p.shape), rank, group["update_gap"])
        if group["proj"] == "random":
            proj = self._projectors.get(p)
            if proj is None or proj.state is not state:
                seed = projection_seed(group["seed"], self._index[p], 0)
                proj = RandomProjector(state, tuple(p.shape), rank, group["update_gap"], seed, orthonormal=True)
                self._projectors[p] = proj
            return proj
        raise ValueError(f"proj={group['proj']!r} is not one of {PROJECTIONS}.")

    def _lowrank_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        proj = self.projector(p)
        step = state["step"] - 1
        if proj.due(step):
            if group["reset_on_refresh"] and proj.state["refreshes"] > 0:
                self._reset_moments(state)
            proj.refresh(grad, step, self.param_name(p))
        g = grad.float()
        r = proj.project(g)
        full = proj.project_back(self._adam_direction(r, group, state))
        residual = g - proj.project_back(r)  # g may be the gradient itself: not in place
        if isinstance(proj, RandomProjector):
            proj.release()
        if group["state_free"] == "signsgd":
            residual.sign_()
        elif group["state_free"] != "sgd":
            raise ValueError(f"state_free={group['state_free']!r} is not one of {STATE_FREE}.")
        full.add_(residual, alpha=group["free_lr_scale"])
        p.add_(full.to(p.dtype), alpha=-group["lr"])

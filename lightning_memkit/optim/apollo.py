"""APOLLO and APOLLO-Mini: AdamW's per-channel learning-rate scaling, estimated in a random subspace.

For a low-rank weight with gradient G (m x n): R = Pᵀ G (or G P) with a seeded Gaussian basis P
(:class:`~lightning_memkit.optim.projectors.RandomProjector`, entries N(0, 1/r), a new one every
``update_gap`` steps, drawn from the seed on the parameter's device at each step, never stored); Adam
moments of R give the direction R̃ = m̂ / (√v̂ + ε). The update is the *full-rank* gradient scaled:

- channel-wise (APOLLO): s_j = ‖R̃[:, j]‖ / (‖R[:, j]‖ + 1e-8) for each channel j of the kept
  (larger) dimension, G̃ = G · diag(s);
- tensor-wise (APOLLO-Mini, rank 1): s = ‖R̃‖ / (‖R‖ + 1e-8), G̃ = s·G.

Norm-growth limiter (from Fira): if ‖U_t‖ > γ‖U_{t−1}‖ then the update is rescaled so that
‖U_t‖ = γ‖U_{t−1}‖. Then W ← W − lr·√scale·G̃ (the reference implementation's ``apollo_scale`` enters
as its square root: APOLLO-Mini's scale 128 multiplies the update by √128). Bias correction is inside
R̃, as in torch's AdamW. Which update the limiter watches is ``limiter_on``:

- ``"raw"`` (the default, as apollo-torch 1.0.3): U is the update *before* bias correction,
  G̃·(1 − β₁ᵗ)/√(1 − β₂ᵗ). That factor grows about 2x over the first ~10 steps (β = (0.9, 0.999)),
  so with γ = 1.01 the limiter also acts as a warm-up of the first steps;
- ``"corrected"`` (memkit before it followed the reference): U = G̃, the bias-corrected update,
  which does not grow by itself; steps 2-30 are then larger (up to 1.9x with a constant gradient, 1.2-1.4x
  with a persistent direction plus noise).

Either way the state keeps one fp32 number, the last limited norm of U. Two documented differences
from apollo-torch remain: ε is added after bias correction, as torch's AdamW does (the reference adds
it before: ε/√(1 − β₂ᵗ) in these terms), and weight decay is applied before the update, not after.

The update needs the full gradient G, so step-in-backward cannot accumulate it projected.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_memkit.config import MemKitConfigError, check_choice, check_int, check_number
from lightning_memkit.optim.base import MemKitOptimizer
from lightning_memkit.optim.projectors import (
    DefaultRank,
    LowRankSettings,
    RandomProjector,
    check_rank_and_gap,
    projection_seed,
    weight_rank,
)

SCALE_TYPES = ("channel", "tensor")
#: which update the norm-growth limiter watches: before ("raw", the reference's) or after bias correction
LIMITER_ON = ("raw", "corrected")


class Apollo(LowRankSettings, MemKitOptimizer):
    """APOLLO (defaults from the paper: rank 256, channel-wise, refresh every 200 steps, scale 1).

    Args:
        params, lr, betas, eps, weight_decay, lowrank_params, names: see
            :class:`~lightning_memkit.optim.base.MemKitOptimizer`.
        rank: dimension of the random subspace. Left at its default, each weight uses min(256, m, n).
        update_gap: steps between new random bases.
        scale: the update is multiplied by √scale.
        scale_type: ``"channel"`` or ``"tensor"``.
        norm_growth_limit: γ of the limiter (None or 0: off).
        limiter_on: the update the limiter watches: ``"raw"`` (before bias correction, as the reference
            implementation; the default) or ``"corrected"`` (after it). See the module docstring.
        seed: base seed of the random bases (each weight derives its own from it and its index).
    """

    name = "apollo"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int = DefaultRank(256), update_gap: int = 200,
                 scale: float = 1.0, scale_type: str = "channel", norm_growth_limit: Optional[float] = 1.01,
                 limiter_on: str = "raw", seed: int = 0, lowrank_params: Optional[Iterable[Tensor]] = None,
                 names: Optional[dict[Tensor, str]] = None) -> None:
        if scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type={scale_type!r} is not one of {SCALE_TYPES}.")
        rank, self._rank_is_default = check_rank_and_gap(rank, update_gap)
        scale = check_number("scale", scale, minimum=0, min_exclusive=True)
        limiter_on = check_choice("limiter_on", limiter_on, LIMITER_ON)
        seed = check_int("seed", seed, minimum=0)
        if norm_growth_limit is not None:
            norm_growth_limit = check_number("norm_growth_limit", norm_growth_limit, minimum=0)
        if norm_growth_limit is not None and norm_growth_limit != 0 and not norm_growth_limit >= 1:
            raise ValueError(f"norm_growth_limit={norm_growth_limit!r} must be >= 1 (or None to turn the limiter off).")
        super().__init__(params, lr, betas, eps, weight_decay, lowrank_params=lowrank_params, names=names,
                         rank=rank, update_gap=update_gap, scale=scale, scale_type=scale_type,
                         norm_growth_limit=norm_growth_limit, limiter_on=limiter_on, seed=seed)

    def projector(self, p: Tensor) -> RandomProjector:
        proj = self._projectors.get(p)
        if proj is None or proj.state is not self.state[p].get("projector"):
            group = self.group_of(p)
            seed = projection_seed(group["seed"], self._index[p], 0)
            proj = RandomProjector(self.state[p].setdefault("projector", {}), tuple(p.shape),
                                   weight_rank(group, tuple(p.shape)), group["update_gap"], seed)
            self._projectors[p] = proj
        return proj

    def _lowrank_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        proj = self.projector(p)
        if proj.due(state["step"] - 1):
            proj.refresh(None, state["step"] - 1)
        r = proj.project(grad)
        proj.release()  # the update scales the full gradient: the basis is no longer needed
        n = self._adam_direction(r, group, state)
        if group["scale_type"] == "channel":
            dim = 0 if proj.side == "left" else 1  # norms over the projected dimension: one per kept channel
            s = n.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        elif group["scale_type"] == "tensor":
            s = n.norm() / (r.norm() + 1e-8)
        else:
            raise ValueError(f"scale_type={group['scale_type']!r} is not one of {SCALE_TYPES}.")
        # The update is G·s. Its norm comes from G's channel norms, and it is added with addcmul, so no
        # full-size temporary is made (the embedding's gradient alone can be 1 GiB).
        gamma = group["norm_growth_limit"]
        if gamma:
            if s.ndim == 0:
                norm = s * _fp32_norm(grad)
            else:
                norm = (s.square() * _fp32_norm(grad, dim=dim, keepdim=True).square()).sum().sqrt()
            if group["limiter_on"] == "raw":  # the norm before bias correction: undo it
                beta1, beta2 = group["betas"]
                t = state["moment_step"]  # the step _adam_direction corrected for
                norm = norm * ((1 - beta1**t) / math.sqrt(1 - beta2**t))
            elif group["limiter_on"] != "corrected":
                raise ValueError(f"limiter_on={group['limiter_on']!r} is not one of {LIMITER_ON}.")
            if "last_update_norm" in state:
                limiter = torch.clamp(norm / (state["last_update_norm"] + 1e-8), min=gamma) / gamma
                s = s / limiter
                norm = norm / limiter
            state["last_update_norm"] = norm
        step = -group["lr"] * math.sqrt(group["scale"])
        p.addcmul_(grad, s.to(grad.dtype) if grad.dtype != s.dtype else s, value=step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`MemKitOptimizer.load_state_dict`. A state saved before ``limiter_on`` existed was written
        by the limiter on the bias-corrected update: its param groups load as ``limiter_on="corrected"``, so an
        optimizer built with ``limiter_on="corrected"`` resumes it exactly.

        Raises:
            MemKitConfigError: such an old state is loaded into an optimizer whose limiter is on the raw update
                (the default): its saved last update norm is on the other scale.
        """
        groups = state_dict.get("param_groups")
        # an APOLLO state from before the setting: APOLLO's other settings, not this one (any other state is left
        # to the base class's checks, which name the optimizer that wrote it)
        if isinstance(groups, list) and groups and all(
                isinstance(g, dict) and "norm_growth_limit" in g and "limiter_on" not in g for g in groups):
            for new in self.param_groups:
                if new["limiter_on"] != "corrected":
                    raise MemKitConfigError(
                        f"limiter_on={new['limiter_on']!r}: this {type(self).__name__} state was saved before the "
                        "setting existed, when the norm-growth limiter watched the bias-corrected update. Fix: build "
                        "the optimizer with limiter_on='corrected' (optimizer.limiter_on: corrected) to resume it "
                        "exactly, or start the optimizer state fresh (MemKitStrategy(resume='weights')).")
            groups = [{**g, "limiter_on": "corrected"} for g in groups]
            state_dict = {**state_dict, "param_groups": groups}
        super().load_state_dict(state_dict)


def _fp32_norm(t: Tensor, dim: Optional[int] = None, keepdim: bool = False) -> Tensor:
    """The 2-norm of ``t`` (along ``dim``) accumulated in fp32 without an fp32 copy of ``t``."""
    if dim is None:
        return torch.linalg.vector_norm(t, dtype=torch.float32)
    return torch.linalg.vector_norm(t, dim=dim, keepdim=keepdim, dtype=torch.float32)


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (update × √128), as in the paper."""

    name = "apollo_mini"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int = DefaultRank(1), scale: float = 128.0,
                 scale_type: str = "tensor", **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, scale=scale, scale_type=scale_type, **kwargs)

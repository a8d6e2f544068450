"""Projectors of a gradient matrix onto a low-rank subspace, kept apart from the optimizers.

A projector is a small object over a ``dict`` that lives in the optimizer's per-parameter state, so
everything needed to continue (the SVD basis, the seed, the refresh counter) is in
``optimizer.state_dict()`` and loads with ``torch.load(..., weights_only=True)``.

Side: for a gradient G of shape (m, n) the smaller dimension is projected away, so the projected
gradient R has shape (r, n) when m < n ("left": R = Pᵀ G with P (m, r)) and (m, r) when m >= n
("right": R = G P with P (n, r)). The optimizer state is then r x max(m, n). A square weight
(Llama's q/o projections) is projected on the right, as galore-torch 1.0 and apollo-torch 1.0.3
(``proj_type="std"``) and FRUGAL's code (``proj_side="std"``) do; the side a projector starts with
is kept in its state, so a run resumed from an older checkpoint keeps the side it was saved with.

- :class:`SVDProjector` (GaLore, FRUGAL "svd"): P is the top-r singular vectors of the gradient,
  recomputed every ``update_gap`` steps. The SVD is made robust: a failed or non-finite
  decomposition is retried in float64, then with a tiny jitter; if all fail the previous basis is
  kept (and a warning says so); with no previous basis it raises -- never a silent zero update.
- :class:`RandomProjector` (APOLLO, FRUGAL "random"): P is drawn from a seeded generator on the
  parameter's device, entries N(0, 1/r) (``orthonormal=True``: the Q factor of such a draw),
  regenerated from (seed, refresh count) at every step and never kept between steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_memkit._tensors import is_symbolic
from lightning_memkit.config import check_int

SIDES = ("left", "right")


def choose_side(shape: tuple[int, ...]) -> str:
    """``"left"`` (project the rows away) when m < n, else ``"right"`` (square weights included, as the
    reference implementations do)."""
    m, n = shape
    return "left" if m < n else "right"


def check_rank(name: str, shape: tuple[int, ...], rank: int) -> None:
    """Raise ValueError if ``rank`` cannot project a matrix of ``shape``."""
    if len(shape) != 2:
        raise ValueError(f"{name}: low-rank projection needs a 2-D weight, got shape {tuple(shape)}.")
    if rank < 1 or rank > min(shape):
        raise ValueError(
            f"{name}: rank={rank} does not fit its shape {tuple(shape)} (a rank must be between 1 and "
            f"min(m, n) = {min(shape)}). Fix: lower rank to at most {min(shape)}, or leave this weight out of the "
            "low-rank patterns."
        )


class DefaultRank(int):
    """The rank an optimizer takes when the caller gives none (the paper's value, e.g. GaLore's 128).

    It is an ``int`` and prints as the number; the optimizer stores a plain ``int`` in its param
    groups with ``rank_is_default=True``, and each weight then uses ``min(rank, m, n)``: a default
    must work on a small model. A rank the caller gives (to the optimizer or in a param group) is used
    as given, and one that does not fit a weight is refused (:func:`check_rank`). ``rank_is_default``
    is not one of the optimizer's ``defaults``: a state dict saved without it loads as an explicit rank.
    """


def weight_rank(group: dict[str, Any], shape: tuple[int, ...]) -> int:
    """The rank a low-rank weight of ``shape`` uses under ``group``'s settings: ``group["rank"]``, or
    ``min(rank, m, n)`` when the rank is the optimizer's default (``group["rank_is_default"]``)."""
    rank = group["rank"]
    if group.get("rank_is_default") and len(shape) == 2:
        return max(1, min(rank, *shape))
    return rank


class LowRankSettings:
    """Mixin of the low-rank optimizers (GaLore, APOLLO, FRUGAL): the default rank is lowered per weight
    (:func:`weight_rank`), and :meth:`_check_lowrank` checks the rank each weight will use. The
    optimizer sets ``_rank_is_default`` before ``MemKitOptimizer.__init__`` adds the groups."""

    _rank_is_default: bool = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank_is_default" not in param_group:  # a group's own rank is explicit
            param_group["rank_is_default"] = "rank" not in param_group and self._rank_is_default
        super().add_param_group(param_group)  # type: ignore[misc]

    def _check_lowrank(self, p: Tensor, group: dict[str, Any]) -> None:
        super()._check_lowrank(p, {**group, "rank": weight_rank(group, tuple(p.shape))})  # type: ignore[misc]


def check_rank_and_gap(rank: Any, update_gap: Any) -> tuple[int, bool]:
    """Validate a low-rank optimizer's ``rank`` and ``update_gap`` (integers >= 1); returns
    ``(rank, rank is the optimizer's default)``.

    Raises:
        MemKitConfigError: either is not an integer >= 1 (a ValueError).
    """
    is_default = isinstance(rank, DefaultRank)
    check_int("update_gap", update_gap, minimum=1)
    return check_int("rank", rank, minimum=1), is_default


class _Projector:
    """Common part: the side, project / project_back, and when to refresh."""

    def __init__(self, state: dict[str, Any], shape: tuple[int, ...], rank: int, update_gap: int) -> None:
        self.state = state
        self.rank = rank
        self.update_gap = update_gap
        state.setdefault("side", choose_side(shape))
        state.setdefault("refreshes", 0)  # how many bases have been made so far

    @property
    def side(self) -> str:
        return self.state["side"]

    def due(self, step: int) -> bool:
        """True when the basis must be (re)made before projecting at optimizer step ``step`` (0-based):
        no basis yet, or a multiple of ``update_gap`` not yet refreshed (several micro-batches of one
        accumulation window project at the same step)."""
        if self.state["refreshes"] == 0:
            return True
        return step % self.update_gap == 0 and self.state.get("refreshed_at") != step

    def mark_refreshed(self, step: int) -> None:
        self.state["refreshes"] += 1
        self.state["refreshed_at"] = step

    def basis(self, device: torch.device) -> Tensor:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    def project(self, grad: Tensor) -> Tensor:
        """R = Pᵀ G (left, r x n) or G P (right, m x r), returned in fp32.

        A bf16/fp16 gradient is multiplied in its own dtype (the basis is cast to it; the product
        accumulates in fp32 and only the small r x n result is rounded), so no fp32 copy of the full
        gradient is made -- for a 128256 x 4096 embedding that copy would be 2 GiB.
        """
        p = self.basis(grad.device)
        if grad.dtype in (torch.bfloat16, torch.float16):
            p = p.to(grad.dtype)
        elif grad.dtype != torch.float32:
            grad = grad.float()
        if self.side == "left":
            return (p.t() @ grad).float()
        if self.side == "right":
            return (grad @ p).float()
        raise ValueError(f"unknown projector side {self.side!r}; expected one of {SIDES}")

    def project_back(self, low_rank: Tensor) -> Tensor:
        """P R (left) or R Pᵀ (right): back to the weight's shape, fp32."""
        p = self.basis(low_rank.device)
        if self.side == "left":
            return p @ low_rank
        if self.side == "right":
            return low_rank @ p.t()
        raise ValueError(f"unknown projector side {self.side!r}; expected one of {SIDES}")


class SVDProjector(_Projector):
    """GaLore's projector: the top-``rank`` singular vectors of the gradient on the projected side."""

    def refresh(self, grad: Tensor, step: int, name: str = "weight") -> None:
        """Make the basis from ``grad`` at step ``step`` (robustly; see the module docstring)."""
        basis = robust_svd_basis(grad, self.rank, self.side)
        if basis is None:
            if "basis" not in self.state:
                raise RuntimeError(
                    f"{name}: the SVD of its gradient failed in float32, float64 and with jitter, and there is no "
                    "earlier basis to keep. The gradient is likely non-finite (check the loss for nan/inf)."
                )
            warnings.warn(f"{name}: the SVD of its gradient failed; keeping the previous projection basis.",
                          stacklevel=2)
        else:
            self.state["basis"] = basis
        self.mark_refreshed(step)

    def basis(self, device: torch.device) -> Tensor:
        return self.state["basis"]


def robust_svd_basis(grad: Tensor, rank: int, side: str) -> Tensor | None:
    """Top-``rank`` left (side ``"left"``) or right singular vectors of ``grad`` as an (·, rank) fp32
    matrix with orthonormal columns, or None if every attempt fails."""
    g = grad.detach().float()
    attempts = (
        lambda: g,
        lambda: g.double(),
        lambda: g.double() + 1e-7 * (g.double().norm() / math.sqrt(g.numel()) + 1e-30)
        * torch.randn(g.shape, dtype=torch.float64, device=g.device, generator=_jitter_generator(g.device)),
    )
    for attempt in attempts:
        try:
            u, _, vh = torch.linalg.svd(attempt(), full_matrices=False)
        except torch.OutOfMemoryError:
            raise  # retrying in float64 would need more memory; let the caller see it
        except (torch.linalg.LinAlgError, RuntimeError):  # no convergence (CPU); solver errors (CUDA)
            continue
        if side not in SIDES:
            raise ValueError(f"unknown projector side {side!r}; expected one of {SIDES}")
        basis = u[:, :rank] if side == "left" else vh[:rank].t()
        if is_symbolic(basis) or bool(torch.isfinite(basis).all()):  # fake tensors (memory planning) have no values
            return basis.float().contiguous()
    return None


def _jitter_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def projection_seed(base_seed: int, index: int, refresh: int) -> int:
    """A 63-bit seed from (optimizer seed, parameter index, refresh count), the same on every run."""
    x = (base_seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + refresh * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


class RandomProjector(_Projector):
    """APOLLO's projector: a seeded Gaussian basis, N(0, 1/rank) entries, regenerated on each step.

    The state holds ``seed`` (an int) and ``refreshes``; the basis is drawn from
    (seed, refresh count) by a generator on the parameter's device whenever a step needs it, kept
    only until :meth:`release` (the end of that step), and never stored: no memory between steps,
    and on a GPU the draw costs microseconds. CPU and CUDA generators differ, so the two devices
    draw different (each reproducible) bases. ``orthonormal=True`` takes the Q factor of the draw
    (FRUGAL needs P Pᵀ to be a projection).
    """

    def __init__(self, state: dict[str, Any], shape: tuple[int, ...], rank: int, update_gap: int, seed: int,
                 orthonormal: bool = False) -> None:
        super().__init__(state, shape, rank, update_gap)
        state.setdefault("seed", int(seed))
        self.rows = shape[0] if self.side == "left" else shape[1]
        self.orthonormal = orthonormal
        self._cache: tuple[int, torch.device, Tensor] | None = None

    def refresh(self, grad: Tensor | None, step: int, name: str = "weight") -> None:
        """Move to the next seeded basis (the gradient is not used)."""
        self.mark_refreshed(step)
        self.release()

    def release(self) -> None:
        """Drop the basis drawn for this step."""
        self._cache = None

    def basis(self, device: torch.device) -> Tensor:
        key = self.state["refreshes"]
        if self._cache is not None and self._cache[0] == key and self._cache[1] == device:
            return self._cache[2]
        gen = torch.Generator(device=device).manual_seed(projection_seed(self.state["seed"], 0, key))
        p = torch.randn(self.rows, self.rank, generator=gen, device=device).div_(math.sqrt(self.rank))
        if self.orthonormal:
            p = torch.linalg.qr(p).Q
        self._cache = (key, device, p)
        return p

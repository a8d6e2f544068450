"""COSMOS: SOAP-style Adam in the leading eigensubspace of the gradient statistics, a MUON-style
orthogonalized update on the rest.

For a low-rank weight W (m x n, ``nn.Linear``'s (out, in)) with gradient G, as the authors' code
(github lliu606/COSMOS) does it, with P (n x r) an orthonormal basis of the leading eigenvectors of
the second-moment matrix GᵀG, S (r x r) that matrix in the basis, V (m x r) Adam's second moment in
the basis and m (m x n) the full first moment:

- basis: at the first step P = top-r right singular vectors of G (the eigenvectors of GᵀG; computed
  by GaLore's robust SVD, :func:`~lightning_memkit.optim.projectors.robust_svd_basis`) and
  S = (1−β₂)(GP)ᵀ(GP). At each later refresh (every ``update_gap`` steps; the authors: every step)
  one power-iteration step on the running statistics: Y = β₂·P S + (1−β₂)·Gᵀ(GP), P' = QR(Y).Q,
  T = PᵀP', S = β₂·Tᵀ S T + (1−β₂)(GP')ᵀ(GP'). Between refreshes P is kept and
  S = β₂·S + (1−β₂)(GP)ᵀ(GP).
- moments: V = β₂·V + (1−β₂)(GP)²; m = β₁·m + (1−β₁)·G, and the (Nesterov) momentum used is
  G̃ = ((1−β₁)·G + β₁·m) / (1−β₁^{t+1}) (``nesterov=False``: G̃ = m / (1−β₁^t)). The authors keep the
  sum Σβ₁^k G; with their bias correction both give the same G̃.
- update: A = G̃ P; U₁ = (A / (√(V/(1−β₂^t)) + ε)) Pᵀ (Adam in the eigenbasis);
  R = G̃ − A Pᵀ (the rest), O = NewtonSchulz₅(R), U₂ = √(mn)·O / (‖O‖ + ε) (MUON);
  U = U₁ + scale·U₂ and W ← W − lr·lr_ratio·√(mn)·U / (‖U‖ + ε).

Differences from the authors' code, on purpose: Newton-Schulz runs in fp32 (theirs in bf16, for GPU
speed; the step is normalized, so only rounding differs); when the rank equals n the rest R is zero
by definition and U₂ is dropped (theirs orthogonalizes the rounding noise of G̃ − G̃PPᵀ); dense
parameters use torch's AdamW (theirs a variant with β₁'s bias correction fixed at 0.9); their code
also writes the Nesterov momentum into ``p.grad``, this one leaves the gradient alone; weight decay is
applied before the update (theirs too, for the matrices).

The update of each weight depends on its own gradient only, so step-in-backward can drive it (it
needs the full gradient: no projected accumulation). State of a low-rank weight: the first moment
m x n in the weight's dtype, and in fp32 P (n x r), S (r x r) and V (m x r): see
:func:`predicted_state_bytes`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_memkit.config import check_int, check_number
from lightning_memkit.optim.base import MemKitOptimizer
from lightning_memkit.optim.projectors import (
    DefaultRank,
    LowRankSettings,
    SVDProjector,
    check_rank_and_gap,
    weight_rank,
)

#: the quintic Newton-Schulz coefficients of MUON (and the authors' COSMOS code)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """MUON's quintic Newton-Schulz iteration: an approximation of U Vᵀ for G = U Σ Vᵀ, in fp32.

    X = G / (‖G‖ + eps) (transposed when G is tall), then ``steps`` times X ← aX + b(XXᵀ)X + c(XXᵀ)²X.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.float() / (g.norm() + eps)
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.t()
    for _ in range(steps):
        s = x @ x.t()
        y = s @ x
        x = a * x + b * y + c * (s @ y)
    return x.t() if tall else x


class Cosmos(LowRankSettings, MemKitOptimizer):
    """COSMOS (defaults from the authors' code: rank 64, basis updated every step, MUON part scale 0.2,
    the matrices' learning rate 0.1 x lr, Nesterov momentum).

    Args:
        params, lr, betas, eps, weight_decay, lowrank_params, names: see
            :class:`~lightning_memkit.optim.base.MemKitOptimizer` (the dense parameters use AdamW with ``lr``).
        rank: dimension of the eigensubspace that gets Adam. Left at its default, each weight uses
            min(64, m, n).
        update_gap: steps between power-iteration updates of the eigenbasis (1: every step, as the authors).
        scale: γ, the weight of the MUON (orthogonalized) part of the update.
        lr_ratio: the low-rank weights' learning rate as a multiple of ``lr``; their update
            has Frobenius norm lr·lr_ratio·√(mn) (the authors' ``lr_ratio``).
        nesterov: use the Nesterov momentum (the authors' default).
        ns_steps: Newton-Schulz iterations (5).

    Raises:
        MemKitConfigError: a setting out of range (a ValueError).
    """

    name = "cosmos"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int = DefaultRank(64), update_gap: int = 1,
                 scale: float = 0.2, lr_ratio: float = 0.1, nesterov: bool = True, ns_steps: int = 5,
                 lowrank_params: Optional[Iterable[Tensor]] = None,
                 names: Optional[dict[Tensor, str]] = None) -> None:
        rank, self._rank_is_default = check_rank_and_gap(rank, update_gap)
        scale = check_number("scale", scale, minimum=0)
        lr_ratio = check_number("lr_ratio", lr_ratio, minimum=0, min_exclusive=True)
        ns_steps = check_int("ns_steps", ns_steps, minimum=1)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov={nesterov!r} has type {type(nesterov).__name__}. Fix: True or False.")
        super().__init__(params, lr, betas, eps, weight_decay, lowrank_params=lowrank_params, names=names,
                         rank=rank, update_gap=update_gap, scale=scale, lr_ratio=lr_ratio, nesterov=nesterov,
                         ns_steps=ns_steps)

    def _check_lowrank(self, p: Tensor, group: dict[str, Any]) -> None:
        super()._check_lowrank(p, group)
        check_number("scale", group["scale"], minimum=0)  # a param group may set its own
        check_number("lr_ratio", group["lr_ratio"], minimum=0, min_exclusive=True)
        check_int("ns_steps", group["ns_steps"], minimum=1)

    def projector(self, p: Tensor) -> SVDProjector:
        """The weight's basis P (n x r: the input side, as the authors), kept in its state."""
        group = self.group_of(p)
        shape = tuple(p.shape)
        state = self.state[p].setdefault("projector", {"side": "right"})
        return SVDProjector(state, shape, weight_rank(group, shape), group["update_gap"])

    def _lowrank_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        step = state["step"]
        g = grad.float()
        m_rows, n_cols = g.shape
        proj = self.projector(p)
        if proj.due(step - 1):
            self._refresh_basis(p, proj, g, beta2, step - 1)
        else:
            gp = g @ proj.basis(p.device)
            state["gram"].mul_(beta2).addmm_(gp.t(), gp, alpha=1 - beta2)
        basis = proj.basis(p.device)
        gp = g @ basis  # m x r
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(gp)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"].mul_(beta2).addcmul_(gp, gp, value=1 - beta2)
        m = state["exp_avg"]
        m.lerp_(grad.to(m.dtype), 1 - beta1)
        if group["nesterov"]:
            g_tilde = (g * (1 - beta1)).add_(m.float(), alpha=beta1).div_(1 - beta1 ** (step + 1))
        else:
            g_tilde = m.float() / (1 - beta1**step)
        del g, gp
        a = g_tilde @ basis  # m x r
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        update = (a / denom) @ basis.t()  # U₁, m x n
        if basis.shape[1] < n_cols and group["scale"]:  # rank n: the rest is zero by definition
            rest = g_tilde.sub_(a @ basis.t())  # R (g_tilde is no longer needed)
            ortho = newton_schulz(rest, group["ns_steps"])
            update.add_(ortho, alpha=group["scale"] * math.sqrt(m_rows * n_cols) / (float(ortho.norm()) + group["eps"]))
        factor = group["lr"] * group["lr_ratio"] * math.sqrt(m_rows * n_cols) / (float(update.norm()) + group["eps"])
        p.add_(update.to(p.dtype), alpha=-factor)

    def _refresh_basis(self, p: Tensor, proj: SVDProjector, g: Tensor, beta2: float, step: int) -> None:
        """The first basis from the SVD of G (GaLore's robust SVD and failure handling), later ones by one
        power-iteration step on β₂·(old statistics) + (1−β₂)·GᵀG followed by QR."""
        state = self.state[p]
        name = self.param_name(p)
        if "basis" not in proj.state:
            proj.refresh(g, step, name)  # raises if the SVD fails with no basis to keep
            gp = g @ proj.basis(p.device)
            state["gram"] = gp.t().mm(gp).mul_(1 - beta2)
            return
        old, gram = proj.basis(p.device), state["gram"]
        y = (old @ gram).mul_(beta2).addmm_(g.t(), g @ old, alpha=1 - beta2)  # n x r
        new = torch.linalg.qr(y).Q
        if not bool(torch.isfinite(new).all()):
            warnings.warn(f"{name}: the eigenbasis update of COSMOS is not finite (non-finite gradient?); keeping the "
                          "previous basis.", stacklevel=3)
            proj.mark_refreshed(step)
            gp = g @ old
            gram.mul_(beta2).addmm_(gp.t(), gp, alpha=1 - beta2)
            return
        t = old.t() @ new  # r x r
        gp = g @ new
        state["gram"] = (t.t() @ gram @ t).mul_(beta2).addmm_(gp.t(), gp, alpha=1 - beta2)
        proj.state["basis"] = new.contiguous()
        proj.mark_refreshed(step)


def predicted_state_bytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *, rank: Optional[int] = None,
                          lowrank: bool = True) -> int:
    """Bytes of COSMOS's state for one parameter after its first step.

    Args:
        shape: the parameter's shape.
        dtype: the parameter's dtype.
        rank: the rank the weight uses (None: the default, min(64, m, n)).
        lowrank: whether the parameter gets the COSMOS rule (else AdamW: two moments in ``dtype``).

    Returns:
        Low-rank (m, n) of rank r: m·n·itemsize (first moment) + 4·(n·r + r·r + m·r) (basis, statistics in
        the basis, second moment in the basis). Dense: 2·numel·itemsize.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if not lowrank:
        return 2 * numel * itemsize
    m, n = shape
    r = min(64, m, n) if rank is None else rank
    return numel * itemsize + 4 * (n * r + r * r + m * r)


__all__ = ["Cosmos", "newton_schulz", "predicted_state_bytes"]

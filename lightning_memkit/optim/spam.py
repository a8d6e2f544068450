"""SPAM: Adam with periodic momentum reset and spike-aware gradient clipping (Huang et al., 2025).

For a parameter at its step ``t`` (1, 2, ...; ``ΔT`` = ``reset_interval``, ``θ`` = ``spike_threshold``,
``W`` = ``reset_warmup``), after the decoupled weight decay ``W ← W·(1 − lr·wd)``:

1. **Momentum reset**: when ``t mod ΔT = 0``, both moments are set to zero (bias correction keeps counting
   from the first step, as in the paper's Algorithm 1 and the authors' code).
2. **Spike-aware clipping**: entries with ``g² > θ·v`` (``v`` the second moment *before* this step's update)
   become ``sign(g)·√(θ·v)``. As in the authors' code it starts at step ``clip_delay`` (20) and is skipped for
   the first ``clip_delay`` steps after each reset (``t mod ΔT < clip_delay``), while ``v`` is rebuilt.
3. Adam: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``W ← W − lr·s·m̂ / (√v̂ + ε)`` with torch
   AdamW's placement of ε (the authors add ε before the bias correction).
4. **Warm-up after a reset**: the step is multiplied by ``s = 1 − 0.99·(1 + cos(π c / (W + 1))) / 2`` for
   ``c = t mod ΔT < W`` once a reset has happened (``t ≥ ΔT``), else ``s = 1`` (the authors' ``CosineDecay``).

**Sparse momentum** (``density < 1``): the chosen 2-D weights (``lowrank_params``) keep moments only on a
random subset of exactly ``⌊density·m·n⌋`` entries (their sorted flat indices, int32, in the state, drawn from
``seed``, the parameter's index and the reset count, renewed at every reset: 3 bytes per entry at density 0.25
against AdamW's 8); the other entries take no Adam step (weight
decay still applies to every entry). Every other parameter is dense SPAM.

Differences from the authors' code, on purpose: the step counter is per parameter (theirs is global: the same
when every parameter gets a gradient at every step, and what lets the step run in backward); a renewed subset
holds exactly ``⌊density·m·n⌋`` entries, kept as indices rather than a boolean mask (theirs draws each entry with
probability ``density``, so the state size would drift); the weight decay is applied first, as torch AdamW
(theirs after the update, and on sparse weights not at all: ``p.data[mask].add_`` writes to a copy); sparse
moments are fp32. Measured against the authors' code (dense, 130 steps with resets, warm-ups and clipped spikes,
no weight decay): parameters agree to 3.4e-6 (6.7e-6 of their total change; from the placement of ε).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_memkit.config import MemKitConfigError, check_int, check_number
from lightning_memkit.optim.base import DENSE_CHUNK, MemKitOptimizer


def warmup_scale(step: int, reset_interval: int, reset_warmup: int) -> float:
    """SPAM's step multiplier at ``step`` (1-based): a cosine ramp from 0.01 to 1 over ``reset_warmup`` steps
    after each reset, 1 before the first reset and after the ramp."""
    if step < reset_interval:
        return 1.0
    c = step % reset_interval
    if c >= reset_warmup:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (reset_warmup + 1))) / 2.0


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of the kept entries' indices of a weight of ``numel`` values."""
    return torch.int32 if numel < 2**31 else torch.int64


def sparse_count(numel: int, density: float) -> int:
    """Entries of a weight of ``numel`` values that keep moments at ``density`` (at least one)."""
    return max(1, min(numel, int(density * numel)))


class SPAM(MemKitOptimizer):
    """SPAM (Spike-Aware Adam with Momentum reset), with the optional sparse-momentum variant.

    Args:
        params, lr, betas, eps, weight_decay, names: see :class:`~lightning_memkit.optim.base.MemKitOptimizer`.
        reset_interval: ΔT, steps between momentum resets (the paper: 500).
        spike_threshold: θ (5000); 0 turns the clipping off.
        reset_warmup: steps of the cosine warm-up of the step after each reset (150); at most ``reset_interval``.
        density: fraction of the entries of each ``lowrank_params`` weight that keep moments (1.0: dense).
        seed: base seed of the sparse-momentum subsets.
        clip_delay: steps (from the start and after each reset) before the clipping acts (the authors' 20).
        lowrank_params: the 2-D weights that get sparse momentum when ``density < 1``; None: every 2-D
            parameter (as the other memkit optimizers). Ignored (every parameter dense) when ``density == 1``.

    Raises:
        MemKitConfigError: a setting out of range (naming it and the fix).
    """

    name = "spam"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, reset_interval: int = 500,
                 spike_threshold: float = 5000.0, reset_warmup: int = 150, density: float = 1.0, seed: int = 0,
                 clip_delay: int = 20, lowrank_params: Optional[Iterable[Tensor]] = None,
                 names: Optional[dict[Tensor, str]] = None) -> None:
        reset_interval = check_int("optimizer.reset_interval", reset_interval, minimum=1)
        spike_threshold = check_number("optimizer.spike_threshold", spike_threshold, minimum=0)
        reset_warmup = check_int("optimizer.reset_warmup", reset_warmup, minimum=0)
        if reset_warmup > reset_interval:
            raise MemKitConfigError(
                f"optimizer.reset_warmup={reset_warmup} is longer than optimizer.reset_interval={reset_interval}: the "
                "warm-up after a reset would never finish before the next reset. Fix: reset_warmup <= reset_interval "
                "(the paper: 150 and 500).")
        density = check_number("optimizer.density", density, minimum=0, maximum=1, min_exclusive=True,
                               what="a number in (0, 1]", fix="set optimizer.density in (0, 1] (1.0: dense).")
        seed = check_int("optimizer.seed", seed, minimum=0)
        clip_delay = check_int("clip_delay", clip_delay, minimum=0)
        if density == 1.0:
            lowrank_params = []
        super().__init__(params, lr, betas, eps, weight_decay, lowrank_params=lowrank_params, names=names,
                         reset_interval=reset_interval, spike_threshold=spike_threshold, reset_warmup=reset_warmup,
                         density=density, seed=seed, clip_delay=clip_delay)

    def _check_lowrank(self, p: Tensor, group: dict[str, Any]) -> None:
        if p.ndim != 2:
            raise ValueError(f"sparse momentum applies to 2-D weights; {self.param_name(p)} has shape "
                             f"{tuple(p.shape)}.")

    # ----- the rule ---------------------------------------------------------------------------------
    def _dense_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Dense SPAM, in slices of :data:`DENSE_CHUNK` values (element-wise math: slicing changes no value)."""
        step = state["step"]
        if "exp_avg" not in state or step % group["reset_interval"] == 0:  # the parameter's dtype, as torch AdamW
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
        if not (p.is_contiguous() and m_all.is_contiguous()):
            self._spam_math(p, grad, m_all, v_all, group, step)
            return
        flat_p, flat_g, flat_m, flat_v = p.view(-1), grad.reshape(-1), m_all.view(-1), v_all.view(-1)
        for a in range(0, p.numel(), DENSE_CHUNK):
            b = min(p.numel(), a + DENSE_CHUNK)
            self._spam_math(flat_p[a:b], flat_g[a:b], flat_m[a:b], flat_v[a:b], group, step)

    def _lowrank_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Sparse momentum: SPAM on the kept entries only."""
        step = state["step"]
        interval = group["reset_interval"]
        if "index" not in state or step % interval == 0:
            state["index"] = self._draw_index(p, group, step // interval)
            k = state["index"].numel()
            state["exp_avg"] = torch.zeros(k, device=p.device)
            state["exp_avg_sq"] = torch.zeros(k, device=p.device)
        index = state["index"]
        contiguous = p.is_contiguous()
        flat = p.view(-1) if contiguous else p.contiguous().view(-1)
        values = flat.index_select(0, index).float()  # the kept entries, in row-major order
        g = grad.reshape(-1).index_select(0, index).float()
        self._spam_math(values, g, state["exp_avg"], state["exp_avg_sq"], group, step)
        flat[index] = values.to(p.dtype)
        if not contiguous:  # a transposed weight: written back through its contiguous copy
            p.copy_(flat.view(p.shape))

    def _draw_index(self, p: Tensor, group: dict[str, Any], reset: int) -> Tensor:
        """The sorted flat indices of exactly ``⌊density·numel⌋`` entries (int32 below 2³¹ entries, else int64),
        drawn from (seed, parameter index, reset count)."""
        generator = torch.Generator().manual_seed(
            (group["seed"] * 1_000_003 + self._index[p] * 10_007 + reset) % (2**63 - 1))
        numel = p.numel()
        chosen = torch.randperm(numel, generator=generator)[:sparse_count(numel, group["density"])]
        return chosen.sort().values.to(device=p.device, dtype=index_dtype(numel))

    def _spam_math(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict[str, Any], step: int) -> None:
        """Clip, update the moments and step ``p`` in place (all tensors of one shape; ``m``, ``v`` the state)."""
        beta1, beta2 = group["betas"]
        interval, delay, theta = group["reset_interval"], group["clip_delay"], group["spike_threshold"]
        if theta and step >= delay and step % interval >= delay:
            bound = (v * theta).sqrt_().to(g.dtype)  # √(θ·v) with v before this step's update
            g = torch.where(g.square() > theta * v, g.sign() * bound, g)
        m.lerp_(g.to(m.dtype), 1 - beta1)
        v.mul_(beta2).addcmul_(g.to(v.dtype), g.to(v.dtype), value=1 - beta2)
        scale = warmup_scale(step, interval, group["reset_warmup"])
        step_size = group["lr"] * scale / (1 - beta1**step)
        denom = v.sqrt().div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
        p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-step_size)


__all__ = ["SPAM", "index_dtype", "sparse_count", "warmup_scale"]

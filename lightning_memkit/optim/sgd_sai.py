"""SGD-SaI: SGD with momentum and learning rates scaled once, at initialization, by the gradient
signal-to-noise ratio (Xu et al., 2024, "No More Adam: Learning Rate Scaling at Initialization is All You Need").

At its first gradient each parameter tensor ``i`` gets ``gSNR_i = ‖g_i‖₂ / (σ(g_i) + ε)`` (σ the unbiased
standard deviation of the tensor's entries; a one-entry tensor has σ = 0), and keeps it for the whole training.
Then, with ``μ = betas[0]`` of the param group and weight decay decoupled as AdamW's::

    buf ← g                      (first step)        buf ← μ·buf + (1 − μ)·g      (later)
    W   ← W·(1 − lr·wd) − lr · gSNR_i / max_j gSNR_j · buf

The maximum runs over every parameter that has a gradient at the first step (all groups), as in the authors'
code (v1.0.4, which normalizes the paper's gSNR by its maximum so that ``lr`` is the largest step). A parameter
whose first gradient comes later is scaled by the same maximum. As in the authors' code, a one-entry tensor (a
learnable scalar) gets ``|g| / ε``, which then sets the maximum and shrinks every other tensor's step.
State: one momentum buffer in the parameter's dtype and the gSNR (a Python float) per tensor: half of AdamW's;
the maximum is saved in ``state_dict`` (the authors' code recomputes it from the first gradient after a resume).

The step can run in backward: at the first step the hooks record each parameter's gSNR and momentum buffer
(which is the gradient itself) and defer the update; :meth:`finish_backward_step` applies them once every
gradient of the step has been seen (``StepInBackward`` calls it after the backward), giving the ordinary step's
parameters exactly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from lightning_memkit._tensors import is_symbolic
from lightning_memkit.optim.base import DENSE_CHUNK, MemKitOptimizer

#: the key of SGD-SaI's state dict holding the maximum gSNR of the first step
_MAX_KEY = "sgd_sai_max_gsnr"


def gsnr(grad: Tensor, eps: float) -> float:
    """``‖g‖₂ / (σ(g) + ε)`` of one gradient tensor in fp32 (σ unbiased; 0 for a one-entry tensor), computed in
    slices of :data:`DENSE_CHUNK` values for large tensors (no fp32 copy of a whole bf16 embedding gradient)."""
    n = grad.numel()
    if is_symbolic(grad):  # memory planning on fake tensors: shapes without values
        return 1.0
    if n <= DENSE_CHUNK:
        g = grad.float()
        sigma = g.std() if n > 1 else torch.zeros((), device=g.device)  # the authors' nan_to_num of a 1-entry std
        return float(torch.linalg.vector_norm(g) / (sigma + eps))
    flat = grad.reshape(-1)
    total = sum(float(flat[a:a + DENSE_CHUNK].sum(dtype=torch.float64)) for a in range(0, n, DENSE_CHUNK))
    mean = total / n
    squares = centered = 0.0
    for a in range(0, n, DENSE_CHUNK):
        chunk = flat[a:a + DENSE_CHUNK].double()
        squares += float(chunk.square().sum())
        centered += float((chunk - mean).square().sum())
    return math.sqrt(squares) / (math.sqrt(centered / (n - 1)) + eps)


class SGDSaI(MemKitOptimizer):
    """SGD-SaI (every parameter dense; no low-rank rule).

    Args:
        params, lr, eps, weight_decay, names: see :class:`~lightning_memkit.optim.base.MemKitOptimizer`
            (``eps`` guards the gSNR's division).
        betas: ``betas[0]`` is the momentum μ (the authors' default 0.9); ``betas[1]`` is unused (kept so that
            an AdamW's param groups convert unchanged).
        lowrank_params: must be empty (SGD-SaI has no low-rank rule).
    """

    name = "sgd_sai"

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, names: Optional[dict[Tensor, str]] = None,
                 lowrank_params: Optional[Iterable[Tensor]] = None) -> None:
        if lowrank_params:
            raise ValueError("sgd_sai has no low-rank rule; lowrank_params must be empty.")
        super().__init__(params, lr, betas, eps, weight_decay, lowrank_params=[], names=names)
        self.max_gsnr: Optional[float] = None  # fixed at the first step
        self._deferred: list[Tensor] = []  # first-step updates waiting for the maximum (step in backward)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """As :class:`MemKitOptimizer`'s, then the first step's deferred updates (see :meth:`finish_backward_step`)."""
        loss = super().step(closure)
        self.finish_backward_step()
        return loss

    def _dense_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if "gsnr" not in state:  # the first gradient: record gSNR and buf = g (and wait for the maximum)
            state["gsnr"] = gsnr(grad, group["eps"])
            state["momentum_buffer"] = grad.detach().to(p.dtype, copy=True)
            if self.max_gsnr is None:
                self._deferred.append(p)
                return
        else:
            momentum = group["betas"][0]
            state["momentum_buffer"].mul_(momentum).add_(grad, alpha=1 - momentum)
        self._apply(p, group, state)

    def _apply(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        scale = state["gsnr"] / self.max_gsnr if self.max_gsnr else 0.0  # all first gradients zero: no step
        p.add_(state["momentum_buffer"], alpha=-group["lr"] * scale)

    @torch.no_grad()
    def finish_backward_step(self) -> None:
        """Fix the maximum gSNR (at the first step) and apply the updates deferred until it was known. Called
        at the end of :meth:`step`, and by ``StepInBackward`` after each step's backward."""
        if not self._deferred:
            return
        if self.max_gsnr is None:
            self.max_gsnr = max(self.state[p]["gsnr"] for p in self._deferred)
        for p in self._deferred:
            self._apply(p, self._group_of[p], self.state[p])
        self._deferred = []

    def state_dict(self) -> dict[str, Any]:
        """As :class:`MemKitOptimizer`'s, plus the maximum gSNR of the first step."""
        state_dict = super().state_dict()
        state_dict[_MAX_KEY] = self.max_gsnr
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        max_gsnr = state_dict.get(_MAX_KEY)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != _MAX_KEY})
        self.max_gsnr = None if max_gsnr is None else float(max_gsnr)
        self._deferred = []


__all__ = ["SGDSaI", "gsnr"]

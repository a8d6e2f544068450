"""Step in backward (layer-wise updates): each parameter is updated as soon as its gradient is ready.

:class:`StepInBackward` wraps a memkit optimizer and registers
``Tensor.register_post_accumulate_grad_hook`` on every trainable parameter. Inside ``step(closure)``
(which is how Lightning calls an optimizer) the closure's backward pass updates each parameter from
its hook and frees its gradient at once, so full gradients never coexist; the update is the wrapped
optimizer's own per-parameter update, so parameters equal the ordinary step's bit for bit.

Gradient accumulation: a backward pass that runs *outside* ``step`` is an accumulation micro-batch
(Lightning runs the first k−1 micro-batches of a window so). Low-rank weights of optimizers that
step from the projected gradient (GaLore, Natural GaLore) accumulate R = Pᵀ G (r x n instead of m x n) and free G;
the projection is linear, so Σ Pᵀ G_k = Pᵀ Σ G_k while P stays fixed within the window (a refresh
due at this step uses the window's first micro-batch's gradient). Dense parameters accumulate in
``.grad`` as usual. ``step()`` then applies whatever was accumulated and not yet applied, so plain
``loss.backward(); opt.step()`` is also correct (without the memory saving).

What cannot work, and is refused by the strategy at setup: clipping by global norm (the norm needs
every gradient before the first update), fp16 with a GradScaler (it unscales gradients after the
backward), multi-process DDP (gradients are averaged after the hooks run), and accumulation with an
optimizer whose update needs the full gradient (AdamW, APOLLO, FRUGAL, SPAM, SGD-SaI, COSMOS) -- see
:func:`incompatibility`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_memkit.config import IN_BACKWARD_OPTIMIZERS
from lightning_memkit.optim.base import MemKitOptimizer


class StepInBackward(torch.optim.Optimizer):
    """Run ``optimizer``'s update from each parameter's gradient hook.

    ``param_groups`` and ``state`` are the wrapped optimizer's own objects, so LR schedulers,
    checkpoints and loggers see one optimizer. Call :meth:`remove_hooks` to detach.
    """

    def __init__(self, optimizer: MemKitOptimizer) -> None:
        if getattr(optimizer, "forward_only", False):
            raise TypeError(
                f"step-in-backward drives an optimizer from gradient hooks; {type(optimizer).__name__} is "
                "zeroth-order: it runs no backward pass and no hook would fire. Fix: step it with "
                f"optimizer.step(closure), or use one of {', '.join(IN_BACKWARD_OPTIMIZERS)}."
            )
        if not isinstance(optimizer, MemKitOptimizer):
            raise TypeError(
                f"step-in-backward drives memkit optimizers one parameter at a time; got {type(optimizer).__name__}. "
                "Fix: use one of memkit's optimizers "
                f"({', '.join(IN_BACKWARD_OPTIMIZERS)})."
            )
        super().__init__([{"params": [p for g in optimizer.param_groups for p in g["params"]]}], optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self._stepping = False
        self._pending: dict[Tensor, Tensor] = {}  # accumulated projected gradients
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook)
                       for g in self.param_groups for p in g["params"] if p.requires_grad]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group to the wrapped optimizer and hook its parameters (during ``__init__`` torch
        calls this for the placeholder group: that one is ignored)."""
        if not hasattr(self, "optimizer"):
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        self._hooks += [p.register_post_accumulate_grad_hook(self._hook)
                        for p in self.param_groups[-1]["params"] if p.requires_grad]

    # ----- hooks ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if p.grad is None:  # a custom autograd node returned no gradient for it (nothing to apply)
            return
        opt = self.optimizer
        projected = opt.is_lowrank(p) and opt.accumulates_projected
        if projected:
            r = opt.project_grad(p, p.grad)
            pending = self._pending.pop(p, None)
            if pending is not None:
                r = pending.add_(r)
            p.grad = None
            if self._stepping:
                opt.update_param(p, None, projected=r)
            else:
                self._pending[p] = r
        elif self._stepping:
            opt.update_param(p, p.grad)
            p.grad = None
        # else: an accumulation micro-batch of a dense (or full-gradient) parameter: .grad accumulates

    # ----- the optimizer interface ------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            self._stepping = True
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self._stepping = False
        self.flush()
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every accumulated gradient not applied yet (parameters whose hook did not run inside
        ``step``: accumulation outside a closure, or unused in the last micro-batch)."""
        opt = self.optimizer
        for p, r in list(self._pending.items()):
            opt.update_param(p, None, projected=r)
        self._pending.clear()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    opt.update_param(p, p.grad)
                    p.grad = None
        finish = getattr(opt, "finish_backward_step", None)
        if finish is not None:  # an optimizer whose step needs every gradient of the step first (SGD-SaI's
            finish()            # first step: the maximum gSNR); it deferred those updates until now

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending.clear()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups  # torch's load makes new group dicts and a new state
        self.state = self.optimizer.state

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return f"StepInBackward({self.optimizer!r})"


def incompatibility(optimizer_name: str, accumulates_projected: bool, *, accumulate_grad_batches: int,
                    gradient_clip_val: Optional[float], precision: str, world_size: int) -> Optional[str]:
    """Why step-in-backward cannot run with these Trainer settings (with the alternative), or None."""
    if gradient_clip_val:
        return (f"gradient_clip_val={gradient_clip_val} clips by the global norm of all gradients, "
                "but step-in-backward "
                "updates each parameter before the next gradient exists. Fix: drop gradient_clip_val, or set "
                "optimizer.in_backward=false to keep clipping.")
    if precision in ("16-mixed", "16"):
        return (f"precision={precision!r} uses a GradScaler, "
                "which unscales and checks all gradients after the backward "
                "pass; step-in-backward has used them by then. Fix: use precision='bf16-mixed' (no scaler), or "
                "optimizer.in_backward=false.")
    if world_size > 1:
        return (f"{world_size} processes: DDP averages gradients across processes after the gradient hooks run, so an "
                "update from the hook would use this process's gradient only. Fix: train on one device, or set "
                "optimizer.in_backward=false (ZeRO under DeepSpeed is the multi-GPU way to save this memory).")
    if accumulate_grad_batches > 1 and not accumulates_projected:
        return (f"accumulate_grad_batches={accumulate_grad_batches} with optimizer {optimizer_name!r}: "
                "its update needs the "
                "full accumulated gradient, so every full gradient would be kept across micro-batches -- the memory "
                f"step-in-backward exists to save. Fix: use {' / '.join(projected_accumulators())} (which accumulate "
                "the r x n projected gradient), or accumulate_grad_batches=1 with a larger batch, "
                "or optimizer.in_backward=false.")
    return None


def projected_accumulators() -> list[str]:
    """Names of the optimizers whose step in backward accumulates the projected gradient over micro-batches
    (``accumulates_projected``: GaLore and Natural GaLore, 8-bit variants included); every other in-backward
    optimizer (AdamW, APOLLO, FRUGAL, SPAM, SGD-SaI, COSMOS) needs the full gradient."""
    from lightning_memkit.optim import OPTIMIZER_CLASSES

    return [name for name in IN_BACKWARD_OPTIMIZERS
            if getattr(OPTIMIZER_CLASSES.get(name), "accumulates_projected", False)]

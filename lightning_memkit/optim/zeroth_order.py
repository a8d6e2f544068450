"""Zeroth-order training: MeZO's SPSA step (ZO-SGD), the ZO benchmark's ZO-Adam and its block-wise variant.

The gradient is estimated from losses alone (no backward pass, no gradients, no saved activations), so a step
needs the memory of inference plus the optimizer's state (none for ZO-SGD). One perturbation ``k`` of one step:

.. code-block:: text

    z_k ~ N(0, I)                     regenerated from its seed whenever it is needed, never stored
    θ += ε z_k;   L+ = closure()      in place
    θ -= 2ε z_k;  L- = closure()
    θ += ε z_k                        back to θ (up to fp rounding, as in MeZO)
    g_k = (L+ - L-) / (2ε)            the projected gradient, a scalar

and the update, after all ``n_perturbations`` have been evaluated at the same θ:

.. code-block:: text

    ĝ = (1/n) Σ_k g_k z_k                              (the SPSA estimate of ∇L)
    ZO-SGD:  θ ← θ - lr·(ĝ + wd·θ)                    (MeZO's update; decoupled decay)
    ZO-Adam: θ ← AdamW(θ, ĝ)                          (torch AdamW's update on ĝ, moments in θ's dtype)

Block-wise (``blockwise=True``, the ZO benchmark's variant): the parameters are split into blocks (by default
one per parameter tensor; ``MemKitStrategy`` passes one block per transformer block, plus one per remaining
tensor) and each block gets its own perturbations and loss pairs with only that block perturbed, so a step costs
``2 · n_perturbations · blocks`` forward passes; every estimate is taken at the same θ, then all blocks update.

Noise: ``z`` of parameter ``i`` is drawn in slices of :data:`NOISE_CHUNK` values, each from its own generator
seeded by ``(seed, step, block, k, i, slice)``. So it can be regenerated exactly at any time (resume needs only
the step count) and perturbing a 1 GiB embedding needs a temporary of one slice, not of the whole tensor.

The losses a step evaluated: :meth:`ZerothOrderOptimizer.step` returns their mean (≈ L(θ), to O(ε²)) and keeps
the pairs in :attr:`ZerothOrderOptimizer.last_losses`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import torch
from torch import Tensor

from lightning_memkit.config import MemKitConfigError, check_number
from lightning_memkit.optim.base import MemKitOptimizer

#: values per slice of the regenerated noise (each slice has its own seed)
NOISE_CHUNK = 1 << 22
_MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def noise_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (order matters): a chain of splitmix64 mixes."""
    h = 0
    for part in parts:
        h = _splitmix(h ^ (part & _MASK))
    return h >> 1


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.is_meta


class ZerothOrderOptimizer(MemKitOptimizer):
    """ZO-SGD (MeZO's SPSA step). ``step(closure)`` calls ``closure`` twice per perturbation (and block) with the
    parameters perturbed in place; the closure returns the loss and must not call backward.

    Args:
        params: parameters or param groups.
        lr: learning rate (MeZO fine-tunes with 1e-7 .. 1e-6 for SGD; ZO-Adam ~1e-5 .. 1e-4).
        betas, eps: Adam's (ZO-Adam only; kept in the groups for ZO-SGD, unused).
        weight_decay: decoupled weight decay (``θ ← θ - lr·wd·θ``).
        perturbation: ε, the scale of the perturbation (MeZO: 1e-3).
        n_perturbations: directions averaged per step (``≥ 1``; each costs two forward passes).
        blockwise: perturb and estimate one block at a time (see the module docstring).
        seed: base seed of the perturbations.
        blocks: the partition of the parameters used with ``blockwise`` (lists of tensors); None: one block per
            parameter tensor. Parameters of the groups left out of every block form one more block.
        names: display names of parameters, for messages.

    Raises:
        MemKitConfigError: a setting out of range.
    """

    name: ClassVar[str] = "zo_sgd"
    #: the step runs the closure forward-only: no backward, no gradients (read by MemKitStrategy)
    forward_only: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        perturbation: float = 1e-3,
        n_perturbations: int = 1,
        blockwise: bool = False,
        seed: int = 0,
        blocks: Optional[Sequence[Sequence[Tensor]]] = None,
        names: Optional[dict[Tensor, str]] = None,
        lowrank_params: Optional[Iterable[Tensor]] = None,
    ) -> None:
        check_number("optimizer.perturbation", perturbation, minimum=0.0, min_exclusive=True,
                     fix="set optimizer.perturbation to a finite number > 0 (MeZO uses 1e-3).")
        if isinstance(n_perturbations, bool) or not isinstance(n_perturbations, int) or n_perturbations < 1:
            raise MemKitConfigError(f"optimizer.n_perturbations={n_perturbations!r} must be an integer >= 1. Fix: 1 "
                                    "(MeZO), or more to average several directions per step.")
        if not isinstance(blockwise, bool):
            raise MemKitConfigError(f"optimizer.blockwise={blockwise!r} has type {type(blockwise).__name__}. Fix: "
                                    "true or false.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise MemKitConfigError(f"optimizer.seed={seed!r} must be an integer >= 0. Fix: e.g. seed=0.")
        if lowrank_params:
            raise MemKitConfigError(f"{self.name} has no low-rank rule (every parameter is perturbed whole). Fix: drop "
                                    "optimizer.target_modules.")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lowrank_params=(),
                         names=names, perturbation=float(perturbation), n_perturbations=n_perturbations,
                         blockwise=blockwise, seed=seed)
        for group in self.param_groups:
            group.setdefault("zo_step", 0)  # the steps taken (saved with the groups; not a setting)
        self._blocks_given = [list(b) for b in blocks] if blocks is not None else None
        self.last_losses: list[tuple[float, float]] = []

    # ----- the partition and the noise ----------------------------------------------------------------
    def _trainable(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def blocks(self) -> list[list[Tensor]]:
        """The blocks perturbed one at a time (``blockwise``), or one block of every trainable parameter."""
        params = self._trainable()
        if not self.param_groups[0]["blockwise"]:
            return [params]
        if self._blocks_given is None:
            return [[p] for p in params]
        held = set(params)
        blocks = [[p for p in b if p in held] for b in self._blocks_given]
        blocks = [b for b in blocks if b]
        covered = {p for b in blocks for p in b}
        rest = [p for p in params if p not in covered]
        return blocks + ([rest] if rest else [])

    def _key(self, step: int, block: int, k: int, p: Tensor) -> int:
        return noise_seed(self.group_of(p)["seed"], step, block, k, self._index[p])

    def noise(self, p: Tensor, key: int) -> Tensor:
        """The whole ``z`` of ``p`` for ``key`` (``p``'s shape and dtype): what :meth:`add_noise_` adds, slice by
        slice."""
        flat = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        for a, z in self._slices(p, key):
            flat[a:a + z.numel()] = z
        return flat.view(p.shape)

    def _slices(self, p: Tensor, key: int) -> Iterable[tuple[int, Tensor]]:
        numel = p.numel()
        if _is_fake(p):  # planning on fake tensors: values do not matter, sizes do
            for a in range(0, numel, NOISE_CHUNK):
                yield a, torch.randn(min(NOISE_CHUNK, numel - a), dtype=p.dtype, device=p.device)
            return
        generator = torch.Generator(device=p.device)
        for i, a in enumerate(range(0, numel, NOISE_CHUNK)):
            generator.manual_seed(noise_seed(key, i))
            yield a, torch.randn(min(NOISE_CHUNK, numel - a), generator=generator, dtype=p.dtype, device=p.device)

    def add_noise_(self, p: Tensor, key: int, scale: float) -> None:
        """``p += scale · z(key)`` in place, one slice of :data:`NOISE_CHUNK` values at a time."""
        if not p.is_contiguous():
            p.add_(self.noise(p, key), alpha=scale)
            return
        flat = p.view(-1)
        for a, z in self._slices(p, key):
            flat[a:a + z.numel()].add_(z, alpha=scale)

    # ----- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Tensor]:
        """One ZO step: ``2 · n_perturbations`` closure calls per block, then the update.

        Args:
            closure: runs the forward pass at the current parameters and returns the loss (a scalar tensor or a
                number), or None to skip the step (the parameters are left unchanged). Called under
                ``torch.no_grad()``.

        Returns:
            The mean of the losses evaluated (None when the closure skipped the step).

        Raises:
            RuntimeError: without a closure (nothing to estimate the gradient from).
        """
        if closure is None:
            raise RuntimeError(f"{self.name} estimates the gradient from losses: step() needs a closure that returns "
                               "the loss (Lightning's automatic optimization passes one).")
        groups = self.param_groups
        step, n = groups[0]["zo_step"], groups[0]["n_perturbations"]
        eps = groups[0]["perturbation"]
        blocks = self.blocks()
        estimates: list[list[tuple[int, float]]] = []  # per block: (key index k, projected gradient)
        losses: list[tuple[Any, Any]] = []
        for b, block in enumerate(blocks):
            per_block = []
            for k in range(n):
                keys = [self._key(step, b, k, p) for p in block]
                pair = self._evaluate(closure, block, keys, eps)
                if pair is None:
                    return None
                losses.append(pair)
                per_block.append((k, self._projected(pair, eps)))
            estimates.append(per_block)
        for b, (block, per_block) in enumerate(zip(blocks, estimates)):
            for p in block:
                self._update(p, [(self._key(step, b, k, p), g / n) for k, g in per_block])
        for group in groups:
            group["zo_step"] = step + 1
        self.last_losses = [(self._number(a), self._number(b)) for a, b in losses]
        flat = [loss for pair in losses for loss in pair]
        if all(isinstance(x, Tensor) for x in flat):
            return torch.stack([x.detach().float().reshape(()) for x in flat]).mean()
        return torch.tensor(sum(float(x) for x in flat) / len(flat))

    def _evaluate(self, closure: Callable[[], Any], block: list[Tensor], keys: list[int], eps: float) -> Any:
        """(L+, L-) with ``block`` perturbed by ±ε z, the parameters restored afterwards (also on an error)."""
        for p, key in zip(block, keys):
            self.add_noise_(p, key, eps)
        moved = 1.0
        try:
            plus = closure()
            for p, key in zip(block, keys):
                self.add_noise_(p, key, -2.0 * eps)
            moved = -1.0
            minus = closure()
        finally:
            for p, key in zip(block, keys):
                self.add_noise_(p, key, -moved * eps)
        if plus is None or minus is None:
            return None
        return plus, minus

    @staticmethod
    def _number(loss: Any) -> float:
        if isinstance(loss, Tensor) and _is_fake(loss):
            return 0.0
        return float(loss)

    def _projected(self, pair: tuple[Any, Any], eps: float) -> float:
        plus, minus = (self._number(x) for x in pair)
        return (plus - minus) / (2.0 * eps)

    def _update(self, p: Tensor, terms: list[tuple[int, float]]) -> None:
        """ZO-SGD: ``θ ← θ(1 - lr·wd) - lr·Σ (g_k/n) z_k`` (MeZO's ``θ - lr·(g·z + wd·θ)``), slice by slice."""
        group = self.group_of(p)
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1.0 - lr * group["weight_decay"])
        for key, g in terms:
            self.add_noise_(p, key, -lr * g)

    def init_state(self) -> None:
        """Create the state the first step would (none for ZO-SGD), without a step (the planner's warm-up)."""


class ZerothOrderAdam(ZerothOrderOptimizer):
    """ZO-Adam (the ZO benchmark's): torch AdamW's update on the SPSA estimate ``ĝ = (1/n) Σ g_k z_k``, one
    parameter at a time (``ĝ`` is one temporary of that parameter's size). Same arguments as
    :class:`ZerothOrderOptimizer`; ``betas`` and ``eps`` are Adam's. State: two moments in the parameter's dtype.
    """

    name: ClassVar[str] = "zo_adam"

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, lr, *args, **kwargs)

    def _update(self, p: Tensor, terms: list[tuple[int, float]]) -> None:
        estimate = torch.zeros_like(p)
        for key, g in terms:
            self.add_noise_(estimate, key, g)
        self.update_param(p, estimate)  # decoupled decay, then AdamW (MemKitOptimizer._dense_update)

    def init_state(self) -> None:
        for p in self._trainable():
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def predict_zo_state_bytes(name: str, params: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of a ZO optimizer's state after its first step: none (ZO-SGD), two moments in each trainable
    parameter's dtype (ZO-Adam)."""
    import math

    if name == "zo_sgd":
        return 0
    if name == "zo_adam":
        return sum(2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in params)
    raise ValueError(f"{name!r} is not a zeroth-order optimizer")


#: name -> class
ZO_OPTIMIZERS = {"zo_sgd": ZerothOrderOptimizer, "zo_adam": ZerothOrderAdam}

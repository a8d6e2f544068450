"""What every memkit optimizer shares: AdamW for the dense parameters, a per-parameter update that
step-in-backward can call, moments in fp32 or 8 bits, and a state dict that keeps dtypes.

A memkit optimizer is a ``torch.optim.Optimizer``. Its settings live in the param groups (``lr``,
``betas``, ``eps``, ``weight_decay`` and the technique's own, such as ``rank``). Each parameter is
either *low-rank* (a 2-D weight chosen by the caller: the subclass's rule) or *dense* (AdamW, as in
the papers: norms, biases, embeddings, the LM head). Weight decay is decoupled and applied first,
as ``torch.optim.AdamW`` does: ``W ← W·(1 − lr·wd)``, then the update.

The math of one parameter's update is a method taking (parameter, gradient): :meth:`step` calls it
for every parameter, and :class:`~lightning_memkit.optim.in_backward.StepInBackward` calls it from
the gradient hook, so both give the same parameters bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import Tensor

from lightning_memkit.config import MemKitConfigError, check_number
from lightning_memkit.optim.eight_bit import BLOCKSIZE, dequantize_state, quantize_state, quantized_bytes
from lightning_memkit.optim.projectors import check_rank

#: tensors with fewer elements keep fp32 moments in 8-bit mode (as bitsandbytes' min_8bit_size)
MIN_8BIT_SIZE = 4096
#: values per slice of a dense update (a multiple of the 8-bit block size)
DENSE_CHUNK = 1 << 22
#: the first index of frozen parameters (see ``MemKitOptimizer._next_index``), above any trainable one
FROZEN_INDEX = 1 << 40


class MemKitOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses set ``name`` and implement :meth:`_lowrank_update`.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: AdamW's settings (every parameter uses them).
        lowrank_params: the parameters that get the low-rank rule. None: every 2-D parameter of the
            groups whose ``"lowrank"`` key is true (the default for a group).
        names: optional display names of parameters, used in error messages.
        eight_bit: keep Adam moments in 8 bits (bitsandbytes blockwise quantization, blocks of 256,
            one fp32 scale each) for tensors of at least 4096 elements.
        **technique_defaults: the subclass's settings (e.g. ``rank``), stored in every group.
    """

    name: ClassVar[str] = "memkit"
    #: step-in-backward may accumulate this optimizer's low-rank gradients projected (GaLore only)
    accumulates_projected: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        lowrank_params: Optional[Iterable[Tensor]] = None,
        names: Optional[dict[Tensor, str]] = None,
        eight_bit: bool = False,
        **technique_defaults: Any,
    ) -> None:
        if not isinstance(lr, Tensor):  # torch optimizers take a tensor lr (e.g. for torch.compile)
            check_number("lr", lr, minimum=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise MemKitConfigError(f"betas={betas!r} must be two numbers in [0, 1). Fix: e.g. betas=(0.9, 0.999).")
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, minimum=0.0, maximum=1.0, max_exclusive=True)
        check_number("eps", eps, minimum=0.0)
        check_number("weight_decay", weight_decay, minimum=0.0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lowrank=True,
                        **technique_defaults)
        self.eight_bit = eight_bit
        self._names = dict(names or {})
        self._group_of: dict[Tensor, dict[str, Any]] = {}
        self._index: dict[Tensor, int] = {}
        self._counts = [0, 0]  # trainable and frozen parameters numbered so far (see _next_index)
        self._lowrank: set[Tensor] = set()
        self._auto_lowrank = lowrank_params is None
        self._projectors: dict[Tensor, Any] = {}
        super().__init__(params, defaults)  # calls add_param_group for each group
        if lowrank_params is not None:
            chosen = list(lowrank_params)
            stray = [self.param_name(p) for p in chosen if p not in self._group_of]
            if stray:
                raise ValueError(f"lowrank_params contains parameters that are not in the optimizer: {stray[:5]}")
            for p in chosen:
                self._check_lowrank(p, self._group_of[p])
            self._lowrank = set(chosen)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's; the new parameters are dense, or low-rank (2-D ones) when the optimizer was built
        without ``lowrank_params`` and the group's ``"lowrank"`` is true (e.g. Lightning's
        ``BaseFinetuning.unfreeze_and_add_param_group``)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._group_of[p] = group
            self._index[p] = self._next_index(p)
            if self._auto_lowrank and group["lowrank"] and p.ndim == 2:
                self._check_lowrank(p, group)
                self._lowrank.add(p)

    # ----- bookkeeping ------------------------------------------------------------------------------
    def _next_index(self, p: Tensor) -> int:
        """``p``'s index, which seeds its random projection (APOLLO, FRUGAL): trainable parameters are numbered
        0, 1, ... in order and frozen ones (``requires_grad=False``) from :data:`FROZEN_INDEX`, so frozen
        parameters in the groups change no trainable parameter's seed: the optimizer trains exactly as one
        built over the trainable parameters alone."""
        frozen = not p.requires_grad
        index = FROZEN_INDEX * frozen + self._counts[frozen]
        self._counts[frozen] += 1
        return index

    def param_name(self, p: Tensor) -> str:
        index = self._index.get(p)
        where = ("?" if index is None else f"{index}" if index < FROZEN_INDEX
                 else f"{index - FROZEN_INDEX} (frozen)")
        return self._names.get(p, f"parameter {where} of shape {tuple(p.shape)}")

    def is_lowrank(self, p: Tensor) -> bool:
        return p in self._lowrank

    def group_of(self, p: Tensor) -> dict[str, Any]:
        return self._group_of[p]

    def _check_lowrank(self, p: Tensor, group: dict[str, Any]) -> None:
        """Validate a low-rank parameter's settings (subclasses check their own keys)."""
        if "rank" in group:
            check_rank(self.param_name(p), tuple(p.shape), group["rank"])
        gap = group.get("update_gap")
        if gap is not None and (isinstance(gap, bool) or not isinstance(gap, int) or gap < 1):
            raise ValueError(f"update_gap={gap!r} must be an integer >= 1 (steps between projection refreshes).")

    # ----- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p not in self._group_of:  # DeepSpeed's ZeRO replaced the params by flat partitions
                        self._group_of[p] = group
                    self.update_param(p, p.grad)
        return loss

    @torch.no_grad()
    def update_param(self, p: Tensor, grad: Optional[Tensor], projected: Optional[Tensor] = None) -> None:
        """Apply one optimizer step to ``p`` from its complete gradient ``grad``, or, for optimizers
        that accumulate projected gradients (:attr:`accumulates_projected`), from the projected
        gradient ``projected`` (see :meth:`project_grad`)."""
        if grad is not None and grad.is_sparse:
            raise RuntimeError(f"{self.name} does not support sparse gradients ({self.param_name(p)}).")
        group = self._group_of[p]
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        if projected is not None:
            self._projected_update(p, projected, group, state)
        elif p in self._lowrank:
            self._lowrank_update(p, grad, group, state)
        else:
            self._dense_update(p, grad, group, state)

    def project_grad(self, p: Tensor, grad: Tensor) -> Tensor:
        """The low-rank gradient of ``p`` for its next step (refreshing the basis if due). Only for
        optimizers with :attr:`accumulates_projected`."""
        raise NotImplementedError(f"{self.name} cannot accumulate projected gradients")

    def _projected_update(self, p: Tensor, r: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{self.name} cannot step from a projected gradient")

    def _lowrank_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define a low-rank update")

    # ----- Adam pieces ------------------------------------------------------------------------------
    def _dense_update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """AdamW on the full parameter (decay already applied), in slices of :data:`DENSE_CHUNK` values so
        that no temporary the size of a large weight (an embedding: 1-2 GiB) is made. The math is
        element-wise, so slicing changes no value."""
        beta1, beta2 = group["betas"]
        step = state["step"]
        eight_bit = self._uses_8bit(p)
        if not eight_bit and "exp_avg" not in state:  # the parameter's dtype, as torch.optim.AdamW
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if eight_bit and "exp_avg_q" not in state:
            state["exp_avg_q"], state["exp_avg_absmax"] = quantize_state(
                torch.zeros(p.numel(), device=p.device), signed=True)
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_state(
                torch.zeros(p.numel(), device=p.device), signed=False)
        bc2_sqrt, step_size = math.sqrt(1 - beta2**step), group["lr"] / (1 - beta1**step)
        if not (p.is_contiguous() and (eight_bit or state["exp_avg"].is_contiguous())):
            # transposed or channels-last weights: one whole-tensor pass (no flat views to slice)
            self._dense_whole(p, grad, group, state, eight_bit, bc2_sqrt, step_size)
            return
        flat_p, flat_g = p.view(-1), grad.reshape(-1)
        for a in range(0, p.numel(), DENSE_CHUNK):
            b = min(p.numel(), a + DENSE_CHUNK)
            g = flat_g[a:b]
            if eight_bit:  # DENSE_CHUNK is a multiple of the quantization block: slices hold whole blocks
                blocks = slice(a // BLOCKSIZE, -(-b // BLOCKSIZE))
                m = dequantize_state(state["exp_avg_q"][a:b], state["exp_avg_absmax"][blocks], signed=True)
                v = dequantize_state(state["exp_avg_sq_q"][a:b], state["exp_avg_sq_absmax"][blocks], signed=False)
                g = g.float()
            else:
                m, v = state["exp_avg"].view(-1)[a:b], state["exp_avg_sq"].view(-1)[a:b]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if eight_bit:
                state["exp_avg_q"][a:b], state["exp_avg_absmax"][blocks] = quantize_state(m, signed=True)
                state["exp_avg_sq_q"][a:b], state["exp_avg_sq_absmax"][blocks] = quantize_state(v, signed=False)
            denom = v.sqrt().div_(bc2_sqrt).add_(group["eps"])  # the values torch.optim.AdamW computes
            flat_p[a:b].addcdiv_(m, denom, value=-step_size)

    def _dense_whole(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any], eight_bit: bool,
                     bc2_sqrt: float, step_size: float) -> None:
        beta1, beta2 = group["betas"]
        if eight_bit:
            m = dequantize_state(state["exp_avg_q"], state["exp_avg_absmax"], signed=True).view(p.shape)
            v = dequantize_state(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False).view(p.shape)
            grad = grad.float()
        else:
            m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if eight_bit:
            state["exp_avg_q"], state["exp_avg_absmax"] = quantize_state(m, signed=True)
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_state(v, signed=False)
        p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(group["eps"]), value=-step_size)

    def _adam_direction(self, r: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
        """Update the (fp32 or 8-bit) moments of the low-rank gradient ``r`` and return the bias-corrected
        Adam direction m̂ / (√v̂ + ε) (fp32, shape of ``r``)."""
        beta1, beta2 = group["betas"]
        step = state["moment_step"] = state.get("moment_step", 0) + 1  # restarts when the moments are reset
        m, v = self._load_moments(state, r.shape, r.device)
        m.lerp_(r, 1 - beta1)
        v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
        self._store_moments(state, m, v)
        denom = (v / (1 - beta2**step)).sqrt_().add_(group["eps"])  # not in place: v may be the stored state
        return (m / (1 - beta1**step)).div_(denom)

    def _uses_8bit(self, p_or_numel: Any) -> bool:
        numel = p_or_numel if isinstance(p_or_numel, int) else p_or_numel.numel()
        return self.eight_bit and numel >= MIN_8BIT_SIZE

    def _load_moments(self, state: dict[str, Any], shape: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
        """fp32 working copies of (exp_avg, exp_avg_sq) of ``shape`` (zeros the first time)."""
        numel = math.prod(shape)
        if self._uses_8bit(numel):
            if "exp_avg_q" not in state:
                return torch.zeros(shape, device=device), torch.zeros(shape, device=device)
            return (dequantize_state(state["exp_avg_q"], state["exp_avg_absmax"], signed=True).view(shape),
                    dequantize_state(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False).view(shape))
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(shape, device=device)
            state["exp_avg_sq"] = torch.zeros(shape, device=device)
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: dict[str, Any], m: Tensor, v: Tensor) -> None:
        if self._uses_8bit(m.numel()):
            state["exp_avg_q"], state["exp_avg_absmax"] = quantize_state(m, signed=True)
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_state(v, signed=False)
        # fp32 moments were updated in place

    def _reset_moments(self, state: dict[str, Any]) -> None:
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax",
                    "moment_step"):
            state.pop(key, None)

    # ----- memory -----------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (what ``state_dict`` would save)."""
        total = 0
        for state in self.state.values():
            total += _tensor_bytes(state)
        return total

    # ----- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As torch's, plus ``"memkit"``: which optimizer wrote it (checked by :meth:`load_state_dict`)."""
        state_dict = super().state_dict()
        state_dict[_STATE_KEY] = self._identity()
        return state_dict

    def _identity(self) -> dict[str, Any]:
        return {"optimizer": type(self).__name__, "eight_bit": bool(self.eight_bit)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but every state tensor keeps its saved dtype (torch would cast fp32 moments and
        uint8 codes to the parameter's dtype); tensors move to the parameter's device.

        Raises:
            ValueError: the state was written by another optimizer (another class, 8-bit or fp32 moments,
                or other values of the settings that shape the state, such as ``rank``); torch's own
                load would take it and fail, or silently keep the old settings, at a later step.
        """
        self._check_loadable(state_dict)
        saved_state = state_dict["state"]
        state_dict = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for key, value in saved_state.items():
            p = by_id[key]
            self.state[p] = _to_device(value, p.device)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}  # torch made new group dicts
        self._projectors.clear()

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        mine = self._identity()
        saved = state_dict.get(_STATE_KEY)
        if saved is not None and saved != mine:
            raise ValueError(
                f"this optimizer state was written by {saved['optimizer']} (8-bit moments: {saved['eight_bit']}), not "
                f"by {mine['optimizer']} (8-bit moments: {mine['eight_bit']}): its state cannot drive this optimizer."
            )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"this optimizer state has {len(groups) if isinstance(groups, list) else 'no'} param "
                             f"groups, the optimizer {len(self.param_groups)}.")
        shaping = sorted(set(self.defaults) - _ADAMW_GROUP_KEYS)  # the technique's own settings, e.g. rank
        if shaping and not any(k in group for group in groups for k in shaping):
            raise ValueError(f"this optimizer state has none of {type(self).__name__}'s settings "
                             f"({', '.join(shaping)}): another optimizer wrote it.")
        for i, (old, new) in enumerate(zip(groups, self.param_groups)):
            differ = [f"{k}: saved {old.get(k, '(absent)')!r}, now {new[k]!r}" for k in shaping if old.get(k) != new[k]]
            if differ:
                raise ValueError(
                    f"this optimizer state was written with other {type(self).__name__} settings (param group {i}: "
                    f"{'; '.join(differ)}). Loading it would keep the saved settings and ignore the new ones."
                )


#: the key of a memkit optimizer's state dict naming the optimizer that wrote it
_STATE_KEY = "memkit"
#: group keys every memkit optimizer has (the rest are the technique's settings, which shape its state)
_ADAMW_GROUP_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "lowrank", "initial_lr"})


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def moment_bytes(numel: int, eight_bit: bool, dense_dtype_bytes: int = 4) -> int:
    """Predicted bytes of the two Adam moments of ``numel`` elements (see ``MemKitOptimizer``)."""
    if eight_bit and numel >= MIN_8BIT_SIZE:
        return 2 * quantized_bytes(numel)
    return 2 * numel * dense_dtype_bytes

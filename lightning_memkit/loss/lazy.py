"""Lazy logits: an ordinary module's LM head feeds ``F.cross_entropy`` without materializing its logits.

A module in the style of nanoGPT or litgpt computes ``logits = self.lm_head(x)`` and then
``F.cross_entropy(logits.view(-1, V), y.view(-1))``. With ``cross_entropy="fused"`` the strategy wraps
that head (:func:`install_lazy_head`): while the toggle is active, the head returns a
:class:`LazyLogits` instead of its output. It holds ``(hidden, weight, bias)`` and the tensor ops
applied to it so far, and no data:

- ``view``, ``reshape``, ``flatten``, ``contiguous``, ``float()`` / ``.to(torch.float32)`` and slices
  of the leading dimensions (``logits[:, :-1]``, ``logits[..., :-1, :]``) give another lazy tensor;
- ``F.cross_entropy`` (and ``nn.CrossEntropyLoss``, which calls it) on a lazy ``(N, V)`` tensor with
  ``(N,)`` class indices computes :func:`~lightning_memkit.loss.linear_cross_entropy` of the hidden
  states with the same ``ignore_index``, ``reduction`` and ``label_smoothing``: no logits;
- any other use (``argmax``, ``softmax``, logging, other indexing, class weights, ...) materializes the
  logits exactly as the plain head computes them, once per head call (cached), with gradients
  flowing as in the plain computation, and runs the op on them.

The loss and gradients equal the plain computation's (fp32: to the rounding of a matmul done in chunks).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_memkit.config import CrossEntropyConfig
from lightning_memkit.loss.linear_ce import linear_cross_entropy
from lightning_memkit.step_context import active_cross_entropy, count_fused_call
from lightning_memkit.technique import ForwardWrapper, unwrap_forward, wrap_forward_once

#: Tensor attributes read from the lazy tensor's own metadata (no materialization).
_METADATA = {
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__,
    Tensor.is_cuda.__get__, Tensor.layout.__get__, Tensor.size, Tensor.dim, Tensor.numel, Tensor.ndimension,
    Tensor.is_floating_point, Tensor.element_size, Tensor.get_device, Tensor.nelement,
    Tensor.requires_grad.__get__, Tensor.stride, Tensor.is_contiguous, Tensor.__len__,
}
_RESHAPES = {Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten}
_CE_SIGNATURE = inspect.signature(F.cross_entropy)

_materializations = 0
_fused_losses = 0


def lazy_counts() -> tuple[int, int]:
    """(head outputs materialized, losses computed fused from lazy logits) in this process; for tests."""
    return _materializations, _fused_losses


class _HeadCall:
    """One call of a wrapped head: its inputs, the settings in force then, and the logits once materialized."""

    def __init__(self, hidden: Tensor, head: nn.Linear, config: CrossEntropyConfig) -> None:
        self.hidden, self.weight, self.bias = hidden, head.weight, head.bias
        self.config = config
        self.grad_enabled = torch.is_grad_enabled()
        device = hidden.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.logits: Optional[Tensor] = None

    def modes(self) -> contextlib.ExitStack:
        """The grad mode and autocast state of the head call (what the plain head computed under)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
        device, enabled, dtype = self.autocast
        stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        return stack

    def materialize(self) -> Tensor:
        global _materializations
        if self.logits is None:
            _materializations += 1
            with self.modes():
                self.logits = F.linear(self.hidden, self.weight, self.bias)
        return self.logits


def _replay(ops: tuple, x: Tensor, side: int) -> Tensor:
    """Apply the recorded ops to ``x``: ``side`` 0 replays them on the logits, 1 on the hidden states."""
    for op in ops:
        x = op[side](x)
    return x


class LazyLogits(Tensor):
    """The output of a wrapped LM head (see the module docstring): metadata without data.

    It is a wrapper subclass with no storage; every op reaches :meth:`__torch_function__`, which keeps
    it lazy, fuses the loss, or materializes it.
    """

    _call: _HeadCall
    _ops: tuple
    _cache: Optional[Tensor]

    @staticmethod
    def __new__(cls, call: _HeadCall, shadow: Tensor, ops: tuple) -> "LazyLogits":
        requires_grad = call.grad_enabled and (call.hidden.requires_grad or call.weight.requires_grad
                                               or (call.bias is not None and call.bias.requires_grad))
        out = Tensor._make_wrapper_subclass(cls, shadow.shape, strides=shadow.stride(), dtype=shadow.dtype,
                                            device=call.hidden.device, requires_grad=requires_grad)
        out._call, out._shadow, out._ops, out._cache = call, shadow, ops, None
        return out

    def materialize(self) -> Tensor:
        """The plain logits this tensor stands for (the head's output with the recorded ops applied)."""
        if self._cache is None:
            logits = self._call.materialize()
            with self._call.modes():
                self._cache = _replay(self._ops, logits, 0)
        return self._cache

    def _hidden(self) -> Tensor:
        with self._call.modes():
            return _replay(self._ops, self._call.hidden, 1)

    def _derive(self, shadow: Tensor, on_logits: Callable[[Tensor], Tensor],
                on_hidden: Callable[[Tensor], Tensor]) -> "LazyLogits":
        return LazyLogits(self._call, shadow, self._ops + ((on_logits, on_hidden),))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if args and type(args[0]) is LazyLogits:
            if func is F.cross_entropy:
                out = _fused_cross_entropy(args, kwargs)
                if out is not None:
                    return out
            else:
                out = _keep_lazy(func, args[0], args[1:], kwargs)
                if out is not None:
                    return out
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        raise RuntimeError(
            f"memkit: {func} reached a lazy LM-head output below autograd (torch function handling disabled), "
            "where its logits cannot be built with gradients. Fix: report this use; meanwhile set "
            "MemKitStrategy(cross_entropy='plain') or call lightning_memkit.loss.linear_cross_entropy yourself."
        )


def _contains_lazy(values: Any) -> bool:
    found = []
    tree_map(lambda a: found.append(a) if isinstance(a, LazyLogits) else None, values)
    return bool(found)


def _keep_lazy(func: Any, lazy: LazyLogits, rest: tuple, kwargs: dict) -> Optional[LazyLogits]:
    """The lazy result of ``func(lazy, *rest, **kwargs)`` when it is a shape op on the leading dims or a cast to
    fp32; None otherwise (the caller materializes)."""
    if _contains_lazy((rest, kwargs)):
        return None
    shadow = lazy._shadow
    v = shadow.shape[-1] if shadow.ndim else None
    if func is Tensor.contiguous and not rest and not kwargs:
        return lazy._derive(shadow.contiguous(), lambda t: t.contiguous(), lambda h: h)
    if func is Tensor.float and not rest and not kwargs or (func is Tensor.to and _is_float32_cast(rest, kwargs)):
        if shadow.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        return lazy._derive(shadow.float(), lambda t: t.float(), lambda h: h)
    if v is None:
        return None
    if func in _RESHAPES:
        try:
            out = func(shadow, *rest, **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return None  # the plain op raises: let it, on the materialized logits
        if out.ndim == 0 or out.shape[-1] != v or out.dtype != shadow.dtype:  # view(dtype) reinterprets bits
            return None
        lead = tuple(out.shape[:-1])
        return lazy._derive(out, lambda t: func(t, *rest, **kwargs), lambda h: h.reshape(*lead, h.shape[-1]))
    if func is Tensor.__getitem__ and len(rest) == 1 and _slices_leading_dims(rest[0], shadow.ndim):
        index = rest[0]
        out = shadow[index]
        if out.ndim == 0 or out.shape[-1] != v:
            return None
        return lazy._derive(out, lambda t: t[index], lambda h: h[index])
    return None


def _is_float32_cast(rest: tuple, kwargs: dict) -> bool:
    """``.to(torch.float32)`` or ``.to(dtype=torch.float32)`` (nothing else: no device, copy or memory format)."""
    if len(rest) == 1 and not kwargs:
        return rest[0] is torch.float32
    return not rest and set(kwargs) == {"dtype"} and kwargs["dtype"] is torch.float32


def _slices_leading_dims(index: Any, ndim: int) -> bool:
    """A basic index made of slices (and at most one Ellipsis) that leaves the last dimension whole."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in items) or sum(i is Ellipsis for i in items) > 1:
        return False
    if not all(isinstance(p, (int, type(None))) and not isinstance(p, bool)
               for i in items if isinstance(i, slice) for p in (i.start, i.stop, i.step)):
        return False
    full = slice(None)
    if Ellipsis in items:
        after = items[items.index(Ellipsis) + 1:]
        return not after or after[-1] == full
    if len(items) > ndim:
        return False
    return len(items) < ndim or items[-1] == full


def _fused_cross_entropy(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """``F.cross_entropy`` of lazy ``(N, V)`` logits and ``(N,)`` class indices by ``linear_cross_entropy``; None
    when the call is outside what the fused loss reproduces (the caller materializes)."""
    global _fused_losses

    try:
        bound = _CE_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    lazy, target = a["input"], a["target"]
    if (
        lazy.ndim != 2 or not isinstance(target, Tensor) or isinstance(target, LazyLogits)
        or target.dtype != torch.int64 or target.shape != lazy.shape[:1]
        or target.device != lazy.device or a["weight"] is not None or a["size_average"] is not None
        or a["reduce"] is not None or a["reduction"] not in ("mean", "sum", "none")
        or not isinstance(a["ignore_index"], int) or not isinstance(a["label_smoothing"], (int, float))
        or lazy.dtype not in (torch.float32, torch.bfloat16, torch.float16)
    ):
        return None
    call = lazy._call
    hidden = lazy._hidden()
    weight, bias = call.weight, call.bias
    device, autocast_on, autocast_dtype = call.autocast
    with call.modes():
        if autocast_on and hidden.is_floating_point():  # what autocast's F.linear computes in
            hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
            bias = bias.to(autocast_dtype) if bias is not None else None
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        return None
    cfg = call.config
    with torch.autocast(device, enabled=False):  # inputs are already in the head's compute dtype
        loss = linear_cross_entropy(
            hidden, weight, target, bias=bias, ignore_index=a["ignore_index"], reduction=a["reduction"],
            label_smoothing=float(a["label_smoothing"]), impl=cfg.impl, chunk_size=cfg.chunk_size,
            filter_eps=cfg.filter_eps,
        )
    count_fused_call()
    _fused_losses += 1
    here = torch.is_autocast_enabled(device)  # autocast runs cross_entropy in fp32; plainly it keeps the dtype
    return loss if here or lazy.dtype == torch.float32 else loss.to(lazy.dtype)


class LazyHeadForward(ForwardWrapper):
    """Replaces an LM head's ``forward``: while the fused toggle is active, returns :class:`LazyLogits`."""

    def __init__(self, head: nn.Linear, inner: Any, had_instance_forward: bool) -> None:
        super().__init__(inner, had_instance_forward)
        self.head = head

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        config = active_cross_entropy()
        hidden = args[0] if len(args) == 1 and not kwargs else kwargs.get("input") if not args else None
        if (  # plain tensors, and the planner's fake ones (it then measures the fused step); not under compile
            config is None or type(hidden) not in (Tensor, FakeTensor) or hidden.ndim < 1
            or not hidden.is_floating_point() or hidden.device.type == "meta" or torch.compiler.is_compiling()
            # DeepSpeed ZeRO-3 releases the gathered weight when the head's forward returns: the loss comes later
            or hasattr(self.head.weight, "ds_id")
        ):
            return self.inner(*args, **kwargs)
        call = _HeadCall(hidden, self.head, config)
        shape = (*hidden.shape[:-1], self.head.out_features)
        device, autocast_on, autocast_dtype = call.autocast
        dtype = autocast_dtype if autocast_on else hidden.dtype
        return LazyLogits(call, torch.empty(shape, dtype=dtype, device="meta"), ())


def find_lm_head_candidates(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The module's LM head, found conservatively: the one ``nn.Linear`` with the largest ``out_features``,
    which must exceed 4x its ``in_features`` (a vocabulary: MLPs widen by 4x at most) and any other Linear's.

    Returns:
        ``[(name, linear)]``, or ``[]`` when there is no such Linear or several share the largest output.
    """
    linears = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    if not linears:
        return []
    widest = max(m.out_features for _, m in linears)
    top = [(name, m) for name, m in linears if m.out_features == widest]
    if len(top) != 1 or not widest > 4 * top[0][1].in_features:
        return []
    return top


def install_lazy_head(head: nn.Linear) -> bool:
    """Wrap ``head.forward`` (see :class:`LazyHeadForward`); False when it is already wrapped."""
    return wrap_forward_once(head, LazyHeadForward, lambda inner, had: LazyHeadForward(head, inner, had))


def uninstall_lazy_head(head: nn.Linear) -> None:
    """Undo :func:`install_lazy_head`."""
    unwrap_forward(head, LazyHeadForward)


__all__ = ["LazyLogits", "find_lm_head_candidates", "install_lazy_head", "lazy_counts", "uninstall_lazy_head"]

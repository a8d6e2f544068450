"""Bytes of every tensor storage a training step creates, sorted into the planner's categories.

:class:`CategoryTracker` is a ``TorchDispatchMode`` (it works on real and fake tensors, CPU and
CUDA). It counts the storages created while it is active, files each under a category chosen when it
is created, and keeps the counts at the moment of the step's peak:

- ``activations``: created by the forward pass (what autograd saves, and the forward's temporaries);
- ``logits_loss``: created by the forward once the LM head starts (logits, the loss and their
  intermediates), and in the backward by the head's and the loss's own autograd nodes (the logits'
  gradient);
- ``gradients``: a storage becomes a gradient when autograd accumulates it into ``.grad`` (moved
  there from where it was created);
- ``temporaries``: everything else the backward pass and the optimizer step create (the
  recomputation of checkpointed blocks in the backward is filed here too).

What existed before the step (parameters, buffers, optimizer state, the batch) is not counted unless
handed to :meth:`CategoryTracker.count_existing` (then it is counted, under the category given, for as long
as it lives): the planner adds it exactly from the objects instead. What a technique creates inside
:func:`~lightning_memkit.step_context.host_allocations` (StreamBP's block inputs offloaded to host memory) is host
memory: counted apart (:data:`HOST`), never in the device peak. The phase (forward / backward / optimizer)
is set by the caller; with a sequence method, forward and backward interleave chunk by chunk inside the loss,
so that work is filed under the forward's categories (the peak is exact; the split is not). In the ``"auto"``
phase (a step the caller does not drive, such as a Lightning step seen from a callback) an operator that the
autograd engine runs is backward work and anything else forward work; the optimizer phase is still the
caller's to set (:class:`~lightning_memkit.memory.StepMemoryTracker` does it from the optimizers' step hooks).

This is the package's one measurement of tensor memory: the planner, :class:`~lightning_memkit.memory.LiveBytes`,
``StepMemoryTracker`` and the ``MemoryReport`` callback all count with it.
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

# the fused loss calls step_context.note_head_input (below the planner); an active tracker observes it
from lightning_memkit.step_context import observe_head_inputs, observe_host_allocations

#: Categories of what the step creates, in table order.
DYNAMIC = ("gradients", "activations", "logits_loss", "temporaries")


#: Where storages created inside :func:`~lightning_memkit.step_context.host_allocations` are filed: host memory,
#: outside every device category and total (:attr:`CategoryTracker.host_now`, ``host_peak``, ``host_at_peak``).
HOST = "host"

#: The phases :attr:`CategoryTracker.phase` takes ("auto": backward told apart by the autograd engine).
PHASES = ("forward", "backward", "optimizer", "auto")


def _storages(t: Tensor) -> list[Any]:
    from torch.distributed._tools.common_utils import get_untyped_storages

    return list(get_untyped_storages(t))


def storage_bytes(tensors: Iterable[Any], exclude: Optional[set[int]] = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (works on fake tensors, which have no data pointer);
    non-tensors are skipped, and storages whose ``id`` is in ``exclude`` left out."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            for st in _storages(t):
                seen[id(st)] = st.nbytes()
    return sum(v for k, v in seen.items() if not exclude or k not in exclude)


def storage_ids(tensors: Iterable[Any]) -> set[int]:
    """The ``id`` of every storage behind ``tensors`` (for ``exclude=`` of :func:`storage_bytes`)."""
    return {id(st) for t in tensors if isinstance(t, Tensor) for st in _storages(t)}


class CategoryTracker:
    """Context manager counting the storages a step creates, by category (see the module docstring).

    Args:
        parameters: the model's parameters: their accumulated gradients are moved to ``gradients``.
        heads: modules whose forward starts the logits/loss part (the LM head);
            :func:`~lightning_memkit.step_context.note_head_input` marks it too (the fused loss calls it; the tracker
            observes it while active).
        phase: the starting phase, one of :data:`PHASES` (``"auto"``: see the module docstring).
        optimizer_category: where what the optimizer phase creates is filed: ``"temporaries"`` (the planner: the
            state exists before its measured step) or ``"optimizer_state"`` (a step that may create the state).

    Raises:
        ValueError: an unknown ``phase``.

    Attributes:
        now, peak_by_category: bytes per category now, and at the moment of the peak. ``current``: their sum.
        peak: the most bytes alive at once. ``max_by_category``: each category's own maximum.
        work_peak, work_peak_by_category: the same without gradients, over the forward and backward only.
        host_now, host_peak: bytes of host memory (see :data:`HOST`) now, and the most at once;
        host_at_peak: host bytes at the moment of the device peak.
    """

    def __init__(self, parameters: Iterable[Tensor] = (), heads: Iterable[nn.Module] = (), *, phase: str = "forward",
                 optimizer_category: str = "temporaries") -> None:
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is not a phase. Fix: one of {PHASES}.")
        self.now = dict.fromkeys(DYNAMIC, 0)
        self.peak = 0
        self.peak_by_category = dict(self.now)
        self.max_by_category = dict(self.now)
        # the forward and backward passes' own peak, gradients left out (ZeRO partitions the gradients and
        # steps on the CPU, so the planner adds its model states to this)
        self.work_peak = 0
        self.work_peak_by_category = dict(self.now)
        self.phase = phase
        self.optimizer_category = optimizer_category
        self._in_head = False
        self._head_inputs: list[Any] = []  # grad_fn of the hidden states entering a head
        self._head_nodes: set[Any] = set()
        self._refs: dict[int, tuple[Any, int, str]] = {}
        self._before: dict[int, Any] = {}
        self._parameters = [p for p in parameters if p.requires_grad]
        self._heads = list(heads)
        self._hooks: list[Any] = []
        self._observing: Any = None
        self.host_now = self.host_peak = self.host_at_peak = 0
        self._host_depth = 0  # inside host_allocations()

    @property
    def current(self) -> int:
        """Bytes of the storages created inside and still alive."""
        return sum(self.now.values())

    # ----- phases ---------------------------------------------------------------------------------
    def _in_backward(self) -> bool:
        return self.phase == "backward" or (self.phase == "auto" and torch._C._current_autograd_node() is not None)

    def head_started(self, hidden: Any) -> None:
        if self.phase == "forward" or (self.phase == "auto" and not self._in_backward()):
            self._in_head = True
            if isinstance(hidden, Tensor) and hidden.grad_fn is not None:
                self._head_inputs.append(hidden.grad_fn)

    def begin_backward(self, loss: Tensor) -> None:
        """The forward is over; the head's and the loss's autograd nodes (those between ``loss`` and
        the hidden states) are remembered, so what they create in the backward is ``logits_loss``."""
        self.phase, self._in_head = "backward", False
        stop = set(self._head_inputs)
        if not stop or loss.grad_fn is None:
            return
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in stop:
                continue
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
        self._head_nodes = seen

    def begin_optimizer(self) -> None:
        self.phase = "optimizer"

    def _category(self) -> str:
        if self.phase == "auto":
            if torch._C._current_autograd_node() is None:
                return "logits_loss" if self._in_head else "activations"
            self._in_head = False  # the backward has started: a later forward is a new pass
            return "temporaries"
        if self.phase == "forward":
            return "logits_loss" if self._in_head else "activations"
        if self.phase == "backward" and self._head_nodes and torch._C._current_autograd_node() in self._head_nodes:
            return "logits_loss"
        if self.phase == "optimizer":
            return self.optimizer_category
        return "temporaries"

    # ----- bookkeeping ----------------------------------------------------------------------------
    def _release(self, key: int, _ref: Any) -> None:
        entry = self._refs.pop(key, None)
        if entry is None:
            return
        if entry[2] == HOST:
            self.host_now -= entry[1]
        else:
            self.now[entry[2]] -= entry[1]

    def _host_scope(self, entering: bool) -> None:
        self._host_depth += 1 if entering else -1

    def _count_host(self, st: Any) -> None:
        key, nbytes = id(st), st.nbytes()
        self._refs[key] = (weakref.ref(st, partial(self._release, key)), nbytes, HOST)
        self.host_now += nbytes
        self.host_peak = max(self.host_peak, self.host_now)

    def _forget(self, key: int, _ref: Any) -> None:
        self._before.pop(key, None)

    def _skip(self, t: Tensor) -> None:
        for st in _storages(t):
            key = id(st)
            if key not in self._refs and key not in self._before:
                self._before[key] = weakref.ref(st, partial(self._forget, key))

    def _add_category(self, category: str) -> None:
        if category not in self.now:
            for counts in (self.now, self.peak_by_category, self.max_by_category, self.work_peak_by_category):
                counts[category] = 0

    def _count(self, st: Any, category: str) -> None:
        key, nbytes = id(st), st.nbytes()
        self._refs[key] = (weakref.ref(st, partial(self._release, key)), nbytes, category)
        self.now[category] += nbytes
        self.max_by_category[category] = max(self.max_by_category[category], self.now[category])
        total = sum(self.now.values())
        if total > self.peak:
            self.peak = total
            self.peak_by_category = dict(self.now)
            self.host_at_peak = self.host_now
        work = total - self.now["gradients"]
        if self.phase != "optimizer" and work > self.work_peak:
            self.work_peak = work
            self.work_peak_by_category = dict(self.now, gradients=0)

    def _track(self, t: Tensor) -> None:
        category: Optional[str] = None
        for st in _storages(t):
            key = id(st)
            if key in self._refs or key in self._before:
                continue
            if self._host_depth:
                self._count_host(st)
                continue
            category = category or self._category()
            self._add_category(category)
            self._count(st, category)

    def count_existing(self, category: str, tensors: Iterable[Any], exclude: Optional[set[int]] = None) -> None:
        """Count the storages behind ``tensors`` (created before the step) under ``category`` while they live.

        A storage already counted keeps its category; non-tensors are skipped, and storages whose ``id`` is in
        ``exclude`` (:func:`storage_ids`) left out.
        """
        self._add_category(category)
        for t in tensors:
            if not isinstance(t, Tensor):
                continue
            for st in _storages(t):
                key = id(st)
                if key not in self._refs and (not exclude or key not in exclude):
                    self._before.pop(key, None)
                    self._count(st, category)

    def move_to(self, category: str, tensors: Iterable[Any]) -> None:
        """File the counted storages behind ``tensors`` under ``category`` from now on (the peak's split, taken
        before, is not changed)."""
        self._add_category(category)
        for t in tensors:
            if not isinstance(t, Tensor):
                continue
            for st in _storages(t):
                entry = self._refs.get(id(st))
                if entry is not None and entry[2] not in (category, HOST):
                    self.now[entry[2]] -= entry[1]
                    self.now[category] += entry[1]
                    self._refs[id(st)] = (entry[0], entry[1], category)
                    self.max_by_category[category] = max(self.max_by_category[category], self.now[category])

    def _to_gradients(self, p: Tensor) -> None:
        if p.grad is not None:
            self.move_to("gradients", [p.grad])

    # ----- context --------------------------------------------------------------------------------
    def __enter__(self) -> "CategoryTracker":
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        owner = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, Tensor):
                        owner._skip(t)
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, Tensor):
                        owner._track(t)
                return out

        self._hooks = [p.register_post_accumulate_grad_hook(self._to_gradients) for p in self._parameters]
        self._hooks += [h.register_forward_pre_hook(lambda _m, args: self.head_started(args[0]) if args else None)
                        for h in self._heads]
        self._mode = _Mode()
        self._mode.__enter__()
        self._observing = contextlib.ExitStack()
        self._observing.enter_context(observe_head_inputs(self.head_started))
        self._observing.enter_context(observe_host_allocations(self._host_scope))
        return self

    def add_gradients(self, parameters: Iterable[Tensor]) -> None:
        """Create zero gradients inside the measured step, counted as gradients (gradient accumulation: the
        micro-batch that ends a window runs with the window's gradients already alive)."""
        for p in parameters:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
                self._to_gradients(p)

    def __exit__(self, *exc: object) -> None:
        self._observing.close()
        self._host_depth = 0
        self._mode.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks = []

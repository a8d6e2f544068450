"""The per-step context the loss and sequence families both read, in one module below both.

``MemKitStrategy`` (through its techniques) activates settings around every step; the code computing a loss asks
what is active. The fused loss (:mod:`lightning_memkit.loss`) and the sequence methods
(:mod:`lightning_memkit.sequence`) each read the other's setting, and the planner watches the loss; each imports
this module instead of the other, so imports flow one way (``step_context`` imports nothing from ``loss``,
``sequence``, ``planner`` or ``strategy``):

- the active cross-entropy config (:func:`active_cross_entropy`, :func:`use_cross_entropy`);
- the active sequence runtime, any object with the :class:`SequenceLoss` method
  (:func:`active_sequence_runtime`, :func:`use_sequence_runtime`);
- how many losses the fused path computed (:func:`count_fused_call`, :func:`fused_call_count`);
- naming the positional arguments of a wrapped ``forward`` (:func:`as_keywords`);
- where an LM head or a fused loss starts (:func:`note_head_input`), for observers the planner registers with
  :func:`observe_head_inputs`;
- which tensors a technique creates in host memory during the step (inside :func:`host_allocations`: the sequence
  methods' offloaded block inputs), for observers registered with :func:`observe_host_allocations` (the memory
  tracker counts them as host, not device, bytes).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any, Callable, Iterator, Optional, Protocol

from torch import Tensor, nn

from lightning_memkit.config import CrossEntropyConfig
from lightning_memkit.technique import ForwardWrapper

# ----- the fused cross-entropy setting --------------------------------------------------------------------------

_CROSS_ENTROPY: contextvars.ContextVar[Optional[CrossEntropyConfig]] = contextvars.ContextVar(
    "memkit_cross_entropy", default=None
)


def active_cross_entropy() -> Optional[CrossEntropyConfig]:
    """The fused cross-entropy settings in force for this step, or None (compute logits as usual)."""
    return _CROSS_ENTROPY.get()


@contextlib.contextmanager
def use_cross_entropy(config: Optional[CrossEntropyConfig]) -> Iterator[None]:
    """Make ``config`` the active cross-entropy setting inside the block (None or unfused: off)."""
    token = _CROSS_ENTROPY.set(config if config is not None and config.fused else None)
    try:
        yield
    finally:
        _CROSS_ENTROPY.reset(token)


# ----- the sequence method --------------------------------------------------------------------------------------


class SequenceLoss(Protocol):
    """What the loss asks of the active sequence method (:class:`~lightning_memkit.sequence.runtime.SequenceRuntime`
    is the one memkit activates): a causal LM's loss whose backward runs the method."""

    def loss(self, model: nn.Module, input_ids: Tensor, labels: Tensor, *, ignore_index: int = -100,
             shift: bool = False, reduction: str = "mean") -> Tensor:
        """The loss of ``model`` on ``input_ids`` ((B, T)) against ``labels`` ((B, T)), as ``F.cross_entropy``."""
        ...


_SEQUENCE: contextvars.ContextVar[Optional[SequenceLoss]] = contextvars.ContextVar("memkit_sequence", default=None)


def active_sequence_runtime() -> Optional[SequenceLoss]:
    """The sequence method in force for this step, or None (ordinary backprop)."""
    return _SEQUENCE.get()


@contextlib.contextmanager
def use_sequence_runtime(runtime: Optional[SequenceLoss]) -> Iterator[None]:
    """Make ``runtime`` the active sequence method inside the block (None: off). The caller decides whether its
    config is enabled (:func:`~lightning_memkit.sequence.runtime.use_sequence` does)."""
    token = _SEQUENCE.set(runtime)
    try:
        yield
    finally:
        _SEQUENCE.reset(token)


# ----- the fused-call counter -----------------------------------------------------------------------------------

_fused_calls = 0


def fused_call_count() -> int:
    """How many losses the fused path has computed in this process (lets the strategy check it acts)."""
    return _fused_calls


def count_fused_call() -> None:
    """Record one loss computed by the fused path (each place that computes one calls this once)."""
    global _fused_calls
    _fused_calls += 1


# ----- naming a wrapped forward's arguments ---------------------------------------------------------------------


def innermost_forward(fn: Any, module: Optional[nn.Module] = None) -> Any:
    """The model's real ``forward`` behind ``fn``: the chain of technique wrappers
    (:class:`~lightning_memkit.technique.ForwardWrapper`, whose signature is ``(*args, **kwargs)``) is
    walked down to its innermost callable; when that still takes only ``*args``/``**kwargs`` (another
    library's wrapper), the class's ``forward`` bound to ``module`` is used."""
    while isinstance(fn, ForwardWrapper):
        fn = fn.inner
    if module is not None:
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        if kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            fn = type(module).forward.__get__(module, type(module))
    return fn


def as_keywords(fn: Any, args: tuple, kwargs: dict[str, Any],
                module: Optional[nn.Module] = None) -> Optional[dict[str, Any]]:
    """``args`` and ``kwargs`` as keyword arguments of the real forward behind ``fn`` (see
    :func:`innermost_forward`): ``model(ids, mask, labels=ids)`` gives ``input_ids``, ``attention_mask``,
    ``labels``. None when a positional argument lands in the forward's ``*args`` (it has no name)."""
    bound = inspect.signature(innermost_forward(fn, module)).bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            out[name] = value
    return out


# ----- where the LM head starts ---------------------------------------------------------------------------------

_HEAD_OBSERVERS: list[Callable[[Any], None]] = []


def note_head_input(hidden: Tensor) -> None:
    """Called where an LM head or a fused loss starts (its input: the hidden states). Calls each observer
    registered with :func:`observe_head_inputs`; does nothing when there is none."""
    for observer in _HEAD_OBSERVERS:
        observer(hidden)


@contextlib.contextmanager
def observe_head_inputs(observer: Callable[[Any], None]) -> Iterator[None]:
    """Call ``observer(hidden)`` at every :func:`note_head_input` inside the block (the planner's memory
    tracker files what follows under logits/loss). Observers are process-wide, as the tracker's dispatch mode."""
    _HEAD_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _HEAD_OBSERVERS.remove(observer)


_HOST_OBSERVERS: list[Callable[[bool], None]] = []


@contextlib.contextmanager
def host_allocations() -> Iterator[None]:
    """Tensors created inside are host memory a technique keeps for the step (an offloaded copy): each observer
    registered with :func:`observe_host_allocations` is called with True on entry and False on exit (the memory
    tracker files what is created between as host bytes). Does nothing when there is no observer."""
    for observer in list(_HOST_OBSERVERS):
        observer(True)
    try:
        yield
    finally:
        for observer in list(_HOST_OBSERVERS):
            observer(False)


@contextlib.contextmanager
def observe_host_allocations(observer: Callable[[bool], None]) -> Iterator[None]:
    """Register ``observer`` for :func:`host_allocations` inside the block (process-wide, as
    :func:`observe_head_inputs`)."""
    _HOST_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _HOST_OBSERVERS.remove(observer)


__all__ = [
    "SequenceLoss",
    "active_cross_entropy",
    "active_sequence_runtime",
    "as_keywords",
    "count_fused_call",
    "fused_call_count",
    "innermost_forward",
    "note_head_input",
    "host_allocations",
    "observe_head_inputs",
    "observe_host_allocations",
    "use_cross_entropy",
    "use_sequence_runtime",
]

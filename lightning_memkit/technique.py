"""The points where a technique attaches to a training step, and the base class techniques share.

``MemKitStrategy`` builds one :class:`Technique` per enabled setting and calls, in order:

- :meth:`Technique.setup_trainer` with the Trainer when fitting starts (the place to refuse
  Trainer settings the technique cannot work with);
- :meth:`Technique.setup_module` on the LightningModule when fitting starts, before the model is
  wrapped for distributed training (the place to change the forward of chosen modules);
- :meth:`Technique.setup_optimizers` on the optimizers ``configure_optimizers`` returned (the place
  to rebuild or wrap them; LR schedulers are re-pointed to the returned optimizers);
- :meth:`Technique.step_context` around every training / validation / test step (the place for
  ``saved_tensors_hooks`` and for choosing a loss implementation);
- :meth:`Technique.teardown` when fitting ends, which must leave the module as it found it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator, Optional, TypeVar

from torch import nn
from torch.optim import Optimizer

W = TypeVar("W", bound="ForwardWrapper")


class Technique:
    """One memory-saving technique installed by ``MemKitStrategy``.

    Attributes:
        name: short name used in logs and the memory report.
        exact: True if results equal the plain computation (to dtype tolerance or bit for bit).
    """

    name: ClassVar[str] = "technique"
    exact: ClassVar[bool] = True

    def describe(self) -> str:
        return self.name

    def setup_trainer(self, trainer: Any) -> None:
        """Check the Trainer's settings before anything is installed (raise MemKitConfigError to refuse
        a combination that cannot work). Default: nothing."""

    def setup_module(self, module: nn.Module) -> None:
        """Change how ``module`` stores or computes activations. Default: nothing."""

    def setup_optimizers(self, optimizers: list[Optimizer]) -> list[Optimizer]:
        """Return the optimizers to train with (same length and order). Default: unchanged."""
        return optimizers

    def step_context(self) -> contextlib.AbstractContextManager:
        """A context entered around each step's forward. Default: does nothing."""
        return contextlib.nullcontext()

    def teardown(self, module: nn.Module) -> None:
        """Undo :meth:`setup_module`. Default: nothing."""


class ForwardWrapper:
    """Base of the callables a technique puts in place of a module's ``forward``.

    A wrapper is an instance attribute (``module.forward``), so the module keeps its class,
    parameters and state-dict keys. ``inner`` is what it wraps: the bound class ``forward`` or an
    earlier instance-level forward (possibly another technique's wrapper), so wrappers stack and
    each can be removed on its own with :func:`unwrap_forward`.
    """

    def __init__(self, inner: Callable[..., Any], had_instance_forward: bool) -> None:
        self.inner = inner
        self.had_instance_forward = had_instance_forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - subclasses define it
        return self.inner(*args, **kwargs)


def _chain(module: nn.Module) -> Iterator[ForwardWrapper]:
    wrapper = module.__dict__.get("forward")
    while isinstance(wrapper, ForwardWrapper):
        yield wrapper
        wrapper = wrapper.inner if wrapper.had_instance_forward else None


def find_forward_wrapper(module: nn.Module, cls: type[W]) -> Optional[W]:
    """The wrapper of class ``cls`` on ``module.forward``, or None."""
    return next((w for w in _chain(module) if isinstance(w, cls)), None)


def wrap_forward(module: nn.Module, make: Callable[[Callable[..., Any], bool], W]) -> Optional[W]:
    """Put ``make(current_forward, had_instance_forward)`` in place of ``module.forward``; returns it."""
    wrapper = make(module.forward, "forward" in module.__dict__)
    module.forward = wrapper
    return wrapper


def wrap_forward_once(module: nn.Module, cls: type[W], make: Callable[[Callable[..., Any], bool], W]) -> bool:
    """:func:`wrap_forward` unless ``module.forward`` already carries a wrapper of class ``cls``; True if it wrapped
    (a technique set up twice keeps its one wrapper)."""
    if find_forward_wrapper(module, cls) is not None:
        return False
    wrap_forward(module, make)
    return True


def unwrap_forward(module: nn.Module, cls: type[ForwardWrapper]) -> None:
    """Remove the wrapper of class ``cls`` from ``module.forward``, leaving any others in place."""
    parent: Optional[ForwardWrapper] = None
    for wrapper in _chain(module):
        if isinstance(wrapper, cls):
            if parent is not None:  # splice it out of the chain
                parent.inner, parent.had_instance_forward = wrapper.inner, wrapper.had_instance_forward
            elif wrapper.had_instance_forward:
                module.forward = wrapper.inner
            else:
                del module.forward
            return
        parent = wrapper


def call_through_wrappers(
    module: nn.Module, fn: Callable[..., Any], *args: Any, skip: tuple[type[ForwardWrapper], ...] = ()
) -> Any:
    """Run ``fn(*args)`` in place of ``module``'s own forward, inside the wrappers techniques put on it.

    The module is not changed: each wrapper (outermost first, those of the classes in ``skip``
    left out) is copied with ``fn`` as its innermost callable. This is how a computation that runs a
    block piece by piece (the sequence methods) keeps the block's checkpointing and saved-tensor hooks.
    """
    import copy

    call: Callable[..., Any] = fn
    for wrapper in reversed(list(_chain(module))):
        if isinstance(wrapper, skip):
            continue
        outer = copy.copy(wrapper)
        outer.inner, outer.had_instance_forward = call, True
        call = outer
    return call(*args)

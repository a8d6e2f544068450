"""The points where a technique attaches to a training step, and the base class techniques share.

``MemKitStrategy`` builds one :class:`Technique` per enabled setting and calls, in order:

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
from typing import ClassVar

from torch import nn
from torch.optim import Optimizer


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

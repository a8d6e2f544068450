"""``TechniqueSet``: the techniques one setting enables, and their lifecycle on a module.

The strategy (every fit) and the planner (every measured step) run the same sequence, so it lives here once:

1. :meth:`TechniqueSet.build`: one :class:`~lightning_memkit.technique.Technique` per enabled family, in the
   order they are installed;
2. :meth:`TechniqueSet.install`: each technique sees the Trainer (and may refuse it), then changes the module;
3. :meth:`TechniqueSet.convert_optimizers`: each may replace the optimizers ``configure_optimizers`` returned,
   and a callback re-points what followed the old optimizer (the strategy's LR schedulers);
4. :meth:`TechniqueSet.step_context`: entered around every step;
5. :meth:`TechniqueSet.uninstall`: undoes step 2 on what was installed, last first, also after a failed install.

It sits above the technique families (it builds them) and below the strategy and the planner (which use it);
the base contract, :class:`~lightning_memkit.technique.Technique`, is in :mod:`lightning_memkit.technique`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import nn

from lightning_memkit.activations.checkpoint import CheckpointTechnique
from lightning_memkit.activations.technique import saved_activation_techniques
from lightning_memkit.config import ZEROTH_ORDER_OPTIMIZERS, ActivationsConfig, CrossEntropyConfig, OptimizerConfig, \
    SequenceConfig
from lightning_memkit.loss.technique import FusedCrossEntropyTechnique
from lightning_memkit.optim.technique import OptimizerTechnique
from lightning_memkit.optim.zo_technique import ZerothOrderTechnique
from lightning_memkit.sequence.technique import SequenceTechnique
from lightning_memkit.technique import Technique


class TechniqueSet:
    """The techniques of one setting, installed on at most one module at a time."""

    def __init__(self, techniques: Sequence[Technique]) -> None:
        self.techniques: list[Technique] = list(techniques)
        self._installed: list[Technique] = []
        self._module: Optional[nn.Module] = None

    @classmethod
    def build(cls, activations: ActivationsConfig, cross_entropy: CrossEntropyConfig, optimizer: OptimizerConfig,
              sequence: SequenceConfig) -> "TechniqueSet":
        """The techniques the settings enable, in the order they are installed."""
        techniques: list[Technique] = []
        if activations.checkpoint != "none":
            techniques.append(CheckpointTechnique(activations))
        # WTA-CRS, then compression / offload; after checkpointing: they skip checkpointed blocks
        techniques.extend(saved_activation_techniques(activations))
        if cross_entropy.fused:
            techniques.append(FusedCrossEntropyTechnique(cross_entropy))
        if sequence.enabled:  # after the fused loss: its Hugging Face forward wraps the fused one
            techniques.append(SequenceTechnique(sequence, step_in_backward=optimizer.enabled and optimizer.in_backward))
        if optimizer.enabled and optimizer.name in ZEROTH_ORDER_OPTIMIZERS:  # forward only: refuses a sequence method
            techniques.append(ZerothOrderTechnique(optimizer, sequence))
        elif optimizer.enabled:
            techniques.append(OptimizerTechnique(optimizer))
        return cls(techniques)

    def __iter__(self) -> Iterator[Technique]:
        return iter(self.techniques)

    def __len__(self) -> int:
        return len(self.techniques)

    def __bool__(self) -> bool:
        return bool(self.techniques)

    def describe(self) -> str:
        return "; ".join(t.describe() for t in self.techniques)

    @property
    def forward_only(self) -> bool:
        """True when the step runs forward only (zeroth-order training): no backward pass, no gradients."""
        return any(getattr(t, "forward_only", False) for t in self.techniques)

    @property
    def installed_on(self) -> Optional[nn.Module]:
        """The module the techniques are installed on, or None."""
        return self._module

    def install(self, module: nn.Module, trainer: Any = None) -> None:
        """Let every technique check ``trainer`` (when given), then change ``module``, in order. If one raises, what
        was installed stays recorded, so :meth:`uninstall` undoes it."""
        if self._module is not None:
            raise RuntimeError("the techniques are installed already; uninstall them first")
        if trainer is not None:
            for technique in self.techniques:
                technique.setup_trainer(trainer)
        self._module = module
        for technique in self.techniques:
            self._installed.append(technique)
            technique.setup_module(module)

    def convert_optimizers(self, optimizers: list[Any],
                           replaced: Optional[Callable[[Any, Any], None]] = None) -> list[Any]:
        """Let each technique replace the optimizers; ``replaced(before, after)`` is called for each replacement."""
        for technique in self.techniques:
            new = technique.setup_optimizers(list(optimizers))
            if len(new) != len(optimizers):
                raise RuntimeError(f"{technique.name}.setup_optimizers returned {len(new)} optimizers for "
                                   f"{len(optimizers)}")
            if replaced is not None:
                for before, after in zip(optimizers, new):
                    if after is not before:
                        replaced(before, after)
            optimizers = new
        return optimizers

    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        """Every technique's step context, entered in order."""
        with contextlib.ExitStack() as stack:
            for technique in self.techniques:
                stack.enter_context(technique.step_context())
            yield

    def uninstall(self) -> None:
        """Undo :meth:`install` on what was installed, last first (nothing when nothing is)."""
        module, installed = self._module, self._installed
        self._module, self._installed = None, []
        if module is not None:
            for technique in reversed(installed):
                technique.teardown(module)


def build_techniques(activations: ActivationsConfig, cross_entropy: CrossEntropyConfig, optimizer: OptimizerConfig,
                     sequence: SequenceConfig) -> list[Technique]:
    """The techniques the settings enable, in the order they are installed (:meth:`TechniqueSet.build`)."""
    return TechniqueSet.build(activations, cross_entropy, optimizer, sequence).techniques

"""Activation checkpointing of transformer blocks (exact).

A checkpointed block keeps only its inputs during the forward pass and is recomputed in the
backward pass (non-reentrant ``torch.utils.checkpoint``, RNG state preserved so dropout replays
identically). Gradients equal the un-checkpointed run bit for bit on deterministic kernels.

The functional API (:func:`apply_checkpointing`, :func:`remove_checkpointing`) works on any
modules; :class:`CheckpointTechnique` is how ``MemKitStrategy`` installs it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_memkit.config import ActivationsConfig, MemKitConfigError
from lightning_memkit.models.interface import find_blocks
from lightning_memkit.techniques import ForwardWrapper, Technique, find_forward_wrapper, unwrap_forward, wrap_forward


class _CheckpointedForward(ForwardWrapper):
    """Replaces a module's ``forward``: runs the original under ``torch.utils.checkpoint``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # inference: nothing is saved, nothing to recompute
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    return find_forward_wrapper(module, _CheckpointedForward) is not None


def apply_checkpointing(blocks: Sequence[nn.Module], every: int = 1) -> list[nn.Module]:
    """Checkpoint ``blocks[0], blocks[every], blocks[2*every], ...``; returns the modules changed.

    The modules keep their class, parameters and state-dict keys; only ``forward`` is wrapped.
    Already-checkpointed modules are left as they are.
    """
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    changed = []
    for i, block in enumerate(blocks):
        if i % every or is_checkpointed(block):
            continue
        wrap_forward(block, _CheckpointedForward)
        changed.append(block)
    return changed


def remove_checkpointing(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`apply_checkpointing` on ``blocks`` (others are left alone)."""
    for block in blocks:
        unwrap_forward(block, _CheckpointedForward)


class CheckpointTechnique(Technique):
    """``activations.checkpoint='blocks'``: checkpoint every ``checkpoint_every``-th block."""

    name = "activation_checkpointing"
    exact = True

    def __init__(self, config: ActivationsConfig) -> None:
        self.config = config
        self._changed: list[nn.Module] = []

    def describe(self) -> str:
        every = self.config.checkpoint_every
        which = "every block" if every == 1 else f"every {every}th block"
        return f"activation checkpointing of {which} ({len(self._changed)} blocks)"

    def setup_module(self, module: nn.Module) -> None:
        blocks = find_blocks(module)
        if not blocks:
            raise MemKitConfigError(
                f"activations.checkpoint={self.config.checkpoint!r}, but {type(module).__name__} has no recognizable "
                "transformer blocks (looked for a memkit_blocks() method and for nn.ModuleList/nn.Sequential "
                "containers of two or more same-class modules). Fix: define memkit_blocks() on your "
                "LightningModule returning the blocks, or set activations.checkpoint='none'."
            )
        self._changed = apply_checkpointing(blocks, every=self.config.checkpoint_every)

    def teardown(self, module: nn.Module) -> None:
        remove_checkpointing(self._changed)
        self._changed = []

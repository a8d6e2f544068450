"""Activation memory: what the forward pass keeps for the backward pass."""

from lightning_memkit.activations.checkpoint import (
    CheckpointTechnique,
    apply_checkpointing,
    is_checkpointed,
    remove_checkpointing,
)

__all__ = ["CheckpointTechnique", "apply_checkpointing", "is_checkpointed", "remove_checkpointing"]

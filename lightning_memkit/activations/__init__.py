"""Activation memory: what the forward pass keeps for the backward pass."""

from lightning_memkit.activations.checkpoint import (
    CheckpointTechnique,
    apply_checkpointing,
    is_checkpointed,
    remove_checkpointing,
)
from lightning_memkit.activations.sampled import (
    SampledBackwardConfig,
    SampledBackwardTechnique,
    apply_sampled_backward,
    parse_sampled_backward,
    remove_sampled_backward,
    sampled_linear,
)

__all__ = [
    "CheckpointTechnique",
    "SampledBackwardConfig",
    "SampledBackwardTechnique",
    "apply_checkpointing",
    "apply_sampled_backward",
    "is_checkpointed",
    "parse_sampled_backward",
    "remove_checkpointing",
    "remove_sampled_backward",
    "sampled_linear",
]

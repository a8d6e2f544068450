"""Loss API: fused linear cross-entropy (the LM head and the loss without logits)."""

from lightning_memkit.loss.api import IMPLS, linear_cross_entropy
from lightning_memkit.loss.reference import reference_linear_cross_entropy

__all__ = ["IMPLS", "linear_cross_entropy", "reference_linear_cross_entropy"]

"""Loss API: fused linear cross-entropy (the LM head and the loss without logits) and its toggle."""

from lightning_memkit.loss.linear_ce import IMPLS, linear_cross_entropy
from lightning_memkit.loss.reference import reference_linear_cross_entropy
from lightning_memkit.loss.causal_lm import active_cross_entropy, causal_lm_loss, use_cross_entropy

__all__ = [
    "IMPLS",
    "active_cross_entropy",
    "causal_lm_loss",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
    "use_cross_entropy",
]

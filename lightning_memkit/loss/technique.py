"""``MemKitStrategy(cross_entropy="fused")`` as a technique."""

from __future__ import annotations

import contextlib

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_memkit.config import CrossEntropyConfig
from lightning_memkit.loss.toggle import is_hf_causal_lm, patch_hf_causal_lm, unpatch_hf_causal_lm, use_cross_entropy
from lightning_memkit.techniques import Technique


def _has_fused_head(module: nn.Module) -> bool:
    """A model ``causal_lm_loss`` can fuse: ``forward_hidden`` and a linear ``lm_head``."""
    return callable(getattr(module, "forward_hidden", None)) and isinstance(getattr(module, "lm_head", None), nn.Linear)


class FusedCrossEntropyTechnique(Technique):
    """Activates the fused loss around every step and patches Hugging Face causal LMs."""

    name = "fused_cross_entropy"
    exact = True

    def __init__(self, config: CrossEntropyConfig) -> None:
        self.config = config
        self._patched: list[nn.Module] = []
        self._heads = 0

    def describe(self) -> str:
        if not self._heads:
            return "fused cross-entropy: no LM head found (step unchanged)"
        return f"fused linear cross-entropy (impl={self.config.impl!r}, {self._heads} LM head(s))"

    def setup_module(self, module: nn.Module) -> None:
        heads = [m for m in module.modules() if _has_fused_head(m)]
        hf = [m for m in module.modules() if is_hf_causal_lm(m)]
        self._patched = [m for m in hf if patch_hf_causal_lm(m)]
        self._heads = len(heads) + len(hf)
        if not self._heads:
            rank_zero_warn(
                f"memkit: cross_entropy='fused' found no LM head in {type(module).__name__} (looked for models with "
                "forward_hidden() and lm_head, and Hugging Face *ForCausalLM models); the step is left unchanged. "
                "To fuse your own head and loss, call lightning_memkit.loss.linear_cross_entropy(hidden, "
                "head.weight, targets) or causal_lm_loss(model, input_ids, labels) in your training_step."
            )

    def step_context(self) -> contextlib.AbstractContextManager:
        return use_cross_entropy(self.config)

    def teardown(self, module: nn.Module) -> None:
        for m in self._patched:
            unpatch_hf_causal_lm(m)
        self._patched = []

"""``MemKitStrategy(cross_entropy="fused")`` as a technique."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_memkit.config import CrossEntropyConfig, MemKitConfigError
from lightning_memkit.loss.lazy import find_lm_head_candidates, install_lazy_head, uninstall_lazy_head
from lightning_memkit.loss.causal_lm import (
    FUSABLE_HF_MODEL_TYPES,
    fused_call_count,
    is_fusable_hf_causal_lm,
    is_hf_language_model,
    patch_hf_causal_lm,
    unpatch_hf_causal_lm,
    use_cross_entropy,
)
from lightning_memkit.technique import Technique


def _has_fused_head(module: nn.Module) -> bool:
    """A model ``causal_lm_loss`` can fuse: ``forward_hidden`` and a linear ``lm_head``."""
    return callable(getattr(module, "forward_hidden", None)) and isinstance(getattr(module, "lm_head", None), nn.Linear)


class FusedCrossEntropyTechnique(Technique):
    """Activates the fused loss around every step and patches Hugging Face causal LMs.

    A module with neither (a nanoGPT- or litgpt-style model computing ``F.cross_entropy`` of its head's
    output) gets its LM head wrapped to return lazy logits (:mod:`lightning_memkit.loss.lazy`): the loss
    is fused when the logits go to ``F.cross_entropy``, and they are materialized for any other use.
    """

    name = "fused_cross_entropy"
    exact = True

    def __init__(self, config: CrossEntropyConfig) -> None:
        self.config = config
        self._patched: list[nn.Module] = []
        self._lazy: list[tuple[str, nn.Linear]] = []
        self._heads = 0
        self._warned = False
        self._checked = False

    def describe(self) -> str:
        if self._lazy:
            heads = ", ".join(f"{name or type(m).__name__!r} Linear({m.in_features}->{m.out_features})"
                              for name, m in self._lazy)
            return (f"fused linear cross-entropy (impl={self.config.impl!r}) through lazy logits of head {heads}: "
                    "fused where they go to F.cross_entropy, materialized for any other use")
        if not self._heads:
            return "fused cross-entropy: no LM head found (step unchanged)"
        return f"fused linear cross-entropy (impl={self.config.impl!r}, {self._heads} candidate LM head(s))"

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(message)

    def setup_trainer(self, trainer: Any) -> None:
        """Refuse ``impl="triton"`` where it cannot run, at setup rather than in the first step: it needs the
        model on a CUDA device (or ``TRITON_INTERPRET=1``, Triton's CPU interpreter, for tests) and an
        importable Triton. ``impl="auto"`` with ``filter_eps`` picks Triton on CUDA, so it needs Triton there."""
        c = self.config
        device = trainer.strategy.root_device
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if not c.fused or not (c.impl == "triton" or (c.impl == "auto" and c.filter_eps is not None
                                                      and device.type == "cuda")):
            return
        if c.impl == "triton" and device.type != "cuda" and not interpret:
            raise MemKitConfigError(
                f"cross_entropy.impl='triton' runs Triton kernels on CUDA, but the model is on {device} (the Trainer's "
                "accelerator). Fix: cross_entropy.impl='chunked' (or 'auto'), or train on a CUDA device "
                "(Trainer(accelerator='gpu'))."
            )
        from lightning_memkit._imports import MissingBackendError, require

        try:
            require("lightning_memkit.kernels.linear_cross_entropy", feature=f"cross_entropy.impl={c.impl!r}")
        except MissingBackendError as err:
            raise MemKitConfigError(f"{err}, or set cross_entropy.impl='chunked'.") from err

    def setup_module(self, module: nn.Module) -> None:
        self._warned = self._checked = False
        heads = [m for m in module.modules() if _has_fused_head(m)]
        hf = [m for m in module.modules() if is_hf_language_model(m)]
        inside_adapters = {id(m.hf) for m in heads if hasattr(m, "hf")}  # HFCausalLM wraps one: count once
        fusable = [m for m in hf if is_fusable_hf_causal_lm(m)]
        self._patched = [m for m in fusable if patch_hf_causal_lm(m)]
        self._heads = len(heads) + len([m for m in fusable if id(m) not in inside_adapters])
        if not self._heads and not hf and self.config.fused:
            self._lazy = find_lm_head_candidates(module)
            for _, head in self._lazy:
                install_lazy_head(head)  # already wrapped (setup twice): kept as it is
            self._heads = len(self._lazy)
        others = sorted({getattr(m.config, "model_type", type(m).__name__) for m in hf if m not in fusable})
        if others:
            self._warn_once(
                f"memkit: cross_entropy='fused' leaves Hugging Face model type(s) {others} unchanged: they are not in "
                "memkit's family table (lightning_memkit.models.families.HF_FAMILIES), or their config adds to the "
                "loss what the fused loss does not reproduce (logit scaling, router losses); fused types: "
                + ", ".join(FUSABLE_HF_MODEL_TYPES) + "."
            )
        elif not self._heads:
            self._warn_once(
                f"memkit: cross_entropy='fused' found no LM head in {type(module).__name__} (looked for models with "
                "forward_hidden() and lm_head, Hugging Face *ForCausalLM models, and one nn.Linear whose output is "
                "wider than 4x its input and than any other Linear's); the step is left unchanged. "
                "To fuse your own head and loss, call lightning_memkit.loss.linear_cross_entropy(hidden, "
                "head.weight, targets) or causal_lm_loss(model, input_ids, labels) in your training_step."
            )

    @contextlib.contextmanager
    def _checked_step(self):  # noqa: ANN202
        before = fused_call_count()
        with use_cross_entropy(self.config):
            yield
        if not self._checked:
            self._checked = True
            if self._lazy and fused_call_count() == before:
                self._warn_once(
                    "memkit: cross_entropy='fused' is on, but the first step computed its loss without it: the "
                    f"output of head {self._lazy[0][0]!r} did not reach F.cross_entropy as (N, V) logits with (N,) "
                    "class indices (or it went through an op the lazy logits do not follow), so the logits were "
                    "built as usual. Fix: pass logits.view(-1, V) to F.cross_entropy, or call "
                    "lightning_memkit.loss.linear_cross_entropy(hidden, head.weight, targets) in your step."
                )
            elif self._heads and fused_call_count() == before:
                self._warn_once(
                    "memkit: cross_entropy='fused' is on, but the first step computed its loss without it (the "
                    "model's logits were built as usual). The fused loss acts through causal_lm_loss(...) and Hugging "
                    "Face models called with labels=; call one of them, or linear_cross_entropy(...), in your step."
                )

    def step_context(self) -> contextlib.AbstractContextManager:
        return self._checked_step()

    def teardown(self, module: nn.Module) -> None:
        for m in self._patched:
            unpatch_hf_causal_lm(m)
        for _, head in self._lazy:
            uninstall_lazy_head(head)
        self._patched, self._lazy = [], []

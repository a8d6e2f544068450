"""``activations.compress`` / ``activations.offload``: what chosen modules save for the backward."""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_memkit.activations.checkpoint import hf_checkpointed, is_checkpointed
from lightning_memkit.activations.sampled import SampledBackwardTechnique
from lightning_memkit.activations.saved import SavedTensors, install, uninstall
from lightning_memkit.config import ActivationsConfig, MemKitConfigError
from lightning_memkit.models.interface import find_blocks
from lightning_memkit.technique import Technique


def choose_modules(module: nn.Module, patterns: tuple[str, ...] | None) -> dict[str, nn.Module]:
    """name -> module: the transformer blocks (``patterns=None``) or the modules whose names match."""
    named = dict(module.named_modules())
    if patterns is None:
        blocks = find_blocks(module)
        if not blocks:
            raise MemKitConfigError(
                f"activations: {type(module).__name__} has no recognizable transformer blocks to compress or offload "
                "the saved tensors of. Fix: name the modules with activations.modules, e.g. ['*.mlp'], or define "
                "memkit_blocks()."
            )
        ids = {id(b) for b in blocks}
        return {name: m for name, m in named.items() if id(m) in ids}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {name: m for name, m in named.items() if name and fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            sample = ", ".join(n for n in list(named)[1:9])
            raise MemKitConfigError(
                f"activations.modules pattern {pattern!r} matches no module. Candidates: {sample}, ...")
        chosen.update(hits)
    # a module inside another chosen one is covered by the outer hooks
    return {n: m for n, m in chosen.items() if not any(n.startswith(o + ".") for o in chosen if o != n)}


class SavedTensorsTechnique(Technique):
    """Compresses and/or offloads what the chosen (not checkpointed) modules save."""

    name = "saved_activations"

    def __init__(self, config: ActivationsConfig) -> None:
        self.config = config
        self.exact = config.compress == "none"
        self.manager: SavedTensors | None = None
        self._changed: list[nn.Module] = []
        self._left_to_checkpoint = 0  # chosen modules inside checkpointed blocks (they save nothing to compress)
        self._hf_checkpointing = False  # a Hugging Face model's gradient_checkpointing_enable() is in force

    def describe(self) -> str:
        parts = []
        if self.config.compress != "none":
            parts.append(f"{self.config.compress} saved activations" + (" (running scales)" if
                                                                       self.config.scales == "running" else ""))
        if self.config.offload:
            parts.append("offloaded to host memory")
        hooked = sum(1 for m in self._changed if not isinstance(m, nn.Linear))
        left = f"; {self._left_to_checkpoint} inside checkpointed blocks left to the checkpoint" \
            if self._left_to_checkpoint else ""
        return ", ".join(parts) + f" ({hooked} modules{left})"

    def setup_trainer(self, trainer: Any) -> None:
        from lightning_memkit.activations.saved import check_host_memory, host_memory_available

        if self.config.offload and trainer.strategy.root_device.type == "cuda":
            check_host_memory(self.config.offload_host_memory, host_memory_available())

    def setup_module(self, module: nn.Module) -> None:
        checkpointed = [n for n, m in module.named_modules() if is_checkpointed(m)]
        # a Hugging Face model's own gradient checkpointing (gradient_checkpointing_enable(), which PEFT's
        # prepare_model_for_kbit_training calls by default): its blocks save only their inputs too
        hf_layers = [n for n, m in module.named_modules() if hf_checkpointed(m)]
        self._hf_checkpointing = bool(hf_layers)
        checkpointed += hf_layers

        def inside(name: str) -> bool:  # a checkpointed block saves only its inputs: nothing inside it to compress
            return any(name == c or name.startswith(c + ".") for c in checkpointed)

        candidates = choose_modules(module, self.config.modules)
        chosen = {n: m for n, m in candidates.items() if not inside(n)}
        self._left_to_checkpoint = len(candidates) - len(chosen)
        if self.config.compress != "none" and checkpointed:
            self._check_effect(module, chosen, inside)
        if not chosen:
            return  # offload only, every chosen block checkpointed: the checkpoint offloads the blocks' inputs
        self.manager = SavedTensors(self.config.compress, self.config.offload, self.config.scales,
                                    self.config.min_numel, list(module.parameters()), self.config.offload_host_memory)
        self._changed = install(chosen, self.manager, linear_per_group=self.config.compress == "fp8")

    def _check_effect(self, module: nn.Module, chosen: dict[str, nn.Module], inside: Any) -> None:
        """Refuse compression that would compress nothing (every module it names is inside a checkpointed
        block); warn once about a pattern of ``activations.modules`` that has no effect while others do.

        Why refuse the first and only warn about the second: with nothing to compress the setting silently
        does nothing, which ``ActivationsConfig`` already refuses when ``modules`` is unset; a pattern that
        covers a checkpointed block next to patterns that act is a partial overlap that may be meant (e.g.
        compress the MLPs of the blocks ``checkpoint_every`` leaves alone), so the run goes on, but it is said.
        """
        c = self.config
        fix = ("Fix: name modules outside the checkpointed blocks in activations.modules, set checkpoint_every >= 2 "
               "(compress the blocks left unchecked), checkpoint='none', or drop compress"
               + (" (offload alone moves the checkpointed blocks' inputs to host memory)." if c.offload else "."))
        if self._hf_checkpointing:
            fix = ("Fix: turn the Hugging Face gradient checkpointing off (model.gradient_checkpointing_disable(), or "
                   "peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)) to compress the "
                   "blocks' activations, or drop activations.compress to keep the checkpointing.")
        if not chosen:
            where = "the Hugging Face model's own gradient checkpointing" if self._hf_checkpointing else \
                f"checkpoint={c.checkpoint!r}"
            raise MemKitConfigError(
                f"activations.compress={c.compress!r} with {where}: every module that "
                f"activations.modules={list(c.modules or ())!r} names lies inside a checkpointed block, which saves "
                f"no activations (it recomputes them), so nothing would be compressed. {fix}"
            )
        if c.modules is None:
            return  # the blocks: checkpoint_every leaves some unchecked by design (ActivationsConfig checks the rest)
        names = [n for n, _ in module.named_modules() if n]
        idle = [p for p in c.modules if all(inside(n) for n in names if fnmatch.fnmatchcase(n, p))]
        if idle:
            rank_zero_warn(
                f"memkit: activations.modules pattern(s) {idle!r} match only modules inside checkpointed blocks "
                f"(checkpoint={c.checkpoint!r}), which save no activations: compress={c.compress!r} has no effect "
                f"there (the other patterns are compressed). {fix}"
            )

    def step_context(self) -> Any:
        if self.manager is not None and torch.is_grad_enabled():  # training steps; validation saves nothing
            self.manager.reset_counters()
        return super().step_context()

    def teardown(self, module: nn.Module) -> None:
        uninstall(self._changed)
        self._changed = []


def saved_activation_techniques(config: ActivationsConfig) -> list[Technique]:
    """The techniques that act on what chosen modules save, in their install order.

    WTA-CRS (``config.sampled_backward``, when set) comes first, so that the
    compression / offload hooks installed after it (around the blocks, and for fp8 around each linear layer,
    outside the sampling wrapper) see the sampled rows it saves and compress those. Then compression / offload
    when ``compress`` or ``offload`` is set, exactly as before.
    """
    techniques: list[Technique] = []
    if config.sampled_backward is not None:
        techniques.append(SampledBackwardTechnique(config.sampled_backward))
    if config.compress != "none" or config.offload:
        techniques.append(SavedTensorsTechnique(config))
    return techniques

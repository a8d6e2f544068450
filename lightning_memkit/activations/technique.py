"""``activations.compress`` / ``activations.offload``: what chosen modules save for the backward."""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from lightning_memkit.activations.checkpoint import is_checkpointed
from lightning_memkit.activations.saved import SavedTensors, install, uninstall
from lightning_memkit.config import ActivationsConfig, MemKitConfigError
from lightning_memkit.models.interface import find_blocks
from lightning_memkit.techniques import Technique


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
            raise MemKitConfigError(f"activations.modules pattern {pattern!r} matches no module. Candidates: {sample}, ...")
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

    def describe(self) -> str:
        parts = []
        if self.config.compress != "none":
            parts.append(f"{self.config.compress} saved activations" + (" (running scales)" if
                                                                       self.config.scales == "running" else ""))
        if self.config.offload:
            parts.append("offloaded to host memory")
        hooked = sum(1 for m in self._changed if not isinstance(m, nn.Linear))
        return ", ".join(parts) + f" ({hooked} modules)"

    def setup_trainer(self, trainer: Any) -> None:
        from lightning_memkit.activations.saved import check_host_memory, host_memory_available

        if self.config.offload and trainer.strategy.root_device.type == "cuda":
            check_host_memory(self.config.offload_host_memory, host_memory_available())

    def setup_module(self, module: nn.Module) -> None:
        checkpointed = [n for n, m in module.named_modules() if is_checkpointed(m)]
        chosen = {n: m for n, m in choose_modules(module, self.config.modules).items()
                  if not any(n == c or n.startswith(c + ".") for c in checkpointed)}  # inside a checkpoint: no
        if not chosen:
            return  # every chosen block is checkpointed: the checkpoint technique handles offload of its inputs
        self.manager = SavedTensors(self.config.compress, self.config.offload, self.config.scales,
                                    self.config.min_numel, list(module.parameters()), self.config.offload_host_memory)
        self._changed = install(chosen, self.manager, linear_per_group=self.config.compress == "fp8")

    def step_context(self) -> Any:
        if self.manager is not None and torch.is_grad_enabled():  # training steps; validation saves nothing
            self.manager.reset_counters()
        return super().step_context()

    def teardown(self, module: nn.Module) -> None:
        uninstall(self._changed)
        self._changed = []

"""The ``optimizer`` technique: rebuild the user's optimizer as a memkit optimizer when fitting starts."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_memkit.config import DENSE_ONLY_OPTIMIZERS, OPTIMIZER_KEYS, MemKitConfigError, OptimizerConfig
from lightning_memkit.optim.convert import convert_optimizer, lora_weights, select_lowrank
from lightning_memkit.optim import OPTIMIZER_CLASSES
from lightning_memkit.optim.in_backward import StepInBackward, incompatibility
from lightning_memkit.technique import Technique

#: optimizers that keep 8-bit states through bitsandbytes
EIGHT_BIT_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "galore_adamw8bit")


def has_special_weights(config: OptimizerConfig) -> bool:
    """Whether ``config``'s optimizer gives chosen 2-D weights their own rule (low rank; SPAM with density < 1:
    sparse momentum), so that ``target_modules`` picks them."""
    if config.name in DENSE_ONLY_OPTIMIZERS:
        return False
    return config.name != "spam" or (config.density is not None and config.density < 1)


class OptimizerTechnique(Technique):
    """Installed by ``MemKitStrategy(optimizer=...)``.

    At setup it checks the Trainer (step-in-backward's incompatibilities), picks the low-rank weights
    from the module (so a pattern that matches nothing fails before any optimizer exists), then
    converts each optimizer ``configure_optimizers`` returned and, with ``in_backward``, wraps it so
    that parameters update from their gradient hooks.
    """

    name = "optimizer"

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config
        self.exact = config.name == "adamw"  # the others change the update (low rank, 8-bit states)
        self._lowrank: dict[Tensor, str] = {}
        self._names: dict[Tensor, str] = {}
        self._wrapped: list[Any] = []
        self._lowered: list[int] = []  # the ranks the default was lowered to, one per narrower weight
        self._trainable = 0  # trainable tensors: the module's at setup, then those the converted optimizers hold
        self._frozen = 0  # the module's frozen tensors (requires_grad=False): no step, no state, never low-rank
        self._lora: dict[Tensor, str] = {}  # PEFT LoRA factors left on AdamW (low-rank already)
        self._held_lowrank: Optional[int] = None  # low-rank weights the converted optimizers hold (after conversion)

    def describe(self) -> str:
        """The setup line: the trainable tensors the optimizer holds (the frozen ones left out), how many get
        the low-rank rule, and why LoRA factors do not."""
        text = f"optimizer {self.config.name}: {self._trainable} trainable tensors"
        if self._frozen:
            text += f" ({self._frozen} frozen left out)"
        if has_special_weights(self.config):
            lowrank = len(self._lowrank) if self._held_lowrank is None else self._held_lowrank
            text += f", {lowrank} " + ("sparse-momentum" if self.config.name == "spam" else "low-rank")
            if self._lora:
                text += (f"; {len(self._lora)} LoRA factors (lora_A/lora_B) are low-rank already and are updated by "
                         "AdamW (name them in optimizer.target_modules to change that)")
        if self._lowered:
            text += (f" (default rank {self.default_rank()} lowered to min(m, n) on {len(self._lowered)} narrower "
                     f"weights, down to {min(self._lowered)})")
        return text + (" (step in backward)" if self.config.in_backward else "")

    def default_rank(self) -> int:
        """The optimizer class's own default rank (used when ``optimizer.rank`` is unset)."""
        import inspect

        for cls in OPTIMIZER_CLASSES[self.config.name].__mro__:  # APOLLO-Mini sets only what differs from APOLLO
            param = inspect.signature(cls.__init__).parameters.get("rank") if "__init__" in vars(cls) else None
            if param is not None:
                return int(param.default)
        raise MemKitConfigError(f"optimizer {self.config.name!r} has no rank setting.")

    def setup_trainer(self, trainer: Any) -> None:
        if self.config.name in EIGHT_BIT_OPTIMIZERS:  # fail at setup, not in the first step's 8-bit quantization
            from lightning_memkit._imports import MissingBackendError, require

            try:
                require("bitsandbytes", feature=f"optimizer={self.config.name!r} (8-bit optimizer states)")
            except MissingBackendError as err:
                raise MemKitConfigError(f"{err}, or choose an optimizer without 8-bit states (e.g. "
                                        f"{self.config.name.replace('8bit', '').replace('paged_', '')!r}).") from err
        if not self.config.in_backward:
            return
        cls = OPTIMIZER_CLASSES.get(self.config.name)
        if cls is None:
            raise MemKitConfigError(f"optimizer {self.config.name!r} is not available in this version. Fix: choose one "
                                    f"of {sorted(OPTIMIZER_CLASSES)}.")
        precision = str(getattr(trainer.precision_plugin, "precision", trainer.precision))
        reason = incompatibility(
            self.config.name, cls.accumulates_projected, accumulate_grad_batches=trainer.accumulate_grad_batches,
            gradient_clip_val=trainer.gradient_clip_val, precision=precision, world_size=trainer.world_size,
        )
        if reason is not None:
            raise MemKitConfigError(f"optimizer.in_backward=true cannot work here: {reason}")
        module = trainer.lightning_module
        if module is not None and not module.automatic_optimization:
            raise MemKitConfigError(
                "optimizer.in_backward=true needs Lightning's automatic optimization "
                "(the backward pass must run inside "
                "optimizer.step(closure)); this module sets automatic_optimization=False. Fix: in_backward=false."
            )

    def setup_module(self, module: nn.Module) -> None:
        self._names = {p: n for n, p in module.named_parameters()}
        self._trainable = sum(p.requires_grad for p in self._names)
        self._frozen = len(self._names) - self._trainable
        self._held_lowrank = None
        if has_special_weights(self.config):
            self._lowrank = select_lowrank(module, self.config.target_modules)
            self._lora = {p: n for p, n in lora_weights(module).items() if p not in self._lowrank}
            # the default rank is lowered to fit each narrower weight (see DefaultRank)
            if self.config.rank is None and "rank" in OPTIMIZER_KEYS[self.config.name]:
                default = self.default_rank()
                self._lowered = [min(p.shape) for p in self._lowrank if p.ndim == 2 and min(p.shape) < default]

    def setup_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
        if not optimizers:
            raise MemKitConfigError("optimizer: configure_optimizers returned no optimizer to convert.")
        new = []
        for optimizer in optimizers:
            converted = convert_optimizer(optimizer, self.config, self._lowrank, self._names)
            if self.config.in_backward:
                converted = StepInBackward(converted)
                self._wrapped.append(converted)
            new.append(converted)
        self._count_held(new)
        return new

    def _count_held(self, optimizers: list[Any]) -> None:
        """Count what the converted optimizers hold; when it is not what the setup line said (the optimizer
        leaves some trainable tensors out), say so."""
        held = {p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.requires_grad}
        before = self.describe()
        self._trainable = len(held)
        self._held_lowrank = sum(p in held for p in self._lowrank)
        self._lora = {p: n for p, n in self._lora.items() if p in held}
        after = self.describe()
        if after != before:
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            rank_zero_info(f"memkit: the converted optimizers hold {after}")

    def teardown(self, module: nn.Module) -> None:
        for wrapper in self._wrapped:
            wrapper.remove_hooks()
        self._wrapped = []

    @property
    def lowrank_names(self) -> list[str]:
        """Names of the weights given the low-rank rule (after setup)."""
        return sorted(self._lowrank.values())

"""The ``optimizer`` technique for zeroth-order training (``optimizer="zo_sgd"`` / ``"zo_adam"``).

How a ZO step runs through Lightning's ordinary automatic optimization, the user's ``training_step`` unchanged:

- Lightning builds its closure (``training_step``, ``zero_grad``, ``backward``) and calls
  ``LightningModule.optimizer_step`` -> ``optimizer.step(closure)`` -> ``MemKitStrategy.optimizer_step``;
- for a forward-only optimizer the strategy calls the ``on_before_optimizer_step`` hooks once, then
  ``optimizer.step(closure)`` directly (not through the precision plugin, whose gradient scaler and clipping have
  no gradients to act on); the ZO optimizer calls the closure twice per perturbation, the parameters perturbed;
- inside the closure, ``MemKitStrategy.training_step`` runs under this technique's step context,
  ``torch.no_grad()`` (Lightning's closure enables grad around it; this context, entered inside, wins): no
  activation is saved and the loss has no graph; ``MemKitStrategy.backward`` does nothing (and calls no backward
  hooks): there is nothing to differentiate;
- the step's output (``outputs["loss"]`` of ``on_train_batch_end``) is the mean of all losses the step evaluated
  (≈ L(θ) to O(ε²)). What ``training_step`` logs with ``self.log`` is logged at each evaluation, so an
  ``on_step`` value is the last evaluation's, L(θ - εz) of the last perturbation, and an ``on_epoch`` value averages
  all evaluations.

Refused at setup (MemKitConfigError with the fix): manual optimization, ``accumulate_grad_batches > 1`` (a
perturbation would have to be kept across micro-batches), ``gradient_clip_val`` (no gradient), more than one
process (the projected gradient is not all-reduced), ZeRO under DeepSpeed (its engine steps the optimizer without
a closure; stage 3 also partitions the parameters the step perturbs), and the sequence methods (they call backward
inside the forward). Activation checkpointing and saved-tensor compression are harmless (nothing is saved under
``no_grad``, so they do nothing) and are allowed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memkit.config import MemKitConfigError, OptimizerConfig, SequenceConfig
from lightning_memkit.models.interface import find_blocks
from lightning_memkit.optim.convert import read_optimizer
from lightning_memkit.optim.zeroth_order import ZO_OPTIMIZERS
from lightning_memkit.technique import Technique

#: keys of OptimizerConfig a ZO optimizer takes
ZO_KEYS = ("perturbation", "n_perturbations", "blockwise", "seed")


def is_forward_only(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the optimizer a LightningOptimizer wraps) estimates its gradient from losses."""
    inner = getattr(optimizer, "_optimizer", optimizer)
    return bool(getattr(inner, "forward_only", False))


class ZerothOrderTechnique(Technique):
    """Installed by ``MemKitStrategy(optimizer="zo_sgd" | "zo_adam" | {...})``; see the module docstring."""

    name = "optimizer"
    exact = False
    #: MemKitStrategy makes backward a no-op and steps forward-only optimizers itself
    forward_only = True

    def __init__(self, config: OptimizerConfig, sequence: SequenceConfig | None = None) -> None:
        if config.name not in ZO_OPTIMIZERS:
            raise ValueError(f"{config.name!r} is not a zeroth-order optimizer")
        self.config = config
        self.sequence = sequence
        self._names: dict[Tensor, str] = {}
        self._blocks: list[list[Tensor]] = []
        self._trainable = 0
        self._frozen = 0  # the module's frozen tensors (requires_grad=False): never perturbed, no state
        if config.in_backward:  # config.py refuses it first; kept for a config built around its check
            raise MemKitConfigError(f"optimizer.in_backward=true with optimizer {config.name!r}: zeroth-order "
                                    "training runs no backward pass. Fix: in_backward=false.")
        if sequence is not None and sequence.enabled:
            raise MemKitConfigError(
                f"sequence={sequence.method!r} with optimizer {config.name!r}: the sequence methods back-propagate "
                "chunk by chunk inside the forward, and zeroth-order training runs the forward without gradients. "
                "Fix: drop sequence (a ZO step keeps no activations, so long context costs only the forward's "
                "working memory), or use a first-order optimizer."
            )

    def describe(self) -> str:
        c = self.config
        blocks = f", {len(self._blocks)} blocks perturbed one at a time" if c.blockwise else ""
        frozen = f" ({self._frozen} frozen left out)" if self._frozen else ""
        return (f"optimizer {c.name}: {self._trainable} trainable tensors{frozen}, zeroth-order (forward only, "
                f"{2 * (c.n_perturbations or 1)} forward passes per step{' per block' if c.blockwise else ''}, no "
                f"backward, no gradients){blocks}")

    def setup_trainer(self, trainer: Any) -> None:
        name = self.config.name
        module = getattr(trainer, "lightning_module", None)
        if module is not None and not module.automatic_optimization:
            raise MemKitConfigError(
                f"optimizer={name!r} runs through Lightning's automatic optimization (optimizer.step(closure) "
                f"evaluates training_step at perturbed weights); {type(module).__name__} sets "
                "automatic_optimization=False. Fix: automatic_optimization=True (training_step returns the loss), or "
                "call lightning_memkit.optim.zeroth_order.ZerothOrderOptimizer.step(closure) yourself."
            )
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if accumulate > 1:
            raise MemKitConfigError(
                f"accumulate_grad_batches={accumulate} with optimizer={name!r}: there are no gradients to "
                "accumulate, and a perturbation cannot be held across micro-batches. Fix: accumulate_grad_batches=1 "
                "with a larger batch (a ZO step keeps no activations), or more optimizer.n_perturbations."
            )
        clip = getattr(trainer, "gradient_clip_val", None)
        if clip:
            raise MemKitConfigError(f"gradient_clip_val={clip} with optimizer={name!r}: zeroth-order training "
                                    "computes no gradient to clip. Fix: gradient_clip_val=None.")
        strategy = getattr(trainer, "strategy", None)
        zero = getattr(strategy, "zero", None)
        if zero is not None and zero.enabled:
            raise MemKitConfigError(
                f"zero_stage={zero.stage} with optimizer={name!r}: DeepSpeed's engine steps the optimizer without "
                "Lightning's closure, so no loss can be evaluated at the perturbed weights"
                + (", and ZeRO-3 partitions the parameters the step perturbs in place" if zero.stage == 3 else "")
                + ". Fix: zero_stage=0 (a ZO step keeps no gradients and, with zo_sgd, no optimizer state)."
            )
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world > 1:
            raise MemKitConfigError(
                f"optimizer={name!r} with {world} processes: the projected gradient of each process would have to be "
                "averaged across processes before the update (not implemented), or the replicas drift apart. Fix: "
                "train on one device."
            )

    def setup_module(self, module: nn.Module) -> None:
        self._names = {p: n for n, p in module.named_parameters()}
        self._trainable = sum(p.requires_grad for p in self._names)
        self._frozen = len(self._names) - self._trainable
        self._blocks = []
        if self.config.blockwise:
            blocks = find_blocks(module)  # none recognizable: one block per tensor
            self._blocks = [[p for p in b.parameters() if p.requires_grad] for b in blocks]
            self._blocks = [b for b in self._blocks if b]

    def setup_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
        if not optimizers:
            raise MemKitConfigError("optimizer: configure_optimizers returned no optimizer to convert.")
        cls = ZO_OPTIMIZERS[self.config.name]
        kwargs = {k: getattr(self.config, k) for k in ZO_KEYS if getattr(self.config, k, None) is not None}
        new = []
        for optimizer in optimizers:
            groups, defaults = read_optimizer(optimizer)
            new.append(cls(groups, **defaults, names=self._names, blocks=self._blocks or None, **kwargs))
        held = {p for opt in new for g in opt.param_groups for p in g["params"] if p.requires_grad}
        self._trainable = len(held)
        if self.config.blockwise:
            self._blocks = new[0].blocks()
        return new

    @property
    def lowrank_names(self) -> list[str]:
        """Names of the weights given a low-rank rule: none (a ZO step perturbs every trainable tensor whole);
        the same property as the first-order optimizer technique's."""
        return []

    def step_context(self) -> contextlib.AbstractContextManager:
        """``torch.no_grad()``: the forward keeps no activations and builds no graph."""
        return torch.no_grad()

"""Activation checkpointing of transformer blocks (exact).

A checkpointed block keeps only its inputs during the forward pass and is recomputed in the
backward pass (non-reentrant ``torch.utils.checkpoint``, RNG state preserved so dropout replays
identically). Gradients equal the un-checkpointed run bit for bit on deterministic kernels.

The functional API (:func:`apply_checkpointing`, :func:`remove_checkpointing`) works on any
modules; :class:`CheckpointTechnique` is how ``MemKitStrategy`` installs it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_memkit.config import ActivationsConfig, MemKitConfigError, check_int
from lightning_memkit.models.interface import find_blocks
from lightning_memkit.technique import ForwardWrapper, Technique, find_forward_wrapper, unwrap_forward, wrap_forward


#: ops whose outputs selective checkpointing keeps (matrix products and attention); the rest is recomputed
_SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten.linear.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _SAVED_OPS.add(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


class BudgetPlan:
    """``checkpoint="budget"``: how many blocks keep their activations, decided from a measurement.

    The first forward with gradients runs block 0 without checkpointing under a counting
    ``saved_tensors_hooks`` (bytes of the distinct storages it saves, parameters excluded); then
    ``keep = (budget - n_blocks x input bytes) // block bytes`` blocks (at least 1: block 0 already
    kept them in this step) keep their activations and the rest are checkpointed, in this step and
    every later one. The measurement assumes the blocks are alike (they are in transformers).
    """

    def __init__(self, budget: int, n_blocks: int) -> None:
        self.budget, self.n_blocks = budget, n_blocks
        self.block_bytes: Optional[int] = None
        self.input_bytes = 0
        self.keep = 0

    def measure(self, inner: Any, args: Any, kwargs: Any) -> Any:
        seen: set[int] = set()
        total = [0]

        def count(x: torch.Tensor) -> torch.Tensor:
            if not (isinstance(x, nn.Parameter) or isinstance(x._base, nn.Parameter)):  # weights are not activations
                key = x.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total[0] += x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(count, lambda x: x):
            out = inner(*args, **kwargs)
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        self.input_bytes = first.numel() * first.element_size() if first is not None else 0
        self.block_bytes = max(1, total[0])
        room = self.budget - self.n_blocks * self.input_bytes
        self.keep = int(min(self.n_blocks, max(1, room // self.block_bytes)))
        return out

    def describe(self) -> str:
        if self.block_bytes is None:
            return "not measured yet"
        return (f"{self.keep} of {self.n_blocks} blocks keep their activations ({self.block_bytes / 2**20:.1f} MiB "
                f"each), {self.n_blocks - self.keep} are checkpointed")


class _CheckpointedForward(ForwardWrapper):
    """Replaces a module's ``forward``: runs the original under ``torch.utils.checkpoint``.

    ``selective``: keep matrix-product and attention outputs, recompute the rest. ``offload``: the
    inputs the checkpoint keeps are saved through ``torch.autograd.graph.save_on_cpu(pin_memory=True)``
    and copied back for the recomputation (CUDA only; RNG states are handled by the checkpoint as usual).
    """

    selective: bool = False
    offload: bool = False
    plan: Optional[BudgetPlan] = None
    index: int = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # inference: nothing is saved, nothing to recompute
            return self.inner(*args, **kwargs)
        if self.plan is not None:
            if self.plan.block_bytes is None:
                return self.plan.measure(self.inner, args, kwargs)
            if self.index < self.plan.keep:
                return self.inner(*args, **kwargs)
        extra = {"context_fn": _selective_context} if self.selective else {}
        if self.offload and any(isinstance(t, torch.Tensor) and t.is_cuda for t in (*args, *kwargs.values())):
            # the checkpoint saves its inputs through autograd's saved-tensor hooks: keep them in pinned host memory
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return checkpoint(self.inner, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    return find_forward_wrapper(module, _CheckpointedForward) is not None


def apply_checkpointing(blocks: Sequence[nn.Module], every: int = 1, *, selective: bool = False,
                        offload: bool = False, plan: Optional[BudgetPlan] = None) -> list[nn.Module]:
    """Checkpoint ``blocks[0], blocks[every], blocks[2*every], ...``; returns the modules changed.

    The modules keep their class, parameters and state-dict keys; only ``forward`` is wrapped.
    Already-checkpointed modules are left as they are. ``selective``: keep matrix-product outputs
    and recompute element-wise ops only; ``offload``: hold each block's input in host memory (CUDA).
    """
    check_int("every", every, minimum=1)  # a MemKitConfigError (ValueError) naming the value and the fix
    changed = []
    for i, block in enumerate(blocks):
        if i % every or is_checkpointed(block):
            continue
        wrapper = wrap_forward(block, _CheckpointedForward)
        wrapper.selective, wrapper.offload, wrapper.plan, wrapper.index = selective, offload, plan, i
        changed.append(block)
    return changed


def remove_checkpointing(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`apply_checkpointing` on ``blocks`` (others are left alone)."""
    for block in blocks:
        unwrap_forward(block, _CheckpointedForward)


class CheckpointTechnique(Technique):
    """``activations.checkpoint='blocks'``: checkpoint every ``checkpoint_every``-th block."""

    name = "activation_checkpointing"
    exact = True

    def __init__(self, config: ActivationsConfig) -> None:
        self.config = config
        self.plan: Optional[BudgetPlan] = None
        self._changed: list[nn.Module] = []
        self._caches: list[tuple[Any, Any]] = []  # Hugging Face configs whose use_cache was turned off

    def describe(self) -> str:
        every = self.config.checkpoint_every
        which = "every block" if every == 1 else f"every {every}th block"
        kind = ""
        if self.config.checkpoint == "selective":
            kind = "selective "
        elif self.config.checkpoint == "budget":
            kind = f"memory-targeted ({self.config.activation_budget / 2**30:.2f} GiB: {self.plan.describe()}) "
        where = ", inputs offloaded to host memory" if self.config.offload else ""
        return f"{kind}activation checkpointing of {which} ({len(self._changed)} blocks{where})"

    def setup_module(self, module: nn.Module) -> None:
        blocks = find_blocks(module)
        if not blocks:
            raise MemKitConfigError(
                f"activations.checkpoint={self.config.checkpoint!r}, but {type(module).__name__} has no recognizable "
                "transformer blocks (looked for a memkit_blocks() method and for nn.ModuleList/nn.Sequential "
                "containers of two or more same-class modules). Fix: define memkit_blocks() on your "
                "LightningModule returning the blocks, or set activations.checkpoint='none'."
            )
        if self.config.checkpoint == "budget":
            self.plan = BudgetPlan(self.config.activation_budget, len(blocks))
        self._changed = apply_checkpointing(blocks, every=self.config.checkpoint_every,
                                            selective=self.config.checkpoint == "selective",
                                            offload=self.config.offload, plan=self.plan)
        self._caches = _turn_off_kv_cache(module, self._changed)

    def teardown(self, module: nn.Module) -> None:
        remove_checkpointing(self._changed)
        self._changed = []
        for config, value in self._caches:
            config.use_cache = value
        self._caches = []


def _turn_off_kv_cache(module: nn.Module, checkpointed: Sequence[nn.Module]) -> list[tuple[Any, Any]]:
    """Set ``config.use_cache=False`` on the Hugging Face models around checkpointed blocks; returns (config, old
    value) pairs to restore.

    A Hugging Face model builds a key/value cache in training too (``use_cache`` defaults to true), and a
    checkpointed block recomputed in the backward pass writes its keys and values into that cache a second time:
    an extra copy of them, and with a padded ``attention_mask`` a shape error in the backward. Hugging Face's own
    ``gradient_checkpointing_enable`` turns the cache off the same way.
    """
    inside = {id(m) for block in checkpointed for m in block.modules()}
    changed: list[tuple[Any, Any]] = []
    for m in module.modules():
        config = getattr(m, "config", None)
        if (type(m).__module__.startswith("transformers.") and getattr(config, "use_cache", False) is True
                and any(id(sub) in inside for sub in m.modules()) and all(config is not c for c, _ in changed)):
            changed.append((config, config.use_cache))
            config.use_cache = False
    return changed


def hf_checkpointed(module: nn.Module) -> bool:
    """A Hugging Face decoder layer whose model has ``gradient_checkpointing_enable()`` in force
    (transformers' ``GradientCheckpointingLayer`` with ``gradient_checkpointing`` set)."""
    return getattr(module, "gradient_checkpointing", False) is True and any(
        c.__name__ == "GradientCheckpointingLayer" for c in type(module).__mro__)

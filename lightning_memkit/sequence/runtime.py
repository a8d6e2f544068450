"""The ``sequence=`` toggle: how a model's loss picks up SeCO / SpaCO / StreamBP without code changes.

``MemKitStrategy`` activates a :class:`SequenceRuntime` around every step (a context variable of
:mod:`lightning_memkit.step_context`). :func:`~lightning_memkit.loss.causal_lm_loss` asks it first; Hugging Face
``*ForCausalLM`` models called with ``labels=`` get their ``forward`` wrapped for the fit
(:func:`patch_hf_forward`): the loss comes from :func:`~lightning_memkit.sequence.sequence_loss` and
the output's ``logits`` is ``None`` (with ``return_dict=False``: the tuple ``(loss,)``). Positional
arguments are named by the model class's own ``forward``; ``attention_mask`` (no padding),
``position_ids`` (0..T-1), ``num_items_in_batch`` and ``logits_to_keep`` (the loss covers every
position, as Hugging Face's does with labels) are accepted.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, cast

import torch
from torch import Tensor, nn

from lightning_memkit.config import SequenceConfig
from lightning_memkit.sequence.loss import sequence_loss
from lightning_memkit.sequence.core import BlockCall, direct_call
from lightning_memkit.step_context import (
    active_cross_entropy,
    active_sequence_runtime,
    as_keywords,
    count_fused_call,
    use_sequence_runtime,
)
from lightning_memkit.technique import ForwardWrapper, unwrap_forward, wrap_forward_once


class SequenceRuntime:
    """The sequence setting in force: the config, how blocks are called, where SpaCO's draws come from."""

    def __init__(self, config: SequenceConfig, call: BlockCall = direct_call,
                 step: Callable[[], int] = lambda: 0, early_gradients: bool = False) -> None:
        self.config, self.call, self.step = config, call, step
        self.early_gradients = early_gradients
        self.calls = 0
        self.calls_this_step = 0

    def loss(self, model: nn.Module, input_ids: Tensor, labels: Tensor, *, ignore_index: int = -100,
             shift: bool = False, reduction: str = "mean") -> Tensor:
        self.calls += 1
        c = self.config
        early = self.early_gradients and c.method == "streambp" and torch.is_grad_enabled()
        if early:
            self.calls_this_step += 1
            if self.calls_this_step > 1:
                raise RuntimeError(
                    "sequence='streambp' with a step-in-backward optimizer hands each block's gradients to the "
                    "optimizer as soon as the block is done, so the step's loss must come from one causal_lm_loss "
                    "call; this step made a second one. Fix: one call per training step (concatenate the "
                    "sequences into one batch), or set optimizer.in_backward=false."
                )
        cross_entropy = active_cross_entropy()
        if cross_entropy is not None:  # each chunk's loss is the fused one
            count_fused_call()
        return sequence_loss(
            model, input_ids, labels, method=c.method, chunk_size=c.chunk_size, keep=c.keep, seed=c.seed,
            step=self.step(), ignore_index=ignore_index, shift=shift, cross_entropy=cross_entropy, call=self.call,
            reduction=reduction, early_gradients=early, offload=c.offload,
        )


def active_sequence() -> Optional[SequenceRuntime]:
    """The sequence method in force for this step, or None (ordinary backprop)."""
    return cast(Optional[SequenceRuntime], active_sequence_runtime())


@contextlib.contextmanager
def use_sequence(runtime: Optional[SequenceRuntime]) -> Iterator[None]:
    """Make ``runtime`` the active sequence method inside the block (None or not enabled: off)."""
    with use_sequence_runtime(runtime if runtime is not None and runtime.config.enabled else None):
        yield


#: the Hugging Face forward arguments the sequence methods honour (checked or equal to what they do); any other
#: argument given a value is refused, naming it
_DRIVEN_ARGUMENTS = ("input_ids", "labels", "attention_mask", "position_ids", "num_items_in_batch", "use_cache",
                     "return_dict", "logits_to_keep")


class _SequenceHFForward(ForwardWrapper):
    """Replaces a HF ``*ForCausalLM.forward``: called with labels while the toggle is active, the loss
    comes from the sequence method and no logits are returned."""

    def __init__(self, module: nn.Module, inner: Any, had_instance_forward: bool) -> None:
        super().__init__(inner, had_instance_forward)
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runtime = active_sequence()
        if runtime is None:
            return self.inner(*args, **kwargs)
        if args:  # named by the model's own forward signature (not the wrappers' (*args, **kwargs))
            named = as_keywords(self.inner, args, kwargs, self.module)
            if named is None:
                raise ValueError(
                    f"sequence={runtime.config.method!r} could not name the {len(args)} positional argument(s) of "
                    f"{type(self.module).__name__}.forward (it takes *args). Fix: pass input_ids= and labels= by "
                    "keyword, or train without sequence=."
                )
            kwargs = named
        labels = kwargs.get("labels")
        if labels is None:
            return self.inner(**kwargs)
        extra = sorted(k for k, v in kwargs.items() if v is not None and k not in _DRIVEN_ARGUMENTS)
        if extra:
            raise ValueError(
                f"sequence={runtime.config.method!r} drives the model from input_ids and labels only, but the call "
                f"also passed {extra}. Fix: call the model with input_ids and labels (right padding marked -100 in "
                "the labels), or train without sequence=."
            )
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                f"sequence={runtime.config.method!r} needs the token ids; the call passed labels without input_ids. "
                "Fix: pass input_ids (inputs_embeds is not supported), or train without sequence=."
            )
        positions = kwargs.get("position_ids")
        if positions is not None and not _default_positions(positions, input_ids):
            raise ValueError(
                f"sequence={runtime.config.method!r} got position_ids other than 0..T-1 in every row (packed or "
                "shifted positions); the sequence methods place token t at position t. Fix: leave position_ids out, "
                "or train without sequence=."
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(
                f"sequence={runtime.config.method!r} got an attention_mask with padding; the sequence methods apply "
                "causal attention to the whole row. Fix: pad on the right and mark the padding -100 in the labels "
                "(causal attention never lets earlier tokens see it), or train without sequence=."
            )
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:
            loss = runtime.loss(self.module, input_ids, labels, ignore_index=-100, shift=True)
        else:  # Hugging Face's convention under accumulation: the sum over the micro-batch / num_items
            loss = runtime.loss(self.module, input_ids, labels, ignore_index=-100, shift=True, reduction="sum")
            loss = loss / (num_items.to(loss.device) if isinstance(num_items, Tensor) else num_items)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(loss=loss, logits=None)
        # return_dict=False: Hugging Face's tuple without its None fields, here (loss,)
        return out.to_tuple() if kwargs.get("return_dict") is False else out


def _default_positions(positions: Tensor, input_ids: Tensor) -> bool:
    """``positions`` ((T,), (1, T) or (B, T)) is 0..T-1 in every row, the positions the methods use."""
    expected = torch.arange(input_ids.shape[1], device=positions.device)
    return positions.shape[-1] == input_ids.shape[1] and bool((positions == expected).all())


def patch_hf_forward(module: nn.Module) -> bool:
    """Route ``module.forward(labels=...)`` through the sequence method while the toggle is active."""
    return wrap_forward_once(module, _SequenceHFForward, lambda inner, had: _SequenceHFForward(module, inner, had))


def unpatch_hf_forward(module: nn.Module) -> None:
    unwrap_forward(module, _SequenceHFForward)


__all__ = ["SequenceRuntime", "active_sequence", "use_sequence", "patch_hf_forward", "unpatch_hf_forward"]

"""The ``cross_entropy="fused"`` toggle: how models pick up the fused loss without code changes.

``MemKitStrategy`` activates a :class:`~lightning_memkit.config.CrossEntropyConfig` around every
step (a context variable of :mod:`lightning_memkit.step_context`, re-exported here with its counter:
:func:`use_cross_entropy`, :func:`active_cross_entropy`, :func:`fused_call_count`). Code that computes a
causal-LM loss asks :func:`active_cross_entropy`:

- :func:`causal_lm_loss` (used by ``CausalLMModule``; the one call an ordinary module needs) takes a
  model with ``forward_hidden`` and ``lm_head`` (the reference model, ``HFCausalLM``) and computes
  the loss from the hidden states and the head weight: no logits.
- Hugging Face ``*ForCausalLM`` models called with ``labels=`` get their ``forward`` replaced for the
  duration of the fit (:func:`patch_hf_causal_lm`): the loss comes from the fused function and the
  output's ``logits`` is ``None``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_memkit.config import CrossEntropyConfig
from lightning_memkit.loss.linear_ce import linear_cross_entropy
from lightning_memkit.models.families import (
    HF_FAMILIES,
    hf_family,
    is_hf_causal_lm,
    is_hf_language_model,
    unsupported_loss_extras,
)
from lightning_memkit.step_context import (
    active_cross_entropy,
    active_sequence_runtime,
    as_keywords,
    count_fused_call,
    fused_call_count,
    use_cross_entropy,
)
from lightning_memkit.technique import ForwardWrapper, unwrap_forward, wrap_forward_once

#: Hugging Face model types whose head + loss the patched forward reproduces exactly (tested), from the family
#: table :data:`~lightning_memkit.models.families.HF_FAMILIES`. Others (e.g. Granite's logits scaling, Cohere's
#: logit_scale, Mixtral's router loss) keep their own forward.
FUSABLE_HF_MODEL_TYPES = tuple(HF_FAMILIES)

#: the old private name of :func:`~lightning_memkit.step_context.as_keywords` (tests name it)
_as_keywords = as_keywords


def _fused_kwargs(config: CrossEntropyConfig) -> dict[str, Any]:
    return {"impl": config.impl, "chunk_size": config.chunk_size, "filter_eps": config.filter_eps}


def causal_lm_loss(
    model: nn.Module, input_ids: Tensor, labels: Tensor, *, ignore_index: int = -100, shift: bool = False
) -> Tensor:
    """Mean cross-entropy of ``model`` on ``input_ids`` against ``labels`` (both (B, T)).

    With the strategy's ``cross_entropy="fused"`` active, computed from ``model.forward_hidden`` and
    ``model.lm_head`` by :func:`~lightning_memkit.loss.linear_cross_entropy` (no logits; softcapped by
    ``model.logit_softcap`` when the model has one, as Gemma 2 in ``HFCausalLM``; an ``HFCausalLM`` whose config
    scales its logits or adds a router loss keeps the plain path); otherwise
    ``F.cross_entropy(model(input_ids).float(), labels)``. Both give the same value and gradients.
    With the strategy's ``sequence=`` active, the loss comes from
    :func:`~lightning_memkit.sequence.sequence_loss` (same value, gradients by SeCO / SpaCO / StreamBP).
    ``shift=True`` when ``labels`` are the inputs themselves (position i predicts labels[i + 1]).
    """
    sequence = active_sequence_runtime()
    if sequence is not None:  # SeCO / SpaCO / StreamBP (they use the fused loss per chunk when it is on)
        return sequence.loss(model, input_ids, labels, ignore_index=ignore_index, shift=shift)
    config = active_cross_entropy()
    if config is not None and not unsupported_loss_extras(getattr(getattr(model, "hf", None), "config", None)):
        head = model.lm_head
        count_fused_call()
        return linear_cross_entropy(
            model.forward_hidden(input_ids), head.weight, labels, bias=head.bias, ignore_index=ignore_index,
            shift=shift, softcap=getattr(model, "logit_softcap", None), **_fused_kwargs(config),
        )
    logits = model(input_ids)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index)


def is_fusable_hf_causal_lm(module: nn.Module) -> bool:
    """A Hugging Face causal LM of a family whose loss the fused forward reproduces exactly: its model type is in
    :data:`~lightning_memkit.models.families.HF_FAMILIES`, its parts are where the table says, and its config
    sets no loss extra the fused loss does not compute (logit scaling, router losses)."""
    return hf_family(module) is not None and not unsupported_loss_extras(module.config)


class _FusedHFForward(ForwardWrapper):
    """Replaces a HF ``*ForCausalLM.forward``: with labels and the toggle active, no logits. The body, head and
    softcap come from the model's family entry (:func:`~lightning_memkit.models.families.hf_family`)."""

    def __init__(self, module: nn.Module, inner: Any, had_instance_forward: bool) -> None:
        super().__init__(inner, had_instance_forward)
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        config = active_cross_entropy()
        if config is None:
            return self.inner(*args, **kwargs)
        if args:  # name the positional arguments (input_ids, attention_mask, ...) by the model's own signature
            named = as_keywords(self.inner, args, kwargs, self.module)
            if named is None:  # a forward taking *args: keep Hugging Face's own path
                return self.inner(*args, **kwargs)
            kwargs = named
        if (
            kwargs.get("labels") is None
            or kwargs.get("shift_labels") is not None  # labels already shifted by the caller
            or kwargs.get("return_dict") is False  # tuple outputs: keep HF's own layout
            or kwargs.get("output_router_logits", getattr(self.module.config, "output_router_logits", False))
        ):
            return self.inner(**kwargs)
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        hf = self.module
        family = hf_family(hf)
        if family is None:  # parts moved since the patch (a replaced head): keep Hugging Face's own path
            return self.inner(**kwargs)
        outputs = family.decoder(hf)(**kwargs)
        hidden = outputs[0]  # (B, T, D), after the final norm
        head = family.head(hf)
        reduction = "sum" if num_items is not None else "mean"
        loss = linear_cross_entropy(
            hidden, head.weight, labels, bias=head.bias, shift=True, softcap=family.logit_softcap(hf.config),
            reduction=reduction, **_fused_kwargs(config),
        )
        if num_items is not None:  # Hugging Face's convention under gradient accumulation
            loss = loss / (num_items.to(loss.device) if isinstance(num_items, Tensor) else num_items)
        count_fused_call()
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
        )
        return out


def patch_hf_causal_lm(module: nn.Module) -> bool:
    """Route ``module.forward(labels=...)`` through the fused loss while the toggle is active."""
    return wrap_forward_once(module, _FusedHFForward, lambda inner, had: _FusedHFForward(module, inner, had))


def unpatch_hf_causal_lm(module: nn.Module) -> None:
    unwrap_forward(module, _FusedHFForward)


__all__ = [
    "FUSABLE_HF_MODEL_TYPES",
    "active_cross_entropy",
    "causal_lm_loss",
    "fused_call_count",
    "is_fusable_hf_causal_lm",
    "is_hf_causal_lm",
    "is_hf_language_model",
    "patch_hf_causal_lm",
    "unpatch_hf_causal_lm",
    "use_cross_entropy",
]

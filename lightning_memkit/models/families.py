"""Hugging Face causal-LM families memkit's fused cross-entropy reproduces exactly, as one table.

Each :class:`HFFamily` says where a ``*ForCausalLM`` (or ``GPT2LMHeadModel``) keeps its decoder body, its
blocks, its final norm, its embedding and its LM head, and which extras its own loss applies to the
logits. The fused loss computes the family's loss from the body's hidden states and the head weight
(no logits); a family is added here only with a test that compares it with the model's own loss
(``tests/loss/test_families.py``). Adding one is a line, e.g.::

    "olmo2": HFFamily("olmo2"),

Families whose loss has parts the fused loss does not compute (logit scaling such as Cohere's
``logit_scale`` or Granite's ``logits_scaling``, MoE router losses such as Mixtral's) stay out of the
table: their models keep their own forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """Where a Hugging Face causal-LM family keeps its parts, and what its loss adds to the logits."""

    #: ``config.model_type`` of the family (the table's key).
    model_type: str
    #: attribute of the ``*ForCausalLM`` holding the decoder: called with the model's inputs, it returns the
    #: hidden states after the final norm (``BaseModelOutput*``, ``[0]`` = (B, T, D)).
    body: str = "model"
    #: attribute of the body holding the blocks (an ``nn.ModuleList``).
    blocks: str = "layers"
    #: attribute of the body holding the final norm (applied inside the body).
    final_norm: str = "norm"
    #: attribute of the body holding the input token embedding.
    embed: str = "embed_tokens"
    #: attributes of the ``*ForCausalLM`` that may hold the ``nn.Linear`` LM head, first found wins
    #: (GPT-NeoX calls it ``embed_out`` before transformers 5 and ``lm_head`` since).
    heads: tuple[str, ...] = ("lm_head",)
    #: the family config's default ``tie_word_embeddings`` (head weight is the embedding). The fused loss reads
    #: the head's weight, which is then the embedding itself, so tied or not the gradients land where HF's do.
    tied: bool = False
    #: config attribute holding the final-logit softcap c (the loss is taken on ``c * tanh(logits / c)``);
    #: None: the family applies none.
    softcap: Optional[str] = None

    def head(self, hf: nn.Module) -> Optional[nn.Linear]:
        """The LM head of ``hf``, or None when none of :attr:`heads` is an ``nn.Linear``."""
        for name in self.heads:
            head = getattr(hf, name, None)
            if isinstance(head, nn.Linear):
                return head
        return None

    def decoder(self, hf: nn.Module) -> Optional[nn.Module]:
        """The decoder body of ``hf`` (embedding, blocks, final norm), or None if absent."""
        body = getattr(hf, self.body, None)
        return body if isinstance(body, nn.Module) else None

    def logit_softcap(self, config: Any) -> Optional[float]:
        """The final-logit softcap in force for ``config``, or None."""
        if self.softcap is None:
            return None
        value = getattr(config, self.softcap, None)
        return None if value is None else float(value)


#: The families, by ``config.model_type``. Llama layout: ``model.layers``, ``model.norm``, ``lm_head``.
HF_FAMILIES: dict[str, HFFamily] = {f.model_type: f for f in (
    HFFamily("llama"),
    HFFamily("mistral"),
    HFFamily("qwen2"),
    HFFamily("qwen3"),
    HFFamily("phi3"),
    HFFamily("gemma2", tied=True, softcap="final_logit_softcapping"),
    HFFamily("gemma3_text", tied=True, softcap="final_logit_softcapping"),  # Gemma3ForCausalLM (text only)
    HFFamily("gpt2", body="transformer", blocks="h", final_norm="ln_f", embed="wte", tied=True),  # GPT2LMHeadModel
    HFFamily("gpt_neox", body="gpt_neox", final_norm="final_layer_norm", embed="embed_in",
             heads=("lm_head", "embed_out")),
)}

#: Config attributes that change the logits or add a loss term the fused loss does not compute; a model whose
#: config sets one (to other than its neutral value) keeps its own forward even if its family is in the table.
UNSUPPORTED_LOSS_EXTRAS: dict[str, Any] = {"logit_scale": 1.0, "logits_scaling": 1.0, "router_aux_loss_coef": 0.0}


def hf_family(module: nn.Module) -> Optional[HFFamily]:
    """The table entry for a Hugging Face causal LM whose parts are where the entry says, else None.

    Only transformers' own classes qualify: a wrapper that forwards attribute reads to the model it wraps (PEFT's
    ``PeftModelForCausalLM``) would otherwise resolve the entry's paths to the wrong modules; the wrapped
    ``*ForCausalLM`` inside it is found (and patched) instead.
    """
    if not type(module).__module__.startswith("transformers."):
        return None
    config = getattr(module, "config", None)
    family = HF_FAMILIES.get(getattr(config, "model_type", None))  # type: ignore[arg-type]
    if family is None or family.decoder(module) is None or family.head(module) is None:
        return None
    return family


def unsupported_loss_extras(config: Any) -> list[str]:
    """``name=value`` for each loss extra in ``config`` the fused loss does not reproduce (see the table)."""
    out = []
    for name, neutral in UNSUPPORTED_LOSS_EXTRAS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            out.append(f"{name}={value!r}")
    return out

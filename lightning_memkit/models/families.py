"""Hugging Face causal-LM families memkit's fused cross-entropy reproduces exactly, as one table.

Each :class:`HFFamily` says where a ``*ForCausalLM`` (or ``GPT2LMHeadModel``) keeps its decoder body, its
blocks, its final norm, its embedding and its LM head, and which extras its own loss applies to the
logits. The fused loss computes the family's loss from the body's hidden states and the head weight
(no logits); a family is added here only with a test that compares it with the model's own loss
(``tests/loss/test_families.py``). Adding one is a line, e.g.::

    "olmo2": HFFamily("olmo2"),

The same entry says how the sequence methods (StreamBP, SeCO, SpaCO) run the family's blocks piece by piece
(:class:`SequenceLayout`: the attention's projections, the norms around attention and MLP, per-head q/k norms,
per-layer-type RoPE), or why they cannot (``sequence=None`` with ``no_sequence``, the reason a user reads).

Families whose loss has parts the fused loss does not compute (logit scaling such as Cohere's
``logit_scale`` or Granite's ``logits_scaling``, MoE router losses such as Mixtral's) stay out of the
table: their models keep their own forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """How a family's decoder block is laid out, for the sequence methods (pre-norm, sequential residuals).

    A block computes ``x + post_attn_norm(o_proj(attention(q, k, v)))`` with q, k, v from ``attn_norm(x)``, then
    ``+ post_mlp_norm(mlp(mlp_norm(.)))``; a ``post_*`` norm that is None is left out. The attention's scale
    (``attention.scaling``), logit softcap (``attention.attn_logit_softcapping``) and sliding window
    (``attention.sliding_window``) are read from each layer's attention module.
    """

    #: attribute of the block holding the attention module
    attention: str = "self_attn"
    #: attribute of the attention holding one fused q/k/v projection (Phi-3's ``qkv_proj``, rows q, then k, then v);
    #: None: separate ``q_proj``, ``k_proj``, ``v_proj``
    fused_qkv: Optional[str] = None
    #: the attention applies per-head norms ``q_norm`` / ``k_norm`` to queries and keys before RoPE (Qwen3, Gemma 3)
    qk_norm: bool = False
    #: attributes of the block holding its norms
    attn_norm: str = "input_layernorm"
    post_attn_norm: Optional[str] = None
    mlp_norm: str = "post_attention_layernorm"
    post_mlp_norm: Optional[str] = None
    #: RoPE angles differ by attention layer type (Gemma 3: a local base for sliding layers); the rotary module is
    #: called with the layer type
    rope_per_layer_type: bool = False
    #: the embedding module scales its output itself (Gemma's ``*ScaledWordEmbedding``, which has ``embed_scale``);
    #: older transformers scaled in the model's forward instead, which the sequence methods do not call
    scaled_embedding: bool = False
    #: config attributes holding dropout probabilities inside the blocks; each must be 0 (recomputed chunks would
    #: draw other masks)
    dropouts: tuple[str, ...] = ("attention_dropout",)


#: The Llama layout: q/k/v/o projections, ``input_layernorm`` before attention, ``post_attention_layernorm`` before
#: the MLP.
LLAMA_LAYOUT = SequenceLayout()
#: Gemma 2's sandwich norms: a norm after attention and after the MLP too.
GEMMA2_LAYOUT = SequenceLayout(post_attn_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                               post_mlp_norm="post_feedforward_layernorm", scaled_embedding=True)


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
    #: how the sequence methods drive the family's blocks; None: they refuse it, saying :attr:`no_sequence`
    sequence: Optional[SequenceLayout] = LLAMA_LAYOUT
    #: why the sequence methods cannot drive the family (when :attr:`sequence` is None)
    no_sequence: str = ""

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

    def part(self, hf: nn.Module, name: str) -> Any:
        """The body's part ``name`` (``"blocks"``, ``"final_norm"`` or ``"embed"``: where this entry says it is), or
        None when the model has no body or no such part."""
        return getattr(self.decoder(hf), getattr(self, name), None)

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
    HFFamily("qwen3", sequence=SequenceLayout(qk_norm=True)),
    HFFamily("gemma", tied=True, sequence=SequenceLayout(scaled_embedding=True)),  # Gemma 1: the Llama layout
    HFFamily("phi3", sequence=SequenceLayout(fused_qkv="qkv_proj", dropouts=("attention_dropout", "resid_pdrop"))),
    HFFamily("gemma2", tied=True, softcap="final_logit_softcapping", sequence=GEMMA2_LAYOUT),
    HFFamily("gemma3_text", tied=True, softcap="final_logit_softcapping",  # Gemma3ForCausalLM (text only)
             sequence=dataclasses.replace(GEMMA2_LAYOUT, qk_norm=True, rope_per_layer_type=True)),
    HFFamily("gpt2", body="transformer", blocks="h", final_norm="ln_f", embed="wte", tied=True,  # GPT2LMHeadModel
             sequence=None, no_sequence="its positions are learned embeddings added at the input (no rotary "
             "embedding), and its Conv1D attention differs from the layout the methods drive"),
    HFFamily("gpt_neox", body="gpt_neox", final_norm="final_layer_norm", embed="embed_in",
             heads=("lm_head", "embed_out"), sequence=None,
             no_sequence="its blocks add attention and MLP in parallel (use_parallel_residual) from interleaved "
             "per-head q/k/v, not the sequential pre-norm layout the methods drive"),
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


def is_hf_causal_lm(module: nn.Module) -> bool:
    """A Hugging Face decoder-only ``*ForCausalLM`` (``model`` + ``lm_head`` + ``config``)."""
    return (
        type(module).__name__.endswith("ForCausalLM")
        and isinstance(getattr(module, "lm_head", None), nn.Linear)
        and isinstance(getattr(module, "model", None), nn.Module)
        and hasattr(module, "config")
    )


def is_hf_language_model(module: nn.Module) -> bool:
    """A Hugging Face causal LM the fused loss may consider: the Llama layout (:func:`is_hf_causal_lm`) or any
    family of the table (GPT-2's ``transformer`` + ``lm_head``, GPT-NeoX's ``gpt_neox`` + ``embed_out``)."""
    return is_hf_causal_lm(module) or hf_family(module) is not None

"""What the sequence-chunked methods need from a causal LM, and the adapters that provide it.

SeCO, SpaCO and StreamBP do not call a model's ``forward``: they run its pieces on chunks of the
sequence (the embedding, each block's norms, projections, attention and MLP, the final norm and the
head), with the keys and values of earlier positions taken from a buffer. A
:class:`SequenceAdapter` exposes those pieces. memkit ships two:

- :class:`ReferenceAdapter` for the reference :class:`~lightning_memkit.models.Transformer`;
- :class:`HFAdapter` for Hugging Face Llama / Qwen2 / Mistral ``*ForCausalLM`` models (bare or
  inside :class:`~lightning_memkit.models.HFCausalLM`). It uses the model's own modules, including
  its rotary embedding, so RoPE scaling (Llama 3.1's ``llama3``, ``linear``, ``yarn``) is honoured.

Any other model takes part by defining ``memkit_sequence_adapter()`` returning a
:class:`SequenceAdapter` subclass (see the README). :func:`get_adapter` finds or builds the adapter and
raises, naming what is missing, for a model it cannot drive.

Shapes: B batch, c chunk length, e keys up to the chunk's end, D width, H query heads, K key/value
heads, E head dim.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_memkit.config import MemKitConfigError


class SequenceAdapter(abc.ABC):
    """The pieces of a pre-norm decoder-only causal LM (x + attn(norm(x)), then + mlp(norm(.))).

    Subclasses set :attr:`model`, :attr:`blocks`, :attr:`n_heads`, :attr:`n_kv_heads`,
    :attr:`head_dim` and :attr:`max_seq_len`, and define the abstract methods below (a subclass that
    leaves one out cannot be instantiated). Every method must be a
    pure function of its inputs (no dropout, no state), so that recomputing a chunk reproduces it.
    """

    model: nn.Module
    blocks: list[nn.Module]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    #: the longest span attention may cover (None: unlimited; sliding-window models set it)
    window: Optional[int] = None

    @abc.abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, c) token ids -> (B, c, D)."""

    @abc.abstractmethod
    def rope(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin for integer ``positions`` (c,), broadcastable against (B, heads, c, E)."""

    @abc.abstractmethod
    def attn_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        """The norm before attention, (B, c, D) -> (B, c, D)."""

    @abc.abstractmethod
    def qkv(self, block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed input (B, c, D) -> q (B, H, c, E), k and v (B, K, c, E), with RoPE applied to q and k."""

    @abc.abstractmethod
    def attn_out(self, block: nn.Module, y: Tensor) -> Tensor:
        """Attention output (B, c, H*E) -> (B, c, D) (the output projection)."""

    @abc.abstractmethod
    def mlp_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        """The norm before the MLP, (B, c, D) -> (B, c, D)."""

    @abc.abstractmethod
    def mlp(self, block: nn.Module, h: Tensor) -> Tensor:
        """The MLP on the normed input, (B, c, D) -> (B, c, D)."""

    @abc.abstractmethod
    def final_norm(self, x: Tensor) -> Tensor:
        """The norm after the last block, (B, c, D) -> (B, c, D)."""

    @property
    @abc.abstractmethod
    def lm_head(self) -> nn.Linear:
        """The output projection (its ``weight`` and ``bias`` are used)."""

    @property
    def embedding(self) -> Optional[nn.Module]:
        """The module :meth:`embed` uses (None: unknown). With it, StreamBP hands the head's gradients
        over as soon as the head is done, unless the head shares parameters with it (tied weights)."""
        return None

    def kv(self, block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """k, v only (StreamBP's key/value pass). Default: through :meth:`qkv`."""
        _, k, v = self.qkv(block, h, cos, sin)
        return k, v

    #: refuse sequences longer than :attr:`max_seq_len` (the reference model refuses them itself)
    refuse_longer: bool = True

    def check_length(self, seq_len: int) -> None:
        """Raise if a sequence of ``seq_len`` tokens cannot be driven."""
        if self.refuse_longer and seq_len > self.max_seq_len:
            raise ValueError(
                f"sequence of {seq_len} tokens exceeds the model's max_seq_len={self.max_seq_len}. Fix: shorten the "
                "input (data.seq_len) or use a model with a longer context."
            )
        if self.window is not None and seq_len > self.window:
            raise ValueError(
                f"sequence of {seq_len} tokens is longer than the model's sliding attention window ({self.window}); "
                "the sequence methods implement full causal attention only. Fix: keep data.seq_len <= "
                f"{self.window}, or train without sequence=."
            )


def _heads_view(x: Tensor, heads: int, head_dim: int) -> Tensor:
    b, c, _ = x.shape
    return x.view(b, c, heads, head_dim).transpose(1, 2)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class _LlamaLayoutAdapter(SequenceAdapter):
    """Blocks whose attention module has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears and whose
    MLP is ``block.mlp`` (the reference model and the Hugging Face Llama family)."""

    @abc.abstractmethod
    def attention(self, block: nn.Module) -> nn.Module:
        """The block's attention module."""

    def qkv(self, block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q = _apply_rope(_heads_view(self.attention(block).q_proj(h), self.n_heads, self.head_dim), cos, sin)
        k, v = self.kv(block, h, cos, sin)
        return q, k, v

    def kv(self, block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        attn = self.attention(block)
        k = _apply_rope(_heads_view(attn.k_proj(h), self.n_kv_heads, self.head_dim), cos, sin)
        return k, _heads_view(attn.v_proj(h), self.n_kv_heads, self.head_dim)

    def attn_out(self, block: nn.Module, y: Tensor) -> Tensor:
        return self.attention(block).o_proj(y)

    def mlp(self, block: nn.Module, h: Tensor) -> Tensor:
        return block.mlp(h)


class ReferenceAdapter(_LlamaLayoutAdapter):
    """The reference :class:`~lightning_memkit.models.Transformer`."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.model = model
        self.blocks = list(model.blocks)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.max_seq_len = cfg.max_seq_len
        self._theta = cfg.rope_theta

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    @property
    def embedding(self) -> nn.Module:
        return self.model.embed_tokens

    def rope(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        from lightning_memkit.models.llama import rope_cos_sin

        return rope_cos_sin(positions, self.head_dim, self._theta, like.dtype)

    def attn_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.attn_norm(x)

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def mlp_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.mlp_norm(x)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head


#: Hugging Face model types the adapter reproduces exactly (tested against the model's own forward).
HF_SEQUENCE_MODEL_TYPES = ("llama", "qwen2", "mistral")
#: RoPE types whose angles depend on the position only (not on the sequence length seen so far).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class HFAdapter(_LlamaLayoutAdapter):
    """A Hugging Face Llama / Qwen2 / Mistral ``*ForCausalLM`` (the model's own modules are used)."""

    def __init__(self, hf: nn.Module) -> None:
        config = hf.config
        kind = getattr(config, "model_type", type(hf).__name__)
        if kind not in HF_SEQUENCE_MODEL_TYPES:
            raise MemKitConfigError(
                f"sequence methods cannot drive the Hugging Face model type {kind!r}: its blocks may differ from the "
                f"Llama layout (extra norms, logit scaling, softcapping). Driven and tested: {HF_SEQUENCE_MODEL_TYPES}. "
                "Fix: use one of them, or give the model a memkit_sequence_adapter() (see the README)."
            )
        inner = hf.model
        missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, name)]
        if missing:
            raise MemKitConfigError(
                f"{type(hf).__name__}.model lacks {missing}, which the sequence methods need. Fix: a Llama-layout "
                "*ForCausalLM (transformers >= 4.45), or a memkit_sequence_adapter()."
            )
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in _STATIC_ROPE_TYPES:
            raise MemKitConfigError(
                f"the model's RoPE type {rope_type!r} depends on the sequence length seen so far, which chunks "
                f"change. Fix: train without sequence=, or use a model with one of {_STATIC_ROPE_TYPES}."
            )
        layer_types = set(getattr(config, "layer_types", None) or ())
        if layer_types - {"full_attention"}:
            raise MemKitConfigError(
                f"the model uses attention layer types {sorted(layer_types)}; the sequence methods implement full "
                "causal attention only. Fix: train without sequence=, or disable sliding-window attention in the config."
            )
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            if not getattr(attn, "is_causal", True):
                raise MemKitConfigError(
                    f"layer {i} of the model has non-causal attention (is_causal=False); the sequence methods need "
                    "causal attention. Fix: train this model without sequence=."
                )
        if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
            raise MemKitConfigError(
                f"attention_dropout={config.attention_dropout} in the model's config: recomputed chunks would draw "
                "different dropout masks. Fix: set attention_dropout=0 (the usual value for fine-tuning)."
            )
        self.model = hf
        self.blocks = list(inner.layers)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.max_seq_len = int(config.max_position_embeddings)
        self.refuse_longer = False  # Hugging Face models run past max_position_embeddings (context extension)
        window = getattr(config, "sliding_window", None)
        self.window = window if window is not None and getattr(config, "use_sliding_window", True) else None

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.model.embed_tokens(input_ids)

    @property
    def embedding(self) -> nn.Module:
        return self.model.model.embed_tokens

    def rope(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.model.model.rotary_emb(like, positions[None, :])  # (1, c, E)
        return cos[:, None], sin[:, None]  # (1, 1, c, E)

    def attn_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.input_layernorm(x)

    def attention(self, block: nn.Module) -> nn.Module:
        return block.self_attn

    def mlp_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.post_attention_layernorm(x)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.model.norm(x)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head


def find_adapter(model: nn.Module) -> Optional[SequenceAdapter]:
    """The adapter for ``model`` (built afresh: it is cheap, and caching it would keep the model alive),
    or None if it is none of the kinds memkit drives. Raises for a recognized model with parts the
    methods cannot drive."""
    from lightning_memkit.loss.toggle import is_hf_causal_lm
    from lightning_memkit.models.hf import HFCausalLM
    from lightning_memkit.models.llama import Transformer

    custom = getattr(model, "memkit_sequence_adapter", None)
    if callable(custom):
        adapter = custom()
        if not isinstance(adapter, SequenceAdapter):
            raise MemKitConfigError(
                f"{type(model).__name__}.memkit_sequence_adapter() returned {type(adapter).__name__}; it must return a "
                "lightning_memkit.sequence.SequenceAdapter."
            )
    elif isinstance(model, Transformer):
        adapter = ReferenceAdapter(model)
    elif isinstance(model, HFCausalLM):
        adapter = HFAdapter(model.hf)
    elif is_hf_causal_lm(model):
        adapter = HFAdapter(model)
    else:
        return None
    return adapter


def get_adapter(model: nn.Module) -> SequenceAdapter:
    """The adapter for ``model``; raises naming what is missing when there is none."""
    adapter = find_adapter(model)
    if adapter is None:
        raise MemKitConfigError(
            f"the sequence methods cannot drive {type(model).__name__}: it is not the reference Transformer, an "
            "HFCausalLM or a Hugging Face Llama/Qwen2/Mistral *ForCausalLM, and it has no memkit_sequence_adapter() "
            "method. Fix: pass one of those to causal_lm_loss(), or define memkit_sequence_adapter() returning a "
            "lightning_memkit.sequence.SequenceAdapter for your model."
        )
    return adapter


# --------------------------------------------------------------------------------------------------
# attention of a chunk of queries against the keys up to its end
# --------------------------------------------------------------------------------------------------


def causal_bias(c: int, e: int, like: Tensor) -> Any:
    """The attention mask of queries at positions ``e-c .. e-1`` against keys ``0 .. e-1``.

    None when ``c == e`` (plain causal). On CUDA a lower-right ``CausalBias`` (flash/efficient kernels,
    nothing materialized); elsewhere an additive (c, e) mask in ``like``'s dtype, made once per chunk
    and shared by every layer (so a graph through all layers saves it once).
    """
    if c == e:
        return None
    if like.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(c, e)
    device = like.device.type
    # the queries' dtype: autocast's when it is on (the projections run under it), else the hidden states'
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
    keep = torch.ones(c, e, dtype=torch.bool, device=like.device).tril(diagonal=e - c)
    return torch.zeros(c, e, dtype=dtype, device=like.device).masked_fill_(~keep, float("-inf"))


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, bias: Any) -> Tensor:
    """q (B, H, c, E) against k, v (B, K, e, E); grouped-query heads are not repeated in memory."""
    gqa = q.shape[1] != k.shape[1]
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(bias, Tensor) and bias.dtype != q.dtype:  # a model whose projections change dtype
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)

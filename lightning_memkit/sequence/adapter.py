"""What the sequence-chunked methods need from a causal LM, and the adapters that provide it.

SeCO, SpaCO and StreamBP do not call a model's ``forward``: they run its pieces on chunks of the
sequence (the embedding, each block's norms, projections, attention and MLP, the final norm and the
head), with the keys and values of earlier positions taken from a buffer. A
:class:`SequenceAdapter` exposes those pieces. memkit ships two:

- :class:`ReferenceAdapter` for the reference :class:`~lightning_memkit.models.Transformer`;
- :class:`HFAdapter` for Hugging Face ``*ForCausalLM`` models (bare or inside
  :class:`~lightning_memkit.models.HFCausalLM`) of the families in
  :data:`~lightning_memkit.models.families.HF_FAMILIES` that have a block layout: Llama, Qwen2,
  Qwen3 (q/k norms), Mistral, Phi-3 (fused q/k/v), Gemma 2 and 3 (sandwich norms, attention
  softcapping, per-layer-type RoPE, sliding windows that cover the sequence). It uses the model's own
  modules, including its rotary embedding, so RoPE scaling (``llama3``, ``linear``, ``yarn``,
  ``dynamic``, ``longrope``) is honoured.

Any other model takes part by defining ``memkit_sequence_adapter()`` returning a
:class:`SequenceAdapter` subclass (see docs/sequence.md). :func:`get_adapter` finds or builds the adapter and
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

from lightning_memkit._tensors import is_symbolic
from lightning_memkit.config import MemKitConfigError
from lightning_memkit.models.families import (
    HF_FAMILIES,
    HFFamily,
    SequenceLayout,
    hf_family,
    is_hf_language_model,
)
from lightning_memkit.sequence.attention import (
    LowerRight,
    attention_backend,
    chunked_attention,
    prefers_chunked,
    uses_chunked,
)


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

    def attend(self, block: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Any) -> Tensor:
        """The block's attention of a chunk's queries (B, H, c, E) on the keys and values up to its end (B, K, e, E),
        masked by ``bias`` (see :func:`causal_bias`). Default: softmax(q k^T / sqrt(E)) v."""
        return chunk_attention(q, k, v, bias)

    @property
    def logit_softcap(self) -> Optional[float]:
        """The final-logit softcap c the loss applies (``c * tanh(logits / c)``, Gemma 2/3), or None."""
        return None

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
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary (Phi-4-mini's partial_rotary_factor): the rest passes unrotated
        head, rest = x[..., :rotary], x[..., rotary:]
        return torch.cat((head * cos + _rotate_half(head) * sin, rest), dim=-1)
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


#: RoPE types the adapter drives. Every one of them is exact here: the methods compute the angles once per step for
#: positions 0..T-1, so a type whose angles depend on the sequence length (``dynamic``, ``longrope``) sees the whole
#: length, as in the model's own forward.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def _rope_types(config: Any) -> set[str]:
    """The RoPE types of ``config`` (Gemma 3 has one parameter set per attention layer type)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    sets = [params] if "rope_type" in params or "type" in params or "rope_theta" in params else list(params.values())
    return {(p or {}).get("rope_type", (p or {}).get("type", "default")) or "default" for p in sets} or {"default"}


def _sliding_window(config: Any) -> Optional[int]:
    """The sliding attention window some layer of ``config`` uses, or None (full attention everywhere)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    return int(window) if getattr(config, "use_sliding_window", True) else None


def _family_of(hf: nn.Module) -> tuple[HFFamily, SequenceLayout]:
    """The table entry and block layout of ``hf``; raises naming why the methods cannot drive it."""
    kind = getattr(getattr(hf, "config", None), "model_type", None)
    family = hf_family(hf)
    drivable = sorted(t for t, f in HF_FAMILIES.items() if f.sequence is not None)
    if family is None:
        raise MemKitConfigError(
            f"sequence methods cannot drive the Hugging Face model {type(hf).__name__} (model type {kind!r}): it is "
            "not "
            f"in memkit's family table, so where its blocks' norms and projections are is unknown. Driven and tested: "
            f"{drivable}. Fix: use one of them, add the family to lightning_memkit.models.families.HF_FAMILIES, or "
            "give the model a memkit_sequence_adapter() (see docs/models.md)."
        )
    if family.sequence is None:
        raise MemKitConfigError(
            f"sequence methods cannot drive the Hugging Face model type {kind!r}: {family.no_sequence}. Driven and "
            f"tested: {drivable}. Fix: train it without sequence= (activations='checkpoint' and the fused loss "
            "apply to it), or use one of those families."
        )
    return family, family.sequence


class HFAdapter(_LlamaLayoutAdapter):
    """A Hugging Face ``*ForCausalLM`` of a family in :data:`~lightning_memkit.models.families.HF_FAMILIES` whose
    entry has a :class:`~lightning_memkit.models.families.SequenceLayout` (the model's own modules are used)."""

    def __init__(self, hf: nn.Module) -> None:
        family, layout = _family_of(hf)
        config = hf.config
        kind = config.model_type
        body = family.decoder(hf)
        blocks = family.part(hf, "blocks")
        parts = {"the blocks": blocks, "the embedding": family.part(hf, "embed"),
                 "the final norm": family.part(hf, "final_norm"),
                 "the rotary embedding": getattr(body, "rotary_emb", None)}
        missing = [what for what, part in parts.items() if part is None]
        if not missing:
            names = [layout.attention, layout.attn_norm, layout.mlp_norm, "mlp"]
            names += [n for n in (layout.post_attn_norm, layout.post_mlp_norm) if n is not None]
            projections = [layout.fused_qkv] if layout.fused_qkv else ["q_proj", "k_proj", "v_proj"]
            projections += ["o_proj"] + (["q_norm", "k_norm"] if layout.qk_norm else [])
            for i, block in enumerate(blocks):
                attn = getattr(block, layout.attention, None)
                missing += [f"layers[{i}].{n}" for n in names if getattr(block, n, None) is None]
                missing += [f"layers[{i}].{layout.attention}.{n}" for n in projections
                            if attn is not None and getattr(attn, n, None) is None]
        if layout.scaled_embedding and parts["the embedding"] is not None \
                and not hasattr(parts["the embedding"], "embed_scale"):
            missing.append("an embedding that scales its output (transformers >= 5)")
        if missing:
            raise MemKitConfigError(
                f"{type(hf).__name__} ({kind!r}) lacks {missing}, which the sequence methods need. Fix: upgrade "
                "transformers (the layouts are tested with 5.x), or give the model a memkit_sequence_adapter()."
            )
        unknown = _rope_types(config) - set(ROPE_TYPES)
        if unknown:
            raise MemKitConfigError(
                f"the model's RoPE type {sorted(unknown)} is not one the sequence methods drive ({ROPE_TYPES}). "
                "Fix: train without sequence=, or use a model with one of them."
            )
        for i, layer in enumerate(blocks):
            if not getattr(getattr(layer, layout.attention), "is_causal", True):
                raise MemKitConfigError(
                    f"layer {i} of the model has non-causal attention (is_causal=False); the sequence methods need "
                    "causal attention. Fix: train this model without sequence=."
                )
        for name in layout.dropouts:
            if float(getattr(config, name, 0.0) or 0.0) > 0:
                raise MemKitConfigError(
                    f"{name}={getattr(config, name)} in the model's config: recomputed chunks would draw different "
                    f"dropout masks. Fix: set {name}=0 (the usual value for fine-tuning)."
                )
        self.model = hf
        self.family, self.layout = family, layout
        self._body = body
        self.blocks = list(blocks)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.max_seq_len = int(config.max_position_embeddings)
        self.refuse_longer = False  # Hugging Face models run past max_position_embeddings (context extension)
        # a sliding layer attends to the keys less than `window` positions back: over a sequence no longer than the
        # window that is full causal attention (check_length refuses longer ones)
        self.window = _sliding_window(config)
        # the layer type of each block, when RoPE angles differ by layer type (Gemma 3)
        types = list(getattr(config, "layer_types", None) or ()) if layout.rope_per_layer_type else []
        self._rope_types = sorted(set(types))
        self._rope_group = {id(block): self._rope_types.index(t) for block, t in zip(self.blocks, types)}

    # -- the pieces ------------------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embedding(input_ids)

    @property
    def embedding(self) -> nn.Module:
        return self.family.part(self.model, "embed")

    def rope(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        rotary = self._body.rotary_emb
        if not self._rope_types:
            cos, sin = rotary(like, positions[None, :])  # (1, c, E')
            return cos[:, None], sin[:, None]  # (1, 1, c, E')
        pairs = [rotary(like, positions[None, :], t) for t in self._rope_types]  # one per layer type
        return torch.stack([c[:, None] for c, _ in pairs]), torch.stack([s[:, None] for _, s in pairs])

    def _angles(self, block: nn.Module, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if not self._rope_types:
            return cos, sin
        group = self._rope_group[id(block)]
        return cos[group], sin[group]

    def attn_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        return getattr(block, self.layout.attn_norm)(x)

    def attention(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.layout.attention)

    def _projections(self, block: nn.Module, h: Tensor, queries: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """q (None unless ``queries``), k, v as (B, c, heads, E), before RoPE."""
        attn, b, c = self.attention(block), h.shape[0], h.shape[1]
        nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.layout.fused_qkv:
            qkv = getattr(attn, self.layout.fused_qkv)(h)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
            q = q if queries else None
        else:
            q = attn.q_proj(h) if queries else None
            k, v = attn.k_proj(h), attn.v_proj(h)
        q = None if q is None else q.reshape(b, c, self.n_heads, self.head_dim)
        k, v = k.reshape(b, c, self.n_kv_heads, self.head_dim), v.reshape(b, c, self.n_kv_heads, self.head_dim)
        if self.layout.qk_norm:
            q = None if q is None else attn.q_norm(q)
            k = attn.k_norm(k)
        return q, k, v

    def qkv(self, block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self._projections(block, h, queries=True)
        cos, sin = self._angles(block, cos, sin)
        assert q is not None
        return (_apply_rope(q.transpose(1, 2), cos, sin), _apply_rope(k.transpose(1, 2), cos, sin),
                v.transpose(1, 2))

    def kv(self, block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        _, k, v = self._projections(block, h, queries=False)
        cos, sin = self._angles(block, cos, sin)
        return _apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def attend(self, block: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Any) -> Tensor:
        attn = self.attention(block)
        return chunk_attention(q, k, v, bias, scale=getattr(attn, "scaling", None),
                               softcap=getattr(attn, "attn_logit_softcapping", None))

    def attn_out(self, block: nn.Module, y: Tensor) -> Tensor:
        out = self.attention(block).o_proj(y)
        post = self.layout.post_attn_norm
        return out if post is None else getattr(block, post)(out)

    def mlp_norm(self, block: nn.Module, x: Tensor) -> Tensor:
        return getattr(block, self.layout.mlp_norm)(x)

    def mlp(self, block: nn.Module, h: Tensor) -> Tensor:
        out = block.mlp(h)
        post = self.layout.post_mlp_norm
        return out if post is None else getattr(block, post)(out)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.family.part(self.model, "final_norm")(x)

    @property
    def lm_head(self) -> nn.Linear:
        head = self.family.head(self.model)
        assert head is not None
        return head

    @property
    def logit_softcap(self) -> Optional[float]:
        return self.family.logit_softcap(self.model.config)


def find_adapter(model: nn.Module) -> Optional[SequenceAdapter]:
    """The adapter for ``model`` (built afresh: it is cheap, and caching it would keep the model alive),
    or None if it is none of the kinds memkit drives. Raises for a recognized model with parts the
    methods cannot drive."""
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
    elif type(model).__module__.startswith("transformers.") and is_hf_language_model(model):
        adapter = HFAdapter(model)  # transformers' own classes only: a PEFT wrapper's inner model is found instead
    else:
        return None
    return adapter


def get_adapter(model: nn.Module) -> SequenceAdapter:
    """The adapter for ``model``; raises naming what is missing when there is none."""
    adapter = find_adapter(model)
    if adapter is None:
        raise MemKitConfigError(
            f"the sequence methods cannot drive {type(model).__name__}: it is not the reference Transformer, an "
            "HFCausalLM or a Hugging Face causal LM of a family they drive (docs/models.md), and it has no "
            "memkit_sequence_adapter() "
            "method. Fix: pass one of those to causal_lm_loss(), or define memkit_sequence_adapter() returning a "
            "lightning_memkit.sequence.SequenceAdapter for your model."
        )
    return adapter


# --------------------------------------------------------------------------------------------------
# attention of a chunk of queries against the keys up to its end
# --------------------------------------------------------------------------------------------------


def causal_bias(c: int, e: int, like: Tensor) -> Any:
    """The attention mask of queries at positions ``e-c .. e-1`` against keys ``0 .. e-1``.

    None when ``c == e`` (plain causal). On CUDA a lower-right ``CausalBias`` (nothing materialized: SDPA's
    flash/efficient kernels or memkit's chunked kernel run it); elsewhere, inside
    :func:`~lightning_memkit.sequence.attention.chunked_attention_above` for a chunk above its size, a
    :class:`~lightning_memkit.sequence.attention.LowerRight` marker (memkit's chunked kernel; on fake tensors, the
    planner's step, the marker too: the plan is for a GPU, which builds no mask); otherwise an
    additive (c, e) mask in ``like``'s dtype, made once per chunk and shared by every layer (so a graph through all
    layers saves it once).
    """
    if c == e:
        return None
    if like.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(c, e)
    if prefers_chunked(c, e) or is_symbolic(like):  # a plan is for a GPU, whose kernels take the bias mask-free
        return LowerRight(c, e)
    device = like.device.type
    # the queries' dtype: autocast's when it is on (the projections run under it), else the hidden states'
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
    keep = torch.ones(c, e, dtype=torch.bool, device=like.device).tril(diagonal=e - c)
    return torch.zeros(c, e, dtype=dtype, device=like.device).masked_fill_(~keep, float("-inf"))


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, bias: Any, scale: Optional[float] = None,
                    softcap: Optional[float] = None) -> Tensor:
    """q (B, H, c, E) against k, v (B, K, e, E); grouped-query heads are not repeated in memory.

    ``bias``: what :func:`causal_bias` returned. ``scale``: the score scale (None: 1/sqrt(E)). ``softcap``: scores
    become ``softcap * tanh(scores / softcap)`` before the mask and softmax (Gemma 2's attention logit softcapping),
    with the softmax in fp32, as Hugging Face's eager attention computes them.

    The kernel is :func:`~lightning_memkit.sequence.attention.attention_backend`'s: SDPA (with a lower-right
    ``CausalBias`` on CUDA, where flash/efficient attention runs it without a mask); memkit's
    :func:`~lightning_memkit.sequence.attention.chunked_attention` (no (c, e) mask or scores) for chunks above
    :data:`~lightning_memkit.sequence.attention.CHUNKED_ABOVE` query-key pairs that SDPA would run by
    materializing the scores (its math kernel), softcapped ones included, and for every chunk above the size
    given to :func:`~lightning_memkit.sequence.attention.chunked_attention_above`; other chunks keep SDPA (off
    CUDA with an explicit mask, which PyTorch's blocked CPU kernel reads) or the eager softcapped formula.
    """
    if isinstance(bias, LowerRight) and is_symbolic(q) and softcap is None:
        # a planned step (fake tensors: no values) counts what a GPU runs for a lower-right bias: SDPA's fused
        # kernel, no (c, e) mask, nothing but the output and its softmax statistics kept
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1],
                                              scale=scale)
    # memkit's kernel only ever takes chunks above the threshold: smaller ones (most, in every layer of every
    # chunk) go straight to SDPA without asking SDPA's dispatcher
    if uses_chunked(q.shape[-2], k.shape[-2]) and attention_backend(q, k, v, bias, scale, softcap) == "memkit-chunked":
        return chunked_attention(q, k, v, scale=scale, softcap=softcap)
    if softcap is not None:
        return _softcapped_attention(q, k, v, scale, float(softcap))
    gqa = q.shape[1] != k.shape[1]
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    if type(bias) is Tensor and bias.dtype != q.dtype:  # a model whose projections change dtype (a mask we built)
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa, scale=scale)


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], softcap: float) -> Tensor:
    """The eager softcapped attention (the reference :func:`chunked_attention` is tested against): scores
    (B, H, c, e) ``softcap * tanh(q k^T * scale / softcap)``, lower-right causal mask, softmax in fp32 (fp64 for
    fp64)."""
    b, heads, c, e_dim = q.shape
    kv_heads, e = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.reshape(b, kv_heads, group, c, e_dim)  # query heads grouped by the key/value head they share
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * (e_dim ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    keep = torch.ones(c, e, dtype=torch.bool, device=q.device).tril(diagonal=e - c)
    scores = scores.masked_fill(~keep, float("-inf"))
    # fp32 at least (fp64 stays fp64: a float32 softmax would cost fp64 inputs 7 digits)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(weights, v[:, :, None]).reshape(b, heads, c, v.shape[-1])

"""A Llama-style decoder in one readable file: the reference model of lightning_memkit.

RMSNorm, rotary position embeddings (the "rotate half" layout Hugging Face Llama uses, so its
weights load unchanged), SwiGLU MLP, grouped-query attention through
``torch.nn.functional.scaled_dot_product_attention``, optional tied embeddings, optional q/k/v
biases (Qwen2) and a differentiable KV cache.

Shapes in comments: B batch, T new tokens, P cached tokens, D model width, H query heads,
K key/value heads, E head dim, V vocabulary, F MLP width.

The model exposes what the techniques need: ``blocks`` (``memkit_blocks()``), ``final_norm``,
``lm_head`` and ``embed_tokens``; ``forward_hidden`` returns the normed hidden states so a loss can
be computed from them and the head weight without materializing logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # D, the residual stream width
    n_layers: int
    n_heads: int  # H, query heads
    n_kv_heads: int  # K, key/value heads (K divides H; K < H is grouped-query attention)
    ffn_dim: int  # F, SwiGLU hidden width
    head_dim: Optional[int] = None  # E; None: D // H (Gemma-2 uses E * H != D)
    max_seq_len: int = 2048  # longest sequence the model accepts (RoPE is computed on the fly)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # the LM head shares the embedding matrix (Qwen2.5-1.5B, Gemma)
    attn_bias: bool = False  # biases on q/k/v projections (Qwen2)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{key}={value!r} must be a positive integer.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}. "
                "Fix: choose n_kv_heads among the divisors of n_heads."
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}. Fix: set head_dim explicitly."
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"LlamaConfig head dim {self.resolved_head_dim} must be even for RoPE.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def num_parameters(self) -> int:
        """Exact parameter count of :class:`Transformer` built from this config."""
        e, d = self.resolved_head_dim, self.dim
        attn = d * self.n_heads * e * 2 + d * self.n_kv_heads * e * 2
        if self.attn_bias:
            attn += self.n_heads * e + 2 * self.n_kv_heads * e
        block = attn + 3 * d * self.ffn_dim + 2 * d
        emb = self.vocab_size * d
        return self.n_layers * block + d + emb * (1 if self.tie_embeddings else 2)


#: Named shapes, from tiny (tests) to real models (planning and fake-tensor benchmarks).
#: The real ones copy the published architectures' sizes; "-like" marks a shape that keeps the
#: sizes of a model whose architecture differs in other ways (Gemma-2: GeGLU, softcapping).
NAMED_CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=258, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=512),
    "small": LlamaConfig(vocab_size=258, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, max_seq_len=1024),
    "llama-2-7b": LlamaConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096
    ),
    "llama-2-13b": LlamaConfig(
        vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, max_seq_len=4096
    ),
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=131072,
        rope_theta=500000.0, tie_embeddings=True,
    ),
    "llama-3-8b": LlamaConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=8192,
        rope_theta=500000.0,
    ),
    "qwen2.5-1.5b": LlamaConfig(
        vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_dim=8960, max_seq_len=32768,
        rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, attn_bias=True,
    ),
    "gemma-2-2b-like": LlamaConfig(
        vocab_size=256000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=9216,
        max_seq_len=8192, norm_eps=1e-6, tie_embeddings=True,
    ),
}


def get_config(name: str, **overrides: Any) -> LlamaConfig:
    """The named config, with fields replaced by ``overrides`` (e.g. ``vocab_size``).

    Raises:
        ValueError: unknown name (the allowed names are listed) or unknown override key.
    """
    if name not in NAMED_CONFIGS:
        raise ValueError(f"model={name!r} is not a named model shape. Fix: use one of {sorted(NAMED_CONFIGS)}.")
    fields = asdict(NAMED_CONFIGS[name])
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown LlamaConfig key(s) {unknown}. Fix: use only {sorted(fields)}.")
    return replace(NAMED_CONFIGS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalize in fp32, as Hugging Face Llama does, then scale in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, E) for integer ``positions`` (T,), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, E)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, T, E); cos/sin: (T, E)."""
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys and values of earlier tokens, per layer. Plain tensors, so gradients flow through it.

    Attributes:
        keys, values: per layer, (B, K, P, E) or None before the first update.
    """

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Optional[Tensor]] = [None] * n_layers
        self.values: list[Optional[Tensor]] = [None] * n_layers

    @property
    def seq_len(self) -> int:
        """P: number of tokens already cached (layer 0's count)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def update(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Append this step's k, v (B, K, T, E) at position ``start``; return keys/values (B, K, start+T, E).

        Idempotent for a repeated call with the same ``start`` (activation checkpointing recomputes
        the block in the backward pass): the entry then already ends at ``start + T`` and is kept.
        """
        cached_k, cached_v = self.keys[layer], self.values[layer]
        if cached_k is not None and start > 0:
            k = torch.cat((cached_k[..., :start, :], k), dim=-2)
            v = torch.cat((cached_v[..., :start, :], v), dim=-2)
        if cached_k is None or cached_k.shape[-2] == start:  # first call for these positions: store
            self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        e = cfg.resolved_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, e
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * e, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * e, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * e, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * e, cfg.dim, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, layer: int = 0, kv_cache: Optional[KVCache] = None, past: int = 0
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, past)  # (B, K, P+T, E)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each K/V head serves H/K query heads
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, H, P+T, E)
            v = v.repeat_interleave(rep, dim=1)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i sits at position past+i and sees keys 0..past+i
            keep = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*E)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, layer: int = 0, kv_cache: Optional[KVCache] = None, past: int = 0
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, kv_cache, past)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The Llama-style causal LM. ``forward(input_ids)`` returns logits (B, T, V)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Transformer":
        return cls(get_config(name, **overrides))

    # ----- the interface techniques use ---------------------------------------------------------
    def memkit_blocks(self) -> nn.ModuleList:
        return self.blocks

    @property
    def final_norm(self) -> RMSNorm:
        return self.norm

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):  # residual branches, GPT-2 style
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    def forward_hidden(self, input_ids: Tensor, kv_cache: Optional[KVCache] = None) -> Tensor:
        """Hidden states after the final norm, (B, T, D)."""
        b, t = input_ids.shape
        past = kv_cache.seq_len if kv_cache is not None else 0
        if past + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + t} tokens exceeds the model's max_seq_len={self.config.max_seq_len}. "
                "Fix: shorten the input (data.seq_len) or build the model with a larger max_seq_len."
            )
        x = self.embed_tokens(input_ids)  # (B, T, D)
        positions = torch.arange(past, past + t, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.config.resolved_head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, kv_cache, past)
        return self.norm(x)

    def forward(self, input_ids: Tensor, kv_cache: Optional[KVCache] = None) -> Tensor:
        return self.lm_head(self.forward_hidden(input_ids, kv_cache))  # (B, T, V)

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` continuing ``input_ids`` (B, T) with the KV cache.

        ``temperature=0`` is greedy decoding.
        """
        cache = KVCache(self.config.n_layers)
        logits = self(input_ids, kv_cache=cache)[:, -1]
        out = [input_ids]
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt, kv_cache=cache)[:, -1]
        return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------------
# Hugging Face Llama-family checkpoints -> the reference model
# ---------------------------------------------------------------------------------------------------

_HF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
}


def config_from_hf(hf_config: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face Llama / Qwen2 / Mistral config object."""
    rope_theta = getattr(hf_config, "rope_theta", None)
    if rope_theta is None:  # transformers >= 5 keeps it in rope_parameters
        rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    rope_type = (getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}).get(
        "rope_type", "default"
    )
    if rope_type not in ("default", None):
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported by the reference model; use the HF adapter.")
    window = getattr(hf_config, "sliding_window", None)
    if (window is not None and getattr(hf_config, "use_sliding_window", True)
            and window < hf_config.max_position_embeddings):
        raise ValueError(
            f"the Hugging Face config uses sliding-window attention (sliding_window={window}), which the reference "
            "model does not implement. Fix: use the HF adapter (load_hf_causal_lm / HFCausalLM) for this model."
        )
    n_heads = hf_config.num_attention_heads
    return LlamaConfig(
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        ffn_dim=hf_config.intermediate_size,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope_theta),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attn_bias=bool(getattr(hf_config, "attention_bias", False)) or hf_config.model_type == "qwen2",
    )


def state_dict_from_hf(hf_state: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """Rename a Hugging Face Llama-family state dict to :class:`Transformer`'s names."""
    out: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        if name == "model.embed_tokens.weight":
            out["embed_tokens.weight"] = tensor
        elif name == "model.norm.weight":
            out["norm.weight"] = tensor
        elif name == "lm_head.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            module, _, leaf = rest.rpartition(".")
            if module not in _HF_BLOCK_NAMES:
                raise ValueError(f"unexpected Hugging Face weight {name!r}; the reference model has no place for it.")
            out[f"blocks.{idx}.{_HF_BLOCK_NAMES[module]}.{leaf}"] = tensor
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed on the fly
        else:
            raise ValueError(f"unexpected Hugging Face weight {name!r}; the reference model has no place for it.")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def from_hf(hf_model: nn.Module) -> Transformer:
    """The reference :class:`Transformer` with the weights of a Hugging Face Llama-family causal LM."""
    cfg = config_from_hf(hf_model.config)
    model = Transformer(cfg).to(next(hf_model.parameters()).dtype)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg), strict=True)
    return model

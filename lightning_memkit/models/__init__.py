"""Models: the Llama-style reference decoder, the Hugging Face adapter, and how techniques find blocks."""

from lightning_memkit.models.hf import HFCausalLM, load_hf_causal_lm
from lightning_memkit.models.interface import find_blocks
from lightning_memkit.models.llama import (
    NAMED_CONFIGS,
    KVCache,
    LlamaConfig,
    Transformer,
    config_from_hf,
    from_hf,
    get_config,
    state_dict_from_hf,
)

__all__ = [
    "HFCausalLM",
    "KVCache",
    "LlamaConfig",
    "NAMED_CONFIGS",
    "Transformer",
    "config_from_hf",
    "find_blocks",
    "from_hf",
    "get_config",
    "load_hf_causal_lm",
    "state_dict_from_hf",
]

"""Hugging Face ``transformers`` causal LMs behind the same interface as the reference model.

:class:`HFCausalLM` wraps a ``*ForCausalLM`` of a family in
:data:`~lightning_memkit.models.families.HF_FAMILIES` (or any with the Llama layout) and exposes
``memkit_blocks()``, ``final_norm``, ``lm_head``, ``embed_tokens``, ``max_seq_len``,
``vocab_size``, ``forward(input_ids) -> logits`` and ``forward_hidden(input_ids)``.
transformers is imported only when one of these functions runs.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_memkit._imports import require
from lightning_memkit.models.families import HF_FAMILIES, HFFamily, hf_family

#: The layout a model outside the family table must have: ``model.layers``, ``model.norm``, ``lm_head``.
LLAMA_LAYOUT_FAMILY = HFFamily("llama")


def _family_of(hf_model: nn.Module) -> HFFamily:
    """The family entry for ``hf_model``: its table entry, else the Llama layout when it has it; raises otherwise."""
    family = hf_family(hf_model)
    if family is not None:
        return family
    body = getattr(hf_model, "model", None)
    missing = [attr for attr, ok in (("model.layers", hasattr(body, "layers")), ("model.norm", hasattr(body, "norm")),
                                     ("lm_head", isinstance(getattr(hf_model, "lm_head", None), nn.Linear))) if not ok]
    if missing:
        kind = getattr(getattr(hf_model, "config", None), "model_type", type(hf_model).__name__)
        raise ValueError(
            f"{type(hf_model).__name__} ({kind!r}) lacks {missing}: it is neither a family of memkit's table "
            f"({sorted(HF_FAMILIES)}) nor a decoder-only causal LM with the Llama layout. Fix: use a *ForCausalLM of "
            "one of those families, or add the family to lightning_memkit.models.families.HF_FAMILIES."
        )
    return LLAMA_LAYOUT_FAMILY


class HFCausalLM(nn.Module):
    """A Hugging Face decoder-only causal LM with the reference model's interface.

    The model's parts are found through its family's entry in
    :data:`~lightning_memkit.models.families.HF_FAMILIES` (GPT-2's ``transformer.h``, GPT-NeoX's ``embed_out``, ...);
    a model outside the table is taken when it has the Llama layout.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self._family = _family_of(hf_model)

    @property
    def _body(self) -> nn.Module:
        return getattr(self.hf, self._family.body)

    def memkit_blocks(self) -> nn.ModuleList:
        return self._family.part(self.hf, "blocks")

    @property
    def final_norm(self) -> nn.Module:
        return self._family.part(self.hf, "final_norm")

    @property
    def lm_head(self) -> nn.Linear:
        head = self._family.head(self.hf)
        assert head is not None
        return head

    @property
    def logit_softcap(self) -> Optional[float]:
        """The final-logit softcap c the model's own forward applies (Gemma 2: ``c * tanh(logits / c)``), or None;
        the fused loss (:func:`~lightning_memkit.loss.causal_lm_loss`) applies it too."""
        return self._family.logit_softcap(self.hf.config)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._family.part(self.hf, "embed")

    @property
    def max_seq_len(self) -> int:
        return int(self.hf.config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def forward_hidden(self, input_ids: Tensor) -> Tensor:
        """Hidden states after the final norm, (B, T, D)."""
        return self._body(input_ids=input_ids, use_cache=False).last_hidden_state

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def load_hf_causal_lm(path: str, *, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> HFCausalLM:
    """Load a Hugging Face causal LM from a local folder (no download) and wrap it.

    Args:
        path: a folder with ``config.json`` and weights, as written by ``save_pretrained``.
        dtype: parameter dtype; default: as stored.
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        FileNotFoundError: ``path`` is not a folder with a ``config.json``.
        ValueError: the config is not a causal LM, or not of the Llama layout.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"hf_path={path!r} is not a folder with a config.json. Fix: point hf_path at a local folder written by "
            "save_pretrained() (memkit never downloads models)."
        )
    transformers = require("transformers", feature="loading a Hugging Face model")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"hf_path={path!r} holds a {config.model_type!r} model, which is not a causal LM. "
            f"Fix: point hf_path at a decoder-only causal LM (tested: {sorted(HF_FAMILIES)})."
        )
    with torch.device("meta"):  # check the layout before reading any weights
        HFCausalLM(transformers.AutoModelForCausalLM.from_config(config))
    if dtype is not None:
        kwargs["dtype"] = dtype
    from lightning_memkit.config import is_planning

    if is_planning():  # memkit plan builds on the meta device: shapes only, no weights read
        return HFCausalLM(
            transformers.AutoModelForCausalLM.from_config(config, dtype=dtype or torch.get_default_dtype())
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    return HFCausalLM(model)

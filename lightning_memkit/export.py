"""Export a memkit checkpoint of a Hugging Face model as a folder ``from_pretrained`` loads.

A :class:`~lightning_memkit.module.CausalLMModule` trained with ``hf_path`` saves Lightning checkpoints: one file
(DDP, with or without the optimizer step in backward) or, under ZeRO-1/2/3, a folder of shards.
:func:`export_checkpoint` turns either into a Hugging Face folder:

- ``config.json`` and ``model.safetensors`` (``save_pretrained(safe_serialization=True)``), so that
  ``AutoModelForCausalLM.from_pretrained(folder)`` returns the trained model;
- ``generation_config.json`` when the model has one (the ``hf_path`` folder's, if it holds one);
- the tokenizer files when the ``hf_path`` folder holds a tokenizer (none: skipped quietly);
- for a PEFT (LoRA) model: the adapters merged into the weights (default), or the adapter files alone
  (``merge_lora=False``), which ``PeftModel.from_pretrained(base, folder)`` loads over the ``hf_path`` model.

The model is rebuilt without the original weights: the architecture comes from the config in ``hf_path``
(``AutoModelForCausalLM.from_config``), the weights from the checkpoint. A PEFT model is rebuilt from the PEFT
configuration the checkpoint records under :data:`PEFT_CHECKPOINT_KEY` (see :func:`peft_checkpoint_entry`).

From the command line: ``memkit export --ckpt PATH --to FOLDER [--dtype bf16|fp16|fp32] [--adapter-only]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import shutil
import sys
import tempfile
import uuid
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_memkit._imports import require
from lightning_memkit.checkpoint_io import AtomicCheckpointIO, unreadable_checkpoint
from lightning_memkit.config import MemKitConfigError

#: checkpoint key holding the PEFT configuration of a PEFT-wrapped model: ``{adapter_name: PeftConfig.to_dict()}``
PEFT_CHECKPOINT_KEY = "peft_config"
#: prefix of the Hugging Face model's weights in a CausalLMModule's ``state_dict`` (``module.model.hf``)
HF_PREFIX = "model.hf."
#: ``--dtype`` names
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: files that, in a model folder, belong to a tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")
_REFERENCE_REFUSAL = (
    "only CausalLMModule(hf_path=...) models export to Hugging Face format; the reference model has no "
    "Hugging Face architecture. Fix: load the reference model with CausalLMModule.load_from_checkpoint(path) "
    "(a ZeRO checkpoint folder: lightning_memkit.zero.export_consolidated(folder, file) first), or train with "
    "model.hf_path=<a Hugging Face model folder>."
)


def _peft_model_class() -> Optional[type]:
    peft = sys.modules.get("peft")  # a PEFT model exists only once peft is imported: no import (slow) otherwise
    return getattr(peft, "PeftModel", None)


def _is_peft(model: nn.Module) -> bool:
    cls = _peft_model_class()
    return cls is not None and isinstance(model, cls)


def peft_checkpoint_entry(model: nn.Module) -> Optional[dict[str, dict[str, Any]]]:
    """The PEFT configuration of ``model`` as plain values, for a checkpoint; None if it is not a PEFT model.

    ``CausalLMModule`` stores it under :data:`PEFT_CHECKPOINT_KEY` so that :func:`export_checkpoint` can rebuild the
    PEFT model around the Hugging Face model.

    Args:
        model: the module's Hugging Face model (``module.model.hf``), PEFT-wrapped or not.
    """
    if not _is_peft(model):
        return None
    # plain JSON values (enums as their strings, sets as lists): the checkpoint loads with weights_only=True
    return {name: json.loads(json.dumps(config.to_dict(), default=sorted))
            for name, config in model.peft_config.items()}


def _check_hf_module(module: nn.Module, where: str) -> nn.Module:
    """The Hugging Face model of a live CausalLMModule (``module.model.hf``), or the reference-model refusal."""
    hf = getattr(getattr(module, "model", None), "hf", None)
    if getattr(module.hparams, "hf_path", None) is None or hf is None:
        model = getattr(module.hparams, "model", None)
        raise MemKitConfigError(f"{where}: model.hf_path=None (the reference model {model!r}): {_REFERENCE_REFUSAL}")
    return hf


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:  # memkit's checkpoint reader: CRC-checked, weights_only
        return AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError) as error:
        raise MemKitConfigError(unreadable_checkpoint(path, error).replace("ckpt_path=", "ckpt=", 1)) from error
    except pickle.UnpicklingError as error:  # never unpickle arbitrary objects behind the user's back
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MemKitConfigError(
            f"ckpt={path!r} holds objects that torch.load(weights_only=True) refuses ({first}), e.g. hyperparameters "
            "of a custom type. Fix: if you trust the file, allow those types with "
            "torch.serialization.add_safe_globals([...]) before exporting, or save plain values as hyperparameters."
        ) from error


def _read_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """A single-file checkpoint as is; a ZeRO folder consolidated (fp32) through a temporary file."""
    if os.path.isdir(ckpt_path):
        if not os.path.isdir(os.path.join(ckpt_path, "checkpoint")):
            raise MemKitConfigError(
                f"ckpt={ckpt_path!r} is a folder but not a sharded ZeRO checkpoint (no 'checkpoint/' in it). Fix: pass "
                "a checkpoint file, or the folder Lightning's ModelCheckpoint wrote under zero_stage >= 1."
            )
        from lightning_memkit.zero.checkpoint import export_consolidated

        with tempfile.TemporaryDirectory(prefix="memkit-export-") as tmp:
            consolidated = os.path.join(tmp, "consolidated.ckpt")
            export_consolidated(ckpt_path, consolidated)
            return _load_checkpoint(consolidated)
    if not os.path.isfile(ckpt_path):
        raise MemKitConfigError(f"ckpt={ckpt_path!r} does not exist. Fix: pass a checkpoint file (.ckpt) or a ZeRO "
                                "checkpoint folder that ModelCheckpoint wrote.")
    return _load_checkpoint(ckpt_path)


def _parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise MemKitConfigError(f"dtype={dtype!r} is not an export dtype. Fix: use one of {sorted(DTYPES)} "
                            "(or torch.bfloat16 / torch.float16 / torch.float32), or None to keep the checkpoint's.")


def _stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype most of the weights' elements have."""
    counts: collections.Counter = collections.Counter()
    for value in state.values():
        if value.is_floating_point():
            counts[value.dtype] += value.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _hf_state(checkpoint: dict[str, Any], ckpt_path: str) -> dict[str, torch.Tensor]:
    if "state_dict" not in checkpoint:
        raise MemKitConfigError(f"ckpt={ckpt_path!r} has no 'state_dict': it is not a Lightning checkpoint. Fix: "
                                "pass a checkpoint that ModelCheckpoint or Trainer.save_checkpoint wrote.")
    state = {k[len(HF_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(HF_PREFIX)}
    if not state:
        raise MemKitConfigError(
            f"ckpt={ckpt_path!r} holds no weights under {HF_PREFIX!r} (the Hugging Face model of a CausalLMModule with "
            f"hf_path). Fix: export a checkpoint of CausalLMModule(hf_path=...); {_REFERENCE_REFUSAL}"
        )
    return state


def _build_model(hf_path: str, state: dict[str, torch.Tensor], peft_entry: Optional[dict], ckpt_path: str) -> nn.Module:
    """The Hugging Face model (PEFT-wrapped when the checkpoint's was) from ``hf_path``'s config and ``state``."""
    transformers = require("transformers", feature="exporting to Hugging Face format")
    if not os.path.isfile(os.path.join(hf_path, "config.json")):
        raise MemKitConfigError(
            f"model.hf_path={hf_path!r} (from the checkpoint's hyperparameters) is not a folder with a config.json, "
            "which gives the architecture. Fix: make that folder available again, or pass hf_path=<a folder with the "
            "same config.json> (memkit export --hf-path FOLDER)."
        )
    config = transformers.AutoConfig.from_pretrained(hf_path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # weights come from `state`
    if os.path.isfile(os.path.join(hf_path, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(hf_path, local_files_only=True)
    wrapped = any(k.startswith("base_model.model.") for k in state)
    if wrapped:
        if not peft_entry:
            raise MemKitConfigError(
                f"ckpt={ckpt_path!r} holds PEFT (LoRA) weights but no PEFT configuration under "
                f"{PEFT_CHECKPOINT_KEY!r}, so the adapters cannot be rebuilt. Fix: save checkpoints with a "
                "CausalLMModule that records it (lightning_memkit.export.peft_checkpoint_entry), or use "
                "module.save_pretrained(folder) on the live module."
            )
        peft = require("peft", feature="exporting a PEFT (LoRA) checkpoint")
        names = list(peft_entry)
        first = peft.get_peft_config(dict(peft_entry[names[0]]))
        model = peft.get_peft_model(model, first, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, peft.get_peft_config(dict(peft_entry[name])))
    # fp32 copies of the stored weights: exact for every dtype; cast to the export dtype afterwards
    missing, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise MemKitConfigError(
            f"ckpt={ckpt_path!r} does not match the architecture of model.hf_path={hf_path!r}: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Fix: pass the hf_path folder the checkpoint was trained from."
        )
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    """``key`` is a weight tied to another (e.g. ``lm_head.weight`` with tied embeddings), absent from some states."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return any(key == t or key.endswith("." + t) for t in tied)


def _tokenizer(hf_path: str) -> Optional[Any]:
    if not any(os.path.isfile(os.path.join(hf_path, f)) for f in _TOKENIZER_FILES):
        return None
    transformers = require("transformers", feature="exporting to Hugging Face format")
    return transformers.AutoTokenizer.from_pretrained(hf_path, local_files_only=True)


def _save(model: nn.Module, tokenizer: Optional[Any], to: str) -> None:
    """Write ``model`` (a PEFT model: its adapters alone) and ``tokenizer`` into the folder ``to``."""
    model.save_pretrained(to, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(to)


def _check_target(to: str) -> None:
    if os.path.exists(to) and (not os.path.isdir(to) or os.listdir(to)):
        raise MemKitConfigError(
            f"to={to!r} exists and is not an empty folder; exporting into it could mix files of two models (e.g. "
            "stale adapter files that from_pretrained would pick up). Fix: choose a new folder, or delete it first."
        )


def _publish(to: str, write) -> None:
    """Run ``write(folder)`` into a fresh folder beside ``to`` and give it the name ``to`` when complete."""
    _check_target(to)
    parent = os.path.dirname(os.path.abspath(to))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(to))}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(staging)
        if os.path.isdir(to):
            os.rmdir(to)  # empty (checked above)
        os.replace(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_checkpoint(ckpt_path: Union[str, os.PathLike], to: Union[str, os.PathLike], *,
                      dtype: Union[None, str, torch.dtype] = None, merge_lora: bool = True,
                      hf_path: Optional[str] = None) -> str:
    """Write a memkit checkpoint of a ``CausalLMModule(hf_path=...)`` as a Hugging Face model folder.

    Args:
        ckpt_path: a single-file Lightning checkpoint (DDP backend) or a sharded ZeRO-1/2/3 checkpoint folder
            (consolidated to fp32 first, through a temporary file).
        to: the folder to write; it must not exist or be empty. It appears only when complete.
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype; None keeps the dtype of the checkpoint's weights
            (fp32 for a ZeRO folder, which consolidates to fp32).
        merge_lora: for a PEFT model: True merges the adapters into the weights (a plain model folder);
            False writes the adapter files alone (``adapter_config.json``, ``adapter_model.safetensors``).
        hf_path: the folder whose ``config.json`` (and tokenizer) to use; default: the checkpoint's
            ``hf_path`` hyperparameter. Only its config and tokenizer are read, never its weights.

    Returns:
        The folder written, ``str(to)``.

    Raises:
        MemKitConfigError: the checkpoint is of the reference model (no ``hf_path``), is not a memkit checkpoint,
            does not match ``hf_path``'s architecture, or ``to`` is not new; ``merge_lora=False`` for a model without
            adapters; an unknown ``dtype``.
    """
    ckpt_path, to = os.fspath(ckpt_path), os.fspath(to)
    target_dtype = _parse_dtype(dtype)
    _check_target(to)  # before the (long) reading and rebuilding
    checkpoint = _read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if hf_path is None:
        if "hf_path" not in hparams:
            raise MemKitConfigError(
                f"ckpt={ckpt_path!r} records no 'hf_path' hyperparameter: it is not a checkpoint of CausalLMModule. "
                "Fix: pass hf_path=<the Hugging Face model folder it was trained from> (memkit export --hf-path)."
            )
        hf_path = hparams["hf_path"]
        if hf_path is None:
            raise MemKitConfigError(f"ckpt={ckpt_path!r} has model.hf_path=None (the reference model "
                                    f"{hparams.get('model')!r}): {_REFERENCE_REFUSAL}")
    state = _hf_state(checkpoint, ckpt_path)
    stored = _stored_dtype(state)
    model = _build_model(hf_path, state, checkpoint.get(PEFT_CHECKPOINT_KEY), ckpt_path)
    del checkpoint, state
    if not merge_lora and not _is_peft(model):
        raise MemKitConfigError(f"merge_lora=False (--adapter-only): ckpt={ckpt_path!r} holds no PEFT adapters. "
                                "Fix: export the whole model (merge_lora=True, no --adapter-only).")
    if _is_peft(model):
        for config in model.peft_config.values():
            config.base_model_name_or_path = os.path.abspath(hf_path)  # what PeftModel.from_pretrained loads under
        if merge_lora:
            model = model.merge_and_unload()  # in fp32, then cast
    model = model.to(target_dtype or stored)
    tokenizer = _tokenizer(hf_path)
    _publish(to, lambda folder: _save(model, tokenizer, folder))
    return to


def save_module(module: nn.Module, folder: Union[str, os.PathLike], **kwargs: Any) -> None:
    """``CausalLMModule.save_pretrained``: the live module's Hugging Face model and its ``hf_path`` tokenizer.

    Args:
        module: a ``CausalLMModule`` built with ``hf_path``.
        folder: where to write (``save_pretrained`` writes into it, creating it if needed).
        kwargs: passed to the model's ``save_pretrained`` (e.g. ``safe_serialization``, ``max_shard_size``); for a
            PEFT model the adapters are written alone (``PeftModel.save_pretrained``), unless ``merge_lora=True``
            is passed, which saves a merged copy and leaves the live module unchanged.

    Raises:
        MemKitConfigError: the module holds the reference model (no ``hf_path``).
    """
    hf = _check_hf_module(module, "save_pretrained")
    if any(hasattr(p, "ds_id") for p in hf.parameters()):
        raise MemKitConfigError(
            "save_pretrained: the module's parameters are partitioned by ZeRO-3 (each process holds a slice). Fix: "
            "save a checkpoint and export it: lightning_memkit.export.export_checkpoint(ckpt, folder) "
            "(memkit export --ckpt PATH --to FOLDER)."
        )
    merge_lora = bool(kwargs.pop("merge_lora", False))
    if _is_peft(hf) and merge_lora:
        import copy

        hf = copy.deepcopy(hf).merge_and_unload()
    hf.save_pretrained(os.fspath(folder), **kwargs)
    tokenizer = _tokenizer(module.hparams.hf_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(folder))


class _Parser(argparse.ArgumentParser):
    """Argument errors raise :class:`MemKitConfigError` (the ``memkit`` command prints those briefly)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise MemKitConfigError(f"memkit export: {message}. Fix: memkit export --ckpt PATH --to FOLDER "
                                "[--dtype bf16|fp16|fp32] [--adapter-only] [--hf-path FOLDER].")


def main(argv: list[str]) -> int:
    """``memkit export --ckpt PATH --to FOLDER [--dtype bf16|fp16|fp32] [--adapter-only] [--hf-path FOLDER]``.

    Returns:
        0 when the folder was written.

    Raises:
        MemKitConfigError: a bad argument or a checkpoint that cannot be exported (see :func:`export_checkpoint`).
    """
    parser = _Parser(
        prog="memkit export",
        description="Write a memkit checkpoint of CausalLMModule(hf_path=...) (a file, or a ZeRO checkpoint folder) "
                    "as a Hugging Face folder that AutoModelForCausalLM.from_pretrained loads.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file, or sharded ZeRO checkpoint folder")
    parser.add_argument("--to", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype (default: the checkpoint's; fp32 for ZeRO folders)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="PEFT models: write the adapter files alone instead of merging them into the weights")
    parser.add_argument("--hf-path", default=None,
                        help="folder with the config.json (and tokenizer) to use instead of the checkpoint's hf_path")
    try:
        opts = parser.parse_args(argv)
    except SystemExit as done:  # --help printed
        return int(done.code or 0)
    folder = export_checkpoint(opts.ckpt, opts.to, dtype=opts.dtype, merge_lora=not opts.adapter_only,
                               hf_path=opts.hf_path)
    print(f"exported {opts.ckpt} to {folder}")
    return 0

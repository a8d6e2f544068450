"""Sharded ZeRO checkpoints: published as a folder once every rank has written, and consolidated into one file."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Optional, Union

import torch

from lightning_memkit.checkpoint_io import fsync_folder
from lightning_memkit.config import MemKitConfigError

#: suffixes of a sharded checkpoint's folder while it is written, and of the one it replaces
PARTIAL_SUFFIX, OLD_SUFFIX = ".partial", ".old"


def publish_folder(staging: str, target: str) -> None:
    """Give the fully written folder ``staging`` the name ``target``, replacing an earlier checkpoint there.

    Every file is fsynced first, so a crash after the rename cannot expose unwritten data. Two renames
    (target -> target.old, staging -> target) cannot be one atomic step for folders: a kill between them
    leaves the previous checkpoint whole as ``target.old`` (``load_checkpoint`` names it).
    """
    for root, _, names in os.walk(staging):
        for name in names:
            with open(os.path.join(root, name), "rb+") as f:
                os.fsync(f.fileno())
    old = target + OLD_SUFFIX
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.isdir(target):
        os.replace(target, old)
    elif os.path.exists(target):
        os.remove(target)
    os.replace(staging, target)
    fsync_folder(os.path.dirname(target))
    if os.path.exists(old):
        shutil.rmtree(old)


def export_consolidated(checkpoint_dir: Union[str, os.PathLike], output_file: Union[str, os.PathLike],
                        dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """Write the full weights of a sharded ZeRO checkpoint (a folder Lightning saved) into one file.

    The file is a Lightning checkpoint without optimizer states: ``state_dict`` holds every
    parameter whole (fp32, or ``dtype`` for inference), next to the module's hyperparameters, so
    ``YourModule.load_from_checkpoint(output_file)`` and ``torch.load(output_file, weights_only=True)``
    both read it, without DeepSpeed.

    Args:
        checkpoint_dir: the checkpoint "file" Lightning wrote under ZeRO (a folder).
        output_file: where to write the single file.
        dtype: cast floating-point weights to this dtype (e.g. ``torch.bfloat16``); None keeps fp32.

    Returns:
        The checkpoint dictionary written.

    Raises:
        MemKitConfigError: ``checkpoint_dir`` is not a DeepSpeed checkpoint folder.
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    if not os.path.isdir(os.path.join(checkpoint_dir, "checkpoint")):
        raise MemKitConfigError(
            f"export_consolidated: {str(checkpoint_dir)!r} is not a sharded ZeRO checkpoint (a folder holding "
            "'checkpoint/'). Fix: pass the path Lightning's ModelCheckpoint wrote under zero_stage >= 1."
        )
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # DeepSpeed prints progress
        checkpoint = convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file)
    if dtype is not None:
        checkpoint["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                                    for k, v in checkpoint["state_dict"].items()}
        torch.save(checkpoint, output_file)
    return checkpoint

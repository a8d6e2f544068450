"""Fake-tensor helpers the planner's step runs on: the weights' dtype for a precision, fake parameters, a batch.

No recipe loading here (that is :mod:`lightning_memkit.planner.load`): the auto mode of ``MemKitStrategy`` uses
these on the module it is given.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from lightning_memkit.config import MemKitConfigError

#: trainer.precision -> the dtype the weights are built in ("true" precisions; mixed ones keep fp32 weights)
WEIGHT_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def weight_dtype(precision: Any, zero_stage: int = 0) -> Optional[torch.dtype]:
    """The dtype of the weights during training: "true" precisions build in it; DeepSpeed (ZeRO) casts the
    weights to 16 bits under mixed precision as well. Lightning's old names ("bf16", "16") are mixed."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    p = str(_convert_precision_to_unified_args(precision)) if precision is not None else "32-true"
    if p in WEIGHT_DTYPES:
        return WEIGHT_DTYPES[p]
    if zero_stage and p in ("bf16-mixed", "16-mixed"):
        return torch.bfloat16 if p.startswith("bf16") else torch.float16
    return None


def swap_to_fake(module: nn.Module, fake_mode: Any, device: Any, dtype: Optional[torch.dtype] = None,
                 only_meta: bool = False, saved: Optional[list] = None) -> list[tuple[dict, str, torch.Tensor]]:
    """Replace ``module``'s parameters and buffers (``only_meta``: those on the meta device) by fake tensors of
    the same shape on ``device`` (the Trainer's: on a CUDA trainer autocast and the optimizers' fused paths act
    as they will in training), floating ones in ``dtype`` when given. Tied tensors stay tied.

    Returns:
        ``saved`` (a new list if None), with ``(store, name, old tensor)`` appended for each replacement as it
        is made (so a failure part-way can still be undone).
    """
    memo: dict[int, torch.Tensor] = {}
    saved = [] if saved is None else saved
    for m in module.modules():
        for store, is_param in ((m._parameters, True), (m._buffers, False)):
            for name, t in list(store.items()):
                if t is None or (only_meta and t.device.type != "meta"):
                    continue
                if id(t) not in memo:
                    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    with fake_mode:
                        new = torch.empty(t.shape, dtype=target, device=device)
                    memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                saved.append((store, name, t))
                store[name] = memo[id(t)]
    return saved


def make_batch(module: Any, datamodule: Any, fake_mode: Any, dataloader: Any = None, device: Any = None,
               synthetic: bool = True) -> Any:
    """A batch of the training shape.

    ``TextDataModule`` (or any datamodule with ``seq_len`` and ``batch_size``, with a module whose
    ``model`` has a ``vocab_size``): random token ids of that shape, made directly (fake when
    ``fake_mode`` is given). Another datamodule: its ``memkit_example_batch()`` if it defines one, else
    the first batch of ``dataloader`` (or of its ``train_dataloader()``), converted to fake tensors.
    ``synthetic=False``: always the data's own first batch (``memkit verify``).
    """
    from torch.utils._pytree import tree_map

    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))

    def to_fake(batch: Any) -> Any:
        if fake_mode is None:
            return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
        with fake_mode:
            return tree_map(lambda t: fake_mode.from_tensor(t).to(device) if isinstance(t, torch.Tensor) else t, batch)

    if synthetic and datamodule is not None and hasattr(datamodule, "memkit_example_batch"):
        return to_fake(datamodule.memkit_example_batch())
    vocab = getattr(getattr(module, "model", None), "vocab_size", None)
    T, B = getattr(datamodule, "seq_len", None), getattr(datamodule, "batch_size", None)
    if synthetic and vocab is not None and T is not None and B is not None:
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            ids = torch.randint(0, int(vocab), (int(B), int(T) + 1), device=device)
            return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    if dataloader is None:
        if datamodule is None:
            raise MemKitConfigError("there is no datamodule to take a batch from: the planner needs one. Fix: add "
                "data: (a "
                                    "LightningDataModule), or give the datamodule a memkit_example_batch() method.")
        datamodule.prepare_data()
        datamodule.setup("fit")
        dataloader = datamodule.train_dataloader()
    return to_fake(next(iter(dataloader)))

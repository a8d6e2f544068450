"""Checks that a loaded optimizer state belongs to the optimizer it was loaded into.

torch's ``Optimizer.load_state_dict`` takes any state with the right number of parameters: an
APOLLO-Mini state loaded into ``torch.optim.AdamW`` fails only in the next step, with a broadcast
error deep in ``adam.py``. memkit's own optimizers check what they load themselves
(:meth:`~lightning_memkit.optim.base.MemKitOptimizer.load_state_dict`); this module checks torch's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_memkit.optim.base import MemKitOptimizer

#: per-parameter state entries of torch's optimizers that have the parameter's shape
_PARAMETER_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum",
                     "exp_inf", "ax", "prev")


def check_torch_optimizer_state(optimizer: Any, saved: Any = None) -> None:
    """Raise if a torch optimizer holds state that another optimizer wrote.

    Args:
        optimizer: the optimizer after ``load_state_dict`` (memkit optimizers and wrappers around them
            are skipped: they check what they load).
        saved: the state dict that was loaded, if at hand: one written by a memkit optimizer (it names
            itself under ``"memkit"``) is refused for a torch optimizer.

    Raises:
        ValueError: a state entry whose shape differs from its parameter's, or a memkit optimizer's state.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's and memkit's wrappers
    if isinstance(inner, MemKitOptimizer) or not isinstance(inner, torch.optim.Optimizer):
        return
    if isinstance(saved, dict) and isinstance(saved.get("memkit"), dict):
        raise ValueError(f"this optimizer state was written by memkit's {saved['memkit'].get('optimizer')}, and is "
                         f"loaded into torch's {type(inner).__name__}.")
    for p, state in inner.state.items():
        for key in _PARAMETER_SHAPED:
            value = state.get(key) if isinstance(state, dict) else None
            if isinstance(value, Tensor) and isinstance(p, Tensor) and value.shape != p.shape:
                raise ValueError(f"the saved {key!r} of a parameter of shape {tuple(p.shape)} has shape "
                                 f"{tuple(value.shape)}: {type(inner).__name__} did not write this state.")

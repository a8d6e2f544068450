"""``MemKitStrategy(memory_budget=...)``: choose the techniques at setup, on a fake copy of the weights.

The module's parameters and buffers are swapped for fake tensors of the dtype they will train in
(nothing is allocated), the candidates of :func:`~lightning_memkit.planner.plans.candidates` are
measured cheapest first with the module's own ``training_step`` and ``configure_optimizers``, and
the real tensors are put back. Every process uses the smallest budget of all, so all make the same choice.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from lightning_memkit.config import MemKitConfigError
from lightning_memkit.planner.search import Row, Setting, check_weights_fit, choose, parse_budget
from lightning_memkit.planner.step import STAND_IN_NOTE


def _fake_tensors_left(module: nn.Module) -> list[str]:
    """Names of FakeTensors still reachable from ``module`` (parameters, buffers, tensor attributes)."""
    from torch._subclasses.fake_tensor import FakeTensor

    left = []
    for name, m in module.named_modules():
        for key, value in list(m._parameters.items()) + list(m._buffers.items()) + list(vars(m).items()):
            if isinstance(value, FakeTensor):
                left.append(f"{name + '.' if name else ''}{key}")
    return left


_SCALARS = (int, float, complex, bool, str, type(None))
_CONTAINERS = (list, dict, set)


def _plain_values(m: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``m``'s public attributes that hold plain values (numbers, strings, lists, dicts, sets): (object, copy)."""
    return {k: (v, copy.copy(v)) for k, v in vars(m).items()
            if not k.startswith("_") and type(v) in _SCALARS + _CONTAINERS}


def _restore_plain_values(m: nn.Module, before: dict[str, tuple[Any, Any]]) -> None:
    """Undo what the planned steps did to ``m``'s plain attributes: each gets its old object back, containers
    with their old contents (in place: other references see it too), and new plain attributes are removed."""
    for k, v in list(vars(m).items()):
        if not k.startswith("_") and type(v) in _SCALARS + _CONTAINERS and k not in before:
            del m.__dict__[k]
    for k, (obj, contents) in before.items():
        if isinstance(obj, list):
            obj[:] = contents
        elif isinstance(obj, (dict, set)):
            obj.clear()
            obj.update(contents)
        m.__dict__[k] = obj


@contextlib.contextmanager
def fake_weights(module: nn.Module, fake_mode: Any, dtype: Optional[torch.dtype], device: Any) -> Iterator[None]:
    """Swap ``module``'s parameters and buffers for fake ones on ``device`` (floating ones in ``dtype``), then
    back. Tensor attributes the step assigns are restored too, and so are plain ones (numbers, strings, lists,
    dicts, sets: a ``self.losses.append(loss.item())`` in training_step records the planner's stand-in value
    otherwise); a fake tensor left anywhere is an error."""
    from lightning_memkit.planner.fake import swap_to_fake

    attributes = {id(m): {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)} for m in module.modules()}
    names = {id(m): (set(m._parameters), set(m._buffers)) for m in module.modules()}
    values = {id(m): _plain_values(m) for m in module.modules()}
    saved: list[tuple[dict, str, Any]] = []
    try:
        swap_to_fake(module, fake_mode, device, dtype, saved=saved)
        yield
    finally:
        for m in module.modules():  # what training_step recorded (self.losses.append(loss.item()): a stand-in)
            _restore_plain_values(m, values.get(id(m), {}))
        for store, name, t in saved:
            store[name] = t
        for m in module.modules():  # what the planned steps assigned or registered
            params, buffers = names.get(id(m), (set(), set()))
            for name in set(m._parameters) - params:
                del m._parameters[name]
            for name in set(m._buffers) - buffers:
                del m._buffers[name]
            for key, value in attributes.get(id(m), {}).items():
                m.__dict__[key] = value
    left = _fake_tensors_left(module)
    if left:
        raise MemKitConfigError(
            f"memory_budget: the planned steps left fake tensors in the module ({left[:5]}): training_step or forward "
            "creates tensor state the planner cannot restore. Fix: create that state in __init__ or setup(), or set "
            "the techniques yourself (memkit plan tells which fit) and drop memory_budget."
        )


def _budget(strategy: Any, value: Any, device: torch.device) -> tuple[int, str]:
    """The budget in bytes, the same on every process (the smallest of all), and how it was set."""
    limit = parse_budget("memory_budget", value, device)
    how = "given"
    if value == "auto":
        limit, how = int(limit * 0.9), "90% of the CUDA device's free memory"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([limit], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        limit, how = int(t.item()), how + ", the smallest over the processes"
    return limit, how


def choose_for_module(module: Any, trainer: Any, budget: Any, *, base: Setting, free: Iterable[str],
                      allow_approximate: bool) -> tuple[Row, list[Row], int, str]:
    """The cheapest candidate that fits ``budget`` for ``module`` under ``trainer``.

    Returns:
        (the chosen row, every row measured, the budget in bytes, how the budget was set).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.planner.fake import make_batch, weight_dtype
    from lightning_memkit.planner.step import StepRunner

    device = trainer.strategy.root_device
    limit, how = _budget(trainer.strategy, budget, device)
    if any(hasattr(p, "ds_shape") for p in module.parameters()):
        raise MemKitConfigError(
            "memory_budget: the parameters are already partitioned by ZeRO-3 (built in configure_model under "
            "DeepSpeed), so their full shapes are not visible at setup. Fix: build the model in __init__, or choose "
            "the techniques with memkit plan and drop memory_budget."
        )
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    dtype = weight_dtype(trainer.precision, base.zero_stage)
    dm = trainer.datamodule
    synthetic = dm is not None and (hasattr(dm, "memkit_example_batch") or (
        getattr(dm, "seq_len", None) is not None and getattr(dm, "batch_size", None) is not None))
    # Lightning's own data source (the datamodule's or trainer.fit's train_dataloaders), without running
    # prepare_data / setup again
    loader = None if synthetic else trainer.fit_loop._data_source.dataloader()
    batch = make_batch(module, dm, fake_mode, loader, device=device)
    world = int(trainer.world_size or 1)
    seq_len = int(batch["input_ids"].shape[-1]) if isinstance(batch, dict) and "input_ids" in batch else 2048
    with fake_weights(module, fake_mode, dtype, device):
        if base.zero_stage < 3:
            check_weights_fit("memory_budget", limit, module)
        runner = StepRunner(module, trainer, batch)
        with fake_mode:
            row, rows = choose(runner, base, limit, free=free, allow_approximate=allow_approximate, world_size=world,
                               seq_len=seq_len)
    notes = [n for r in rows if r.result is not None for n in r.result.notes]
    caveat = next((n for n in notes if n.startswith(STAND_IN_NOTE)), None)
    if caveat is not None:  # once, not once per candidate
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"memkit memory_budget: {caveat}.")
    if row.candidate.note:  # e.g. SGD-SaI's learning rate, ZO-SGD's convergence: before the first step
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"memkit memory_budget chose '{row.candidate.name}': {row.candidate.note}.")
    return row, rows, limit, how

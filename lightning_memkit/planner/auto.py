"""``MemKitStrategy(memory_budget=...)``: choose the techniques at setup, on a fake copy of the weights.

The module's parameters and buffers are swapped for fake tensors of the dtype they will train in
(nothing is allocated), the candidates of :func:`~lightning_memkit.planner.plans.candidates` are
measured cheapest first with the module's own ``training_step`` and ``configure_optimizers``, and
the real tensors are put back. Every process uses the smallest budget of all, so all make the same choice.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from lightning_memkit.config import MemKitConfigError
from lightning_memkit.planner.plans import Row, Setting, check_weights_fit, choose, parse_budget


def _fake_tensors_left(module: nn.Module) -> list[str]:
    """Names of FakeTensors still reachable from ``module`` (parameters, buffers, tensor attributes)."""
    from torch._subclasses.fake_tensor import FakeTensor

    left = []
    for name, m in module.named_modules():
        for key, value in list(m._parameters.items()) + list(m._buffers.items()) + list(vars(m).items()):
            if isinstance(value, FakeTensor):
                left.append(f"{name + '.' if name else ''}{key}")
    return left


@contextlib.contextmanager
def fake_weights(module: nn.Module, fake_mode: Any, dtype: Optional[torch.dtype], device: Any) -> Iterator[None]:
    """Swap ``module``'s parameters and buffers for fake ones on ``device`` (floating ones in ``dtype``), then
    back. Tensor attributes the step assigns are restored too; a fake tensor left anywhere is an error."""
    from lightning_memkit.planner.load import swap_to_fake

    attributes = {id(m): {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)} for m in module.modules()}
    names = {id(m): (set(m._parameters), set(m._buffers)) for m in module.modules()}
    saved: list[tuple[dict, str, Any]] = []
    try:
        swap_to_fake(module, fake_mode, device, dtype, saved=saved)
        yield
    finally:
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
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = torch.tensor([limit], dtype=torch.int64, device=device if torch.distributed.get_backend() == "nccl" else "cpu")
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

    from lightning_memkit.planner.load import make_batch, weight_dtype
    from lightning_memkit.planner.step import StepRunner

    device = trainer.strategy.root_device
    limit, how = _budget(trainer.strategy, budget, device)
    if any(hasattr(p, "ds_shape") for p in module.parameters()):
        raise MemKitConfigError(
            "memory_budget: the parameters are already partitioned by ZeRO-3 (built in configure_model under "
            "DeepSpeed), so their full shapes are not visible at setup. Fix: build the model in __init__, or choose the "
            "techniques with memkit plan and drop memory_budget."
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
    return row, rows, limit, how

"""``MemKitStrategy(memory_budget=...)``: choose the techniques at setup, on a fake copy of the weights.

The module's parameters and buffers are swapped for fake tensors of the dtype they will train in
(nothing is allocated), the candidates of :func:`~lightning_memkit.planner.plan.candidates` are
measured cheapest first with the module's own ``training_step`` and ``configure_optimizers``, and
the real tensors are put back. Every process computes the same choice.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from lightning_memkit.planner.plan import Row, Setting, check_weights_fit, choose, parse_budget


@contextlib.contextmanager
def fake_weights(module: nn.Module, fake_mode: Any, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Swap ``module``'s parameters and buffers for fake ones (floating ones in ``dtype``), then back."""
    saved: list[tuple[dict, str, Any]] = []
    memo: dict[int, Any] = {}
    for m in module.modules():
        for store, is_param in ((m._parameters, True), (m._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in memo:
                    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    with fake_mode:
                        new = torch.empty(t.shape, dtype=target, device=t.device)
                    memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                saved.append((store, name, t))
                store[name] = memo[id(t)]
    try:
        yield
    finally:
        for store, name, t in saved:
            store[name] = t


def choose_for_module(module: Any, trainer: Any, budget: Any, *, base: Setting, free: Iterable[str],
                      allow_approximate: bool, dataloader: Any = None) -> tuple[Row, list[Row], int]:
    """The cheapest candidate that fits ``budget`` for ``module`` under ``trainer``.

    Returns:
        (the chosen row, every row measured, the budget in bytes).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.planner.load import make_batch, weight_dtype
    from lightning_memkit.planner.step import StepRunner

    device = trainer.strategy.root_device
    limit = parse_budget("memory_budget", budget, device)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    dtype = weight_dtype(trainer.precision, base.zero_stage)
    batch = make_batch(module, trainer.datamodule, fake_mode, dataloader)
    world = int(trainer.world_size or 1)
    seq_len = int(batch["input_ids"].shape[-1]) if isinstance(batch, dict) and "input_ids" in batch else 2048
    with fake_weights(module, fake_mode, dtype):
        if base.offload_parameters is None:
            check_weights_fit("memory_budget", limit, module)
        runner = StepRunner(module, trainer, batch)
        with fake_mode:
            row, rows = choose(runner, base, limit, free=free, allow_approximate=allow_approximate, world_size=world,
                               seq_len=seq_len)
    return row, rows, limit

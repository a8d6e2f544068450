"""A tiny regression model, its batches and loss, shared by the optimizers' unit tests."""

from __future__ import annotations

import torch

from lightning_memkit.optim import StepInBackward


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def loss_of(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def assert_step_in_backward_is_exact(make, steps: int = 3) -> None:
    """``make(params)`` builds the optimizer: stepped after backward, and from the gradient hooks
    (``StepInBackward``), it gives the same parameters bit for bit."""
    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = make(a.parameters()), StepInBackward(make(b.parameters()))
    for batch in make_batches(steps):
        opt_a.zero_grad()
        loss_of(a, batch).backward()
        opt_a.step()
        opt_b.step(lambda: loss_of(b, batch).backward())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def mixed_dtype_model() -> torch.nn.Module:
    """Two fp32 layers and a bf16 one: per-parameter dtypes for state and step-in-backward checks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model[2].to(torch.bfloat16)
    return model


def mixed_dtype_loss(model: torch.nn.Module, i: int) -> torch.Tensor:
    """The loss of :func:`mixed_dtype_model` on batch ``i`` (seeded)."""
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(100 + i))
    return model[2](model[1](model[0](x)).to(torch.bfloat16)).float().square().mean()

"""A LightningModule whose model cannot be built on the meta/fake device (for the planner's error test)."""

import lightning.pytorch as pl
import torch
from torch import nn


class Calibrated(nn.Module):
    """Reads a weight's value in ``__init__`` (``float()`` of a meta tensor has no value)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.scale = float(self.weight.abs().max())


class UnbuildableModule(pl.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), Calibrated())

    def training_step(self, batch, batch_idx):  # pragma: no cover - never reached
        return self.net(batch).sum()

    def configure_optimizers(self):  # pragma: no cover
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LazyModule(pl.LightningModule):
    """Builds its layers in configure_model (as for FSDP/ZeRO-3 users); planned with a batch from the datamodule."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(self.width, self.width), nn.ReLU(), nn.Linear(self.width, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


class VectorData(pl.LightningDataModule):
    def __init__(self, width: int = 64, batch_size: int = 32) -> None:
        super().__init__()
        self.width, self.batch_size = width, batch_size

    def memkit_example_batch(self):
        return torch.randn(self.batch_size, self.width)

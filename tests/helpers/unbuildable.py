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

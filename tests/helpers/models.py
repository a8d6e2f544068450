"""Small models and LightningModules shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class PlainBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class UserModule(pl.LightningModule):
    """An ordinary user LightningModule: no memkit interface, blocks in a plain ModuleList."""

    def __init__(self, d: int = 16, n_blocks: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.layers = nn.ModuleList(PlainBlock(d) for _ in range(n_blocks))
        self.out = nn.Linear(d, 1)
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, scale=0.5)
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g)
        return DataLoader(TensorDataset(x, x.sum(-1, keepdim=True)), batch_size=8, shuffle=True)


class NoBlocksModule(UserModule):
    """A LightningModule with nothing that looks like transformer blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()

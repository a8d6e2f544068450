"""LightningModules for the planner's tests: one that reads tensor values in its step, and a small
language model without a ``max_seq_len`` argument (its length comes from the data alone)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class ReadingModule(pl.LightningModule):
    """A vector regression whose ``training_step`` reads the loss's value in every ordinary way
    (``reads=True``): ``.item()``, ``.tolist()``, ``bool``, ``float``, ``int``, ``print`` and an f-string.
    With ``reads=False`` it runs the same tensor operations without reading anything."""

    def __init__(self, width: int = 64, reads: bool = True) -> None:
        super().__init__()
        self.reads = reads
        self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
        self.history: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).square().mean()
        scale = 1
        if self.reads:
            self.history.append(loss.item())
            first = loss.detach().reshape(1).tolist()[0]
            if not torch.isfinite(loss):  # bool(tensor)
                raise FloatingPointError(f"loss {float(loss)}")
            scale = int(loss.detach() > -1)  # 1
            print(f"step {batch_idx}: loss {loss.detach():.4f} ({first:.2f})", loss.detach())
        return loss * scale

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class _TinyLM(nn.Module):
    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size  # the planner reads it to make token batches of the data's shape
        self.embed = nn.Embedding(vocab_size, width)
        self.mix = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (B, T, d)
        h = h + self.mix(h)
        return self.lm_head(h)  # (B, T, vocab)


class SmallLM(pl.LightningModule):
    """A user's own language model: no ``max_seq_len`` argument, any length the data gives."""

    def __init__(self, vocab_size: int = 258, width: int = 32) -> None:
        super().__init__()
        self.model = _TinyLM(vocab_size, width)

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class VectorLoaderData(pl.LightningDataModule):
    """Random vectors of ``width`` from a DataLoader (``memkit verify`` takes its first batch)."""

    def __init__(self, width: int = 64, batch_size: int = 16) -> None:
        super().__init__()
        self.width, self.batch_size = width, batch_size

    def train_dataloader(self):
        data = torch.randn(4 * self.batch_size, self.width, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

"""Fit ``CausalLMModule(hf_path=...)`` for 2 steps under ``MemKitStrategy(**--strategy)`` on ``--devices`` CPU
processes (default 1) with ``--precision`` (default ``32-true``), save a checkpoint with ModelCheckpoint into
``--workdir`` (``step=2.ckpt``: a file, or under ZeRO a folder), and save, from rank 0, the trained module's logits on
the batch ``tests/test_export.py`` uses (``torch.save`` to ``--out``). Used by tests/test_export.py for ZeRO, which runs
DeepSpeed in a process of its own."""

import argparse
import contextlib
import json

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_memkit
from lightning_memkit.module import CausalLMModule


def batch(vocab: int = 258) -> torch.Tensor:
    """(4, 16) token ids: the batch whose logits the test compares."""
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(7))


def loader(vocab: int = 258) -> DataLoader:
    ids = torch.randint(0, vocab, (4, 17), generator=torch.Generator().manual_seed(1))
    return DataLoader([{"input_ids": row[:-1], "labels": row[1:]} for row in ids], batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-path", required=True)
    parser.add_argument("--strategy", required=True, help="JSON MemKitStrategy kwargs")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    pl.seed_everything(0)
    module = CausalLMModule(hf_path=args.hf_path, learning_rate=1e-2, warmup_steps=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, precision=args.precision,
        strategy=lightning_memkit.MemKitStrategy(**json.loads(args.strategy)), max_steps=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.workdir,
        callbacks=[ModelCheckpoint(dirpath=args.workdir, every_n_train_steps=2, filename="{step}")],
    )
    trainer.fit(module, train_dataloaders=loader())
    # ZeRO-1/2: every rank holds the whole (same) parameters; ZeRO-3: the whole parameters, gathered from the partitions
    gathered = contextlib.nullcontext()
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gathered, torch.no_grad():
        module.eval()
        logits = module.model.hf(input_ids=batch(), use_cache=False).logits.float().clone()
    if trainer.global_rank != 0:
        return
    torch.save({"logits": logits, "strategy": type(trainer.strategy).__name__,
                "backend": trainer.strategy.describe_backend()}, args.out)


if __name__ == "__main__":
    main()

"""Fit the tiny reference model for two SGD steps with strategy="memkit_checkpoint" on N CPU processes
(with ``--sequence``: plus a sequence-chunked backprop method).

The data is 4 sequences and the global batch is 4 (all 4 on one process, or 2 on each of two), so
every step sees the same sequences whatever order Lightning's DistributedSampler shuffles them into
(it always shuffles training data). Rank 0 saves the final weights. Used by tests/test_strategy.py
(Lightning's launcher re-runs this script per rank).
"""

import argparse
import json

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import lightning_memkit
from lightning_memkit.activations import is_checkpointed
from lightning_memkit.module import CausalLMModule


class SGDModule(CausalLMModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Probe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.wrapped = isinstance(trainer.strategy.model, DistributedDataParallel)
        self.checkpointed = sum(is_checkpointed(b) for b in pl_module.model.blocks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sequence", default=None, help="a MemKitStrategy sequence= setting, as JSON")
    args = parser.parse_args()
    pl.seed_everything(0)
    module = SGDModule(model="tiny")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 258, (4, 33), generator=g)
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    loader = DataLoader(data, batch_size=4 // args.devices, shuffle=False)
    probe = Probe()
    strategy = "memkit_checkpoint"
    if args.sequence is not None:
        strategy = lightning_memkit.MemKitStrategy(activations="checkpoint", sequence=json.loads(args.sequence))
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )
    trainer.fit(module, train_dataloaders=loader)
    if trainer.is_global_zero:
        torch.save(
            {
                "world_size": trainer.world_size,
                "wrapped_in_ddp": probe.wrapped,
                "checkpointed_blocks": probe.checkpointed,
                "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
            },
            args.out,
        )


if __name__ == "__main__":
    main()

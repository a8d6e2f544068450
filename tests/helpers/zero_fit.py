"""Fit the tiny reference model under several MemKitStrategy settings, one after another, in this
process group (N CPU processes, gloo), and save what each run saw. Used by tests/test_zero.py.

``--runs`` is a JSON list of runs: ``{"name", "strategy": MemKitStrategy kwargs, "steps",
"optimizer": "adamw" | "sgd", "save_every": k (optional), "resume": name of an earlier run (optional),
"resume_step": k, "export": true, "precision", "measure": true, "hf": true (a tiny Hugging Face Llama
instead of the reference model; "labels": and the step calls it with labels=), "sequences": n (default 4),
"trainer": more Trainer arguments, "validate": true (validate on the training data after every epoch)
(optional), "expect_error": true (the fit must fail: its message is saved; such runs come last, as a
failed fit may leave the process group unusable)}``. The data is 4 sequences and the global batch is 4
(4 on one process, 2 on each of two): every step sees all 4 sequences whatever order Lightning's
DistributedSampler shuffles them into, so runs on 1 and 2 processes are comparable, and every
epoch is one step (resuming from an end-of-epoch checkpoint of a longer epoch is off by one batch in
Lightning 2.6).

Rank 0 writes ``--out`` (``torch.save``), per run: the global-batch loss of each step (the mean of
the ranks' losses), the strategy class, how many losses the fused cross-entropy computed and what the
other techniques did (:class:`Evidence`), the initial and the final weights (gathered from ZeRO-3's
partitions), the optimizer class DeepSpeed steps, and with ``measure`` the bytes DeepSpeed keeps per
process (:class:`Partitions`).
A run with ``save_every`` saves checkpoints (mid-epoch) under ``<workdir>/<name>/``.
"""

import argparse
import contextlib
import json
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_memkit
from lightning_memkit.module import CausalLMModule


class Module(CausalLMModule):
    def __init__(self, optimizer: str = "adamw", hf_labels: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.optimizer_name = optimizer
        self.hf_labels = hf_labels

    def training_step(self, batch, batch_idx):
        if self.hf_labels:  # a user's step that calls the Hugging Face model with labels= (memkit patches its forward)
            return self.model.hf(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.5)
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


class Partitions(pl.Callback):
    """Counts, after training, the bytes of what DeepSpeed keeps on this process: the 16-bit parameters (their
    partitions under ZeRO-3), and the fp32 master partitions plus the optimizer's state tensors."""

    numbers: dict = {}

    def on_train_end(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        optimizer = strategy.deepspeed_engine.optimizer
        params = list(pl_module.parameters())
        if strategy.zero_stage_3:
            held = [p.ds_tensor for p in params]
            master = optimizer.fp32_partitioned_groups_flat
        else:
            held = params
            master = optimizer.single_partition_of_fp32_groups
        states = [v for state in optimizer.optimizer.state.values() for v in state.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0]
        self.numbers = {
            "n_params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "parameters": sum(t.numel() * t.element_size() for t in held),
            "parameter_dtype": str(held[0].dtype),
            "optimizer": sum(t.numel() * t.element_size() for t in [*master, *states]),
        }


class Evidence(pl.Callback):
    """What the techniques did: checkpointed modules, bytes through the saved-tensor hooks, sequence-loss calls."""

    def __init__(self) -> None:
        self.numbers = {"checkpointed": 0, "packed_bytes": 0, "sequence_calls": 0}

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning_memkit.activations import is_checkpointed

        self.numbers["checkpointed"] = sum(is_checkpointed(m) for m in pl_module.modules())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for technique in trainer.strategy.techniques:
            manager = getattr(technique, "manager", None)
            if manager is not None:
                self.numbers["packed_bytes"] = max(self.numbers["packed_bytes"], manager.original_bytes)
            runtime = getattr(technique, "_runtime", None)
            if runtime is not None:
                self.numbers["sequence_calls"] = runtime.calls


def full_state(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    gathered = contextlib.nullcontext()
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gathered:
        return {k: v.detach().clone().float() for k, v in module.state_dict().items()}


def fit(run: dict, devices: int, workdir: str) -> dict:
    pl.seed_everything(0)
    module = Module(optimizer=run.get("optimizer", "adamw"), hf_labels=run.get("hf") == "labels", model="tiny")
    if run.get("hf"):  # a tiny Hugging Face Llama (untied head) in place of the reference model, the same on every rank
        import transformers

        from lightning_memkit.models.hf import HFCausalLM

        config = transformers.LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        pl.seed_everything(0)
        module.model = HFCausalLM(transformers.LlamaForCausalLM(config))
    initial = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 258, (run.get("sequences", 4), 33), generator=g)
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    loader = DataLoader(data, batch_size=4 // devices, shuffle=False)
    recorder, evidence = Recorder(), Evidence()
    callbacks: list[pl.Callback] = [recorder, evidence]
    folder = os.path.join(workdir, run["name"])
    if run.get("save_every"):
        callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=run["save_every"], save_top_k=-1,
                                         filename="{step}"))
    partitions = Partitions()
    if run.get("measure"):
        callbacks.append(partitions)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, precision=run.get("precision", "32-true"),
        strategy=lightning_memkit.MemKitStrategy(**run["strategy"]),
        max_steps=run["steps"], logger=False, enable_checkpointing=bool(run.get("save_every")),
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=folder,
        **run.get("trainer", {}),
    )
    from lightning_memkit.loss.causal_lm import fused_call_count

    fused_before = fused_call_count()
    ckpt_path = None
    if run.get("resume"):
        ckpt_path = os.path.join(workdir, run["resume"], f"step={run['resume_step']}.ckpt")
    val = DataLoader(data, batch_size=4 // devices) if run.get("validate") else None
    if run.get("expect_error"):  # a resume memkit must refuse: the message, and how many steps ran before it
        try:
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=val, ckpt_path=ckpt_path)
        except Exception as error:  # noqa: BLE001 - reported to the test, which checks the type and text
            return {"error": f"{type(error).__name__}: {error}", "losses": recorder.losses}
        return {"error": None, "losses": recorder.losses}
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val, ckpt_path=ckpt_path)
    out = {"losses": recorder.losses, "strategy": type(trainer.strategy).__name__,
           "initial": initial, "state": full_state(trainer, module), "val_history": list(module.val_history),
           "world_size": trainer.world_size, "partitions": partitions.numbers,
           "fused_calls": fused_call_count() - fused_before, **evidence.numbers,
           "optimizer_class": type(getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])).__name__}
    if run.get("export"):  # the last checkpoint, consolidated into one file
        trainer.save_checkpoint(os.path.join(folder, "last.ckpt"))
        if trainer.is_global_zero:
            from lightning_memkit.zero import export_consolidated

            export_consolidated(os.path.join(folder, "last.ckpt"), os.path.join(folder, "export.ckpt"))
        trainer.strategy.barrier()
    return out


def main(run_fit=None) -> None:
    """Parse the arguments and fit each run with ``run_fit(run, devices, workdir)`` (default: :func:`fit`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--runs", required=True, help="JSON list of runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    workdir = os.path.dirname(os.path.abspath(args.out))
    results = {}
    for run in json.loads(args.runs):
        results[run["name"]] = (run_fit or fit)(run, args.devices, workdir)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()

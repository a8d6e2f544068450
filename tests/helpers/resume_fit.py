"""Fit the tiny reference model on real text (TextDataModule) with MemKitStrategy, one run after another in
this process (group), for tests/test_resume.py.

``--runs`` is a JSON list of runs: ``{"name", "strategy": MemKitStrategy kwargs, "steps": max_steps,
"data": TextDataModule kwargs (besides paths), "corpus": a folder (default: the stdlib's email package),
"save": {"every_n_train_steps": k} or {"every_n_epochs": k} (ModelCheckpoint arguments; save_last is on),
"kill_at": k (SIGKILL this process -- every rank kills itself -- at the end of step k), "resume": true (fit
with ckpt_path="last"), "checkpoint_io": "torch" (Lightning's
TorchCheckpointIO; default: MemKitStrategy's own, AtomicCheckpointIO), "trainer": more Trainer
arguments}``. Checkpoints go to ``<workdir>/<name>/``; each rank
writes ``<workdir>/<name>.rank<r>.pt``
(``torch.save``) when its fit ends: per step (``trainer.global_step`` after it) the loss, the batch's
``input_ids`` and the epoch, and the final weights (gathered from ZeRO-3's partitions).

``--write IO PATH MB MARKER`` instead writes two checkpoints and pauses in the second (:func:`write_and_pause`).

The LightningModule is ``CausalLMModule(model="tiny")`` with AdamW (lr 1e-2, weight decay) and a per-step
LR schedule, so a resume must restore the weights, the optimizer state, the scheduler, the step counters
and the data position for the steps after it to be bit-identical.
"""

import argparse
import faulthandler
import json
import os
import signal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

import lightning_memkit
from lightning_memkit.checkpoint_io import AtomicCheckpointIO
from lightning_memkit.data import TextDataModule, stdlib_dir
from lightning_memkit.module import CausalLMModule
from tests.helpers.zero_fit import full_state

#: seconds after which a fit process dumps its threads' stacks and exits (a chain of fits takes under 60 here)
HANG_SECONDS = 240


class Module(CausalLMModule):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(pl.Callback):
    """Per step: the loss (mean over the ranks), this rank's batch and the epoch."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")
        self.steps[trainer.global_step] = {"loss": float(loss), "input_ids": batch["input_ids"].clone(),
                                           "epoch": trainer.current_epoch, "batch_idx": batch_idx}


class Killer(pl.Callback):
    """SIGKILL this process at the end of step ``at``: no cleanup, no checkpoint, as a preempted job."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(run: dict, devices: int, workdir: str) -> None:
    pl.seed_everything(0)
    module = Module(model="tiny")
    data = TextDataModule(paths=run.get("corpus", os.path.join(stdlib_dir(), "email")),
                          **{"seq_len": 32, "batch_size": 4, **run.get("data", {})})
    folder = os.path.join(workdir, run["name"])
    recorder = Recorder()
    callbacks: list[pl.Callback] = [recorder]
    if run.get("kill_at"):
        callbacks.append(Killer(run["kill_at"]))
    callbacks.append(ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=-1, **run.get("save", {})))
    strategy_kwargs = dict(run.get("strategy", {}))
    if run.get("checkpoint_io") == "torch":  # the default is MemKitStrategy's own (AtomicCheckpointIO)
        strategy_kwargs["checkpoint_io"] = TorchCheckpointIO()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=lightning_memkit.MemKitStrategy(**strategy_kwargs),
        max_steps=run["steps"], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, default_root_dir=folder,
        **run.get("trainer", {}),
    )
    trainer.fit(module, datamodule=data, ckpt_path="last" if run.get("resume") else None)
    out = {"steps": recorder.steps, "state": full_state(trainer, module), "world_size": trainer.world_size,
           "global_step": trainer.global_step}
    torch.save(out, os.path.join(workdir, f"{run['name']}.rank{trainer.global_rank}.pt"))


def checkpoint(step: int, megabytes: int) -> dict:
    """A checkpoint-like dict whose content follows from ``step``: a tensor of ``megabytes`` MB and the step."""
    return {"global_step": step, "weights": torch.arange(megabytes * 2**18, dtype=torch.float32) + step}


def write_and_pause(io_name: str, path: str, megabytes: int, marker: str) -> None:
    r"""Save ``checkpoint(1, 1)`` at ``path``, then ``checkpoint(2, megabytes)`` over it, paused for good once
    half of its bytes are in a file of the checkpoint's folder, after creating ``marker``: the test SIGKILLs
    this process there. The pause stands in for a slow disk at the same stage of both writers: for
    AtomicCheckpointIO the file is its temporary file (``torch.save`` streams into it); for Lightning's
    TorchCheckpointIO, which serializes to memory, writes a file in $TMPDIR and ``shutil.move``\ s it onto
    the target, it is the target itself when $TMPDIR is on another filesystem (the move copies,
    ``shutil.copyfile``); on the same filesystem the move is a rename and it never pauses."""
    import io as io_module
    import shutil
    import time

    io = AtomicCheckpointIO() if io_name == "atomic" else TorchCheckpointIO()
    io.save_checkpoint(checkpoint(1, 1), path)

    def pause() -> None:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)

    real_save = torch.save

    def half_then_pause(obj, f, *args, **kwargs):
        if isinstance(f, io_module.BytesIO):  # serializing to memory
            return real_save(obj, f, *args, **kwargs)
        buffer = io_module.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        pause()
        f.write(data[len(data) // 2 :])

    def copy_half_then_pause(src, dst, *, follow_symlinks=True):
        with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
            data = fsrc.read()
            fdst.write(data[: len(data) // 2])
            fdst.flush()
            pause()
            fdst.write(data[len(data) // 2 :])
        return dst

    torch.save = half_then_pause
    shutil.copyfile = copy_half_then_pause
    io.save_checkpoint(checkpoint(2, megabytes), path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--runs", help="JSON list of runs")
    parser.add_argument("--workdir")
    parser.add_argument("--write", nargs=4, metavar=("IO", "PATH", "MB", "MARKER"),
                        help="instead of fitting: write_and_pause(IO ('atomic' or 'torch'), PATH, MB, MARKER)")
    args = parser.parse_args()
    if args.write:
        io_name, path, megabytes, marker = args.write
        write_and_pause(io_name, path, int(megabytes), marker)
        return
    # a hang (a collective or a DataLoader worker that never answers) ends this process with every thread's stack
    # on stderr, which the test shows, instead of running into the test's timeout
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    for run in json.loads(args.runs):
        fit(run, args.devices, args.workdir)


if __name__ == "__main__":
    main()

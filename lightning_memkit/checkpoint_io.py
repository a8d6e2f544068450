"""Checkpoint files written whole or not at all.

Lightning 2.6's ``TorchCheckpointIO`` serializes the checkpoint into memory and writes it through an fsspec
transaction: to a file from ``tempfile.mkstemp()`` (in ``$TMPDIR``), then ``shutil.move`` onto the target. When
``$TMPDIR`` lies on another filesystem than the checkpoint (a tmpfs ``/tmp``, a network or scratch disk for
checkpoints) that move is a copy onto the target, so a process killed during it leaves a truncated checkpoint
where the previous one was; a kill before it leaves a checkpoint-sized orphan in ``$TMPDIR``; and nothing is
fsynced. :class:`AtomicCheckpointIO` writes next to the target instead.
"""

from __future__ import annotations

import glob
import os
import uuid
import zipfile
from typing import Any, Callable, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

#: the temporary file of a write to ``<folder>/<name>``: ``<folder>/.<name>.<random>.tmp``
TEMP_PATTERN = ".{name}.{tag}.tmp"


def temp_files(path: str) -> list[str]:
    """The temporary files that writes of ``path`` (a local path) left behind, sorted."""
    folder, name = os.path.split(os.path.abspath(path))
    return sorted(glob.glob(os.path.join(glob.escape(folder), TEMP_PATTERN.format(name=glob.escape(name), tag="*"))))


def _zero_counts(progress: dict) -> None:
    """Set a progress record's counters (``ready``, ``started``, ...) to 0, as Lightning's ``reset()`` does."""
    for key in progress:
        if isinstance(progress[key], int) and not isinstance(progress[key], bool):
            progress[key] = 0


def complete_epoch_end(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint written at the end of an epoch resume at the next epoch's first batch.

    A checkpoint saved in ``on_train_epoch_end`` (``ModelCheckpoint(every_n_epochs=...)``, or any save
    between Lightning counting the epoch processed and counting it completed) records the epoch as
    processed but not completed and its batch counters at the epoch's end. Lightning 2.6 resumes such a
    checkpoint by running one more batch as the last of the finished epoch and then starting the next
    epoch over (its issues #18060, #19815): one batch too many, and with a resumable loader the next
    epoch's order shifted. This completes the epoch in the recorded loop state as Lightning's loops do
    at every epoch boundary -- the epoch counted completed, the per-epoch batch, scheduler-step and
    optimizer-step counters and the validation batch count set back to 0 -- so the resumed run starts the
    next epoch as the uninterrupted run did.

    Not restored either way (Lightning saves the checkpoint before they happen): the ``"epoch"``-interval
    LR-scheduler step and what logging does at the epoch's end.

    Args:
        checkpoint: a Lightning checkpoint; changed in place.

    Returns:
        True when the checkpoint was an end-of-epoch one and was changed.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop") if isinstance(checkpoint.get("loops"), dict) else None
    if not isinstance(fit, dict) or "epoch_progress" not in fit or "epoch_loop.batch_progress" not in fit:
        return False
    epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
    total = epochs["total"]
    processed_not_completed = (total["started"] == total["ready"] and total["processed"] == total["started"]
                               and total["completed"] == total["processed"] - 1)
    if not (processed_not_completed and batches.get("is_last_batch")
            and batches["current"]["completed"] == batches["current"]["processed"]):
        return False
    total["completed"] += 1
    epochs["current"]["completed"] = epochs["current"]["processed"]
    _zero_counts(batches["current"])
    batches["is_last_batch"] = False
    if "epoch_loop.scheduler_progress" in fit:
        _zero_counts(fit["epoch_loop.scheduler_progress"]["current"])
    for tracker in fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).values():
        _zero_counts(tracker["current"])
    if "epoch_loop.val_loop.batch_progress" in fit:
        _zero_counts(fit["epoch_loop.val_loop.batch_progress"]["total"])
    return True


def verify_checksums(path: _PATH) -> None:
    """Check every record of a local ``torch.save`` zip archive against its CRC-32; other files are left alone.

    Raises:
        RuntimeError: a record's bytes do not match its checksum (the file is corrupt).
    """
    fs = get_filesystem(path)
    if not isinstance(fs, LocalFileSystem):
        return
    local = fs._strip_protocol(str(path))
    if not os.path.isfile(local) or not zipfile.is_zipfile(local):  # missing, truncated or legacy: torch.load says
        return
    try:
        with zipfile.ZipFile(local) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        bad = f"({type(error).__name__}: {error})"
    if bad is not None:
        raise RuntimeError(
            f"Checkpoint {local} is corrupt: its record {bad} does not match the CRC-32 checksum written with it "
            f"({os.path.getsize(local)} bytes). Fix: resume from an earlier checkpoint."
        )


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder and needs nothing)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that replaces a local checkpoint file in one step, durably.

    ``save_checkpoint`` streams ``torch.save`` into a new temporary file in the target's own folder
    (``.<name>.<random>.tmp``, created with the permissions a plain write would get), flushes and fsyncs it,
    ``os.replace``\\ s it onto the target and fsyncs the folder. The target therefore always holds a
    whole checkpoint, the previous one or the new one: a process killed (or a machine that loses power)
    during the write leaves the previous file intact and no partial file at the target, only the
    temporary file, which the next successful write of the same target removes. The checkpoint is not
    held a second time in memory as Lightning's in-memory buffer holds it.

    Local paths and ``file://`` URLs get this treatment. Other fsspec URLs (``s3://``, ``gs://``, ...) are
    written by the parent ``TorchCheckpointIO`` unchanged: object stores publish an object only once its
    upload completes, which is their own form of atomicity. Removing is the parent's.

    ``load_checkpoint`` (which Lightning calls to resume ``fit``) first checks a local checkpoint's records against
    the CRC-32 checksums its zip archive holds (``torch.save`` writes them; ``torch.load`` does not check them, so
    a checkpoint with damaged bytes in a tensor loads without complaint and resumes from wrong weights); this
    reads the file once more (0.08 s for 256 MB in the page cache, on a 2-core CPU machine). ``MemKitStrategy``
    applies :func:`complete_epoch_end` to what it loads to resume ``fit``, so an end-of-epoch checkpoint resumes
    at the next epoch's first batch.

    Args:
        verify: check the CRC-32 checksums when loading (default True).

    Use it with ``Trainer(plugins=[AtomicCheckpointIO()])`` or a strategy's ``checkpoint_io=``.
    """

    def __init__(self, verify: bool = True) -> None:
        super().__init__()
        self.verify = verify

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Verify, then load as ``TorchCheckpointIO`` does (see the class docstring).

        Raises:
            RuntimeError: a record of the checkpoint does not match its checksum.
        """
        if self.verify:
            verify_checksums(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class docstring).

        Args:
            checkpoint: the state Lightning collected.
            path: the target file: a local path or any fsspec URL.
            storage_options: not supported, as in ``TorchCheckpointIO``.

        Raises:
            TypeError: ``storage_options`` was given.
        """
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for"
                f" `{type(self).__name__}`. Fix: drop storage_options, or implement your own CheckpointIO."
            )
        fs = get_filesystem(path)
        if not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = os.path.abspath(fs._strip_protocol(str(path)))
        folder, name = os.path.split(target)
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, TEMP_PATTERN.format(name=name, tag=uuid.uuid4().hex[:12]))
        # O_EXCL: a fresh file; mode 0o666 less the umask, as open(target, "wb") would create it
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            if os.path.exists(temp):
                os.remove(temp)
            raise
        fsync_folder(folder)
        for stale in temp_files(target):  # left by writes of this target that were killed
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass


def unreadable_checkpoint(path: str, error: BaseException) -> str:
    """The message for a checkpoint file ``torch.load`` (or :func:`verify_checksums`) could not read."""
    size = os.path.getsize(path) if os.path.isfile(path) else None
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    first = first.split(" Fix:")[0].split(". ")[0].rstrip(".")  # torch's own advice runs on for lines
    if size == 0:
        what = "it is an empty file"
    elif isinstance(error, EOFError):
        what = f"it ends early ({size} bytes)"
    else:
        what = f"{type(error).__name__}: {first}"
    return (f"ckpt_path={path!r} cannot be read: {what}. A checkpoint is truncated or damaged by a copy cut short, a "
            "full disk or a save killed mid-write (memkit's own writes are atomic). Fix: resume from an earlier "
            "checkpoint (ModelCheckpoint(save_top_k=...) keeps several).")

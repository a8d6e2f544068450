"""A text DataModule: files -> tokens -> packed fixed-length sequences, with a deterministic split.

Documents are .txt files, .py files, or the lines of .jsonl files (a JSON object per line, text
under ``text_key``). Each document is tokenized, followed by the tokenizer's eos token, and all are
concatenated and cut into windows of ``seq_len + 1`` tokens (input = window[:-1], target =
window[1:]). A document goes to validation when a hash of its path (and line number, for .jsonl)
falls under ``val_fraction``: the split depends on nothing but the data, not on file order, worker
count or seed.

With no ``paths``, the corpus is the Python standard library's own source files: real text present
on every machine that runs Python.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_memkit.config import MemKitConfigError
from lightning_memkit.data.tokenizers import Tokenizer, load_tokenizer

TEXT_SUFFIXES = (".txt", ".py", ".jsonl", ".md")


def stdlib_dir() -> str:
    """The folder of the running Python's standard library sources."""
    return sysconfig.get_paths()["stdlib"]


def list_files(paths: list[str]) -> list[str]:
    """Text files under ``paths`` (files, or folders searched recursively), sorted, de-duplicated.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no text files were found.
    """
    files: set[str] = set()
    for path in paths:
        if os.path.isfile(path):
            files.add(os.path.abspath(path))
        elif os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "site-packages") and not d.startswith("."))
                files.update(os.path.abspath(os.path.join(root, n)) for n in names if n.endswith(TEXT_SUFFIXES))
        else:
            raise FileNotFoundError(
                f"data.paths: {path!r} does not exist. Fix: point data.paths at existing .txt/.jsonl files or folders."
            )
    if not files:
        raise ValueError(
            f"data.paths={paths!r} contains no text files ({', '.join(TEXT_SUFFIXES)}). "
            "Fix: point data.paths at files or folders with text."
        )
    return sorted(files)


def split_keys(paths: list[str]) -> list[tuple[str, str]]:
    """(file, split key) for the text files under ``paths``, sorted by file.

    The key is the file's path relative to the folder it was found in (a file given directly: its
    name), so the train/validation split does not change when the data moves.
    """
    keyed: dict[str, str] = {}
    for path in paths:
        base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        for f in list_files([path]):
            keyed.setdefault(f, os.path.relpath(f, base))
    return sorted(keyed.items())


def iter_documents(path: str, text_key: str, rel: str) -> list[tuple[str, str]]:
    """(split key, text) for each document in ``path``, whose own split key is ``rel``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.endswith(".jsonl"):
            return [(rel, f.read())]
        docs = []
        for lineno, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno + 1} is not valid JSON ({err}).") from err
            if not isinstance(obj, dict) or text_key not in obj:
                raise ValueError(
                    f"{path}:{lineno + 1} has no {text_key!r} field. "
                    "Fix: set data.text_key to the field that holds the text."
                )
            docs.append((f"{rel}:{lineno}", str(obj[text_key])))
        return docs


def is_validation(key: str, val_fraction: float) -> bool:
    return (zlib.crc32(key.encode("utf-8")) % 1_000_000) < val_fraction * 1_000_000


def tokenize_corpus(
    files: list[tuple[str, str]], tokenizer: Tokenizer, *, val_fraction: float, text_key: str = "text",
    max_tokens: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token streams (train, val) of the documents in ``files`` ((path, split key) pairs, see
    :func:`split_keys`), each document ending in eos.

    ``max_tokens`` caps the total (train + val) by stopping after the file that crosses it.
    """
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    total = 0
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    for path, rel in files:
        for key, text in iter_documents(path, text_key, rel):
            if not text:
                continue
            ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
            (val if is_validation(key, val_fraction) else train).extend((ids, eos))
            total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(train), cat(val)


class PackedDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens; item i is ``(input_ids, labels)``."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        n = (len(tokens) - 1) // seq_len
        self.seq_len = seq_len
        self.tokens = torch.from_numpy(tokens[: n * seq_len + 1].copy())
        self.n = max(n, 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return {"input_ids": window[:-1], "labels": window[1:]}


class TextDataModule(pl.LightningDataModule):
    """Text files -> packed token sequences for causal language modelling.

    Args:
        paths: files or folders (.txt, .py, .md, .jsonl); default: the Python standard library sources.
        tokenizer: ``"byte"`` (UTF-8 bytes, vocabulary 258), a local Hugging Face tokenizer folder, or a
            SentencePiece ``.model`` file.
        seq_len: tokens per training sequence.
        batch_size: sequences per batch (per process).
        val_fraction: share of documents (by hash of their path) held out for validation.
        max_tokens: stop reading files once this many tokens were read (None: all).
        text_key: the field holding the text in .jsonl files.
        num_workers: DataLoader workers.
        seed: seeds the shuffling of training sequences.
    """

    def __init__(
        self,
        paths: Union[str, list[str], None] = None,
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        max_tokens: Optional[int] = None,
        text_key: str = "text",
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if isinstance(paths, str):
            paths = [paths]
        if paths is not None and (not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths)):
            raise ValueError(f"data.paths={paths!r} must be a path or a list of paths (strings).")
        if paths is not None and len(paths) == 0:
            raise ValueError("data.paths=[] is empty. Fix: list at least one file or folder, or leave it unset.")
        if not isinstance(tokenizer, str):
            raise ValueError(f"data.tokenizer={tokenizer!r} must be 'byte' or a local path (a string).")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"data.max_tokens={max_tokens!r} must be an integer >= 1 (or null for no cap).")
        if not isinstance(text_key, str):
            raise ValueError(f"data.text_key={text_key!r} must be a string.")
        for key, value, lo in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"data.{key}={value!r} must be an integer >= {lo}.")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction!r} must lie strictly between 0 and 1.")
        self.paths = paths
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_tokens = max_tokens
        self.text_key = text_key
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_set: Optional[PackedDataset] = None
        self.val_set: Optional[PackedDataset] = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        roots = self.paths if self.paths is not None else [stdlib_dir()]
        train, val = tokenize_corpus(
            split_keys(roots), self.tokenizer, val_fraction=self.val_fraction, text_key=self.text_key,
            max_tokens=self.max_tokens,
        )
        self.train_set, self.val_set = PackedDataset(train, self.seq_len), PackedDataset(val, self.seq_len)
        for name, ds, toks in (("training", self.train_set, train), ("validation", self.val_set, val)):
            if len(ds) == 0:
                raise ValueError(
                    f"data.paths gave {len(toks)} {name} tokens, fewer than one sequence of data.seq_len={self.seq_len}"
                    " + 1. Fix: add text, lower data.seq_len, or change data.val_fraction."
                )

    def train_dataloader(self) -> ResumableDataLoader:
        """The training loader: a :class:`ResumableDataLoader` over an :class:`EpochShuffleSampler`.

        With several processes (the trainer's strategy reports ``distributed_sampler_kwargs``) the sampler
        gives each process its own share of every epoch's permutation, so Lightning leaves it in place
        (it is a ``DistributedSampler``) and the position a checkpoint records is the same on every rank.
        """
        assert self.train_set is not None, "call setup() first"
        shard = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        replicas, rank = (shard["num_replicas"], shard["rank"]) if shard else (1, 0)
        sampler = EpochShuffleSampler(len(self.train_set), self.seed, num_replicas=replicas, rank=rank)
        return ResumableDataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # workers' base seed; keeps the global RNG untouched
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class EpochShuffleSampler(DistributedSampler):
    """Shuffles like ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`` -- epoch e
    gets the (e+1)-th permutation of that generator -- but computes it from the epoch number that
    Lightning passes to ``set_epoch``, so a resumed run sees the same batches as the uninterrupted run.

    With ``num_replicas`` processes, process ``rank`` takes every ``num_replicas``-th index of the
    permutation from its ``rank``-th on (as ``DistributedSampler`` does), the permutation cut to a multiple
    of ``num_replicas`` so every process gets ``n // num_replicas`` indices: the k-th batches of all
    processes together hold the same sequences as the k-th batch of one process with a batch
    ``num_replicas`` times as large. Being a ``DistributedSampler``, Lightning does not wrap or replace it.

    Args:
        n: the dataset's length.
        seed: seeds the permutations.
        num_replicas: how many processes share each epoch.
        rank: this process's index among them.
    """

    def __init__(self, n: int, seed: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n = n
        self.num_samples = n // num_replicas
        self.total_size = self.num_samples * num_replicas
        #: where in this process's share of the epoch the next pass begins (set by a resume, then back to 0)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a pending resume position for another epoch is dropped."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_position(self, epoch: int, start: int) -> None:
        """Begin the next pass at index ``start`` of this process's share of epoch ``epoch``."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start={start} lies outside this process's {self.num_samples} indices of the epoch.")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole epoch's order (all processes' shares), the same on every process."""
        g = torch.Generator().manual_seed(self.seed)
        for e in range(epoch + 1):  # per epoch the DataLoader draws its workers' base seed, then
            torch.empty((), dtype=torch.int64).random_(generator=g)  # RandomSampler draws a permutation
            perm = torch.randperm(self.n, generator=g)  # and an empty tail (num_samples % n == 0)
            if e < epoch:
                torch.randperm(self.n, generator=g)
        return perm

    def __iter__(self):  # noqa: ANN204
        share = self.permutation(self.epoch)[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0
        return iter(share[start:].tolist())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochShuffleSampler` (batches of ``batch_size``, the last partial
    batch dropped) that saves and restores its place in the epoch through Lightning's stateful-loader
    protocol: ``state_dict()`` and ``load_state_dict()``.

    Lightning calls ``state_dict()`` when it writes a checkpoint (``FitLoop.on_save_checkpoint``, stored under
    ``loops.fit_loop.state_dict.combined_loader``) and ``load_state_dict()`` on resume, before it asks the loader
    for an iterator. The state is the epoch and the number of batches this process has received from the
    loader in it -- counted as the batches leave the loader, so batches that worker processes have prepared
    ahead are not counted -- and a resume starts the sampler at that index of the epoch's permutation:
    the resumed run sees exactly the batches the uninterrupted run would have seen, with any
    ``num_workers``, and on several processes (the count is the same on every rank).

    The loader creates its underlying iterator at the first ``next()``, not at ``iter()``: Lightning asks
    for the iterator before it calls ``set_epoch``, and worker processes would otherwise start fetching the
    previous epoch's indices.
    """

    #: bumped when the meaning of the state changes
    STATE_VERSION = 1

    def __init__(self, dataset: Dataset, batch_size: int, sampler: EpochShuffleSampler, **kwargs) -> None:
        if not isinstance(sampler, EpochShuffleSampler):
            raise TypeError(f"ResumableDataLoader needs an EpochShuffleSampler, got {type(sampler).__name__}.")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._pass_epoch: Optional[int] = None  # the epoch of the pass under way (None: none since the last load)
        self._batches = 0  # batches that pass has handed out, counting from where it began

    def __iter__(self) -> "_CountingPass":
        return _CountingPass(self)

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: ``epoch`` and the ``batches`` of it handed out, plus what they depend on."""
        sampler: EpochShuffleSampler = self.sampler
        if self._pass_epoch is not None and self._pass_epoch == sampler.epoch:
            epoch, batches = self._pass_epoch, self._batches
        else:  # no pass of this epoch has started: the next one begins at the sampler's (resumed) position
            epoch, batches = sampler.epoch, sampler.start // self.batch_size
        return {"version": self.STATE_VERSION, "epoch": epoch, "batches": batches, "batch_size": self.batch_size,
                "num_replicas": sampler.num_replicas, "samples": sampler.n, "seed": sampler.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the next pass starts after the batches it counted.

        Raises:
            MemKitConfigError: the checkpoint's loader state belongs to other data, batch size, seed or number
                of processes, where its position means other sequences.
        """
        sampler: EpochShuffleSampler = self.sampler
        now = {"batch_size": self.batch_size, "num_replicas": sampler.num_replicas, "samples": sampler.n,
               "seed": sampler.seed}
        names = {"batch_size": "data.batch_size", "num_replicas": "the number of processes",
                 "samples": "the number of training sequences (data.paths, seq_len, max_tokens, val_fraction, "
                            "tokenizer)", "seed": "data.seed"}
        if state_dict.get("version") != self.STATE_VERSION:
            raise MemKitConfigError(
                f"The checkpoint's training-loader state has version {state_dict.get('version')!r}; this "
                f"lightning_memkit reads version {self.STATE_VERSION}. Fix: resume with the lightning_memkit "
                "version that wrote the checkpoint."
            )
        for key, value in now.items():
            if state_dict.get(key) != value:
                raise MemKitConfigError(
                    f"{names[key]}: the checkpoint was written with {key}={state_dict.get(key)!r}, this run has "
                    f"{key}={value!r}, so the checkpoint's place in the epoch ({state_dict.get('batches')} batches "
                    f"into epoch {state_dict.get('epoch')}) would name other sequences. Fix: resume with the "
                    "checkpoint's data settings and number of processes, or start a new run from its weights "
                    "(MemKitStrategy(resume=\"weights\"))."
                )
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):  # the epoch was used up: the next pass is the next epoch's
            epoch, batches = epoch + 1, 0
        sampler.set_position(epoch, batches * self.batch_size)
        self._pass_epoch, self._batches = None, 0


class _CountingPass:
    """One pass over a :class:`ResumableDataLoader`: counts the batches it hands out."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Optional[Any] = None

    def __iter__(self) -> "_CountingPass":
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Any:
        loader = self.loader
        if self.iterator is None:
            sampler: EpochShuffleSampler = loader.sampler
            loader._pass_epoch, loader._batches = sampler.epoch, sampler.start // loader.batch_size
            self.iterator = DataLoader.__iter__(loader)
        batch = next(self.iterator)
        loader._batches += 1
        return batch

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
from typing import Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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
                    f"{path}:{lineno + 1} has no {text_key!r} field. Fix: set data.text_key to the field that holds the text."
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
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
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

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(self.train_set), self.seed),
            drop_last=True, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # workers' base seed; keeps the global RNG untouched
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class EpochShuffleSampler(Sampler[int]):
    """Shuffles like ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`` -- epoch e
    gets the (e+1)-th permutation of that generator -- but computes it from the epoch number that
    Lightning passes to ``set_epoch``, so a run resumed from a checkpoint at an epoch boundary sees
    the same batches as the uninterrupted run."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # noqa: ANN204
        g = torch.Generator().manual_seed(self.seed)
        for epoch in range(self.epoch + 1):  # per epoch the DataLoader draws its workers' base seed, then
            torch.empty((), dtype=torch.int64).random_(generator=g)  # RandomSampler draws a permutation
            perm = torch.randperm(self.n, generator=g)  # and an empty tail (num_samples % n == 0)
            if epoch < self.epoch:
                torch.randperm(self.n, generator=g)
        return iter(perm.tolist())

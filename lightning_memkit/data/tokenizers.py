"""Tokenizers for the text DataModule: byte-level (no files needed) or one loaded from a local path."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from lightning_memkit._imports import require


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int] | np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus ``<eos>`` = 256 and ``<pad>`` = 257 (vocabulary 258)."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (``tokenizer.json`` / ``tokenizer_config.json``) from a local folder."""

    def __init__(self, path: str) -> None:
        transformers = require("transformers", feature="loading a Hugging Face tokenizer")
        self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(
                f"data.tokenizer={path!r} has no eos token. Fix: give the tokenizer an eos_token "
                "(documents are separated by it)."
            )
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file."""

    def __init__(self, path: str) -> None:
        spm = require("sentencepiece", feature="loading a SentencePiece tokenizer")
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self.sp.get_piece_size())
        eos = int(self.sp.eos_id())
        if eos < 0:
            raise ValueError(f"data.tokenizer={path!r} has no eos piece. Fix: train it with an eos id.")
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, a folder with a Hugging Face tokenizer, or a SentencePiece ``.model`` file.

    Raises:
        FileNotFoundError: ``spec`` is neither ``"byte"`` nor an existing local path.
    """
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    if os.path.isfile(spec) and spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise FileNotFoundError(
        f"data.tokenizer={spec!r} is not 'byte', a local Hugging Face tokenizer folder, or a SentencePiece "
        ".model file. Fix: use 'byte' or a local path (memkit never downloads tokenizers)."
    )

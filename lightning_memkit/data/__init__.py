"""Data: text DataModule and tokenizers."""

from lightning_memkit.data.text import (
    EpochShuffleSampler,
    PackedDataset,
    ResumableDataLoader,
    TextDataModule,
    list_files,
    split_keys,
    stdlib_dir,
    tokenize_corpus,
)
from lightning_memkit.data.tokenizers import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "EpochShuffleSampler", "PackedDataset", "ResumableDataLoader", "TextDataModule",
           "list_files", "load_tokenizer", "split_keys", "stdlib_dir", "tokenize_corpus"]

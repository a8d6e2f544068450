"""Data: text DataModule and tokenizers."""

from lightning_memkit.data.text import PackedDataset, TextDataModule, list_files, stdlib_dir, tokenize_corpus
from lightning_memkit.data.tokenizers import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "PackedDataset", "TextDataModule", "list_files", "load_tokenizer", "stdlib_dir", "tokenize_corpus"]

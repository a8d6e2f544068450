"""Data: text DataModule and tokenizers."""

from lightning_memkit.data.text import PackedDataset, TextDataModule, list_files, split_keys, stdlib_dir, tokenize_corpus
from lightning_memkit.data.tokenizers import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "PackedDataset", "TextDataModule", "list_files", "load_tokenizer", "split_keys", "stdlib_dir", "tokenize_corpus"]

"""Shared fixtures: tiny corpora, tiny models and quiet Trainer settings."""

from __future__ import annotations

import os

# Triton kernels run in Triton's interpreter on machines without a GPU. The variable must be set
# before any kernel module is imported (the @triton.jit decorators read it).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import lightning_memkit  # noqa: F401  (registers the strategy names)
from lightning_memkit.data import stdlib_dir


@pytest.fixture
def small_corpus_dir() -> str:
    """A real-text folder present everywhere: the stdlib's email package (29 files, ~370 KB; 2 go to validation)."""
    return os.path.join(stdlib_dir(), "email")


@pytest.fixture
def trainer_kwargs(tmp_path) -> dict:
    """Quiet, fast Trainer settings for unit tests."""
    return dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

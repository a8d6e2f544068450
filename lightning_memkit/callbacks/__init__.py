"""Callbacks: the memory report."""

from lightning_memkit.callbacks.memory_report import MemoryReport

__all__ = ["MemoryReport"]

"""Where the sequence methods keep their per-block state between the forward and the backward.

:class:`BlockStore` holds tensors (StreamBP's block inputs) by handle. With ``offload=False`` a tensor
stays where it is (on the device). With ``offload=True`` it goes to host memory as soon as it is put:

- on CUDA, into pinned host memory on a side stream (an event marks the copy's end; the device tensor is
  released once the copy is done, :meth:`torch.Tensor.record_stream` keeps the allocator from reusing it
  before); :meth:`BlockStore.prefetch` starts the copy back on the side stream, and :meth:`BlockStore.get`
  makes the compute stream wait for it, so the backward of one block overlaps the copy of the next;
- on any other device (CPU), the same steps with host and device as separate pools: a copy into a separate
  buffer (the caller's tensor is dropped), and a copy back. Nothing is saved there (the device IS host
  memory); it runs the mechanics and the byte counts that the tests check.

Copies are exact, so a method's gradients are the same bit for bit with and without offload. The store
counts the bytes it holds in each pool (``"device"``, ``"host"``), current and peak, and creates its host copies
inside :func:`~lightning_memkit.step_context.host_allocations`, so the planner
and the memory report count them as host memory, not device memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_memkit.step_context import host_allocations

POOLS = ("device", "host")


@dataclass
class _Entry:
    nbytes: int
    device: Optional[Tensor] = None  # on the device: kept (no offload) or prefetched
    host: Optional[Tensor] = None  # the host copy (offload)
    event: Any = None  # CUDA: the end of the last copy on the side stream


def tensor_nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class BlockStore:
    """Tensors by handle, on the device or offloaded to host memory.

    Args:
        offload: move each tensor to host memory when it is put, and back when it is prefetched or read.
        device: the device the tensors live on; CUDA uses pinned memory and a side stream, others a
            separate host buffer per tensor.
    """

    def __init__(self, offload: bool, device: Optional[torch.device] = None) -> None:
        self.offload = offload
        self.device = torch.device(device) if device is not None else None
        self.cuda = offload and self.device is not None and self.device.type == "cuda"
        self.stream: Any = torch.cuda.Stream(self.device) if self.cuda else None
        self._entries: dict[int, _Entry] = {}
        self._next = 0
        self._bytes = dict.fromkeys(POOLS, 0)
        self._peak = dict.fromkeys(POOLS, 0)

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _add(self, pool: str, n: int) -> None:
        self._bytes[pool] += n
        self._peak[pool] = max(self._peak[pool], self._bytes[pool])

    def nbytes(self, pool: str = "device") -> int:
        """Bytes the store holds now in ``pool`` (``"device"`` or ``"host"``)."""
        return self._bytes[_pool(pool)]

    def peak_nbytes(self, pool: str = "device") -> int:
        """The most bytes the store has held at once in ``pool`` since it was made (or :meth:`reset_peaks`)."""
        return self._peak[_pool(pool)]

    def reset_peaks(self) -> None:
        self._peak = dict(self._bytes)

    def __len__(self) -> int:
        return len(self._entries)

    # -- the store ---------------------------------------------------------------------------------------------
    def put(self, t: Tensor) -> int:
        """Keep ``t`` (not to be modified afterwards); returns its handle. With offload the store keeps only a
        host copy: the caller's reference is the last one on the device."""
        handle, self._next = self._next, self._next + 1
        n = tensor_nbytes(t)
        if not self.offload:
            self._entries[handle] = _Entry(n, device=t)
            self._add("device", n)
            return handle
        if self.cuda:
            with host_allocations():  # a memory tracker counts it as host memory
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is computed
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            t.record_stream(self.stream)  # its memory is not reused before the copy is done
            self._entries[handle] = _Entry(n, host=host, event=event)
        else:
            with host_allocations():
                self._entries[handle] = _Entry(n, host=t.detach().clone())
        self._add("host", n)
        return handle

    def prefetch(self, handle: int) -> None:
        """Start bringing the tensor back to the device (no-op when it is there)."""
        entry = self._entries[handle]
        if entry.device is not None:
            return
        assert entry.host is not None
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            dev = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=self.device)
            self.stream.wait_stream(current)  # the memory dev reuses is no longer read by the compute stream
            with torch.cuda.stream(self.stream):
                dev.copy_(entry.host, non_blocking=True)
                entry.event = torch.cuda.Event()
                entry.event.record(self.stream)
            dev.record_stream(self.stream)
        else:
            dev = entry.host.clone()
        entry.device = dev
        self._add("device", entry.nbytes)

    def get(self, handle: int) -> Tensor:
        """The tensor on the device (prefetched now if it was not); with offload the host copy is dropped, so
        each handle is read back once. It stays counted on the device until :meth:`release`."""
        entry = self._entries[handle]
        if entry.device is None:
            self.prefetch(handle)
        assert entry.device is not None
        if self.offload:
            if self.cuda and entry.event is not None:
                torch.cuda.current_stream(self.device).wait_event(entry.event)
                entry.event = None
            if entry.host is not None:
                entry.host = None
                self._bytes["host"] -= entry.nbytes
        return entry.device

    def release(self, handle: int) -> None:
        """Drop the tensor from both pools."""
        entry = self._entries.pop(handle, None)
        if entry is None:
            return
        if entry.device is not None:
            self._bytes["device"] -= entry.nbytes
        if entry.host is not None:
            self._bytes["host"] -= entry.nbytes
        if self.cuda and entry.event is not None:
            entry.event.synchronize()  # a copy still in flight reads or writes these buffers

    def free(self) -> None:
        """Drop everything (the peaks stay readable)."""
        for handle in list(self._entries):
            self.release(handle)


def _pool(pool: str) -> str:
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {POOLS}.")
    return pool


def offload_nbytes(n_layers: int, batch: int, seq_len: int, hidden: int, element_size: int) -> int:
    """Host bytes StreamBP's offload needs for one sequence: every block's input (L x B x T x D x element size)."""
    return n_layers * batch * seq_len * hidden * element_size


__all__ = ["BlockStore", "offload_nbytes", "tensor_nbytes", "POOLS"]

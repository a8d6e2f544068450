"""What happens to the tensors chosen modules save for the backward pass: compression, offload.

:class:`SavedTensors` holds the pack/unpack functions and the byte counters; :func:`install` puts
``torch.autograd.graph.saved_tensors_hooks`` around the forward of chosen modules (and, for FP8,
per-group packers around the ``nn.Linear`` layers inside them, COAT's mixed granularity). The
forward itself is unchanged.

Offload (CUDA): each packed tensor (compressed or not) is copied to pinned host memory on a side
stream that overlaps compute (``record_stream`` keeps the device memory until the copy is done);
in the backward, unpacking a tensor also starts the host-to-device copies of the two tensors
saved just before it (the backward runs roughly in reverse), so they arrive while compute goes
on. On a CPU device there is nowhere to offload to: offload is a no-op there, said once.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_memkit._tensors import is_symbolic
from lightning_memkit.activations.compress import Packed, RunningScales, pack_fp8, pack_int8, unpack
from lightning_memkit.technique import ForwardWrapper, unwrap_forward, wrap_forward

PREFETCH = 2


_VIEW_NODES = ("TBackward", "ViewBackward", "UnsafeViewBackward", "TransposeBackward", "PermuteBackward",
               "ExpandBackward", "AliasBackward")


class _Offloaded:
    """A tensor (or a Packed's codes and scale) in pinned host memory, and its way back."""

    __slots__ = ("host", "device", "index", "on_device", "event", "extra", "__weakref__")

    def __init__(self, host: list[Tensor], device: torch.device, index: int, extra: Any) -> None:
        self.host, self.device, self.index, self.extra = host, device, index, extra
        self.on_device: Optional[list[Tensor]] = None
        self.event: Optional[torch.cuda.Event] = None


class SavedTensors:
    """Pack / unpack policy shared by every hooked module of one technique.

    Args:
        compress: ``"none"``, ``"int8"`` or ``"fp8"``.
        offload: move what is saved to host memory (CUDA only).
        scales: ``"exact"`` (each tensor's own absmax) or ``"running"`` (Mesa; int8 only).
        min_numel: tensors with fewer values are kept as they are.
        params: the model's parameters (never packed).
    """

    def __init__(self, compress: str, offload: bool, scales: str, min_numel: int, params: list[Tensor],
                 host_limit: Optional[int] = None) -> None:
        self.compress, self.offload, self.scales, self.min_numel = compress, offload, scales, min_numel
        self.host_limit = host_limit
        self._params = params
        self._param_ids = {id(p) for p in params}
        self._param_storages: Optional[set[int]] = None  # read at the first pack: the model is on its device by then
        # a tensor saved by several ops (the normed input of q, k and v) is packed once: id -> (weak tensor, weak item)
        self._packed: dict[int, tuple[Any, Any]] = {}
        self.running = RunningScales()
        self.original_bytes = 0  # bytes the packed tensors had
        self.device_bytes = 0  # bytes they take on the device after packing (0 when offloaded)
        self.host_bytes = 0
        self._order: list[_Offloaded] = []
        self._stream: Optional[torch.cuda.Stream] = None
        self._warned_cpu = False

    def reset_counters(self) -> None:
        self.original_bytes = self.device_bytes = self.host_bytes = 0
        self._order = []
        self._packed = {}
        self._param_storages = None

    # ----- what is packed ---------------------------------------------------------------------------
    def eligible(self, x: Tensor) -> bool:
        if not (x.is_floating_point() and x.requires_grad and x.numel() >= self.min_numel):
            return False
        if isinstance(x, nn.Parameter) or id(x._base) in self._param_ids:  # a parameter or a view of one
            return False
        # autocast's low-precision copy of a weight (or a transposed / reshaped view of it, as linear layers
        # save it) is not an activation: follow view-like nodes down to a ToCopy of a parameter
        fn, copied = x.grad_fn, False
        while fn is not None and fn.next_functions:
            name = fn.name()
            if name.startswith("ToCopyBackward"):
                copied = True
            elif not name.startswith(_VIEW_NODES):
                break
            fn = fn.next_functions[0][0]
        if copied and id(getattr(fn, "variable", None)) in self._param_ids:
            return False
        if is_symbolic(x):  # fake tensors (memory planning) have no real storage to compare
            return True
        try:
            if self._param_storages is None:
                self._param_storages = {p.untyped_storage().data_ptr() for p in self._params if not is_symbolic(p)}
            return x.untyped_storage().data_ptr() not in self._param_storages
        except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
            return False

    def pack(self, x: Tensor, slot: Any, per_group: bool) -> Any:
        if not self.eligible(x):
            return x
        seen = self._packed.get(id(x))
        if seen is not None and seen[0]() is x and seen[1]() is not None:
            return seen[1]()
        item = self._pack_new(x, slot, per_group)
        if item is not x:
            self._packed[id(x)] = (weakref.ref(x), weakref.ref(item))
        return item

    def _pack_new(self, x: Tensor, slot: Any, per_group: bool) -> Any:
        nbytes = x.numel() * x.element_size()
        self.original_bytes += nbytes
        item: Any = x
        if self.compress == "int8":
            item = pack_int8(x, self.running.absmax(slot, x) if self.scales == "running" else None)
        elif self.compress == "fp8":
            item = pack_fp8(x, per_group)
        elif self.compress != "none":
            raise ValueError(f"compress={self.compress!r} is not one of 'none', 'int8', 'fp8'")
        size = item.nbytes() if isinstance(item, Packed) else nbytes
        if self.offload and x.device.type == "cuda":
            self.host_bytes += size
            if self.host_limit is not None and self.host_bytes > self.host_limit:
                raise RuntimeError(
                    f"activation offload needs more than activations.offload_host_memory={self.host_limit / 2**30:.2f} "
                    "GiB of pinned host memory in this step. Fix: raise offload_host_memory (if the host has it), add "
                    "compress='int8', or lower the batch or sequence length."
                )
            return self._to_host(item)
        if self.offload and not self._warned_cpu:
            self._warned_cpu = True
            warnings.warn(f"activations.offload: the activations are on {x.device.type}, not a GPU; there is no device "
                          "memory to free, so offload does nothing here.", stacklevel=2)
        self.device_bytes += size
        return item

    def unpack(self, item: Any) -> Tensor:
        if isinstance(item, _Offloaded):
            item = self._to_device(item)
        if isinstance(item, Packed):
            return unpack(item)
        return item

    # ----- offload ----------------------------------------------------------------------------------
    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _to_host(self, item: Any) -> _Offloaded:
        tensors = [item.codes, item.scale] if isinstance(item, Packed) else [item]
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        host = []
        with torch.cuda.stream(stream):
            for t in tensors:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t.record_stream(stream)  # the device memory is reused only after the copy
                host.append(h)
        extra = item if isinstance(item, Packed) else None
        handle = _Offloaded(host, tensors[0].device, len(self._order), extra)
        self._order.append(handle)
        return handle

    def _start_copy_back(self, handle: _Offloaded) -> None:
        if handle.on_device is not None:
            return
        stream = self._side_stream()
        with torch.cuda.stream(stream):
            handle.on_device = [h.to(handle.device, non_blocking=True) for h in handle.host]
            handle.event = torch.cuda.Event()
            handle.event.record(stream)

    def _to_device(self, handle: _Offloaded) -> Any:
        self._start_copy_back(handle)
        for back in range(1, PREFETCH + 1):  # the backward runs roughly in reverse: fetch the next ones
            j = handle.index - back
            if 0 <= j < len(self._order):
                self._start_copy_back(self._order[j])
        torch.cuda.current_stream().wait_event(handle.event)
        tensors = handle.on_device
        for t in tensors:
            t.record_stream(torch.cuda.current_stream())
        handle.on_device = None  # the host copy stays until the graph is freed: a second backward can unpack again
        if handle.extra is not None:
            packed = handle.extra
            return Packed(tensors[0], tensors[1], packed.dtype, packed.shape, packed.grouped)
        return tensors[0]


def host_memory_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(limit: Optional[int], available: Optional[int]) -> None:
    """Refuse offload before training when the host cannot hold ``limit`` bytes of pinned memory."""
    if limit is None or available is None:
        return
    if available < limit:
        from lightning_memkit.config import MemKitConfigError

        raise MemKitConfigError(
            f"activations.offload_host_memory={limit / 2**30:.2f} GiB, "
            f"but this host has only {available / 2**30:.2f} GiB "
            "of memory available to pin. Fix: lower offload_host_memory (and the batch or sequence length with it), "
            "add compress='int8' to halve what is offloaded, or use checkpointing instead of offload."
        )


class _SavedTensorsForward(ForwardWrapper):
    """Runs the module's forward under the saved-tensor hooks of a :class:`SavedTensors`."""

    manager: SavedTensors
    key: str
    per_group: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        counter = [0]

        def pack(x: Tensor) -> Any:
            counter[0] += 1
            return self.manager.pack(x, (self.key, counter[0]), self.per_group)

        with torch.autograd.graph.saved_tensors_hooks(pack, self.manager.unpack):
            return self.inner(*args, **kwargs)


def install(modules: dict[str, nn.Module], manager: SavedTensors, linear_per_group: bool) -> list[nn.Module]:
    """Hook ``modules`` (name -> module); with ``linear_per_group`` also each ``nn.Linear`` inside them
    (the innermost hooks apply, so linear inputs get per-group scales). Returns the modules changed."""
    changed = []

    def hook(module: nn.Module, key: str, per_group: bool) -> None:
        def make(inner: Callable[..., Any], had: bool) -> _SavedTensorsForward:
            wrapper = _SavedTensorsForward(inner, had)
            wrapper.manager, wrapper.key, wrapper.per_group = manager, key, per_group
            return wrapper

        wrap_forward(module, make)
        changed.append(module)

    for name, module in modules.items():
        hook(module, name, False)
        if linear_per_group:
            for sub_name, sub in module.named_modules():
                if isinstance(sub, nn.Linear):
                    hook(sub, f"{name}.{sub_name}", True)
    return changed


def uninstall(modules: list[nn.Module]) -> None:
    for module in modules:
        unwrap_forward(module, _SavedTensorsForward)

"""Measuring the memory of a training step by counting tensor bytes.

:class:`StepMemoryTracker` wraps PyTorch's ``MemTracker`` (a ``TorchDispatchMode`` that follows
every tensor storage created while it is active and sorts it into parameters, buffers, gradients,
optimizer state, activations and temporaries). It gives the same answer on CPU and CUDA, on real
tensors and under ``FakeTensorMode`` (where a full-size model's step allocates nothing), so the
``MemoryReport`` callback and the benchmarks share it. Process RSS is not used: on CPU it ranks
activation checkpointing as worse than no checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import torch
from torch import nn

from lightning_memkit.planner.tracker import CategoryTracker

if TYPE_CHECKING:
    from lightning_memkit.models.llama import LlamaConfig

MIB = 2**20
GIB = 2**30

#: Report categories, in table order, and MemTracker's reference types behind each.
CATEGORIES: dict[str, str] = {
    "parameters": "PARAM",
    "buffers": "BUFFER",
    "gradients": "GRAD",
    "optimizer_state": "OPT",
    "activations": "ACT",
    "temporaries": "TEMP",
    "other": "OTH",
}


@dataclass
class MemoryBreakdown:
    """Bytes by category at the step's peak, on one device.

    Attributes:
        by_category: bytes per :data:`CATEGORIES` name at the moment of the peak.
        peak: their sum: the most bytes of tensors alive at once during the step.
        device: the device measured.
        method: how it was measured.
        allocator_peak: on CUDA, the caching allocator's peak during the step (includes
            fragmentation and tensors outside the tracked objects); None elsewhere.
        step: the optimizer step measured, when known.
    """

    by_category: dict[str, int]
    device: str
    method: str = "MemTracker (bytes of live tensor storages)"
    allocator_peak: Optional[int] = None
    step: Optional[int] = None

    @property
    def peak(self) -> int:
        return sum(self.by_category.values())

    def as_metrics(self, prefix: str = "memory/") -> dict[str, float]:
        out = {f"{prefix}{k}_mib": v / MIB for k, v in self.by_category.items()}
        out[f"{prefix}peak_mib"] = self.peak / MIB
        if self.allocator_peak is not None:
            out[f"{prefix}allocator_peak_mib"] = self.allocator_peak / MIB
        return out


def parameter_bytes(module: nn.Module) -> int:
    """Exact bytes of ``module``'s parameters (tied parameters count once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain fixed-width text table (first column left-aligned, others right-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _closure_aware_mem_tracker() -> Any:
    """A ``MemTracker`` whose optimizer-state category excludes the optimizer's closure.

    ``MemTracker`` files every tensor created inside ``optimizer.step`` as optimizer state. Lightning
    (and LBFGS users) pass the forward and backward pass to ``step`` as a closure, which would file
    all activations as optimizer state. The pre-step hook here wraps the closure so that what it
    creates is categorized as usual.
    """
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    class _Tracker(MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            # Only the global peak: MemTracker also walks every module's statistics on every
            # operator (O(ops x modules)), which made a Llama-3-8B step take minutes. We do not
            # report per-module peaks.
            for dev, dev_snap in self._curr_mem_snap.items():
                total = dev_snap[_TOTAL_KEY]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(dev_snap)

        def _register_global_optimizer_hook(self) -> None:
            def pre_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
                self._in_opt = True
                # args[0] is the optimizer itself; a positional closure comes next
                closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
                if closure is None:
                    return None

                def closure_outside_optimizer() -> Any:
                    self._in_opt = False
                    try:
                        return closure()
                    finally:
                        self._in_opt = True

                if "closure" in kwargs:
                    return args, {**kwargs, "closure": closure_outside_optimizer}
                return (args[0], closure_outside_optimizer, *args[2:]), kwargs

            def post_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
                self._track_optimizer_states(_MemRefType.OPT, optimizer)
                self._in_opt = False

            self._optimizer_hook_handles = (
                register_optimizer_step_pre_hook(pre_hook),
                register_optimizer_step_post_hook(post_hook),
            )

    return _Tracker()


class LiveBytes(CategoryTracker):
    """Bytes of the tensor storages created while it is active and still alive (:attr:`current`); and their peak.

    A ``TorchDispatchMode`` (works on real and fake tensors, CPU and CUDA) with no module bookkeeping,
    so it measures computations that call the same module many times in one step (the sequence
    methods run each block once per chunk, which ``MemTracker``'s module statistics refuse). It is the
    planner's :class:`~lightning_memkit.planner.tracker.CategoryTracker` without parameters or heads:
    storages that existed before (parameters, optimizer state; recognized when they first appear as an
    op's input) are not counted; tensors created inside and still alive at the end (gradients) are in
    :attr:`current`. A storage is counted at its size when created: growth by in-place ``resize_``
    is not seen. Agrees with ``MemTracker``'s peak on a plain step to 0.01% (34.127 vs 34.131 MiB measured).
    """

    def __init__(self) -> None:
        super().__init__()


class StepMemoryTracker:
    """Context manager measuring the peak tensor memory of what runs inside it.

    Args:
        module: the model; its parameters, buffers and gradients are categorized as such.
        optimizers: their states are categorized as optimizer state.

    Example:
        >>> with StepMemoryTracker(model, [opt]) as tracker:  # doctest: +SKIP
        ...     loss = model(x).sum(); loss.backward(); opt.step()
        >>> tracker.result().peak  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        self._tracker = _closure_aware_mem_tracker()
        self._tracker.track_external(module, *optimizers)
        self._device: Optional[torch.device] = None
        self._cuda_peak: Optional[int] = None
        for p in module.parameters():
            self._device = p.device
            break

    def __enter__(self) -> "StepMemoryTracker":
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tracker.__exit__(*exc)
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self._cuda_peak = torch.cuda.max_memory_allocated(self._device)

    def result(self, step: Optional[int] = None) -> MemoryBreakdown:
        snapshot = self._tracker.get_tracker_snapshot("peak")
        device = self._device if self._device in snapshot else (next(iter(snapshot)) if snapshot else self._device)
        raw = {str(k).split(".")[-1]: v for k, v in snapshot.get(device, {}).items()}
        by_category = {name: int(raw.get(ref, 0)) for name, ref in CATEGORIES.items()}
        return MemoryBreakdown(
            by_category=by_category, device=str(device), allocator_peak=self._cuda_peak, step=step
        )


def storage_bytes(tensors: Iterable[Any], exclude: Optional[set[int]] = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (works on fake tensors, which have no data pointer);
    non-tensors are skipped, and storages whose ``id`` is in ``exclude`` left out."""
    from torch.distributed._tools.common_utils import get_untyped_storages

    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for st in get_untyped_storages(t):
                seen[id(st)] = st.nbytes()
    return sum(v for k, v in seen.items() if not exclude or k not in exclude)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class AllocatorStepTracker:
    """CUDA: the step's peak from the caching allocator's statistics (no operator interception).

    Parameters, buffers, gradients and optimizer state are counted exactly from the objects at the
    end of the step; ``activations`` holds the rest of the allocator's peak (activations,
    temporaries and anything else the step allocated). Same interface as :class:`StepMemoryTracker`.
    """

    method = "the CUDA allocator's peak (activations = peak - parameters - buffers - gradients - optimizer state)"

    def __init__(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        self.module, self.optimizers = module, list(optimizers)
        self.device = next(module.parameters()).device
        self._peak = 0

    def __enter__(self) -> "AllocatorStepTracker":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self._peak = torch.cuda.max_memory_allocated(self.device)

    def result(self, step: Optional[int] = None) -> MemoryBreakdown:
        params = _tensor_bytes(self.module.parameters())
        buffers = _tensor_bytes(self.module.buffers())
        grads = _tensor_bytes(p.grad for p in self.module.parameters() if p.grad is not None)
        state = _tensor_bytes(
            v for opt in self.optimizers for st in opt.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.device.type == "cuda"
        )
        known = params + buffers + grads + state
        by_category = dict.fromkeys(CATEGORIES, 0)
        by_category.update(parameters=params, buffers=buffers, gradients=grads, optimizer_state=state,
                           activations=max(0, self._peak - known))
        return MemoryBreakdown(by_category=by_category, device=str(self.device), method=self.method,
                               allocator_peak=self._peak, step=step)


def make_step_tracker(
    module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (), method: str = "auto"
) -> "StepMemoryTracker | AllocatorStepTracker":
    """``"tracker"``: :class:`StepMemoryTracker`; ``"allocator"``: :class:`AllocatorStepTracker` (CUDA);
    ``"auto"``: the allocator on CUDA, the tracker elsewhere."""
    if method not in ("auto", "tracker", "allocator"):
        raise ValueError(f"method={method!r} is not a measuring method. Fix: use 'auto', 'tracker' or 'allocator'.")
    on_cuda = next(module.parameters()).device.type == "cuda"
    if method == "allocator" and not on_cuda:
        raise ValueError("method='allocator' needs a model on CUDA. Fix: use 'tracker' (or 'auto') on other devices.")
    if method == "allocator" or (method == "auto" and on_cuda):
        return AllocatorStepTracker(module, optimizers)
    return StepMemoryTracker(module, optimizers)


def fake_training_step(
    model: Union[str, "LlamaConfig"],
    *,
    seq_len: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    checkpoint_every: Optional[int] = None,
    fused_cross_entropy: bool = False,
    warmup_steps: int = 1,
    optimizer: Any = None,
    sequence: Any = None,
    measure: str = "tracker",
) -> MemoryBreakdown:
    """Peak memory of one training step of a full-size reference model, measured on fake tensors.

    The model is built inside ``FakeTensorMode`` on the CPU device, so nothing is allocated; a
    Llama-3-8B step at 4096 tokens is measured in about 15 s on 2 CPU cores. The step is forward,
    cross-entropy on full logits (fp32, as ``CausalLMModule`` computes it), backward and an AdamW
    update. ``warmup_steps`` unmeasured steps run first, so the measured step starts with the
    optimizer state in place.

    Args:
        model: a name from :data:`lightning_memkit.models.NAMED_CONFIGS`, or a ``LlamaConfig``.
        seq_len, batch_size: tokens per sequence and sequences per micro-batch.
        dtype: parameter (and activation) dtype; optimizer state follows the parameters.
        checkpoint_every: None for no activation checkpointing, else checkpoint every k-th block (with
            ``sequence``: SeCO / SpaCO checkpoint each block's chunk; StreamBP needs no checkpointing).
        fused_cross_entropy: compute the loss with the chunked fused linear cross-entropy (no logits).
        warmup_steps: unmeasured steps before the measured one.
        optimizer: a memkit ``optimizer=`` setting (e.g. ``{"name": "apollo_mini", "in_backward": True}``)
            to convert the AdamW into, with the low-rank weights chosen as the strategy would; None:
            torch AdamW. bitsandbytes' optimizers run compiled kernels and cannot run on fake tensors.
        sequence: a memkit ``sequence=`` setting (e.g. ``{"method": "streambp", "chunk_size": 2048}``):
            the loss and backward go through :func:`~lightning_memkit.sequence.sequence_loss` (with the
            fused loss per chunk when ``fused_cross_entropy``). Measured with :class:`LiveBytes`.
        measure: ``"tracker"`` (MemTracker, by category) or ``"live"`` (:class:`LiveBytes`: parameters and
            optimizer state exact, everything the step creates -- activations, gradients, temporaries --
            under ``activations``). The sequence methods call each block once per chunk, which
            MemTracker's module statistics refuse, so they always use ``"live"``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.activations.checkpoint import apply_checkpointing
    from lightning_memkit.models.llama import Transformer, get_config

    cfg = get_config(model) if isinstance(model, str) else model
    previous = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=False):
        torch.set_default_dtype(dtype)  # build in the target dtype: .to() would not swap fake parameters
        try:
            net = Transformer(cfg)
        finally:
            torch.set_default_dtype(previous)
        if checkpoint_every is not None:
            apply_checkpointing(list(net.blocks), every=checkpoint_every)
        opt = _planned_optimizer(net, optimizer)
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))

        if sequence is not None:
            from lightning_memkit.config import CrossEntropyConfig, parse_sequence
            from lightning_memkit.sequence import sequence_loss
            from lightning_memkit.sequence.technique import wrapped_block_call

            seq = parse_sequence(sequence)
            measure = "live"
        if measure not in ("tracker", "live"):
            raise ValueError(f"measure={measure!r} is not a measuring method. Fix: use 'tracker' or 'live'.")

        def forward_backward() -> None:
            if sequence is not None:
                ce = CrossEntropyConfig(impl="chunked") if fused_cross_entropy else None
                sequence_loss(net, ids[:, :-1], ids[:, 1:], method=seq.method, chunk_size=seq.chunk_size, keep=seq.keep,
                              seed=seq.seed, cross_entropy=ce, call=wrapped_block_call(seq.method),
                              early_gradients=hasattr(opt, "remove_hooks")).backward()  # as the strategy sets it
                return
            if fused_cross_entropy:
                from lightning_memkit.loss import linear_cross_entropy

                hidden = net.forward_hidden(ids[:, :-1])
                loss = linear_cross_entropy(hidden, net.lm_head.weight, ids[:, 1:], impl="chunked")
            else:
                logits = net(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()

        def step() -> None:
            if hasattr(opt, "remove_hooks"):  # step in backward: the backward runs inside step, as Lightning does it
                opt.step(forward_backward)
            else:
                forward_backward()
                opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup_steps):  # creates the optimizer state; not measured
            step()
        if measure == "live":
            with LiveBytes() as live:
                step()
            by_category = dict.fromkeys(CATEGORIES, 0)
            by_category.update(
                parameters=parameter_bytes(net), buffers=storage_bytes(net.buffers()), activations=live.peak,
                optimizer_state=storage_bytes(v for st in opt.state.values() for v in st.values()
                                               if isinstance(v, torch.Tensor)),
            )
            return MemoryBreakdown(
                by_category=by_category, device="cpu", step=warmup_steps,
                method="LiveBytes under FakeTensorMode (activations: everything the step creates, gradients "
                       "and temporaries included; nothing allocated)",
            )
        with StepMemoryTracker(net, [opt]) as tracker:
            step()
        result = tracker.result(step=warmup_steps)
    assert result is not None
    result.method = "MemTracker under FakeTensorMode (bytes of tensor storages; nothing allocated)"
    return result


def _planned_optimizer(net: nn.Module, setting: Any) -> torch.optim.Optimizer:
    """torch AdamW over ``net``, converted to the memkit ``optimizer=`` setting as the strategy would."""
    from lightning_memkit.config import parse_optimizer

    base = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=False)
    config = parse_optimizer(setting)
    if not config.enabled:
        return base
    if config.name in ("adamw8bit", "paged_adamw8bit"):
        raise ValueError(f"optimizer {config.name!r} (bitsandbytes) cannot run on fake tensors; predict its state with "
                         "lightning_memkit.optim.memory.predict_state_bytes instead.")
    from lightning_memkit.optim.convert import convert_optimizer, select_lowrank
    from lightning_memkit.optim.in_backward import StepInBackward

    lowrank = {} if config.name == "adamw" else select_lowrank(net, config.target_modules)
    converted = convert_optimizer(base, config, lowrank, {p: n for n, p in net.named_parameters()})
    return StepInBackward(converted) if config.in_backward else converted

"""Measuring the memory of a training step by counting tensor bytes, with the planner's tracker.

:class:`StepMemoryTracker` runs :class:`~lightning_memkit.planner.tracker.CategoryTracker` (a
``TorchDispatchMode`` that follows every tensor storage created while it is active) over a step the caller
drives, with the model's parameters, buffers, gradients and the optimizers' state counted from the start,
and sorts the step's peak into parameters, buffers, gradients, optimizer state, activations, temporaries and
other. It gives the same answer on CPU and CUDA, on real tensors and under ``FakeTensorMode``, so the
``MemoryReport`` callback, the benchmarks and the planner share one way of counting. Process RSS is not used:
on CPU it ranks activation checkpointing as worse than no checkpointing. :func:`fake_training_step` is the
planner's :class:`~lightning_memkit.planner.step.StepRunner` on a full-size reference model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import torch
from torch import nn

from lightning_memkit.config import MemKitConfigError
from lightning_memkit.planner.tracker import CategoryTracker, storage_bytes, storage_ids  # noqa: F401  (re-exported)
from lightning_memkit.units import GIB, MIB  # noqa: F401  (re-exported: the benchmarks import them from here)

if TYPE_CHECKING:
    from lightning_memkit.models.llama import LlamaConfig

#: Report categories, in table order, and what each holds (from the planner's tracker categories):
#: activations are the forward's (the logits and the loss included: the tracker's ``activations`` and
#: ``logits_loss``), temporaries the backward's (recomputation of checkpointed blocks included), optimizer
#: state the optimizers' state and what their step creates; other is always 0 for a tracked step (a planned
#: step, :func:`fake_training_step`, files the batch there).
CATEGORIES: dict[str, str] = {
    "parameters": "the model's parameters",
    "buffers": "the model's buffers",
    "gradients": "the parameters' gradients",
    "optimizer_state": "the optimizers' state (and what their step creates)",
    "activations": "what the forward pass creates (logits and loss included)",
    "temporaries": "what the backward pass creates (recomputation included)",
    "other": "the batch (planned steps only)",
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
        host: the most bytes the techniques kept in host memory at once during the step (``sequence.offload``'s
            block inputs), outside ``peak``; 0 when nothing was offloaded (or the allocator measured the step).
    """

    by_category: dict[str, int]
    device: str
    method: str = "CategoryTracker (bytes of live tensor storages)"
    allocator_peak: Optional[int] = None
    step: Optional[int] = None
    host: int = 0

    @property
    def peak(self) -> int:
        return sum(self.by_category.values())

    def as_metrics(self, prefix: str = "memory/") -> dict[str, float]:
        out = {f"{prefix}{k}_mib": v / MIB for k, v in self.by_category.items()}
        out[f"{prefix}peak_mib"] = self.peak / MIB
        if self.allocator_peak is not None:
            out[f"{prefix}allocator_peak_mib"] = self.allocator_peak / MIB
        if self.host:
            out[f"{prefix}host_mib"] = self.host / MIB
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


class LiveBytes(CategoryTracker):
    """Bytes of the tensor storages created while it is active and still alive (:attr:`current`); and their peak.

    A ``TorchDispatchMode`` (works on real and fake tensors, CPU and CUDA) with no module bookkeeping,
    so it measures computations that call the same module many times in one step (the sequence
    methods run each block once per chunk). It is the
    planner's :class:`~lightning_memkit.planner.tracker.CategoryTracker` without parameters or heads:
    storages that existed before (parameters, optimizer state; recognized when they first appear as an
    op's input) are not counted; tensors created inside and still alive at the end (gradients) are in
    :attr:`current`. A storage is counted at its size when created: growth by in-place ``resize_``
    is not seen. (It agreed with PyTorch's ``MemTracker``, which this package used before, to 0.01% on a plain
    step: 34.127 vs 34.131 MiB.)
    """

    def __init__(self) -> None:
        super().__init__()


class StepMemoryTracker:
    """Context manager measuring the peak tensor memory of what runs inside it, by :data:`CATEGORIES`.

    The model's parameters, buffers and gradients and the optimizers' state are counted from the start (while
    they live); what the step creates is counted by :class:`~lightning_memkit.planner.tracker.CategoryTracker`
    in its ``"auto"`` phase (work the autograd engine runs is the backward's). Inside any optimizer's ``step``
    (torch's global step hooks) what is created is optimizer state, except the closure Lightning (and LBFGS
    users) pass to ``step``: the forward and backward it runs are categorized as usual. The state an optimizer
    holds after its step is filed as optimizer state.

    Args:
        module: the model; its parameters, buffers and gradients are categorized as such.
        optimizers: their states are categorized as optimizer state.

    Example:
        >>> with StepMemoryTracker(model, [opt]) as tracker:  # doctest: +SKIP
        ...     loss = model(x).sum(); loss.backward(); opt.step()
        >>> tracker.result().peak  # doctest: +SKIP
    """

    method = "CategoryTracker (bytes of live tensor storages)"

    def __init__(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        self.module, self.optimizers = module, list(optimizers)
        self._tracker = CategoryTracker(module.parameters(), phase="auto", optimizer_category="optimizer_state")
        self._device: Optional[torch.device] = next((p.device for p in module.parameters()), None)
        self._cuda_peak: Optional[int] = None
        self._hooks: tuple[Any, ...] = ()

    @staticmethod
    def _state(optimizers: Iterable[Any]) -> list[Any]:
        return [v for opt in optimizers for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor)]

    def _optimizer_hooks(self) -> tuple[Any, ...]:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        tracker = self._tracker
        before: list[str] = []  # the phase each running step interrupted (steps may nest: a step in backward)

        def pre_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
            before.append(tracker.phase)
            tracker.phase = "optimizer"
            # args[0] is the optimizer itself; a positional closure comes next
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            if closure is None:
                return None
            outside = before[-1]

            def closure_outside_optimizer() -> Any:
                tracker.phase = outside
                try:
                    return closure()
                finally:
                    tracker.phase = "optimizer"

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_outside_optimizer}
            return (args[0], closure_outside_optimizer, *args[2:]), kwargs

        def post_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            state = self._state([optimizer])
            tracker.move_to("optimizer_state", state)
            # storages the dispatch mode did not see created (torch.tensor(0.0): Adam's step counts) count from now
            tracker.count_existing("optimizer_state", state, exclude=storage_ids(self.module.parameters()))
            tracker.phase = before.pop() if before else "auto"

        return register_optimizer_step_pre_hook(pre_hook), register_optimizer_step_post_hook(post_hook)

    def __enter__(self) -> "StepMemoryTracker":
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
        params = list(self.module.parameters())
        param_ids = storage_ids(params)
        t = self._tracker
        t.count_existing("parameters", params)
        t.count_existing("buffers", self.module.buffers(), exclude=param_ids)
        t.count_existing("gradients", [p.grad for p in params])
        t.count_existing("optimizer_state", self._state(self.optimizers), exclude=param_ids)
        t.count_existing("other", [])
        t.__enter__()
        self._hooks = self._optimizer_hooks()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = ()
        self._tracker.__exit__(*exc)
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self._cuda_peak = torch.cuda.max_memory_allocated(self._device)

    def result(self, step: Optional[int] = None) -> MemoryBreakdown:
        """The breakdown at the step's peak (the tracker's ``logits_loss`` is reported under activations)."""
        at = self._tracker.peak_by_category
        by_category = {name: int(at.get(name, 0)) for name in CATEGORIES}
        by_category["activations"] += int(at.get("logits_loss", 0))
        return MemoryBreakdown(by_category=by_category, device=str(self._device), method=self.method,
                               allocator_peak=self._cuda_peak, step=step, host=int(self._tracker.host_peak))


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
        params = storage_bytes(self.module.parameters())
        buffers = storage_bytes(self.module.buffers())
        grads = storage_bytes(p.grad for p in self.module.parameters())
        state = storage_bytes(
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
        raise MemKitConfigError(f"method={method!r} is not a measuring method. Fix: use 'auto', 'tracker' or "
                                "'allocator'.")
    on_cuda = next(module.parameters()).device.type == "cuda"
    if method == "allocator" and not on_cuda:
        raise MemKitConfigError("method='allocator' needs a model on CUDA. Fix: use 'tracker' (or 'auto') on other "
                                "devices.")
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
) -> MemoryBreakdown:
    """Peak memory of one training step of a full-size reference model, planned on fake tensors.

    The model is built inside ``FakeTensorMode`` on the CPU device, so nothing is allocated, and its step is run
    by the planner's :class:`~lightning_memkit.planner.step.StepRunner` (as ``memkit plan`` runs a recipe's):
    the techniques installed as ``MemKitStrategy`` installs them, forward, cross-entropy (on full fp32 logits, or
    fused), backward and an AdamW update (``lr=1e-4``, ``foreach=False``; converted to ``optimizer``), measured
    by :class:`~lightning_memkit.planner.tracker.CategoryTracker`. The planner's categories are reported as
    :data:`CATEGORIES`: ``logits_loss`` under activations, the buffers apart from the batch (``other``).

    Args:
        model: a name from :data:`lightning_memkit.models.NAMED_CONFIGS`, or a ``LlamaConfig``.
        seq_len, batch_size: tokens per sequence and sequences per micro-batch.
        dtype: parameter (and activation) dtype; optimizer state follows the parameters.
        checkpoint_every: None for no activation checkpointing, else checkpoint every k-th block (with
            ``sequence``: SeCO / SpaCO checkpoint each block's chunk; StreamBP needs no checkpointing).
        fused_cross_entropy: compute the loss with the chunked fused linear cross-entropy (no logits).
        warmup_steps: 0: measure a step that creates the optimizer state; more: the state exists before the
            measured step (created by the planner's warm-up, a step on zero gradients).
        optimizer: a memkit ``optimizer=`` setting (e.g. ``{"name": "apollo_mini", "in_backward": True}``)
            to convert the AdamW into, as the strategy would; None: torch AdamW.
        sequence: a memkit ``sequence=`` setting (e.g. ``{"method": "streambp", "chunk_size": 2048}``); with
            ``"offload": True`` the step is planned as on a GPU: the blocks' inputs are ``host`` bytes.

    Raises:
        MemKitConfigError: a bitsandbytes optimizer (its compiled kernels cannot run on fake tensors: predict
            its state with :func:`lightning_memkit.optim.memory.predict_state_bytes`), or a setting the
            techniques refuse.
    """
    import lightning.pytorch as pl
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.config import parse_optimizer
    from lightning_memkit.loss.causal_lm import causal_lm_loss
    from lightning_memkit.models.llama import Transformer, get_config
    from lightning_memkit.planner.step import Setting, StepRunner

    name = parse_optimizer(optimizer).name if optimizer is not None else None
    if name in ("adamw8bit", "paged_adamw8bit"):
        raise MemKitConfigError(f"optimizer={optimizer!r} (bitsandbytes) cannot run on fake tensors. Fix: predict its "
                                "state with lightning_memkit.optim.memory.predict_state_bytes.")
    setting = Setting(
        activations={"checkpoint": "blocks", "checkpoint_every": checkpoint_every} if checkpoint_every else None,
        cross_entropy={"impl": "chunked"} if fused_cross_entropy else "plain",
        optimizer=optimizer, sequence=sequence,
    )

    class ReferenceStep(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.model = net

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return causal_lm_loss(self.model, batch["input_ids"], batch["labels"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4, foreach=False)

    cfg = get_config(model) if isinstance(model, str) else model
    previous = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=False):
        torch.set_default_dtype(dtype)  # build in the target dtype: .to() would not swap fake parameters
        try:
            module = ReferenceStep(Transformer(cfg))
        finally:
            torch.set_default_dtype(previous)
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        result = StepRunner(module, None, batch).run(setting, measure=True, warm=warmup_steps > 0)
        buffers = storage_bytes(module.buffers(), exclude=storage_ids(module.parameters()))
    at = result.at_peak
    by_category = {
        "parameters": at["parameters"], "buffers": buffers, "gradients": at["gradients"],
        "optimizer_state": at["optimizer_state"], "activations": at["activations"] + at["logits_loss"],
        "temporaries": at["temporaries"], "other": at["other"] - buffers,
    }
    return MemoryBreakdown(by_category=by_category, device="cpu", step=min(warmup_steps, 1), host=result.host,
                           method="the planner's step under FakeTensorMode (CategoryTracker; nothing allocated)")

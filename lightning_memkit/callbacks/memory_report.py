"""``MemoryReport``: the peak memory of training steps, with a breakdown, printed and logged."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from typing_extensions import override

from lightning_memkit.config import MemKitConfigError, check_choice, check_int
from lightning_memkit.memory import CATEGORIES, MemoryBreakdown, format_table, make_step_tracker
from lightning_memkit.units import MIB, in_unit


class MemoryReport(Callback):
    """Measure the peak memory of a training step every ``every_n_steps`` optimizer steps.

    ``method="tracker"`` runs the measured step under
    :class:`~lightning_memkit.memory.StepMemoryTracker` (the planner's
    :class:`~lightning_memkit.planner.tracker.CategoryTracker`), which counts the bytes of live tensors (any
    device) and splits the peak into parameters, buffers, gradients, optimizer state, activations (the
    forward's, logits and loss included), temporaries (the backward's, recomputation included) and other
    (see :data:`~lightning_memkit.memory.CATEGORIES`); such a step runs slower (every operator is
    intercepted), so measure sparingly. ``method="allocator"`` (CUDA) takes the peak from the caching
    allocator's statistics at no cost and counts parameters, gradients and optimizer state exactly, the rest
    being activations. ``"auto"``: the allocator on CUDA, the tracker elsewhere. The breakdown is logged to
    the Trainer's loggers as ``memory/<category>_mib`` at each measurement and printed as a table when
    fitting ends (rank zero).

    Args:
        every_n_steps: measure when the global step is a multiple of this (step 0 included).
        print_every: also print the table at every measurement, not only at the end.
        method: ``"auto"``, ``"tracker"`` or ``"allocator"`` (see above).

    Raises:
        MemKitConfigError: a setting of the wrong type or out of range (a ValueError).

    Attributes:
        reports: one :class:`~lightning_memkit.memory.MemoryBreakdown` per measured step.
    """

    def __init__(self, every_n_steps: int = 100, print_every: bool = False, method: str = "auto") -> None:
        every_n_steps = check_int("MemoryReport.every_n_steps", every_n_steps, minimum=1)
        if not isinstance(print_every, bool):
            raise MemKitConfigError(f"MemoryReport.print_every={print_every!r} has type {type(print_every).__name__}. "
                                    "Fix: true or false.")
        check_choice("MemoryReport.method", method, ("auto", "tracker", "allocator"))
        self.method = method
        self.every_n_steps = every_n_steps
        self.print_every = print_every
        self.reports: list[MemoryBreakdown] = []
        self._active: Optional[Any] = None
        self._active_step = 0

    def _should_measure(self, trainer: "pl.Trainer", batch_idx: int) -> bool:
        last_micro_batch = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        return last_micro_batch and trainer.global_step % self.every_n_steps == 0

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self._should_measure(trainer, batch_idx):
            self._active = make_step_tracker(pl_module, trainer.optimizers, self.method)
            self._active_step = trainer.global_step
            self._active.__enter__()

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._active is None:
            return
        tracker, self._active = self._active, None
        tracker.__exit__(None, None, None)
        report = tracker.result(step=self._active_step)
        self.reports.append(report)
        self._log(trainer, report)
        if self.print_every:
            rank_zero_info(self.table(report))

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self._active is not None:
            self._active.__exit__(type(exception), exception, None)
            self._active = None

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.reports:
            rank_zero_info(self.table(self.reports[-1]))

    @rank_zero_only
    def _log(self, trainer: "pl.Trainer", report: MemoryBreakdown) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(report.as_metrics(), step=report.step)

    def table(self, report: MemoryBreakdown) -> str:
        """The report as a text table: category, MiB, share of the peak."""
        peak = report.peak or 1
        rows = [(name, in_unit(report.by_category[name], MIB), f"{100 * report.by_category[name] / peak:.1f}%")
                for name in CATEGORIES]
        rows.append(("peak (sum)", in_unit(report.peak, MIB), "100.0%"))
        if report.allocator_peak is not None:
            rows.append(("CUDA allocator peak", in_unit(report.allocator_peak, MIB), ""))
        if report.host:
            rows.append(("host memory (offloaded, not in the peak)", in_unit(report.host, MIB), ""))
        title = (
            f"MemoryReport: optimizer step {report.step} on {report.device}: tensors alive at the step's peak, "
            f"measured by {report.method}"
        )
        return title + "\n" + format_table(rows, ("category", "MiB", "share"))

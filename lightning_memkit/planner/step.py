"""One training step of a LightningModule with a chosen set of techniques, run as the strategy runs it.

:class:`StepRunner` is what ``memkit plan``, the auto mode and ``memkit verify`` share. For one
:class:`Setting` it builds the techniques (as ``MemKitStrategy`` does), checks them against the Trainer,
installs them on the module, rebuilds the optimizer from ``configure_optimizers``, runs Lightning's
automatic-optimization step (``optimizer.step(closure)``: ``training_step`` inside the precision's
forward context and the techniques' step contexts, then ``backward``) and takes the techniques off
again. On fake tensors it measures the step with :class:`~.tracker.CategoryTracker`; on real
tensors it can hand back the gradients and the parameters' update (for ``verify``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from lightning_memkit.config import (
    MemKitConfigError,
    parse_activations,
    parse_cross_entropy,
    parse_optimizer,
    parse_sequence,
    planning,
)
from lightning_memkit.planner.tracker import DYNAMIC, CategoryTracker, storage_bytes, storage_ids
from lightning_memkit.technique_set import TechniqueSet
from lightning_memkit.units import human_bytes

#: Categories of a planned step, in table order.
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "logits_loss", "temporaries", "other")
LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer_state": "optimizer state",
          "activations": "activations", "logits_loss": "logits/loss", "temporaries": "temporaries",
          "other": "buffers + batch"}


@dataclass(frozen=True)
class Setting:
    """One combination of techniques: ``MemKitStrategy``'s arguments (ZeRO ones included)."""

    activations: Any = None
    cross_entropy: Any = "fused"
    optimizer: Any = None
    sequence: Any = None
    zero_stage: int = 0
    offload_optimizer: Optional[str] = None
    offload_parameters: Optional[str] = None

    def parsed(self) -> tuple[Any, Any, Any, Any]:
        """The four technique families' configs (ZeRO is planned by formula, not run)."""
        return (parse_activations(self.activations), parse_cross_entropy(self.cross_entropy),
                parse_optimizer(self.optimizer), parse_sequence(self.sequence))

    def strategy_arguments(self) -> dict[str, Any]:
        """The ``MemKitStrategy`` init arguments that differ from the defaults, in YAML-friendly form."""
        defaults = Setting()
        mine, theirs = self.parsed(), defaults.parsed()
        out: dict[str, Any] = {}
        for i, name in enumerate(("activations", "cross_entropy", "optimizer", "sequence")):
            if mine[i] != theirs[i]:
                value = getattr(self, name)
                out[name] = _changed_fields(mine[i]) if dataclasses.is_dataclass(value) else value
        for name in ("zero_stage", "offload_optimizer", "offload_parameters"):
            if getattr(self, name) != getattr(defaults, name):
                out[name] = getattr(self, name)
        return out


def _changed_fields(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass that differ from its defaults."""
    default = type(config)()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


@dataclass
class StepResult:
    """What one planned step measured (bytes) or computed."""

    at_peak: dict[str, int] = field(default_factory=dict)
    maximum: dict[str, int] = field(default_factory=dict)
    host: int = 0
    nvme: int = 0
    notes: list[str] = field(default_factory=list)
    work_at_peak: dict[str, int] = field(default_factory=dict)  # forward/backward peak without gradients
    loss: Optional[float] = None
    gradients: dict[str, Tensor] = field(default_factory=dict)
    update: dict[str, Tensor] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.at_peak.values())


def head_modules(module: nn.Module) -> list[nn.Module]:
    """The LM heads in ``module`` (submodules named ``lm_head``, or a model's output embeddings)."""
    heads = [m for n, m in module.named_modules() if n.split(".")[-1] == "lm_head"]
    for m in module.modules():
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            try:
                out = get()
            except Exception:  # noqa: BLE001 - a model without a head
                out = None
            if isinstance(out, nn.Module) and all(out is not h for h in heads):
                heads.append(out)
    return heads


@contextlib.contextmanager
def _no_logging(module: nn.Module) -> Iterator[None]:
    """``self.log`` outside the Trainer's loop would raise: make it a no-op during the planned step."""
    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            module.__dict__.pop(k, None)
        module.__dict__.update(saved)


class _RunningModule:
    """Remembers which module's forward is running (to name the part a fake step fails in)."""

    def __init__(self, module: nn.Module) -> None:
        self.names = {id(m): n or type(m).__name__ for n, m in module.named_modules()}
        self.stack: list[str] = []
        self.last: Optional[str] = None

    def __enter__(self) -> "_RunningModule":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def pre(m: nn.Module, _args: Any) -> None:
            if id(m) in self.names:
                self.stack.append(f"{self.names[id(m)]} ({type(m).__name__})")
                self.last = self.stack[-1]

        def post(m: nn.Module, _args: Any, _out: Any) -> None:
            if id(m) in self.names and self.stack:
                self.stack.pop()

        self._handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def where(self) -> str:
        return self.stack[-1] if self.stack else (self.last or "the step outside any module's forward")


#: The value a read of a fake tensor's value gets in a planned step (``.item()``, ``.tolist()``, ``if t:``,
#: ``float(t)``, ``f"{t:.3f}"``): fake tensors have no values and a memory plan needs none. 1 (``True``, ``1``,
#: ``1.0`` by dtype) divides, takes logarithms and sizes loops without failing; branches on it are not planned.
STAND_IN = 1
#: how the caveat of a step that read values starts (see :meth:`StandInValues.note`)
STAND_IN_NOTE = "this module reads tensor values in its step"

_PLANNER_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
#: memkit's optimizers: their reads (a Cholesky's status, SGD-SaI's gradient SNR) are memkit's own, not the user's
_OPTIM_DIR = os.path.join(os.path.dirname(_PLANNER_DIR), "optim")


def _caller() -> str:
    """``code`` at ``file:line`` of the innermost frame outside torch and the planner (the user's read); a frame
    in memkit's optimizers is returned as its absolute path (``_OPTIM_DIR/...``: not a read to report)."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith((_PLANNER_DIR, _TORCH_DIR)):
            continue
        if path.startswith(_OPTIM_DIR + os.sep):
            return path
        try:
            shown = os.path.relpath(path)
        except ValueError:  # another drive (Windows)
            shown = path
        shown = shown if not shown.startswith("..") else os.path.basename(path)
        return f"{(frame.line or '').strip() or frame.name} at {shown}:{frame.lineno}"
    return "an unknown place"


class StandInValues:
    """Context manager for a step on fake tensors: a read of a fake tensor's value gets :data:`STAND_IN`
    of the tensor's dtype instead of failing. Only reads that fake tensors cannot answer are replaced (a
    constant the fake mode knows keeps its value); no tensor is created, so the memory accounting is as before.

    Attributes:
        reads: where values were read (``code at file:line``), the first of each place, in order.
    """

    def __init__(self) -> None:
        self.reads: list[str] = []
        self._mode: Any = None
        self._format: Any = None

    def _stand_in(self, t: Tensor) -> Any:
        if len(self.reads) < 20:  # the places are for the caveat; a step reading in a loop need not walk its stack
            where = _caller()
            # a read inside memkit's optimizers is not the module's: those branches only pick between paths of the
            # same size (e.g. Natural GaLore's Cholesky or its eigendecomposition fallback on a 10 x 10 matrix)
            if where not in self.reads and not where.startswith(_OPTIM_DIR):
                self.reads.append(where)
        if t.dtype == torch.bool:
            return bool(STAND_IN)
        return float(STAND_IN) if t.is_floating_point() else (complex(STAND_IN) if t.is_complex() else int(STAND_IN))

    def note(self) -> Optional[str]:
        """The caveat for the plan (None when nothing was read)."""
        if not self.reads:
            return None
        more = f" and {len(self.reads) - 1} more place(s)" if len(self.reads) > 1 else ""
        return (f"{STAND_IN_NOTE} ({self.reads[0]}{more}); the plan used a stand-in value "
                f"({STAND_IN}), so branches on it were not planned")

    def __enter__(self) -> "StandInValues":
        from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        owner, local_scalar = self, torch.ops.aten._local_scalar_dense.default

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if func is local_scalar:
                    try:
                        return func(*args, **(kwargs or {}))
                    except DataDependentOutputException:
                        return owner._stand_in(args[0])
                return func(*args, **(kwargs or {}))

        def fake_format(t: Tensor, spec: str) -> str:  # Tensor.__format__ reads .item() only for plain Tensors
            return format(t.item(), spec) if t.dim() == 0 else object.__format__(t, spec)

        self._format = FakeTensor.__dict__.get("__format__")
        FakeTensor.__format__ = fake_format  # type: ignore[method-assign]
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        self._mode.__exit__(*exc)
        if self._format is None:
            del FakeTensor.__format__
        else:
            FakeTensor.__format__ = self._format  # type: ignore[method-assign]


class StepRunner:
    """Runs one automatic-optimization step of ``module`` with a :class:`Setting`.

    Args:
        module: the LightningModule (real or fake parameters), attached to ``trainer``.
        trainer: the Trainer its techniques are checked against (precision, accumulation, clipping).
        batch: the batch ``training_step`` receives.
    """

    def __init__(self, module: Any, trainer: Any, batch: Any) -> None:
        if not module.automatic_optimization:
            raise MemKitConfigError(
                f"{type(module).__name__} uses manual optimization: memkit's planner runs Lightning's automatic "
                "optimization step (optimizer.step(closure)). Fix: plan a module with automatic_optimization=True."
            )
        self.module, self.trainer, self.batch = module, trainer, batch
        self.precision = trainer.precision_plugin if trainer is not None else None
        self.last_optimizer: Any = None  # the optimizer of the last run (tests read its state)

    def _optimizer(self, techniques: TechniqueSet) -> Any:
        from lightning.pytorch.core.optimizer import _configure_optimizers

        conf = self.module.configure_optimizers()
        if conf is None:
            raise MemKitConfigError(f"{type(self.module).__name__}.configure_optimizers returned None: nothing to "
                "plan.")
        optimizers, _schedulers, _monitor = _configure_optimizers(conf)
        if len(optimizers) != 1:
            raise MemKitConfigError(f"configure_optimizers returned {len(optimizers)} optimizers; the planner runs one "
                                    "(automatic optimization). Fix: plan a module with a single optimizer.")
        return techniques.convert_optimizers(optimizers)[0]

    @staticmethod
    def warm_optimizer(optimizer: Any) -> None:
        """Create the optimizer state without a forward pass: one step on zero gradients (fake tensors)."""
        inner = getattr(optimizer, "optimizer", optimizer) if hasattr(optimizer, "remove_hooks") else optimizer
        if getattr(inner, "forward_only", False):  # zeroth-order: no gradients to step on
            inner.init_state()
            return
        params = [p for g in inner.param_groups for p in g["params"] if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p in params:
            p.grad = None

    def run(self, setting: Setting, *, measure: bool = False, capture: bool = False, warm: bool = False) -> StepResult:
        """One step with ``setting``.

        Args:
            measure: track the step's memory by category (:attr:`StepResult.at_peak`).
            capture: keep the gradients (after backward; not with a step-in-backward optimizer) and the
                parameters' update.
            warm: create the optimizer state before the measured step (fake tensors).

        Raises:
            MemKitConfigError: the setting cannot run with this Trainer or module (the reason says why).
        """
        techniques = TechniqueSet.build(*setting.parsed())
        module, result = self.module, StepResult()
        module.zero_grad(set_to_none=True)
        capture_hooks: list[Any] = []
        try:
            with planning():  # set up for the recipe's machine (e.g. sequence.offload stays on), not this one
                techniques.install(module, self.trainer)
            if capture:  # registered before the optimizer's own hooks: a step in backward consumes the gradients
                names = {p: n for n, p in module.named_parameters()}

                def keep(p: Tensor) -> None:
                    if p.grad is not None:
                        result.gradients[names[p]] = p.grad.detach().clone()

                capture_hooks = [p.register_post_accumulate_grad_hook(keep) for p in module.parameters()
                                 if p.requires_grad]
            try:
                optimizer = self._optimizer(techniques)
            except MemKitConfigError:
                raise
            except Exception as err:
                raise StepError(f"configure_optimizers failed: {type(err).__name__}: {err}") from err
            self.last_optimizer = optimizer
            stand_in = StandInValues() if any(_is_fake(p) for p in module.parameters()) else None
            if warm:  # an optimizer's first step may read values too (Natural GaLore's Cholesky status)
                with stand_in if stand_in is not None else contextlib.nullcontext():
                    self.warm_optimizer(optimizer)
            before = {n: p.detach().clone() for n, p in module.named_parameters()} if capture else {}
            tracker = CategoryTracker(module.parameters(), head_modules(module)) if measure else None
            with contextlib.ExitStack() as stack:
                stack.enter_context(_no_logging(module))
                running = stack.enter_context(_RunningModule(module))
                if stand_in is not None:
                    stack.enter_context(stand_in)
                if tracker is not None:
                    stack.enter_context(tracker)
                try:
                    self._step(techniques, optimizer, tracker, result, capture)
                except MemKitConfigError:
                    raise
                except Exception as err:
                    where = running.where()
                    hint = ""
                    if "DynamicOutputShape" in type(err).__name__:
                        hint = (" The step makes a tensor whose shape depends on values (boolean indexing, nonzero(), "
                                "unique()); fake tensors have none, so its size cannot be planned. Fix: use fixed "
                                "shapes (masks and torch.where) in training_step.")
                    if stand_in is not None and stand_in.reads:
                        hint += f" Note: {stand_in.note()}."
                    raise StepError(f"the training step failed in {where}: {type(err).__name__}: "
                                    f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}.{hint}") from err
            if stand_in is not None and stand_in.reads:
                result.notes.append(stand_in.note() or "")
            if capture:
                result.update = {n: (p.detach() - before[n]) for n, p in module.named_parameters()}
            if tracker is not None:
                result.at_peak = self._static(optimizer)
                result.maximum = dict(result.at_peak)
                for key in DYNAMIC:
                    result.at_peak[key] = tracker.peak_by_category[key]
                    result.maximum[key] = tracker.max_by_category[key]
                result.work_at_peak = dict(tracker.work_peak_by_category)
                if tracker.host_peak:
                    result.host += tracker.host_peak
                    result.notes.append(
                        f"host memory: {human_bytes(tracker.host_peak)} at most of what the techniques keep in host "
                        f"memory during the step (sequence.offload's block inputs; {human_bytes(tracker.host_at_peak)} "
                        "at the device peak), not in the device peak")
        finally:
            for hook in capture_hooks:
                hook.remove()
            techniques.uninstall()
            module.zero_grad(set_to_none=True)
        return result

    def _static(self, optimizer: Any) -> dict[str, int]:
        """What existed before the step: parameters, optimizer state, buffers and the batch (exact)."""
        from torch.utils._pytree import tree_leaves

        params = list(self.module.parameters())
        param_ids = storage_ids(params)
        state = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor)]
        out = dict.fromkeys(CATEGORIES, 0)
        out["parameters"] = storage_bytes(params)
        out["optimizer_state"] = storage_bytes(state, exclude=param_ids)
        other = list(self.module.buffers()) + [t for t in tree_leaves(self.batch) if isinstance(t, Tensor)]
        out["other"] = storage_bytes(other, exclude=param_ids)
        return out

    def _step(self, techniques: TechniqueSet, optimizer: Any, tracker: Optional[CategoryTracker], result: StepResult,
              capture: bool) -> None:
        module = self.module

        forward_only = techniques.forward_only  # zeroth-order: the optimizer calls this twice per perturbation

        def closure() -> Tensor:
            if tracker is not None and forward_only:
                tracker.phase = "forward"
            with contextlib.ExitStack() as stack:
                if self.precision is not None:
                    stack.enter_context(self.precision.forward_context())
                stack.enter_context(techniques.step_context())
                out = module.training_step(self.batch, 0)
            loss = out["loss"] if isinstance(out, dict) else out
            if not isinstance(loss, Tensor):
                raise MemKitConfigError(f"{type(module).__name__}.training_step returned {type(out).__name__}, not a "
                                        "loss tensor (or a dict with 'loss'): nothing to back-propagate.")
            if forward_only:
                if tracker is not None:
                    tracker.begin_optimizer()  # the update between and after the forwards
                return loss
            if tracker is not None:
                tracker.begin_backward(loss)
            loss.backward()
            if tracker is not None:
                tracker.begin_optimizer()
            return loss

        optimizer.zero_grad(set_to_none=True)
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        if tracker is not None and accumulate > 1:  # the window's last micro-batch: its gradients already exist
            tracker.add_gradients(module.parameters())
        loss = optimizer.step(closure)
        if isinstance(loss, Tensor) and not _is_fake(loss):
            result.loss = float(loss.detach())


class StepError(RuntimeError):
    """A planned step failed; the message names the module whose forward was running."""


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)

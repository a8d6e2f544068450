"""``MemKitStrategy``: installs memory-saving techniques on an ordinary LightningModule.

It is Lightning's DDP strategy (one process per device; gloo on CPU, NCCL on CUDA) with two
changes: with a single process it neither starts a process group nor wraps the model, so it behaves
exactly like Lightning's single-device strategy; and it installs the configured techniques at the
points of the step where they belong (see :mod:`lightning_memkit.technique`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from datetime import timedelta
from typing import Any, Literal, Mapping, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_memkit.config import (
    ActivationsConfig,
    CrossEntropyConfig,
    MemKitConfigError,
    MemKitSettings,
    OptimizerConfig,
    SequenceConfig,
    parse_activations,
    parse_cross_entropy,
    parse_optimizer,
    parse_sequence,
    parse_zero,
)
from lightning_memkit.checkpoint_io import AtomicCheckpointIO, complete_epoch_end, unreadable_checkpoint
from lightning_memkit.optim.state import check_torch_optimizer_state
from lightning_memkit.optim.zo_technique import is_forward_only
from lightning_memkit.resume import CHECKPOINT_KEY, check_resume, describe_family, keep_weights_only, parse_resume, \
    settings_record
from lightning_memkit.models.quantized import keep_4bit_trainable
from lightning_memkit.technique_set import TechniqueSet
from lightning_memkit.technique import Technique

#: name -> (description, init arguments). Registered with Lightning when the package is imported.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "memkit": (
        "memkit with its safe defaults: fused linear cross-entropy (exact, no extra compute)",
        {"cross_entropy": "fused"},
    ),
    "memkit_checkpoint": (
        "memkit's defaults plus activation checkpointing of every transformer block (exact; ~1/3 more compute)",
        {"cross_entropy": "fused", "activations": {"checkpoint": "blocks"}},
    ),
    "memkit_zero1": (
        "memkit's defaults on DeepSpeed ZeRO-1 (optimizer states partitioned across processes)",
        {"cross_entropy": "fused", "zero_stage": 1},
    ),
    "memkit_zero2": (
        "memkit's defaults on DeepSpeed ZeRO-2 (optimizer states and gradients partitioned)",
        {"cross_entropy": "fused", "zero_stage": 2},
    ),
    "memkit_zero2_offload": (
        "memkit's defaults on DeepSpeed ZeRO-2 with the optimizer (fp32 weights, states, step) on the CPU",
        {"cross_entropy": "fused", "zero_stage": 2, "offload_optimizer": "cpu"},
    ),
    "memkit_zero3": (
        "memkit's defaults on DeepSpeed ZeRO-3 (parameters, gradients and optimizer states partitioned)",
        {"cross_entropy": "fused", "zero_stage": 3},
    ),
    "memkit_zero3_offload": (
        "memkit's defaults on DeepSpeed ZeRO-3 with the optimizer and the parameters on the CPU",
        {"cross_entropy": "fused", "zero_stage": 3, "offload_optimizer": "cpu", "offload_parameters": "cpu"},
    ),
    "memkit_zero3_offload_nvme": (
        "memkit's defaults on DeepSpeed ZeRO-3 with the optimizer and the parameters on NVMe (ZeRO-Infinity; "
        "the folder comes from $MEMKIT_NVME_PATH)",
        {"cross_entropy": "fused", "zero_stage": 3, "offload_optimizer": "nvme", "offload_parameters": "nvme"},
    ),
}


#: memkit's own arguments of MemKitStrategy: the technique families, then the ZeRO backend's
MEMKIT_ARGUMENTS = ("activations", "cross_entropy", "optimizer", "sequence", "zero_stage", "offload_optimizer",
                    "offload_parameters", "nvme_path", "cpu_adam", "deepspeed_config", "memory_budget", "memory_search",
                    "resume")


#: zero_stage -> the strategy class that runs it; the DeepSpeed backend (lightning_memkit.zero.strategy) registers
#: itself for stages 1-3 when the package is imported (this module does not import it: it builds on this one)
BACKENDS: dict[int, type] = {}


def register_backend(stages: tuple[int, ...], cls: type) -> None:
    """Make ``MemKitStrategy(zero_stage=s)`` build ``cls`` for each ``s`` in ``stages``."""
    for stage in stages:
        BACKENDS[stage] = cls


class _ChooseBackend(type(DDPStrategy)):  # type: ignore[misc]
    """``MemKitStrategy(zero_stage=1|2|3, ...)`` builds the registered ZeRO backend, itself a ``MemKitStrategy``.

    Every memkit argument is keyword-only, so the stage is read from the keywords alone. A metaclass rather than
    ``__new__`` (which would have Python run ``__init__`` a second time on the subclass's instance): LightningCLI
    (jsonargparse) then reads the arguments from ``__init__``, as for any class.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        stage = kwargs.get("zero_stage", 0)
        if cls is MemKitStrategy and isinstance(stage, int) and not isinstance(stage, bool) and stage in BACKENDS:
            return BACKENDS[stage](*args, **kwargs)
        return super().__call__(*args, **kwargs)


class MemKitStrategy(DDPStrategy, metaclass=_ChooseBackend):
    """Train an unchanged LightningModule with memory-saving techniques switched on by configuration.

    Args:
        activations: what the forward pass keeps for the backward pass: ``"none"``,
            ``"checkpoint"`` (checkpoint every transformer block), a mapping of
            :class:`~lightning_memkit.config.ActivationsConfig` fields such as
            ``{"checkpoint": "blocks", "checkpoint_every": 2}``, or an ``ActivationsConfig``.
        cross_entropy: how the LM head and the loss are computed: ``"fused"`` (default; exact, logits
            never materialized), ``"plain"`` (the model's own computation), or a mapping of
            :class:`~lightning_memkit.config.CrossEntropyConfig` fields such as ``{"impl": "chunked"}``.
        optimizer: rebuild the optimizer ``configure_optimizers`` returned as a memory-efficient one:
            ``"none"`` (default: keep it), a name such as ``"galore_adamw8bit"``, ``"apollo_mini"``,
            ``"frugal"``, ``"adamw8bit"``, or a mapping of
            :class:`~lightning_memkit.config.OptimizerConfig` fields such as
            ``{"name": "apollo_mini", "in_backward": True}``.
        sequence: sequence-chunked backpropagation for long context: ``"none"`` (default),
            ``"streambp"`` or ``"seco"`` (exact), ``"spaco"`` (unbiased estimate), or a mapping of
            :class:`~lightning_memkit.config.SequenceConfig` fields such as
            ``{"method": "streambp", "chunk_size": 2048}``. It acts on losses computed with
            :func:`~lightning_memkit.loss.causal_lm_loss` and on Hugging Face causal LMs called with
            ``labels=``.
        zero_stage: 0 (default: memkit's DDP backend, one process per device, nothing sharded), or the
            ZeRO stage DeepSpeed runs: 1 (optimizer states partitioned across processes), 2 (and
            gradients), 3 (and parameters). Stages 1-3 build a
            :class:`~lightning_memkit.zero.MemKitDeepSpeedStrategy` on Lightning's DeepSpeed strategy.
        offload_optimizer: ``"cpu"`` (ZeRO-Offload: fp32 weights, optimizer states and the step on the
            CPU; stage >= 1) or ``"nvme"`` (stage 3); default none.
        offload_parameters: ``"cpu"`` or ``"nvme"``: the 16-bit parameters live off the device between
            uses (stage 3); default none.
        nvme_path: a writable folder on a local NVMe disk, needed by ``"nvme"`` (default:
            ``$MEMKIT_NVME_PATH``).
        cpu_adam: with ``offload_optimizer``, step torch ``Adam``/``AdamW`` as DeepSpeed's vectorized
            ``DeepSpeedCPUAdam`` (the same update; its op is JIT-built once, 1-2 minutes). Default true.
        deepspeed_config: more DeepSpeed config keys (a mapping or a JSON file), merged into the one
            memkit builds; keys memkit or the Trainer own are refused.
        memory_budget: auto mode: a device memory budget (``"24GiB"``, bytes, or ``"auto"``: the CUDA
            device's free memory). At setup memkit measures one full-size step of the module on fake
            tensors for each candidate combination of the families left unset (``activations``,
            ``optimizer``, ``sequence`` given as None), cheapest expected step time first, takes the first
            that fits and logs what it chose and why; it fails before training, naming the closest
            candidate, when none fits. ``"auto"`` keeps 10% of the free memory back; with several
            processes the smallest budget of all is used, so all choose alike. See ``memkit plan``.
        memory_search: ``"exact"`` (default: only techniques that leave the results unchanged, such as
            checkpointing, StreamBP, the step in backward) or ``"any"`` (approximate optimizers too:
            8-bit AdamW, APOLLO-Mini, GaLore-8bit, which change the update).
        resume: what ``Trainer.fit(ckpt_path=...)`` restores. ``"exact"`` (default): everything (weights,
            optimizer state, schedulers, step, data position, RNG), and optimizer settings that differ from
            the ones the checkpoint records are refused at setup with both settings. ``"weights"``: the
            model's weights only; the optimizer, schedulers and counters start fresh, so the settings may
            change (e.g. continue an AdamW run with GaLore).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, timeout, start_method: as in Lightning's ``DDPStrategy``; the
            Trainer fills most of them in. ``checkpoint_io`` defaults to
            :class:`~lightning_memkit.checkpoint_io.AtomicCheckpointIO` (whole files or none, checked on load).
        **ddp_kwargs: passed to ``torch.nn.parallel.DistributedDataParallel`` when more than one
            process trains.

    Raises:
        MemKitConfigError: an unknown technique name or key, a bad value or a wrong type; ZeRO settings
            that do not go together; a technique that cannot run under the chosen ZeRO stage (the
            table in docs/zero.md lists which can). When a fit resumes: optimizer settings that differ from
            the checkpoint's (with ``resume="exact"``), or a checkpoint that is missing or damaged.
    """

    strategy_name = "memkit"

    def __init__(
        self,
        *,
        activations: Union[str, dict[str, Any], ActivationsConfig, None] = None,
        cross_entropy: Union[str, dict[str, Any], CrossEntropyConfig, None] = "fused",
        optimizer: Union[str, dict[str, Any], OptimizerConfig, None] = None,
        sequence: Union[str, dict[str, Any], SequenceConfig, None] = None,
        zero_stage: int = 0,
        offload_optimizer: Optional[str] = None,
        offload_parameters: Optional[str] = None,
        nvme_path: Optional[str] = None,
        cpu_adam: bool = True,
        deepspeed_config: Union[dict[str, Any], str, None] = None,
        memory_budget: Union[str, int, None] = None,
        memory_search: str = "exact",
        resume: str = "exact",
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        self._parse_techniques(activations, cross_entropy, optimizer, sequence)
        self._init_memory_budget(memory_budget, memory_search, activations, optimizer, sequence)
        self._init_resume(resume)
        # zero_stage 0 (here) validates the ZeRO arguments too: offload without ZeRO is refused with the fix
        self.zero = parse_zero(zero_stage, offload_optimizer, offload_parameters, nvme_path, cpu_adam, deepspeed_config)
        if self.zero.enabled:  # only reachable from a subclass: the metaclass builds the DeepSpeed backend otherwise
            raise MemKitConfigError(
                f"{type(self).__name__}(zero_stage={self.zero.stage}): a subclass of MemKitStrategy is the DDP "
                "backend. Fix: subclass lightning_memkit.zero.MemKitDeepSpeedStrategy for ZeRO, or zero_stage=0."
            )
        if self.zero.deepspeed_config:
            raise MemKitConfigError(
                "deepspeed_config is set but zero_stage=0 (memkit's DDP backend, no DeepSpeed). Fix: set zero_stage "
                "to 1, 2 or 3, or drop deepspeed_config."
            )
        check_ddp_kwargs(ddp_kwargs)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,  # None: AtomicCheckpointIO (see the checkpoint_io property)
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )
        self.technique_set = self._build_techniques()

    def _parse_techniques(self, activations: Any, cross_entropy: Any, optimizer: Any, sequence: Any) -> None:
        self.activations = parse_activations(activations)
        self.cross_entropy = parse_cross_entropy(cross_entropy)
        self.optimizer_config = parse_optimizer(optimizer)
        self.sequence = parse_sequence(sequence)

    def _init_memory_budget(self, budget: Any, search: str, activations: Any, optimizer: Any, sequence: Any) -> None:
        from lightning_memkit.config import check_choice, parse_size

        if budget is not None and budget != "auto":
            parse_size("memory_budget", budget)  # an unparseable size fails here, not at setup
        self.memory_budget = budget
        self.memory_search = check_choice("memory_search", search, ("any", "exact"))
        self._free_families = tuple(name for name, value in (("activations", activations), ("optimizer", optimizer),
                                                              ("sequence", sequence)) if value is None)
        self.memory_choice: Any = None  # the planner's Row chosen at setup

    def _init_resume(self, resume: str) -> None:
        self.resume = parse_resume(resume)
        self._weights_resume = False  # True after a resume="weights" checkpoint was loaded

    def _choose_within_budget(self, trainer: "pl.Trainer") -> None:
        """Auto mode: pick the cheapest combination that fits ``memory_budget`` and rebuild the techniques."""
        from lightning_memkit.planner.auto import choose_for_module
        from lightning_memkit.planner.search import setting_of
        from lightning_memkit.units import human_bytes

        module = self.lightning_module
        base = setting_of(self)
        row, rows, limit, how = choose_for_module(module, trainer, self.memory_budget, base=base,
                                                  free=self._free_families,
                                                  allow_approximate=self.memory_search == "any")
        chosen = row.candidate.setting
        self._parse_techniques(chosen.activations, chosen.cross_entropy, chosen.optimizer, chosen.sequence)
        self.technique_set = self._build_techniques()
        self.memory_choice = row
        tried = "; ".join(f"{r.candidate.name}: " + (f"{human_bytes(r.peak)}, does not fit" if r.result is not None
                                                    else f"cannot run ({r.skipped})") for r in rows[:-1])
        rank_zero_info(
            f"memkit memory_budget={human_bytes(limit)} ({how}): chose '{row.candidate.name}' "
            f"({chosen.strategy_arguments() or 'as configured'}): one step peaks at {human_bytes(row.peak)} on the "
            f"device (measured on fake tensors), expected step time {row.candidate.overhead:.2f}x, "
            f"{'exact' if row.candidate.exact else 'approximate'}. It is the cheapest of the "
            f"{'exact ' if self.memory_search == 'exact' else ''}combinations of "
            f"{list(self._free_families) or 'nothing (all families set)'} that fits"
            + (f"; cheaper ones tried: {tried}." if tried else ".")
        )

    def describe_backend(self) -> str:
        """The backend in words (logged at setup)."""
        return "DDP" if not self.single_process else "one process"

    def _build_techniques(self) -> TechniqueSet:
        return TechniqueSet.build(self.activations, self.cross_entropy, self.optimizer_config, self.sequence)

    @property
    def settings(self) -> MemKitSettings:
        """What this strategy is configured with, parsed (the auto mode's choice, once made, included)."""
        return MemKitSettings(self.activations, self.cross_entropy, self.optimizer_config, self.sequence, self.zero)

    @property
    def techniques(self) -> list[Technique]:
        """The techniques in force, in the order they are installed (the list :attr:`technique_set` holds)."""
        return self.technique_set.techniques

    # ----- one process: no process group, no DDP wrapper -----------------------------------------
    @property
    def single_process(self) -> bool:
        """True when this run has one process in all (one device, one node)."""
        return self.num_nodes * self.num_processes <= 1

    @override
    def _configure_launcher(self) -> None:
        if self.single_process:
            self._launcher = None  # nothing to launch; also keeps notebooks working
        else:
            super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        if self.single_process:
            ParallelStrategy.setup_environment(self)  # the accelerator's device setup, no process group
            self.set_world_ranks()
        else:
            super().setup_environment()

    @override
    def configure_ddp(self) -> None:
        if not self.single_process:
            super().configure_ddp()

    # ----- where techniques attach --------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        if self.single_process:
            # Lightning injects a DistributedSampler for every DDPStrategy. With one process it would
            # only change the data order relative to the single-device strategy, so leave it out.
            trainer._accelerator_connector.use_distributed_sampler = False
        if trainer.state.fn == TrainerFn.FITTING:
            assert self.lightning_module is not None
            keep_4bit_trainable(self.lightning_module)  # QLoRA on CPU: validation must not freeze the 4-bit layers
        if trainer.state.fn == TrainerFn.FITTING and self.memory_budget is not None:
            self._choose_within_budget(trainer)
        if trainer.state.fn == TrainerFn.FITTING and self.techniques:
            module = self.lightning_module
            assert module is not None
            self.technique_set.install(module, trainer)  # after an error, teardown undoes what was installed
            rank_zero_info(f"memkit ({self.describe_backend()}): {self.technique_set.describe()}")
        if self.single_process and not self.zero.enabled and trainer.state.fn != TrainerFn.FITTING:
            # DDPStrategy.setup would broadcast the weights from rank 0 (validate / test / predict), which needs
            # a process group: one process has none and nothing to synchronize. The rest of its setup:
            assert self.accelerator is not None
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.setup_precision_plugin()
            return
        super().setup(trainer)

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        super().setup_optimizers(trainer)
        self.optimizers = self._convert_optimizers(list(self.optimizers), self.lr_scheduler_configs)

    def _convert_optimizers(self, optimizers: list[Any], scheduler_configs: list[Any]) -> list[Any]:
        """Let each technique replace the optimizers; the schedulers follow their optimizer."""
        return self.technique_set.convert_optimizers(
            optimizers, lambda before, after: self._repoint_schedulers(before, after, scheduler_configs))

    @staticmethod
    def _repoint_schedulers(before: Any, after: Any, scheduler_configs: list[Any]) -> None:
        for config in scheduler_configs:
            if getattr(config.scheduler, "optimizer", None) is before:
                _repoint_scheduler(config.scheduler, after)

    def _step_context(self) -> contextlib.AbstractContextManager:
        return self.technique_set.step_context()

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._step_context():
            return super().training_step(*args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._step_context():
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._step_context():
            return super().test_step(*args, **kwargs)

    # ----- forward-only (zeroth-order) steps: no backward; the optimizer calls the closure itself -----------
    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """As Lightning's, except that with a forward-only optimizer (zeroth-order training) nothing runs: the loss
        has no graph (``training_step`` ran under ``torch.no_grad()``) and there is nothing to differentiate."""
        if self.technique_set.forward_only:
            return closure_loss
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """As Lightning's, except for a forward-only optimizer (zeroth-order training): the
        ``on_before_optimizer_step`` hooks run once, then ``optimizer.step(closure)`` evaluates ``training_step``
        at the perturbed weights (two closure calls per perturbation) and updates. The precision plugin's step is
        left out: its gradient scaler and clipping have no gradients. The step's output loss (``outputs["loss"]``
        of ``on_train_batch_end``) becomes the mean of the losses the step evaluated."""
        if not (self.technique_set.forward_only and is_forward_only(optimizer)):
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        trainer = self.lightning_module.trainer
        call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
        call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        loss = optimizer.step(closure=closure, **kwargs)
        result = getattr(closure, "_result", None)  # Lightning's Closure: the last evaluation's ClosureResult
        if loss is not None and getattr(result, "loss", None) is not None:
            result.loss = loss.to(device=result.loss.device, dtype=result.loss.dtype)
        return loss

    @override
    def teardown(self) -> None:
        self.technique_set.uninstall()
        super().teardown()

    # ----- checkpoints: atomic files, the settings recorded, resumes checked against them --------------
    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        """Lightning's, except that the default writes atomically
        (:class:`~lightning_memkit.checkpoint_io.AtomicCheckpointIO`): a process killed while a checkpoint is
        written leaves the previous one intact."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO) and self._checkpoint_io.checkpoint_io is None:
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Optional[CheckpointIO]) -> None:
        self._checkpoint_io = io

    def settings_record(self) -> dict[str, Any]:
        """The settings a checkpoint records (see :mod:`lightning_memkit.resume`)."""
        return settings_record(self.activations, self.cross_entropy, self.optimizer_config, self.sequence, self.zero)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        checkpoint[CHECKPOINT_KEY] = self.settings_record()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = str(checkpoint_path)
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "checkpoint")):
            raise MemKitConfigError(
                f"ckpt_path={path!r} is a DeepSpeed (ZeRO) checkpoint folder, and this run uses memkit's DDP backend "
                "(zero_stage=0). Fix: resume with the zero_stage it was written with, or make one file of it with "
                "lightning_memkit.zero.export_consolidated and resume from that with resume='weights'."
            )
        self._weights_resume = False
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except FileNotFoundError as error:
            raise MemKitConfigError(f"ckpt_path={path!r} does not exist. Fix: pass an existing checkpoint file (or "
                                    "'last' / 'best' with the ModelCheckpoint that wrote it).") from error
        except (EOFError, RuntimeError, pickle.UnpicklingError) as error:
            raise MemKitConfigError(unreadable_checkpoint(path, error)) from error
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise MemKitConfigError(f"ckpt_path={path!r} is not a Lightning checkpoint (no 'state_dict'). Fix: pass a "
                                    "file ModelCheckpoint or Trainer.save_checkpoint wrote.")
        return self._resume_from(checkpoint.get(CHECKPOINT_KEY), checkpoint, path)

    def _resume_from(self, saved: Optional[dict[str, Any]], checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
        """Check the settings a checkpoint records, then give what this run restores of it (see :meth:`_restored`)."""
        if not self._fitting():
            return checkpoint  # validate / test / predict restore weights only: settings do not matter
        self._check_settings(saved, path)
        return self._restored(checkpoint)

    def _check_settings(self, saved: Optional[dict[str, Any]], path: str) -> None:
        """Compare a checkpoint's settings with this run's before anything is restored (fitting only)."""
        if saved is not None and self.memory_budget is not None and "optimizer" in self._free_families \
                and self.resume == "exact" \
                and self.technique_set.installed_on is None:  # DDP restores before setup; DeepSpeed after
            # auto mode: keep the optimizer the checkpoint trained with (its state cannot drive another)
            self.optimizer_config = OptimizerConfig(**saved["optimizer"])
            self._free_families = tuple(f for f in self._free_families if f != "optimizer")
            self.technique_set = self._build_techniques()
            rank_zero_info(f"memkit memory_budget: resuming keeps the checkpoint's optimizer "
                           f"({describe_family('optimizer', saved['optimizer'])}).")
        changed = check_resume(saved, self.settings_record(), checkpoint=path, mode=self.resume)
        if changed:
            rank_zero_info("memkit: resuming with changed settings (they take effect from the first resumed step; "
                           "they keep no state): " + "; ".join(changed))
        if self.resume == "weights":
            self._weights_resume = True
            rank_zero_info(f"memkit resume='weights': restoring the model's weights from {path}; the optimizer state, "
                           "LR schedulers, step counter and data position start fresh.")

    def _restored(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """What a fit restores of a checked checkpoint: the weights alone (``resume="weights"``), or everything,
        with an end-of-epoch checkpoint set to resume at the next epoch's first batch."""
        if self._weights_resume:
            return keep_weights_only(checkpoint)
        complete_epoch_end(checkpoint)
        return checkpoint

    def _fitting(self) -> bool:
        module = self.lightning_module
        return module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return not self._weights_resume and super().lightning_restore_optimizer

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        try:
            super().load_optimizer_state_dict(checkpoint)
            for optimizer, saved in zip(self.optimizers, checkpoint.get("optimizer_states", ())):
                check_torch_optimizer_state(optimizer, saved)
        except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as error:
            raise MemKitConfigError(
                f"the checkpoint's optimizer state does not fit this run's optimizer "
                f"({describe_family('optimizer', self.settings_record()['optimizer'])}): {type(error).__name__}: "
                f"{error} It was written with other optimizer settings"
                + ("" if checkpoint.get(CHECKPOINT_KEY) else " (the checkpoint records no memkit settings, so which "
                   "ones cannot be said)")
                + ". Fix: resume with the optimizer settings it was trained with, or start from its weights alone with "
                "MemKitStrategy(resume='weights')."
            ) from error

    # ----- presets --------------------------------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, (description, init_params) in PRESETS.items():
            strategy_registry.register(name, cls, description=description, override=True, **init_params)


def ddp_arguments() -> dict[str, Any]:
    """The keyword arguments DDPStrategy and DistributedDataParallel take, with their defaults."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    arguments: dict[str, Any] = {}
    for fn in (DistributedDataParallel.__init__, DDPStrategy.__init__):  # DDPStrategy's: e.g. ddp_comm_hook
        for name, param in inspect.signature(fn).parameters.items():
            if name not in ("self", "module", "kwargs"):
                arguments.setdefault(name, param.default)
    return arguments


def check_ddp_kwargs(ddp_kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments that DistributedDataParallel does not take (e.g. a misspelled setting)."""
    accepted = ddp_arguments()
    unknown = sorted(set(ddp_kwargs) - set(accepted))
    if unknown:
        raise MemKitConfigError(
            f"MemKitStrategy got unknown argument(s) {unknown}: they are neither memkit settings nor "
            f"DDPStrategy / DistributedDataParallel arguments. Fix: use memkit's {sorted(MEMKIT_ARGUMENTS)} or DDP's "
            f"{sorted(accepted)}."
        )


def _repoint_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Make ``scheduler`` drive ``optimizer`` (a technique's replacement of the one it was built on).

    The new optimizer's groups must line up with the old ones. Its ``step`` is marked the way torch's
    LR schedulers mark the optimizer they are built on, so their "step order" check keeps working.
    """
    scheduler.optimizer = optimizer
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _repoint_scheduler(child, optimizer)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    step = optimizer.step
    if not hasattr(step, "_wrapped_by_lr_sched"):

        @functools.wraps(step)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            optimizer._opt_called = True  # read by torch.optim.lr_scheduler.LRScheduler.step
            return step(*args, **kwargs)

        counted_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = counted_step  # type: ignore[method-assign]


def register() -> None:
    """Register the ``memkit*`` strategy names with Lightning (done on ``import lightning_memkit``)."""
    MemKitStrategy.register_strategies(StrategyRegistry)

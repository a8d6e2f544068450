"""``MemKitDeepSpeedStrategy``: the DeepSpeed backend of ``MemKitStrategy`` (ZeRO-1/2/3 and offload)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import shutil
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_memkit.config import (
    MemKitConfigError,
    parse_zero,
)
from lightning_memkit.resume import CHECKPOINT_KEY, read_zero_record, write_zero_record
from lightning_memkit.strategy import MemKitStrategy, check_ddp_kwargs, ddp_arguments, register_backend
from lightning_memkit.zero.checkpoint import OLD_SUFFIX, PARTIAL_SUFFIX, publish_folder
from lightning_memkit.zero.rules import build_deepspeed_config, check_compatibility, check_elementwise


def to_cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A torch ``Adam``/``AdamW`` as DeepSpeed's ``DeepSpeedCPUAdam`` over the same param groups; others as given.

    ``DeepSpeedCPUAdam`` computes the same update (Adam, or AdamW's decoupled decay) with a vectorized
    C++ op that DeepSpeed JIT-builds on first use (cached under ``TORCH_EXTENSIONS_DIR``).
    """
    kind = type(optimizer)
    if kind not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        return optimizer
    groups = optimizer.param_groups
    if any(g.get("amsgrad") or g.get("maximize") or isinstance(g["lr"], torch.Tensor) for g in groups):
        return optimizer  # no CPU-Adam equivalent: keep torch's
    decoupled = {kind is torch.optim.AdamW or bool(g.get("decoupled_weight_decay")) for g in groups}
    if len(decoupled) > 1:
        return optimizer  # DeepSpeedCPUAdam has one decay mode for all groups: keep torch's
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    adamw = decoupled.pop()
    d = optimizer.defaults
    cpu = DeepSpeedCPUAdam(
        [dict(g) for g in groups], lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
        adamw_mode=adamw,
    )
    for new, old in zip(cpu.param_groups, groups):  # the very group dicts: schedulers keep driving them
        old.update({k: v for k, v in new.items() if k not in old})
    cpu.param_groups = groups
    return cpu


def _changed_ddp_arguments(ddp_kwargs: dict[str, Any]) -> list[str]:
    """The DDP keyword arguments given other values than their defaults (LightningCLI passes them all)."""
    defaults = ddp_arguments()
    return sorted(k for k, v in ddp_kwargs.items() if k not in defaults or v is not defaults[k] and v != defaults[k])


def _check_async_io() -> None:
    """NVMe offload reads and writes through DeepSpeed's async_io op, which needs libaio."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from lightning_memkit.config import is_planning

    if not is_planning() and not AsyncIOBuilder().is_compatible(verbose=False):
        raise MemKitConfigError(
            "offload to 'nvme' needs DeepSpeed's async_io op, which cannot be built here: libaio's headers and "
            "library are missing. Fix: install libaio (e.g. `apt install libaio-dev`) and reinstall DeepSpeed, or "
            "offload to 'cpu'."
        )


@contextlib.contextmanager
def _without_shm_op() -> Iterator[None]:
    """Skip DeepSpeed's CPU shared-memory all-reduce op (a minute of JIT compiling; gloo does the same work)."""
    module = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch as m` gives torch itself
    original = module.build_shm_op
    module.build_shm_op = lambda: None
    try:
        yield
    finally:
        module.build_shm_op = original


class MemKitDeepSpeedStrategy(MemKitStrategy, DeepSpeedStrategy):
    """``MemKitStrategy`` with ``zero_stage`` 1-3: Lightning's DeepSpeed strategy with memkit's techniques.

    Built by ``MemKitStrategy(zero_stage=...)``; see :class:`~lightning_memkit.MemKitStrategy` for the
    arguments. The DDP-only arguments (``start_method``, DistributedDataParallel keywords) and a
    ``checkpoint_io`` are refused: DeepSpeed launches, reduces and writes its sharded checkpoints itself.
    """

    def __init__(self, **kwargs: Any) -> None:
        # one signature, MemKitStrategy's (``__signature__`` below shows it to introspection, e.g. LightningCLI)
        bound = inspect.signature(MemKitStrategy.__init__).bind(self, **kwargs)
        bound.apply_defaults()
        args = bound.arguments
        activations, cross_entropy, optimizer, sequence = (args["activations"], args["cross_entropy"],
                                                           args["optimizer"], args["sequence"])
        checkpoint_io, start_method, ddp_kwargs = args["checkpoint_io"], args["start_method"], args["ddp_kwargs"]
        self._parse_techniques(activations, cross_entropy, optimizer, sequence)
        self._init_memory_budget(args["memory_budget"], args["memory_search"], activations, optimizer, sequence)
        self._init_resume(args["resume"])
        self.zero = parse_zero(args["zero_stage"], args["offload_optimizer"], args["offload_parameters"],
                               args["nvme_path"], args["cpu_adam"], args["deepspeed_config"])
        check_ddp_kwargs(ddp_kwargs)  # a misspelled setting is named as such before the DDP-only check below
        if not self.zero.enabled:
            raise MemKitConfigError("MemKitDeepSpeedStrategy needs zero_stage 1, 2 or 3; use MemKitStrategy for 0.")
        ddp_only = _changed_ddp_arguments(ddp_kwargs) + (["start_method"] if start_method != "popen" else [])
        if ddp_only:
            raise MemKitConfigError(
                f"MemKitStrategy got DDP argument(s) {ddp_only} with zero_stage={self.zero.stage}: DeepSpeed, not "
                "DistributedDataParallel, runs the model under ZeRO. Fix: drop them (DeepSpeed settings go in "
                "deepspeed_config), or zero_stage=0."
            )
        if checkpoint_io is not None:
            raise MemKitConfigError(
                f"checkpoint_io={type(checkpoint_io).__name__} with zero_stage={self.zero.stage}: DeepSpeed writes its "
                "sharded checkpoints itself. Fix: drop checkpoint_io, or zero_stage=0."
            )
        check_compatibility(self.zero, self.activations, self.cross_entropy, self.optimizer_config, self.sequence)
        if "nvme" in (self.zero.offload_optimizer, self.zero.offload_parameters):
            _check_async_io()
        DeepSpeedStrategy.__init__(
            self,
            accelerator=args["accelerator"],
            config=build_deepspeed_config(self.zero),
            parallel_devices=args["parallel_devices"],
            cluster_environment=args["cluster_environment"],
            precision_plugin=args["precision_plugin"],
            process_group_backend=args["process_group_backend"],
            timeout=args["timeout"],
            logging_level=logging.WARN,
        )
        self.technique_set = self._build_techniques()

    def describe_backend(self) -> str:
        where = []
        if self.zero.offload_optimizer != "none":
            where.append(f"optimizer on {self.zero.offload_optimizer}")
        if self.zero.offload_parameters != "none":
            where.append(f"parameters on {self.zero.offload_parameters}")
        return f"DeepSpeed ZeRO-{self.zero.stage}" + (f" ({', '.join(where)})" if where else "")

    # ----- DeepSpeed's process group in every case, on CUDA or CPU ---------------------------------
    @override
    def _configure_launcher(self) -> None:
        DeepSpeedStrategy._configure_launcher(self)

    @override
    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            DeepSpeedStrategy.setup_environment(self)
            return
        # Lightning's DeepSpeed strategy refuses non-CUDA accelerators, and DeepSpeed reads the device index
        # (None for a plain "cpu"): give each process's CPU device its local rank as index, then do what the
        # DDP strategy does (the accelerator's setup, then the process group, through DeepSpeed).
        assert self.parallel_devices is not None
        self.parallel_devices = [torch.device(d.type, i) for i, d in enumerate(self.parallel_devices)]
        DDPStrategy.setup_environment(self)

    @override
    def _init_deepspeed_distributed(self) -> None:
        if self.root_device.type == "cpu":
            with _without_shm_op():
                super()._init_deepspeed_distributed()
        else:
            super()._init_deepspeed_distributed()

    @override
    def configure_ddp(self) -> None:
        pass  # DeepSpeed wraps the model

    # ----- setup: check the Trainer against the DeepSpeed config, then Lightning's DeepSpeed setup --------
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        check_trainer_against_config(self.config, trainer)
        super().setup(trainer)

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        DeepSpeedStrategy.setup_optimizers(self, trainer)  # DeepSpeed builds them in _init_optimizers

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning's loop already divides the loss by accumulate_grad_batches; DeepSpeed's engine.backward would
        # divide it again (gradients 1/k too small: invisible to Adam, wrong for SGD and for the clipping norm).
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    # ----- sharded checkpoints: whole or not at all, settings checked before the engine loads ------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        target = os.path.abspath(str(self.broadcast(str(filepath))))
        staging = target + PARTIAL_SUFFIX
        if self.is_global_zero and os.path.exists(staging):
            shutil.rmtree(staging)  # what a killed save left behind
        self.barrier("memkit_zero_save_begin")
        super().save_checkpoint(checkpoint, staging, storage_options=storage_options)  # adds the settings record
        if self.is_global_zero:
            write_zero_record(staging, self.settings_record())
        self.barrier("memkit_zero_save_written")
        if self.is_global_zero:
            publish_folder(staging, target)
        self.barrier("memkit_zero_save_done")

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = str(checkpoint_path)
        self._weights_resume = False
        if not os.path.isdir(path):
            if os.path.isdir(path + OLD_SUFFIX):
                raise MemKitConfigError(
                    f"ckpt_path={path!r} is missing but {path + OLD_SUFFIX!r} exists: a save was killed between "
                    "replacing the old checkpoint and naming the new one. Fix: rename that folder to "
                    f"{os.path.basename(path)!r} and resume again.")
            return DeepSpeedStrategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)  # its error
        if not self._fitting():
            return DeepSpeedStrategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)
        # the record is checked before DeepSpeed loads the optimizer partitions, maybe of another optimizer
        record = read_zero_record(path)
        self._check_settings(record, path)
        if self._weights_resume:  # the weights alone
            _, checkpoint = self.deepspeed_engine.load_checkpoint(
                path, load_optimizer_states=False, load_lr_scheduler_states=False,
                load_module_strict=self.lightning_module.strict_loading)
            return self._restored(checkpoint or {})
        checkpoint = DeepSpeedStrategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)
        if record is None:  # written by an earlier memkit: its settings travel in the client state only
            self._check_settings(checkpoint.get(CHECKPOINT_KEY), path)
        return self._restored(checkpoint)

    @override
    def _init_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        optimizer, scheduler_config = super()._init_optimizers()
        configs = [scheduler_config] if scheduler_config is not None else []
        (optimizer,) = self._convert_optimizers([optimizer], configs)
        _check_groups_train(optimizer)
        if not self.zero.deepspeed_config.get("zero_allow_untested_optimizer"):
            check_elementwise(optimizer, self.zero.stage)
        if self.zero.offload_optimizer != "none" and self.zero.cpu_adam:
            new = to_cpu_adam(optimizer)
            if new is not optimizer:
                self._repoint_schedulers(optimizer, new, configs)
                optimizer = new
        return optimizer, scheduler_config


def _check_groups_train(optimizer: torch.optim.Optimizer) -> None:
    """Refuse a param group without a trainable parameter: ZeRO drops empty groups (which misaligns the LR
    schedulers built over the groups) and ZeRO-1/2 cannot flatten a group of frozen parameters."""
    for i, group in enumerate(optimizer.param_groups):
        if not any(p.requires_grad for p in group["params"]):
            what = "is empty" if not group["params"] else f"holds {len(group['params'])} frozen parameter(s) only"
            raise MemKitConfigError(
                f"param group {i} of the optimizer configure_optimizers returned {what}: DeepSpeed's ZeRO drops empty "
                "groups, which misaligns the LR schedulers built over the groups, and ZeRO-1/2 cannot flatten a group "
                "of frozen parameters. Fix: leave that group out of configure_optimizers (keep the groups that have "
                "a parameter with requires_grad=True)."
            )


def check_trainer_against_config(config: dict[str, Any], trainer: "pl.Trainer") -> None:
    """DeepSpeed config keys that contradict Trainer arguments: refuse, or say which wins (as Lightning does)."""
    precision = str(trainer.precision_plugin.precision)
    for key, wanted in (("fp16", ("16-mixed", "16-true")), ("bf16", ("bf16-mixed", "bf16-true"))):
        section = config.get(key)
        enabled = bool(section.get("enabled", False)) if isinstance(section, dict) else bool(section)
        if enabled and precision not in wanted:
            raise MemKitConfigError(
                f"deepspeed_config enables {key!r} but Trainer(precision={precision!r}): DeepSpeed would cast the "
                "model "
                f"to {key} while Lightning feeds it {precision} inputs. Fix: drop {key!r} from deepspeed_config and "
                f"set Trainer(precision={wanted[0]!r}) (memkit enables DeepSpeed's {key} from it)."
            )
    clip = config.get("gradient_clipping")
    trainer_clip = trainer.gradient_clip_val
    if clip is not None and trainer_clip is not None and float(clip) != float(trainer_clip):
        rank_zero_warn(
            f"memkit: deepspeed_config's gradient_clipping={clip} and Trainer(gradient_clip_val={trainer_clip}) "
            "disagree; the DeepSpeed config wins (as in Lightning's DeepSpeedStrategy): gradients are clipped to "
            f"{clip}."
        )


MemKitDeepSpeedStrategy.__init__.__signature__ = inspect.signature(MemKitStrategy.__init__)  # type: ignore[attr-defined]
register_backend((1, 2, 3), MemKitDeepSpeedStrategy)  # MemKitStrategy(zero_stage=1|2|3) builds this class

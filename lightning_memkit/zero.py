"""The DeepSpeed backend of ``MemKitStrategy``: ZeRO-1/2/3 and offload, with memkit's techniques on top.

``MemKitStrategy(zero_stage=1|2|3, ...)`` builds a :class:`MemKitDeepSpeedStrategy`, which is both a
``MemKitStrategy`` and Lightning's ``DeepSpeedStrategy``: Lightning's DeepSpeed integration does
the engine, the precision, gradient accumulation and clipping, and the sharded checkpoints; memkit
adds

- its techniques, installed exactly as on the DDP backend (the optimizer technique converts what
  ``configure_optimizers`` returned *before* DeepSpeed wraps it);
- the rules of which technique can live with which ZeRO stage (:func:`check_compatibility`), checked
  when the strategy is built;
- CPU support (gloo), for tests and laptops: Lightning's strategy accepts only CUDA and DeepSpeed
  reads a device index, so CPU devices get explicit indices (``cpu:0``, ``cpu:1``, ...), and
  DeepSpeed's shared-memory all-reduce op (a JIT-compiled speed-up for CPU clusters) is skipped;
- ``cpu_adam``: with the optimizer offloaded, torch ``Adam``/``AdamW`` steps run as DeepSpeed's
  vectorized ``DeepSpeedCPUAdam`` (same update); any other optimizer is kept as it is;
- :func:`export_consolidated`: one file with the full fp32 (or cast) weights of a sharded checkpoint;
- checkpoints written whole or not at all: the shards go to ``<path>.partial`` and the folder takes the
  checkpoint's name once every rank has written (a kill mid-write leaves the previous one), with the
  memkit settings record beside the shards, checked before DeepSpeed loads any state.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
from datetime import timedelta
from typing import Any, Iterator, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_memkit.config import (
    ActivationsConfig,
    CrossEntropyConfig,
    MemKitConfigError,
    OptimizerConfig,
    SequenceConfig,
    ZeroConfig,
    parse_zero,
)
from lightning_memkit.checkpoint_io import fsync_folder
from lightning_memkit.resume import CHECKPOINT_KEY, read_zero_record, write_zero_record
from lightning_memkit.strategy import MemKitStrategy, _check_ddp_kwargs, ddp_arguments

#: memkit optimizers whose update is element-wise, so they can step on DeepSpeed's flat partitions
ELEMENTWISE_OPTIMIZERS = ("none", "adamw", "adamw8bit", "paged_adamw8bit")


def check_compatibility(
    zero: ZeroConfig,
    activations: ActivationsConfig,
    cross_entropy: CrossEntropyConfig,
    optimizer: OptimizerConfig,
    sequence: SequenceConfig,
) -> None:
    """Refuse, with the reason and the fix, the techniques that cannot work under ``zero.stage``.

    The rules (the README's table says the same):

    - low-rank optimizers (GaLore, APOLLO, FRUGAL) need each weight matrix's whole gradient to
      project it; DeepSpeed's ZeRO optimizer hands the optimizer flat 1-D partitions that cut across
      matrices (stages 1-3), so the projection has nothing to act on;
    - step-in-backward updates each parameter from its gradient hook, but under ZeRO the gradient
      is reduced and partitioned by DeepSpeed after the hook, and DeepSpeed runs the step;
    - sequence-chunked backprop calls the model's pieces outside their modules' forward, where ZeRO-3
      has not gathered the parameters (stages 1 and 2 keep whole parameters and work).

    Activation checkpointing, compression and offload, and the fused cross-entropy (ZeRO-3 gathers
    the head weight for the loss) work under every stage.

    Raises:
        MemKitConfigError: an incompatible combination.
    """
    if not zero.enabled:
        return
    stage = f"zero_stage={zero.stage}"
    if optimizer.name not in ELEMENTWISE_OPTIMIZERS:
        raise MemKitConfigError(
            f"optimizer={optimizer.name!r} cannot run under {stage}: it projects each weight matrix's gradient to a "
            "low-rank subspace, but DeepSpeed's ZeRO optimizer hands the optimizer flat 1-D partitions of all the "
            "parameters, cut across matrices, so there is no matrix to project. Fix: zero_stage=0 (memkit's DDP "
            "backend; the low-rank states are small already), or under ZeRO an element-wise optimizer "
            f"({', '.join(repr(n) for n in ELEMENTWISE_OPTIMIZERS[1:])}), whose states ZeRO partitions."
        )
    if optimizer.in_backward:
        raise MemKitConfigError(
            f"optimizer.in_backward=true cannot run under {stage}: DeepSpeed reduces and partitions the gradients "
            "after backward and runs the optimizer step itself, so a step inside backward would use unreduced, "
            "unpartitioned gradients. Fix: in_backward=false (ZeRO-2 already frees each gradient once it is reduced), "
            "or zero_stage=0."
        )
    if sequence.enabled and zero.stage == 3:
        raise MemKitConfigError(
            f"sequence={sequence.method!r} cannot run under zero_stage=3: it calls the model's pieces (projections, "
            "MLP, head) chunk by chunk outside their modules' forward, where ZeRO-3 has not gathered the partitioned "
            "parameters. Fix: zero_stage=2 (parameters whole, gradients and optimizer states partitioned), with "
            "offload_optimizer='cpu' for more room."
        )


#: bytes per parameter of the fp32 master weight plus optimizer states, by memkit optimizer name
#: (bitsandbytes' 8-bit states: one byte per value and an fp32 scale per block of 256)
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 4 + 8, "adamw8bit": 4 + 2 * (1 + 4 / 256), "paged_adamw8bit": 4 + 2 * (1 + 4 / 256),
                             "sgd": 4}
#: DeepSpeed communication buckets memkit sets (elements); DeepSpeed's own defaults (5e8) cost gigabytes
BUCKET_ELEMENTS = 50_000_000
#: ZeRO-3 keeps at most this many gathered parameters alive (DeepSpeed's default ``stage3_max_live_parameters``)
MAX_LIVE_ELEMENTS = 1_000_000_000
#: ZeRO-3 steps the optimizer over sub-groups of this many elements (each with a transient fp32 gradient copy);
#: DeepSpeed's default is 1e9 (4 GB of transient copy), Lightning's 1e12
SUB_GROUP_ELEMENTS = 100_000_000


def zero_memory(
    n_params: int,
    *,
    world_size: int,
    stage: int,
    offload_optimizer: str = "none",
    offload_parameters: str = "none",
    optimizer: str = "adamw",
    largest_block_params: int = 0,
) -> dict[str, dict[str, float]]:
    """Bytes of model states per process under ZeRO, from the partition sizes, on the device, host and NVMe.

    Model states are the parameters, their gradients, and the fp32 master weights with the optimizer
    states (ZeRO paper, Sec. 3). Stage 0 is memkit's DDP backend under ``bf16-mixed`` (fp32
    parameters and gradients, autocast); stages 1-3 are DeepSpeed with ``bf16`` (16-bit parameters and
    gradients, fp32 master weights in the optimizer). ``N`` processes, ``P`` parameters, ``K`` bytes of
    master weight and optimizer state per parameter (:data:`OPTIMIZER_BYTES_PER_PARAM`), on the device:

    ========  ==========  ================================  =============  ====================================
    stage     parameters  gradients                         master+states  buffers
    ========  ==========  ================================  =============  ====================================
    0 (DDP)   4P          4P                                (K-4)P         4P reducer buckets when N > 1
    1         2P          2P (kept whole) + 2P/N partition  KP/N           4P/N fp32 gradient copy at the step,
                                                                           buckets
    2         2P          2P/N                              KP/N           4P/N fp32 copy at the step, buckets
    3         2P/N        2P/N                              KP/N           4 min(P/N, sub-group) fp32 copy,
                                                                           gathered parameters, buckets
    ========  ==========  ================================  =============  ====================================

    ``offload_optimizer`` moves "master+states" to the host (or NVMe), with the fp32 gradient
    partition (4P/N, in host memory) that the CPU step reads; the device keeps the 16-bit gradients
    only in the reduce buckets, except ZeRO-1, which keeps them whole (2P). ``offload_parameters``
    moves the 16-bit parameter partition to the host (or NVMe). Under ZeRO-3 the device also holds
    the gathered parameters, counted at their bound: DeepSpeed's ``stage3_max_live_parameters``
    (1e9 values, 1.9 GiB in 16 bits; a block larger than that is gathered whole). Buckets use memkit's sizes
    (:data:`BUCKET_ELEMENTS`: ZeRO-1/2 keep ~4.5 reduce buckets with ``overlap_comm`` plus an
    all-gather bucket; ZeRO-3 one reduce buffer and one prefetch bucket). Activations are not included.

    Returns:
        ``{"device": {...}, "host": {...}, "nvme": {...}}``, each with ``parameters``, ``gradients``,
        ``optimizer``, ``buffers`` and ``total`` in bytes.
    """
    if optimizer not in OPTIMIZER_BYTES_PER_PARAM:
        raise ValueError(f"optimizer={optimizer!r}: one of {sorted(OPTIMIZER_BYTES_PER_PARAM)}")
    p, n, k = float(n_params), float(world_size), OPTIMIZER_BYTES_PER_PARAM[optimizer]
    device = {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0, "buffers": 0.0}
    host, nvme = dict(device), dict(device)
    side = {"cpu": host, "nvme": nvme}
    bucket = 2.0 * BUCKET_ELEMENTS  # bytes of a 16-bit bucket
    if stage == 0:
        device.update(parameters=4 * p, gradients=4 * p, optimizer=(k - 4) * p, buffers=4 * p if n > 1 else 0.0)
    else:
        side.get(offload_parameters, device)["parameters"] = 2 * p / n if stage == 3 else 2 * p
        offloaded = offload_optimizer != "none"
        if offloaded:
            side[offload_optimizer]["optimizer"] = k * p / n
            host["gradients"] = 4 * p / n  # the fp32 gradient partition the CPU step reads (in memory, even with NVMe)
        else:
            device["optimizer"] = k * p / n
        if stage == 1:
            device["gradients"] = 2 * p + (0.0 if offloaded else 2 * p / n)
        elif not offloaded:
            device["gradients"] = 2 * p / n
        if stage in (1, 2):
            device["buffers"] = 4.5 * bucket + bucket + (0.0 if offloaded else 4 * p / n)
        else:
            transient = 0.0 if offloaded else 4 * min(p / n, SUB_GROUP_ELEMENTS)
            live = min(p, max(MAX_LIVE_ELEMENTS, largest_block_params))  # gathered parameters, at most
            device["buffers"] = bucket + bucket + 2.0 * live + transient
    for where in (device, host, nvme):
        where["total"] = sum(where.values())
    return {"device": device, "host": host, "nvme": nvme}


def build_deepspeed_config(zero: ZeroConfig) -> dict[str, Any]:
    """The DeepSpeed config for ``zero``, with the user's ``deepspeed_config`` merged in.

    Batch size, gradient accumulation, clipping and precision are filled in from the Trainer by
    Lightning's DeepSpeed strategy at setup.
    """
    zero_optimization: dict[str, Any] = {
        "stage": zero.stage, "contiguous_gradients": True, "overlap_comm": True,
        # DeepSpeed's defaults (5e8 elements; overlap_comm keeps ~4.5 reduce buckets) cost gigabytes on a 24 GB card
        "reduce_bucket_size": BUCKET_ELEMENTS, "allgather_bucket_size": BUCKET_ELEMENTS,
    }
    if zero.stage == 3:
        zero_optimization["stage3_prefetch_bucket_size"] = BUCKET_ELEMENTS
        zero_optimization["sub_group_size"] = SUB_GROUP_ELEMENTS
    if zero.offload_optimizer != "none":
        zero_optimization["offload_optimizer"] = {"device": zero.offload_optimizer, "pin_memory": True}
        if zero.offload_optimizer == "nvme":
            zero_optimization["offload_optimizer"]["nvme_path"] = zero.nvme_path
    if zero.offload_parameters != "none":
        zero_optimization["offload_param"] = {"device": zero.offload_parameters, "pin_memory": True}
        if zero.offload_parameters == "nvme":
            zero_optimization["offload_param"]["nvme_path"] = zero.nvme_path
    config: dict[str, Any] = {
        "zero_optimization": zero_optimization,
        # memkit's optimizers are "untested" in DeepSpeed's sense; element-wise ones are exact on partitions
        "zero_allow_untested_optimizer": True,
        # cpu_adam decides whether a torch Adam becomes DeepSpeedCPUAdam; any other optimizer is kept as given
        "zero_force_ds_cpu_optimizer": False,
    }
    for key, value in (zero.deepspeed_config or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


#: optimizers whose update is element-wise (each value from its own gradient and state), so ZeRO may hand
#: them flat partitions that cut across parameters; anything else needs the user's explicit consent
ELEMENTWISE_CLASSES = (
    "torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.sgd.SGD", "torch.optim.adagrad.Adagrad",
    "torch.optim.adamax.Adamax", "torch.optim.rmsprop.RMSprop", "torch.optim.nadam.NAdam", "torch.optim.radam.RAdam",
    "torch.optim.adadelta.Adadelta", "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam",
    "deepspeed.ops.adam.fused_adam.FusedAdam", "bitsandbytes.optim.adamw.AdamW8bit",
    "bitsandbytes.optim.adamw.PagedAdamW8bit", "bitsandbytes.optim.adam.Adam8bit",
    "lightning_memkit.optim.galore.AdamW",
)


def _check_elementwise(optimizer: torch.optim.Optimizer, stage: int) -> None:
    """Refuse an optimizer that is not known to be element-wise: on ZeRO's flat partitions it would compute a wrong
    update silently (per-tensor norms, factored or matrix states)."""
    kind = type(optimizer)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if name in ELEMENTWISE_CLASSES:
        return
    raise MemKitConfigError(
        f"zero_stage={stage}: configure_optimizers returned {name}, which memkit does not know to be element-wise. "
        "DeepSpeed's ZeRO hands the optimizer flat partitions of all parameters, cut across tensors, so an optimizer "
        "with per-tensor norms (LAMB, LARS), factored states (Adafactor) or matrix updates (Shampoo, Muon) would "
        "compute a wrong update without an error. Fix: use an element-wise optimizer (torch Adam/AdamW/SGD, "
        "bitsandbytes' 8-bit Adam, memkit's 'adamw'/'adamw8bit'); or, if its update is element-wise, say so with "
        "deepspeed_config={'zero_allow_untested_optimizer': True}."
    )


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

    def __init__(
        self,
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
        *,
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
        self.zero = parse_zero(zero_stage, offload_optimizer, offload_parameters, nvme_path, cpu_adam, deepspeed_config)
        _check_ddp_kwargs(ddp_kwargs)  # a misspelled setting is named as such before the DDP-only check below
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
            accelerator=accelerator,
            config=build_deepspeed_config(self.zero),
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            logging_level=logging.WARN,
        )
        self.techniques = self._build_techniques()
        self._installed_on = None

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
        _check_trainer_against_config(self.config, trainer)
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
            _publish_folder(staging, target)
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
            _check_elementwise(optimizer, self.zero.stage)
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


#: suffixes of a sharded checkpoint's folder while it is written, and of the one it replaces
PARTIAL_SUFFIX, OLD_SUFFIX = ".partial", ".old"


def _publish_folder(staging: str, target: str) -> None:
    """Give the fully written folder ``staging`` the name ``target``, replacing an earlier checkpoint there.

    Every file is fsynced first, so a crash after the rename cannot expose unwritten data. Two renames
    (target -> target.old, staging -> target) cannot be one atomic step for folders: a kill between them
    leaves the previous checkpoint whole as ``target.old`` (``load_checkpoint`` names it).
    """
    for root, _, names in os.walk(staging):
        for name in names:
            with open(os.path.join(root, name), "rb+") as f:
                os.fsync(f.fileno())
    old = target + OLD_SUFFIX
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.isdir(target):
        os.replace(target, old)
    elif os.path.exists(target):
        os.remove(target)
    os.replace(staging, target)
    fsync_folder(os.path.dirname(target))
    if os.path.exists(old):
        shutil.rmtree(old)


def _check_trainer_against_config(config: dict[str, Any], trainer: "pl.Trainer") -> None:
    """DeepSpeed config keys that contradict Trainer arguments: refuse, or say which wins (as Lightning does)."""
    precision = str(trainer.precision_plugin.precision)
    for key, wanted in (("fp16", ("16-mixed", "16-true")), ("bf16", ("bf16-mixed", "bf16-true"))):
        section = config.get(key)
        enabled = bool(section.get("enabled", False)) if isinstance(section, dict) else bool(section)
        if enabled and precision not in wanted:
            raise MemKitConfigError(
                f"deepspeed_config enables {key!r} but Trainer(precision={precision!r}): DeepSpeed would cast the model "
                f"to {key} while Lightning feeds it {precision} inputs. Fix: drop {key!r} from deepspeed_config and set "
                f"Trainer(precision={wanted[0]!r}) (memkit enables DeepSpeed's {key} from it)."
            )
    clip = config.get("gradient_clipping")
    trainer_clip = trainer.gradient_clip_val
    if clip is not None and trainer_clip is not None and float(clip) != float(trainer_clip):
        rank_zero_warn(
            f"memkit: deepspeed_config's gradient_clipping={clip} and Trainer(gradient_clip_val={trainer_clip}) "
            f"disagree; the DeepSpeed config wins (as in Lightning's DeepSpeedStrategy): gradients are clipped to {clip}."
        )


def export_consolidated(checkpoint_dir: Union[str, os.PathLike], output_file: Union[str, os.PathLike],
                        dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """Write the full weights of a sharded ZeRO checkpoint (a folder Lightning saved) into one file.

    The file is a Lightning checkpoint without optimizer states: ``state_dict`` holds every
    parameter whole (fp32, or ``dtype`` for inference), next to the module's hyperparameters, so
    ``YourModule.load_from_checkpoint(output_file)`` and ``torch.load(output_file, weights_only=True)``
    both read it, without DeepSpeed.

    Args:
        checkpoint_dir: the checkpoint "file" Lightning wrote under ZeRO (a folder).
        output_file: where to write the single file.
        dtype: cast floating-point weights to this dtype (e.g. ``torch.bfloat16``); None keeps fp32.

    Returns:
        The checkpoint dictionary written.

    Raises:
        MemKitConfigError: ``checkpoint_dir`` is not a DeepSpeed checkpoint folder.
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    if not os.path.isdir(os.path.join(checkpoint_dir, "checkpoint")):
        raise MemKitConfigError(
            f"export_consolidated: {str(checkpoint_dir)!r} is not a sharded ZeRO checkpoint (a folder holding "
            "'checkpoint/'). Fix: pass the path Lightning's ModelCheckpoint wrote under zero_stage >= 1."
        )
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # DeepSpeed prints progress
        checkpoint = convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file)
    if dtype is not None:
        checkpoint["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                                    for k, v in checkpoint["state_dict"].items()}
        torch.save(checkpoint, output_file)
    return checkpoint

"""The rules and the memory formula of memkit's ZeRO backend, free of Lightning and DeepSpeed.

Which technique can live with which ZeRO stage (:func:`check_compatibility`, checked when the strategy is
built and by the planner), which optimizers are element-wise (so ZeRO may hand them flat partitions),
the bytes each device, the host and NVMe hold (:func:`zero_memory`, used by the planner), and the
DeepSpeed config memkit builds from a :class:`~lightning_memkit.config.ZeroConfig`.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_memkit.config import (
    ActivationsConfig,
    CrossEntropyConfig,
    MemKitConfigError,
    OptimizerConfig,
    ZEROTH_ORDER_OPTIMIZERS,
    SequenceConfig,
    ZeroConfig,
)

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

    The rules (docs/zero.md's table says the same):

    - zeroth-order optimizers (``zo_sgd``, ``zo_adam``) call the loss closure from their step; DeepSpeed's
      engine steps the optimizer without it (stages 1-3), and ZeRO-3 partitions the parameters the step
      perturbs in place;
    - low-rank optimizers (GaLore, APOLLO, FRUGAL, COSMOS, Natural GaLore) need each weight matrix's whole
      gradient to project it; DeepSpeed's ZeRO optimizer hands the optimizer flat 1-D partitions that cut
      across matrices (stages 1-3), so the projection has nothing to act on; SPAM and SGD-SaI keep
      per-tensor quantities (step counts and sparse masks; each tensor's gradient signal-to-noise ratio)
      that the flat partitions cut across too;
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
    if optimizer.name in ZEROTH_ORDER_OPTIMIZERS:
        raise MemKitConfigError(
            f"optimizer={optimizer.name!r} cannot run under {stage}: a zeroth-order step evaluates the loss at "
            "perturbed weights by calling Lightning's closure, but DeepSpeed's engine steps the optimizer without it"
            + (", and ZeRO-3 partitions the parameters the step perturbs in place" if zero.stage == 3 else "")
            + ". Fix: zero_stage=0 (a ZO step keeps no gradients and no activations and, with 'zo_sgd', no optimizer "
            "state, so ZeRO has little to shard), or a first-order optimizer under ZeRO."
        )
    if optimizer.name in ("spam", "sgd_sai"):
        raise MemKitConfigError(
            f"optimizer={optimizer.name!r} cannot run under {stage}: it keeps per-tensor quantities ("
            + ("step counts for its momentum resets and sparse-momentum masks" if optimizer.name == "spam" else
               "each tensor's gradient signal-to-noise ratio") + "), but DeepSpeed's ZeRO optimizer hands the "
            "optimizer flat 1-D partitions of all the parameters, cut across tensors. Fix: zero_stage=0, or under "
            f"ZeRO an element-wise optimizer ({', '.join(repr(n) for n in ELEMENTWISE_OPTIMIZERS[1:])})."
        )
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
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 4 + 8, "adamw8bit": 4 + 2 * (1 + 4 / 256),
                             "paged_adamw8bit": 4 + 2 * (1 + 4 / 256), "sgd": 4}
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


def check_elementwise(optimizer: torch.optim.Optimizer, stage: int) -> None:
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

"""Typed configuration of each technique family, and the rules that validate it.

A technique's settings accept a short string for the common case and a mapping (or the dataclass)
for the details. Everything is checked when the strategy is constructed: an unknown name, an unknown
key or a wrong type raises :class:`MemKitConfigError` naming the key, the bad value and the fix.

Only families whose techniques exist have a dataclass here; later families are added with their
techniques.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Union


#: the list :func:`recorded_errors` fills, while it is active
_RECORDED: "contextvars.ContextVar[Optional[list[MemKitConfigError]]]" = contextvars.ContextVar("memkit_errors",
                                                                                                 default=None)


class MemKitConfigError(ValueError):
    """A memkit setting is invalid. The message names the key, the value and the fix."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        recorded = _RECORDED.get()
        if recorded is not None:
            recorded.append(self)


@contextlib.contextmanager
def recorded_errors() -> Iterator[list[MemKitConfigError]]:
    """Every :class:`MemKitConfigError` created inside, in order. The command line uses it to find memkit's
    message again where jsonargparse kept only text (it tries each type of a Union and reports them all)."""
    recorded: list[MemKitConfigError] = []
    token = _RECORDED.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDED.reset(token)


def _fmt_allowed(allowed: Any) -> str:
    return ", ".join(repr(a) for a in allowed)


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed`` (strings), else raise naming ``key``."""
    if not isinstance(value, str):
        raise MemKitConfigError(
            f"{key}={value!r} has type {type(value).__name__}, expected a string. "
            f"Fix: set {key} to one of {_fmt_allowed(allowed)}."
        )
    if value not in allowed:
        raise MemKitConfigError(
            f"{key}={value!r} is not a known name. Fix: set {key} to one of {_fmt_allowed(allowed)}."
        )
    return value


def _range_text(minimum: Optional[float], maximum: Optional[float], min_exclusive: bool, max_exclusive: bool,
                integer: bool) -> str:
    """``"an integer >= 1"``, ``"a number > 0"``, ``"a number in (0, 1]"``, ``"a finite number"``."""
    kind = "an integer" if integer else "a number"
    if minimum is not None and maximum is not None:
        return f"{kind} in {'(' if min_exclusive else '['}{minimum}, {maximum}{')' if max_exclusive else ']'}"
    if minimum is not None:
        return f"{kind} {'>' if min_exclusive else '>='} {minimum}"
    if maximum is not None:
        return f"{kind} {'<' if max_exclusive else '<='} {maximum}"
    return kind if integer else "a finite number"


def check_number(key: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 min_exclusive: bool = False, max_exclusive: bool = False, integer: bool = False,
                 what: Optional[str] = None, fix: Optional[str] = None) -> Any:
    """Return ``value`` if it is a finite number in range, else raise :class:`MemKitConfigError`.

    The one check of every numeric memkit setting: it refuses booleans (``True`` is an ``int`` in
    Python), anything that is not a real number (strings such as ``"nan"`` or ``"1e-3"`` included),
    NaN and infinities, non-integers where ``integer`` is set, and values outside the range.

    Args:
        key: the setting's name, as the user writes it (e.g. ``"optimizer.scale"``).
        value: the value to check.
        minimum, maximum: the bounds (None: unbounded on that side).
        min_exclusive, max_exclusive: the bound itself is not allowed.
        integer: the value must be an integer (``int``, not ``float``).
        what: how the message words the allowed values (default: from the range, e.g. "an integer >= 1").
        fix: the message's fix (default: "set {key} to {what}.").

    Returns:
        ``value`` as a Python ``int`` (``integer``) or ``float`` (numpy scalars included).

    Raises:
        MemKitConfigError: naming ``key``, the value and the fix.
    """
    custom = what is not None
    what = what or _range_text(minimum, maximum, min_exclusive, max_exclusive, integer)
    fix = fix or f"set {key} to {what}."
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise MemKitConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {what}. Fix: {fix}")
    if isinstance(value, numbers.Integral):
        value = int(value)  # Python ints are finite however large (math.isfinite would overflow on them)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise MemKitConfigError(f"{key}={value!r} is not a finite number (NaN and infinities would silently spoil "
                                    f"the training). Fix: {fix}")
    if minimum is not None and (value < minimum or (min_exclusive and value == minimum)):
        relation = f"must be {what}" if custom or min_exclusive else f"is below {minimum}"
        raise MemKitConfigError(f"{key}={value!r} {relation}. Fix: {fix}")
    if maximum is not None and (value > maximum or (max_exclusive and value == maximum)):
        relation = f"must be {what}" if custom or max_exclusive else f"is above {maximum}"
        raise MemKitConfigError(f"{key}={value!r} {relation}. Fix: {fix}")
    return value


def check_int(key: str, value: Any, *, minimum: int, maximum: Optional[int] = None) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else raise naming ``key``."""
    return check_number(key, value, minimum=minimum, maximum=maximum, integer=True,
                        fix=f"set {key} to an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None
                                                                      else "") + f", such as {max(minimum, 1)}.")


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(key: str, value: Any) -> int:
    """Bytes from an int or a string such as ``"24GiB"``, ``"512 MiB"``, ``"1.5GB"``.

    A float is taken when it is a whole number (``2e9``, as YAML writes large sizes). NaN, infinities,
    sizes too large to represent and sizes below one byte are refused.

    Raises:
        MemKitConfigError: naming ``key``, the value and the accepted forms.
    """
    import re

    fix = "Fix: a positive number of bytes, or a string such as '24GiB', '512MiB' or '1.5GB'."
    size: Any = None
    if isinstance(value, bool):
        size = None
    elif isinstance(value, int):
        size = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?i?[bB])?\s*", value)
        if match and (match.group(2) or "b").lower() in _SIZE_UNITS:
            unit = (match.group(2) or "b").lower()
            number = float(match.group(1)) * _SIZE_UNITS[unit]
            size = int(number) if math.isfinite(number) else None  # "9" * 400 + "GiB" overflows to inf
    if size is None:
        raise MemKitConfigError(f"{key}={value!r} is not a memory size. {fix}")
    if size < 1:
        raise MemKitConfigError(f"{key}={value!r} is not a memory size: it is below one byte. {fix}")
    return size


def _parse_setting(key: str, value: Any, cls: type, shorthands: Mapping[str, Mapping[str, Any]]) -> Any:
    """A family's setting -> its dataclass: None (defaults), a shorthand, a mapping, or the dataclass."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        check_choice(key, value, tuple(shorthands))
        return cls(**shorthands[value])
    if isinstance(value, Mapping):
        return _from_mapping(cls, key, value)
    raise MemKitConfigError(
        f"{key}={value!r} has type {type(value).__name__}. Fix: pass a string ({_fmt_allowed(shorthands)}), "
        f"a mapping of {_fmt_allowed(f.name for f in dataclasses.fields(cls))}, or a {cls.__name__}."
    )


def _from_mapping(cls: type, key: str, mapping: Mapping[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        raise MemKitConfigError(
            f"{key} has unknown key(s) {_fmt_allowed(unknown)}. Fix: use only {_fmt_allowed(fields)}."
        )
    return cls(**mapping)


# --------------------------------------------------------------------------------------------------
# activations: what happens to the tensors a forward pass saves for the backward
# --------------------------------------------------------------------------------------------------

#: Checkpointing policies. "none": every activation is kept. "blocks": transformer blocks are
#: recomputed in the backward pass. "selective": inside each block the outputs of matrix products
#: (and attention) are kept and only the cheap element-wise ops are recomputed. "budget": checkpoint
#: just enough blocks that the blocks' saved activations fit ``activation_budget``. All exact.
CHECKPOINT_POLICIES = ("none", "blocks", "selective", "budget")
#: Saved-activation compression: "int8" (Mesa: per-channel / per-head scales), "fp8" (COAT: e4m3,
#: per-group scales for linear inputs, per-tensor elsewhere). Approximate.
COMPRESS_MODES = ("none", "int8", "fp8")
SCALE_MODES = ("exact", "running")

#: Short strings accepted for the whole ``activations`` setting, and what each means.
ACTIVATIONS_SHORTHANDS: dict[str, dict[str, Any]] = {
    "none": {},
    "checkpoint": {"checkpoint": "blocks"},
    "selective": {"checkpoint": "selective"},
    "int8": {"compress": "int8"},
    "fp8": {"compress": "fp8"},
    "offload": {"offload": True},
}


# WTA-CRS: activations.sampled_backward (see lightning_memkit.activations.sampled)
#: the authors' ``minimal_k``: never fewer sampled rows than this (all of them when a batch has fewer)
DEFAULT_MIN_ROWS = 10


@dataclass(frozen=True)
class SampledBackwardConfig:
    """Settings of ``activations.sampled_backward``.

    Attributes:
        keep: fraction of the rows (tokens) of each chosen layer's input kept for its weight gradient, in (0, 1];
            1.0 keeps them all (the plain layer, bit for bit).
        modules: module-name patterns (fnmatch over ``named_modules()``); the linear layers matched, or inside a
            matched module, are sampled. None: every ``nn.Linear`` inside the transformer blocks.
        seed: seed of the sampling; each training step draws from a generator seeded with (seed, global step,
            micro-batch, process rank), so runs and resumed runs draw the same rows. None: torch's global generator.
        min_rows: never fewer rows than this (the authors' ``minimal_k``).
    """

    keep: float = 0.3
    modules: Optional[tuple[str, ...]] = None
    seed: Optional[int] = 0
    min_rows: int = DEFAULT_MIN_ROWS


SampledBackwardSetting = Union[float, Mapping[str, Any], SampledBackwardConfig, None]

_WTA = "activations.sampled_backward"


def parse_sampled_backward(value: SampledBackwardSetting) -> Optional[SampledBackwardConfig]:
    """Turn the user's ``activations.sampled_backward`` into a :class:`SampledBackwardConfig` (None: off).

    Args:
        value: None (off); a float, the ``keep`` fraction; a mapping with the keys ``keep``, ``modules``, ``seed``,
            ``min_rows``; or a :class:`SampledBackwardConfig`.

    Raises:
        MemKitConfigError: wrong type, unknown key, or a value out of range.
    """
    if value is None:
        return None
    if isinstance(value, SampledBackwardConfig):
        fields: dict[str, Any] = dict(keep=value.keep, modules=value.modules, seed=value.seed, min_rows=value.min_rows)
    elif isinstance(value, (bool, str)):
        raise MemKitConfigError(f"{_WTA}={value!r} has type {type(value).__name__}. Fix: a fraction of the rows to "
                                "keep, e.g. 0.3, or a mapping such as {keep: 0.3, seed: 0}.")
    elif isinstance(value, numbers.Real):
        fields = {"keep": value}
    elif isinstance(value, Mapping):
        allowed = ("keep", "modules", "seed", "min_rows")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise MemKitConfigError(f"{_WTA} has unknown key(s) {unknown}. Fix: use only {list(allowed)}.")
        fields = dict(value)
    else:
        raise MemKitConfigError(f"{_WTA}={value!r} has type {type(value).__name__}. Fix: a fraction such as 0.3, or "
                                "a mapping such as {keep: 0.3, modules: ['*.mlp.*'], seed: 0}.")
    keep = check_number(f"{_WTA}.keep", fields.get("keep", 0.3), minimum=0, maximum=1, min_exclusive=True,
                        fix="a fraction of the rows in (0, 1], e.g. 0.3 (1.0 keeps every row: the exact gradient).")
    modules = fields.get("modules")
    if modules is not None:
        if isinstance(modules, str) or not isinstance(modules, (list, tuple)) or not modules \
                or not all(isinstance(m, str) and m for m in modules):
            raise MemKitConfigError(f"{_WTA}.modules={modules!r} must be a non-empty list of module-name patterns. "
                                    "Fix: e.g. ['*.self_attn.*_proj', '*.mlp'], or drop it for every linear layer "
                                    "inside the transformer blocks.")
        modules = tuple(modules)
    seed = fields.get("seed", 0)
    if seed is not None:
        seed = check_int(f"{_WTA}.seed", seed, minimum=0)
    min_rows = check_int(f"{_WTA}.min_rows", fields.get("min_rows", DEFAULT_MIN_ROWS), minimum=1)
    return SampledBackwardConfig(keep=float(keep), modules=modules, seed=seed, min_rows=min_rows)



@dataclass(frozen=True)
class ActivationsConfig:
    """Settings of the ``activations`` family.

    Attributes:
        checkpoint: policy name, one of :data:`CHECKPOINT_POLICIES`. ``"blocks"`` wraps the forward
            of the model's transformer blocks in non-reentrant ``torch.utils.checkpoint``: only each
            block's input is kept and the block is recomputed in the backward pass. ``"selective"``
            keeps matrix-product and attention outputs and recomputes the element-wise ops. Exact.
        checkpoint_every: with ``checkpoint="blocks"``, checkpoint blocks ``0, k, 2k, ...`` for
            ``k = checkpoint_every`` (1: every block). A larger ``k`` trades memory for less recompute.
        compress: one of :data:`COMPRESS_MODES`: what the chosen modules save is kept in 8 bits.
        scales: ``"exact"`` (each tensor's absmax) or ``"running"`` (Mesa's running estimates; int8).
        offload: keep what the chosen modules save (compressed or not; with ``checkpoint="blocks"``,
            the blocks' inputs) in pinned host memory, on CUDA.
        modules: module-name patterns (fnmatch over ``named_modules()``) whose saved tensors are
            compressed / offloaded; None: the transformer blocks. Modules inside checkpointed blocks save
            nothing to compress: compression whose modules all lie inside them is refused at setup, and a
            pattern that only matches such modules is warned about.
        min_numel: tensors with fewer values are never compressed or offloaded.
        activation_budget: with ``checkpoint="budget"``: bytes (or ``"6GiB"``) the transformer
            blocks may keep for the backward pass. The first training step measures one block and
            keeps the activations of as many blocks as fit; the others are checkpointed.
        offload_host_memory: with ``offload``: the most pinned host memory offload may use (bytes or
            ``"32GiB"``); checked against the host's available memory at setup (on CUDA), and an error
            names it if a step needs more. None: not checked.
        sampled_backward: WTA-CRS (:class:`SampledBackwardConfig`, or a ``keep`` fraction): chosen linear layers
            keep a sample of their input's rows and estimate their weight gradient from it (unbiased;
            approximate). None: off.
    """

    checkpoint: str = "none"
    checkpoint_every: int = 1
    compress: str = "none"
    scales: str = "exact"
    offload: bool = False
    modules: Optional[tuple[str, ...]] = None
    min_numel: int = 4096
    activation_budget: Optional[Union[int, str]] = None
    offload_host_memory: Optional[Union[int, str]] = None
    sampled_backward: Optional[Any] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampled_backward", parse_sampled_backward(self.sampled_backward))
        if self.activation_budget is not None:
            object.__setattr__(self, "activation_budget", parse_size("activations.activation_budget",
                                                                     self.activation_budget))
        if (self.checkpoint == "budget") != (self.activation_budget is not None):
            raise MemKitConfigError(
                "activations.checkpoint='budget' and activations.activation_budget go together "
                f"(got checkpoint={self.checkpoint!r}, activation_budget={self.activation_budget!r}). Fix: set both, "
                "e.g. {checkpoint: budget, activation_budget: 6GiB}, or neither."
            )
        if self.checkpoint == "budget" and self.checkpoint_every != 1:
            raise MemKitConfigError(
                f"activations.checkpoint='budget' chooses which blocks to checkpoint itself; checkpoint_every="
                f"{self.checkpoint_every} does not apply. Fix: drop checkpoint_every."
            )
        if self.offload_host_memory is not None:
            object.__setattr__(self, "offload_host_memory", parse_size("activations.offload_host_memory",
                                                                       self.offload_host_memory))
            if not self.offload:
                raise MemKitConfigError("activations.offload_host_memory applies to offload=true. Fix: set "
                                        "offload: true, or drop offload_host_memory.")
        check_choice("activations.checkpoint", self.checkpoint, CHECKPOINT_POLICIES)
        check_int("activations.checkpoint_every", self.checkpoint_every, minimum=1)
        check_choice("activations.compress", self.compress, COMPRESS_MODES)
        check_choice("activations.scales", self.scales, SCALE_MODES)
        check_int("activations.min_numel", self.min_numel, minimum=1)
        if not isinstance(self.offload, bool):
            raise MemKitConfigError(f"activations.offload={self.offload!r} has type {type(self.offload).__name__}. "
                                    "Fix: true or false.")
        if self.compress == "fp8":
            import torch

            if not hasattr(torch, "float8_e4m3fn"):
                raise MemKitConfigError(
                    f"activations.compress='fp8' needs torch's float8 dtypes, which torch {torch.__version__} lacks. "
                    "Fix: use compress='int8', or torch >= 2.1."
                )
        if self.scales == "running" and self.compress != "int8":
            raise MemKitConfigError(f"activations.scales='running' applies to compress='int8' (Mesa), not "
                                    f"{self.compress!r}. Fix: drop scales or use compress='int8'.")
        if self.compress != "none" and self.checkpoint in ("blocks", "selective", "budget") \
                and self.checkpoint_every == 1 and self.modules is None:
            raise MemKitConfigError(
                f"activations.compress={self.compress!r} with checkpoint={self.checkpoint!r} on every block leaves "
                "nothing to compress: a checkpointed block saves no activations (it recomputes them). Fix: "
                "checkpoint_every >= 2 (compress the others), or checkpoint='none', or offload=true to move the "
                "checkpointed blocks' inputs to host memory."
            )
        if self.modules is not None:
            if isinstance(self.modules, str) or not self.modules or not all(isinstance(m, str) for m in self.modules):
                raise MemKitConfigError(f"activations.modules={self.modules!r} must be a non-empty list of module-name "
                                        "patterns such as ['*.mlp', '*.attn'].")
            object.__setattr__(self, "modules", tuple(self.modules))

    @property
    def enabled(self) -> bool:
        return self.checkpoint != "none" or self.compress != "none" or self.offload or self.sampled_backward is not None


ActivationsSetting = Union[str, Mapping[str, Any], ActivationsConfig, None]


def parse_activations(value: ActivationsSetting) -> ActivationsConfig:
    """Turn the user's ``activations=`` setting into an :class:`ActivationsConfig`.

    Args:
        value: ``None``; a shorthand string (one of :data:`ACTIVATIONS_SHORTHANDS`); a mapping of
            :class:`ActivationsConfig` fields; or an :class:`ActivationsConfig`.

    Raises:
        MemKitConfigError: unknown shorthand, unknown key, bad value or wrong type.
    """
    return _parse_setting("activations", value, ActivationsConfig, ACTIVATIONS_SHORTHANDS)


# --------------------------------------------------------------------------------------------------
# cross_entropy: how the LM head and the loss are computed
# --------------------------------------------------------------------------------------------------

#: Implementations of the fused loss (see ``lightning_memkit.loss.linear_cross_entropy``).
CROSS_ENTROPY_IMPLS = ("auto", "triton", "chunked", "torch")

CROSS_ENTROPY_SHORTHANDS: dict[str, dict[str, Any]] = {
    "fused": {},
    "plain": {"fused": False},
}


@dataclass(frozen=True)
class CrossEntropyConfig:
    """Settings of the ``cross_entropy`` family.

    Attributes:
        fused: compute the head and the loss together without materializing the logits (exact).
            ``False`` leaves the model's own loss computation alone.
        impl: one of :data:`CROSS_ENTROPY_IMPLS`; ``"auto"``: Triton on CUDA, chunked PyTorch elsewhere.
        chunk_size: tokens per chunk of the chunked implementation (None: about 64 MiB of fp32 logits).
        filter_eps: Triton only: drop logit-gradient entries below this (approximate; None: exact).
    """

    fused: bool = True
    impl: str = "auto"
    chunk_size: Optional[int] = None
    filter_eps: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.fused, bool):
            raise MemKitConfigError(
                f"cross_entropy.fused={self.fused!r} has type {type(self.fused).__name__}. Fix: set it to true or "
                "false."
            )
        check_choice("cross_entropy.impl", self.impl, CROSS_ENTROPY_IMPLS)
        if self.chunk_size is not None:
            check_int("cross_entropy.chunk_size", self.chunk_size, minimum=1)
        if self.filter_eps is not None:
            # the logit gradients it filters are (softmax - one-hot) x the token's weight: at most 1 in size, so a
            # filter_eps of 1 or more would drop every gradient of the head and the model below it
            object.__setattr__(self, "filter_eps", check_number(
                "cross_entropy.filter_eps", self.filter_eps, minimum=0, maximum=1, min_exclusive=True,
                max_exclusive=True, fix="use e.g. 0.000244 (2**-12), or null for exact gradients."))
            if self.impl not in ("triton", "auto"):  # with "auto" it applies where Triton runs (CUDA)
                raise MemKitConfigError(
                    f"cross_entropy.filter_eps is a Triton-only option but impl={self.impl!r}. "
                    "Fix: set cross_entropy.impl to 'triton' or drop filter_eps."
                )


CrossEntropySetting = Union[str, Mapping[str, Any], CrossEntropyConfig, None]


def parse_cross_entropy(value: CrossEntropySetting) -> CrossEntropyConfig:
    """Turn the user's ``cross_entropy=`` setting into a :class:`CrossEntropyConfig`.

    Args:
        value: ``None`` (fused, the default); ``"fused"`` or ``"plain"``; a mapping of
            :class:`CrossEntropyConfig` fields; or a :class:`CrossEntropyConfig`.

    Raises:
        MemKitConfigError: unknown shorthand, unknown key, bad value or wrong type.
    """
    return _parse_setting("cross_entropy", value, CrossEntropyConfig, CROSS_ENTROPY_SHORTHANDS)


# --------------------------------------------------------------------------------------------------
# optimizer: which optimizer replaces the one configure_optimizers returned
# --------------------------------------------------------------------------------------------------

#: "none" keeps the user's optimizer; every other name rebuilds it (see lightning_memkit.optim).
OPTIMIZER_NAMES = (
    "none", "adamw", "adamw8bit", "paged_adamw8bit", "galore_adamw", "galore_adamw8bit", "apollo", "apollo_mini",
    "frugal", "spam", "sgd_sai", "cosmos", "natural_galore", "natural_galore8bit", "zo_sgd", "zo_adam",
)
_LOWRANK_KEYS = ("rank", "update_gap", "scale", "target_modules")
_ZO_KEYS = ("perturbation", "n_perturbations", "blockwise", "seed")
#: which optional keys each optimizer takes (None in the config: the optimizer's own default)
OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "adamw": (),
    "adamw8bit": (),
    "paged_adamw8bit": (),
    "galore_adamw": _LOWRANK_KEYS,
    "galore_adamw8bit": _LOWRANK_KEYS,
    "apollo": ("rank", "update_gap", "scale", "scale_type", "norm_growth_limit", "limiter_on", "seed",
               "target_modules"),
    "apollo_mini": ("rank", "update_gap", "scale", "scale_type", "norm_growth_limit", "limiter_on", "seed",
                    "target_modules"),
    "frugal": ("rank", "update_gap", "proj", "state_free", "free_lr_scale", "reset_on_refresh", "seed",
               "target_modules"),
    "spam": ("reset_interval", "spike_threshold", "reset_warmup", "density", "seed", "target_modules"),
    "sgd_sai": (),
    "cosmos": _LOWRANK_KEYS,
    "natural_galore": (*_LOWRANK_KEYS, "history", "damping"),
    "natural_galore8bit": (*_LOWRANK_KEYS, "history", "damping"),
    "zo_sgd": _ZO_KEYS,
    "zo_adam": _ZO_KEYS,
}
#: optimizers without a low-rank rule (every parameter dense)
DENSE_ONLY_OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd_sai", "zo_sgd", "zo_adam")
#: optimizers step-in-backward can drive (bitsandbytes' optimizers have no per-parameter update; zeroth-order
#: training runs no backward)
IN_BACKWARD_OPTIMIZERS = ("adamw", "galore_adamw", "galore_adamw8bit", "apollo", "apollo_mini", "frugal", "spam",
                          "sgd_sai", "cosmos", "natural_galore", "natural_galore8bit")
#: zeroth-order optimizers: the step runs the forward twice per perturbation and never calls backward
ZEROTH_ORDER_OPTIMIZERS = ("zo_sgd", "zo_adam")

OPTIMIZER_SHORTHANDS: dict[str, dict[str, Any]] = {name: {"name": name} for name in OPTIMIZER_NAMES}


@dataclass(frozen=True)
class OptimizerConfig:
    """Settings of the ``optimizer`` family. Fields left None take the optimizer's own default.

    Attributes:
        name: one of :data:`OPTIMIZER_NAMES`. ``"sgd_sai"`` (SGD-SaI) takes no key of its own: its momentum
            is ``betas[0]`` of the param group (0.9), its learning-rate scales are computed at the first step.
        rank: subspace dimension (GaLore 128, APOLLO 256, APOLLO-Mini 1, FRUGAL 128, COSMOS 64, Natural
            GaLore 128); left unset, it is lowered to min(m, n) on narrower weights.
        update_gap: steps between projection refreshes (200; COSMOS 1: its eigenbasis is updated every step).
        scale: GaLore's and Natural GaLore's α (0.25); APOLLO's scale, applied as √scale (1; APOLLO-Mini 128);
            COSMOS: the weight of its MUON (orthogonalized) part (0.2).
        scale_type: APOLLO's ``"channel"`` or ``"tensor"``.
        norm_growth_limit: APOLLO's limiter γ (1.01); 0 turns it off.
        limiter_on: APOLLO: the update the norm-growth limiter watches: ``"raw"`` (before bias correction, as
            apollo-torch; default) or ``"corrected"`` (after it; memkit's earlier behaviour).
        proj, state_free, free_lr_scale, reset_on_refresh: FRUGAL's projection (``"svd"``/``"random"``),
            state-free rule (``"signsgd"``/``"sgd"``), its learning-rate multiple (1.0), and whether
            moments reset when the basis changes (true).
        seed: base seed of random projections (0); SPAM: of its sparse-momentum masks; zeroth-order: of the
            perturbations.
        reset_interval: SPAM: steps between momentum resets (500), both moments zeroed.
        spike_threshold: SPAM's θ (5000): gradient entries with g² > θ·v are clipped to sign(g)·√(θ·v);
            0 turns the clipping off.
        reset_warmup: SPAM: steps of the cosine learning-rate warm-up after each reset (150); 0: none.
        density: SPAM: fraction of the entries of each ``target_modules`` weight that keep moments (1.0:
            dense Adam; < 1: the sparse-momentum variant, a random mask renewed at each reset).
        history: Natural GaLore: projected gradients kept for the empirical Fisher (10).
        damping: Natural GaLore: the Fisher's damping λ (> 0; 1e-3).
        perturbation: zeroth-order: the SPSA perturbation size ε (MeZO: 1e-3).
        n_perturbations: zeroth-order: perturbations averaged per step (1).
        blockwise: zeroth-order: perturb and update one parameter block at a time.
        target_modules: module-name patterns (fnmatch, over ``LightningModule.named_modules()``) whose
            2-D weights get the low-rank rule (SPAM: sparse momentum); None: every ``nn.Linear`` inside the
            transformer blocks.
        in_backward: update each parameter from its gradient hook (see ``optim.in_backward``); one of
            :data:`IN_BACKWARD_OPTIMIZERS`.
    """

    name: str = "none"
    rank: Optional[int] = None
    update_gap: Optional[int] = None
    scale: Optional[float] = None
    scale_type: Optional[str] = None
    norm_growth_limit: Optional[float] = None
    limiter_on: Optional[str] = None
    proj: Optional[str] = None
    state_free: Optional[str] = None
    free_lr_scale: Optional[float] = None
    reset_on_refresh: Optional[bool] = None
    seed: Optional[int] = None
    reset_interval: Optional[int] = None
    spike_threshold: Optional[float] = None
    reset_warmup: Optional[int] = None
    density: Optional[float] = None
    history: Optional[int] = None
    damping: Optional[float] = None
    perturbation: Optional[float] = None
    n_perturbations: Optional[int] = None
    blockwise: Optional[bool] = None
    target_modules: Optional[tuple[str, ...]] = None
    in_backward: bool = False

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OPTIMIZER_NAMES)
        allowed = OPTIMIZER_KEYS[self.name]
        for f in dataclasses.fields(self):
            if f.name in ("name", "in_backward") or getattr(self, f.name) is None or f.name in allowed:
                continue
            takers = sorted(n for n, keys in OPTIMIZER_KEYS.items() if f.name in keys)
            raise MemKitConfigError(
                f"optimizer.{f.name}={getattr(self, f.name)!r} does not apply to optimizer {self.name!r} (it is a "
                f"setting of {', '.join(takers)}). Fix: drop optimizer.{f.name}, or choose one of those optimizers."
            )
        for key in ("rank", "update_gap", "reset_interval", "history", "n_perturbations"):
            if getattr(self, key) is not None:
                check_int(f"optimizer.{key}", getattr(self, key), minimum=1)
        for key in ("seed", "reset_warmup"):
            if getattr(self, key) is not None:
                check_int(f"optimizer.{key}", getattr(self, key), minimum=0)
        for key, exclusive in (("scale", True), ("free_lr_scale", False), ("norm_growth_limit", False),
                               ("spike_threshold", False), ("damping", True), ("perturbation", True)):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, check_number(
                    f"optimizer.{key}", getattr(self, key), minimum=0, min_exclusive=exclusive,
                    fix=f"set optimizer.{key} to a finite number {'>' if exclusive else '>='} 0, or drop it for the "
                        "optimizer's default."))
        if self.density is not None:
            object.__setattr__(self, "density", check_number(
                "optimizer.density", self.density, minimum=0, maximum=1, min_exclusive=True,
                what="a number in (0, 1]", fix="set optimizer.density in (0, 1] (1.0: dense moments; SPAM's sparse "
                                               "variant uses e.g. 0.25), or drop it."))
        if None not in (self.reset_warmup, self.reset_interval) and self.reset_warmup > self.reset_interval:
            raise MemKitConfigError(
                f"optimizer.reset_warmup={self.reset_warmup!r} is longer than optimizer.reset_interval="
                f"{self.reset_interval!r}: the warm-up after a reset would never finish before the next reset. Fix: "
                "reset_warmup <= reset_interval (the paper: 150 and 500).")
        if self.name == "spam" and self.target_modules is not None and (self.density is None or self.density == 1):
            raise MemKitConfigError(
                f"optimizer.target_modules={list(self.target_modules)!r} with SPAM picks the weights that get sparse "
                f"momentum, but density={self.density!r} keeps every moment dense. Fix: set optimizer.density below 1 "
                "(e.g. 0.25), or drop target_modules.")
        if self.norm_growth_limit not in (None, 0) and self.norm_growth_limit < 1:
            raise MemKitConfigError(f"optimizer.norm_growth_limit={self.norm_growth_limit!r} must be >= 1 (or 0 to "
                                    "turn the limiter off). Fix: use the paper's 1.01.")
        if self.limiter_on is not None:
            check_choice("optimizer.limiter_on", self.limiter_on, ("raw", "corrected"))
        if self.scale_type is not None:
            check_choice("optimizer.scale_type", self.scale_type, ("channel", "tensor"))
        if self.proj is not None:
            check_choice("optimizer.proj", self.proj, ("svd", "random"))
        if self.state_free is not None:
            check_choice("optimizer.state_free", self.state_free, ("signsgd", "sgd"))
        for key in ("in_backward", "reset_on_refresh", "blockwise"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                raise MemKitConfigError(f"optimizer.{key}={value!r} has type {type(value).__name__}. Fix: true or "
                    "false.")
        if self.target_modules is not None:
            patterns = self.target_modules
            if isinstance(patterns, str) or not all(isinstance(x, str) for x in patterns) or not patterns:
                raise MemKitConfigError(
                    f"optimizer.target_modules={patterns!r} must be a non-empty list of module-name patterns such as "
                    "['*.q_proj', '*.mlp.*']."
                )
            object.__setattr__(self, "target_modules", tuple(patterns))
        if self.in_backward and self.name not in IN_BACKWARD_OPTIMIZERS:
            why = ("there is no optimizer to drive (name 'none' keeps yours). " if self.name == "none" else
                   "zeroth-order training runs no backward pass (it estimates the gradient from forward passes). "
                   if self.name in ZEROTH_ORDER_OPTIMIZERS else
                   "bitsandbytes' optimizers have no per-parameter update to call from a gradient hook. ")
            raise MemKitConfigError(
                f"optimizer.in_backward=true with optimizer {self.name!r}: " + why
                + f"Fix: choose one of {_fmt_allowed(IN_BACKWARD_OPTIMIZERS)}, or set in_backward=false."
            )

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The settings given (not None), as keyword arguments of the optimizer class."""
        skip = ("name", "in_backward", "target_modules")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}


OptimizerSetting = Union[str, Mapping[str, Any], OptimizerConfig, None]


def parse_optimizer(value: OptimizerSetting) -> OptimizerConfig:
    """Turn the user's ``optimizer=`` setting into an :class:`OptimizerConfig`.

    Args:
        value: ``None`` (keep the user's optimizer); a name (one of :data:`OPTIMIZER_NAMES`); a mapping
            of :class:`OptimizerConfig` fields such as ``{"name": "galore_adamw8bit", "rank": 128}``;
            or an :class:`OptimizerConfig`.

    Raises:
        MemKitConfigError: unknown name or key, a setting the optimizer does not take, a bad value.
    """
    return _parse_setting("optimizer", value, OptimizerConfig, OPTIMIZER_SHORTHANDS)


# --------------------------------------------------------------------------------------------------
# sequence: chunked backpropagation along the sequence for long context
# --------------------------------------------------------------------------------------------------

#: "none": ordinary backprop. "seco": chunk-wise, exact. "spaco": SeCO with a random subset of the
#: chunks back-propagated, unbiased (approximate). "streambp": layer-wise along the sequence, exact.
SEQUENCE_METHODS = ("none", "seco", "spaco", "streambp")
#: tokens per chunk when ``sequence.chunk_size`` is left unset (clamped to the model's maximum length)
DEFAULT_SEQUENCE_CHUNK = 2048


@dataclass(frozen=True)
class SequenceConfig:
    """Settings of the ``sequence`` family.

    Attributes:
        method: one of :data:`SEQUENCE_METHODS`.
        chunk_size: tokens per chunk; the last chunk of a sequence may be shorter (any length works).
            None (the default): :data:`DEFAULT_SEQUENCE_CHUNK` tokens, or the model's maximum sequence
            length where that is shorter (decided at setup, where the model is known). An explicit value
            longer than the model's maximum is refused at setup.
        keep: SpaCO only: the probability with which each chunk is back-propagated; kept chunks are
            scaled by ``1/keep`` (the compensation factor), so the gradient is unbiased.
        seed: SpaCO only: seed of the chunk sampling (step ``n`` draws from ``(seed, n)``).
        offload: StreamBP only: keep the blocks' inputs in pinned host memory between the forward and the
            backward (copied on a side stream, brought back one block ahead), so the device holds about one
            block's worth of them instead of all; exact. On a CPU device it has no effect (one warning).
    """

    method: str = "none"
    chunk_size: Optional[int] = None
    keep: Optional[float] = None
    seed: Optional[int] = None
    offload: bool = False

    def __post_init__(self) -> None:
        check_choice("sequence.method", self.method, SEQUENCE_METHODS)
        if self.chunk_size is not None:
            check_int("sequence.chunk_size", self.chunk_size, minimum=1)
        if not isinstance(self.offload, bool):
            raise MemKitConfigError(f"sequence.offload={self.offload!r} has type {type(self.offload).__name__}. "
                                    "Fix: true or false.")
        if self.offload and self.method != "streambp":
            what = "sequence is off" if self.method == "none" else "SeCO / SpaCO keep per-layer keys/values " \
                "that every chunk's backward reads, not one block at a time"
            raise MemKitConfigError(
                f"sequence.offload=True applies to sequence.method='streambp', got method={self.method!r} ({what}). "
                "Fix: set sequence.method='streambp', or drop sequence.offload."
            )
        if self.method != "spaco":
            for key in ("keep", "seed"):
                if getattr(self, key) is not None:
                    raise MemKitConfigError(
                        f"sequence.{key}={getattr(self, key)!r} is a SpaCO setting but sequence.method="
                        f"{self.method!r}. Fix: drop sequence.{key}, or set sequence.method='spaco'."
                    )
            return
        keep = check_number("sequence.keep", 0.5 if self.keep is None else self.keep, minimum=0, maximum=1,
                            min_exclusive=True, what="a probability in (0, 1]",
                            fix="e.g. 0.5 back-propagates half the chunks on average (1.0 is SeCO).")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "seed", check_int("sequence.seed", 0 if self.seed is None else self.seed, minimum=0))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def exact(self) -> bool:
        return self.method in ("none", "seco", "streambp")

    def chunk_for(self, max_seq_len: int) -> int:
        """Tokens per chunk on a model that takes at most ``max_seq_len`` positions: ``chunk_size``, or
        when it is unset :data:`DEFAULT_SEQUENCE_CHUNK` clamped to ``max_seq_len`` (a chunk longer than
        the data's sequences is simply one chunk)."""
        return self.chunk_size if self.chunk_size is not None else min(DEFAULT_SEQUENCE_CHUNK, int(max_seq_len))


SequenceSetting = Union[str, Mapping[str, Any], SequenceConfig, None]


def parse_sequence(value: SequenceSetting) -> SequenceConfig:
    """Turn the user's ``sequence=`` setting into a :class:`SequenceConfig`.

    Args:
        value: ``None`` or ``"none"`` (off); a method name (``"seco"``, ``"spaco"``, ``"streambp"``)
            with the default chunk size; a mapping of :class:`SequenceConfig` fields such as
            ``{"method": "streambp", "chunk_size": 1024}``; or a :class:`SequenceConfig`.

    Raises:
        MemKitConfigError: unknown method or key, bad value or wrong type.
    """
    return _parse_setting("sequence", value, SequenceConfig, {m: {"method": m} for m in SEQUENCE_METHODS})


# --------------------------------------------------------------------------------------------------
# ZeRO / offload: the DeepSpeed backend
# --------------------------------------------------------------------------------------------------

ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
#: DeepSpeed config keys memkit sets from its own arguments or the Trainer's (a ``deepspeed_config``
#: may not set them): key -> the argument to use instead
DEEPSPEED_OWNED_KEYS = {
    "gradient_accumulation_steps": "Trainer(accumulate_grad_batches=...)",
    "train_batch_size": "the DataLoader's batch size and Trainer(accumulate_grad_batches=...)",
    "optimizer": "configure_optimizers (memkit rebuilds what it returns; an optimizer in the DeepSpeed config "
                 "would bypass it)",
    "scheduler": "configure_optimizers (Lightning steps the schedulers)",
    "zero_optimization.stage": "MemKitStrategy(zero_stage=...)",
    "zero_optimization.offload_optimizer": "MemKitStrategy(offload_optimizer=..., nvme_path=...)",
    "zero_optimization.offload_param": "MemKitStrategy(offload_parameters=..., nvme_path=...)",
}


@dataclass(frozen=True)
class ZeroConfig:
    """Settings of the DeepSpeed backend (``zero_stage`` 1-3); stage 0 is memkit's DDP backend.

    Attributes:
        stage: ZeRO stage: 0 (no sharding: DDP), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters).
        offload_optimizer: where the fp32 master weights and optimizer states live, and the optimizer
            steps: ``"none"`` (the device), ``"cpu"`` (ZeRO-Offload; stage >= 1) or ``"nvme"``
            (ZeRO-Infinity; stage 3).
        offload_parameters: where the 16-bit parameters live between uses: ``"none"``, ``"cpu"`` or
            ``"nvme"`` (stage 3 only).
        nvme_path: a writable folder on a fast local disk; required when anything goes to ``"nvme"``
            (default: the ``MEMKIT_NVME_PATH`` environment variable).
        cpu_adam: with the optimizer offloaded, run torch ``Adam`` / ``AdamW`` steps as DeepSpeed's
            ``DeepSpeedCPUAdam`` (the same update, vectorized; its C++ op is JIT-built once, 1-2
            minutes, and cached). False keeps the torch optimizer.
        deepspeed_config: further DeepSpeed config keys (a mapping, or a path to a JSON file), merged
            into the config memkit builds. Keys memkit or the Trainer own are refused (see
            :data:`DEEPSPEED_OWNED_KEYS`).
    """

    stage: int = 0
    offload_optimizer: str = "none"
    offload_parameters: str = "none"
    nvme_path: Optional[str] = None
    cpu_adam: bool = True
    deepspeed_config: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        stage = check_int("zero_stage", self.stage, minimum=0)
        if stage not in ZERO_STAGES:
            raise MemKitConfigError(
                f"zero_stage={stage!r} is not a ZeRO stage. Fix: 0 (no sharding), 1 (optimizer states), 2 (+ "
                "gradients) or 3 (+ parameters)."
            )
        for key in ("offload_optimizer", "offload_parameters"):
            value = getattr(self, key)
            value = "none" if value is None or value is False else value
            object.__setattr__(self, key, check_choice(key, value, OFFLOAD_DEVICES))
        if not isinstance(self.cpu_adam, bool):
            raise MemKitConfigError(f"cpu_adam={self.cpu_adam!r} has type {type(self.cpu_adam).__name__}. Fix: true "
                "or false.")
        if self.offload_optimizer != "none" and stage == 0:
            raise MemKitConfigError(
                f"offload_optimizer={self.offload_optimizer!r} needs ZeRO (DeepSpeed moves the partitioned optimizer "
                "states). Fix: set zero_stage to 1, 2 or 3 (e.g. the preset 'memkit_zero2_offload')."
            )
        if self.offload_parameters != "none" and stage != 3:
            raise MemKitConfigError(
                f"offload_parameters={self.offload_parameters!r} needs zero_stage=3 (only stage 3 partitions the "
                f"parameters), not {stage}. Fix: zero_stage=3 (e.g. the preset 'memkit_zero3_offload')."
            )
        if self.offload_optimizer == "nvme" and stage != 3:
            raise MemKitConfigError(
                f"offload_optimizer='nvme' needs zero_stage=3 (ZeRO-Infinity), not {stage}. Fix: zero_stage=3, or "
                "offload_optimizer='cpu'."
            )
        nvme = "nvme" in (self.offload_optimizer, self.offload_parameters)
        if nvme:
            if self.nvme_path is None and os.environ.get("MEMKIT_NVME_PATH"):
                object.__setattr__(self, "nvme_path", os.environ["MEMKIT_NVME_PATH"])
            _check_nvme_path(self.nvme_path)
        elif self.nvme_path is not None:
            raise MemKitConfigError(
                f"nvme_path={self.nvme_path!r} is set but nothing is offloaded to NVMe. Fix: drop nvme_path, or set "
                "offload_optimizer / offload_parameters to 'nvme'."
            )
        object.__setattr__(self, "deepspeed_config", _load_deepspeed_config(self.deepspeed_config))

    @property
    def enabled(self) -> bool:
        """True when DeepSpeed runs the step (stage 1-3)."""
        return self.stage > 0


#: True while ``memkit plan`` builds a recipe: checks of this machine's hardware (an NVMe folder, libaio)
#: are skipped, since a plan is about the memory of the machine the recipe is meant for.
_PLANNING: "contextvars.ContextVar[bool]" = contextvars.ContextVar("memkit_planning", default=False)


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """Inside, settings are validated without checking this machine's hardware (see :data:`_PLANNING`)."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


def is_planning() -> bool:
    return _PLANNING.get()


def _check_nvme_path(path: Any) -> None:
    if _PLANNING.get():
        return
    if not isinstance(path, str) or not path:
        raise MemKitConfigError(
            f"nvme_path={path!r}: offloading to 'nvme' needs a folder on a fast local disk. Fix: set nvme_path "
            "(e.g. nvme_path='/local_nvme/memkit') or the MEMKIT_NVME_PATH environment variable."
        )
    folder = path
    while not os.path.exists(folder):  # a folder to be created: its first existing parent must be writable
        parent = os.path.dirname(os.path.abspath(folder))
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise MemKitConfigError(
            f"nvme_path={path!r} is not a writable folder ({folder!r} "
            + ("is not a folder" if not os.path.isdir(folder) else "is not writable by this user")
            + "). Fix: point nvme_path at a folder on a local NVMe disk that this user can write."
        )


def _load_deepspeed_config(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            raise MemKitConfigError(f"deepspeed_config={str(value)!r} is not a file. Fix: a mapping, or a JSON file's "
                "path.")
        try:
            with open(value) as f:
                value = json.load(f)
        except ValueError as error:
            raise MemKitConfigError(
                f"deepspeed_config file {str(value)!r} is not valid JSON ({error}). Fix the file.") from None
    if not isinstance(value, Mapping):
        raise MemKitConfigError(
            f"deepspeed_config has type {type(value).__name__}. Fix: a mapping of DeepSpeed config keys, or a JSON "
            "path."
        )
    try:
        config = json.loads(json.dumps(dict(value)))  # a plain, deep copy
    except (TypeError, ValueError) as error:
        raise MemKitConfigError(f"deepspeed_config holds a value that is not JSON ({error}). Fix: numbers, strings, "
                                "booleans, lists and mappings only, as in DeepSpeed's JSON config.") from None
    if "zero_optimization" in config and not isinstance(config["zero_optimization"], dict):
        raise MemKitConfigError(
            f"deepspeed_config['zero_optimization']={config['zero_optimization']!r} must be a mapping of ZeRO settings "
            "(memkit builds that section from zero_stage / offload_* and merges yours into it). Fix: e.g. "
            "{'zero_optimization': {'reduce_bucket_size': 2e8}}."
        )
    for key, instead in DEEPSPEED_OWNED_KEYS.items():
        head, _, tail = key.partition(".")
        present = head in config and (not tail or tail in config[head])
        if present:
            raise MemKitConfigError(
                f"deepspeed_config sets {key!r}, which memkit sets from {instead}. Fix: drop {key!r} from "
                "deepspeed_config and use that instead."
            )
    return config


@dataclass(frozen=True)
class MemKitSettings:
    """Everything a ``MemKitStrategy`` is configured with, each family parsed once (``MemKitStrategy.settings``).

    The planner reads a strategy's setting from it (:func:`lightning_memkit.planner.search.setting_of`).
    """

    activations: ActivationsConfig
    cross_entropy: CrossEntropyConfig
    optimizer: OptimizerConfig
    sequence: SequenceConfig
    zero: ZeroConfig


def parse_zero(
    zero_stage: Any = 0,
    offload_optimizer: Any = None,
    offload_parameters: Any = None,
    nvme_path: Any = None,
    cpu_adam: Any = True,
    deepspeed_config: Any = None,
) -> ZeroConfig:
    """Build the :class:`ZeroConfig` from ``MemKitStrategy``'s ZeRO arguments.

    Raises:
        MemKitConfigError: a stage outside 0-3, an unknown offload device, offload the stage cannot do, NVMe
            without a writable ``nvme_path``, or a ``deepspeed_config`` key memkit or the Trainer own.
    """
    return ZeroConfig(zero_stage, offload_optimizer, offload_parameters, nvme_path, cpu_adam, deepspeed_config)

"""What a memkit checkpoint records of its settings, and the rules for resuming from it.

Every checkpoint a ``MemKitStrategy`` writes holds, under the key ``"memkit"``, the technique
settings it was trained with (plain JSON values: it loads with ``torch.load(weights_only=True)``).
When ``Trainer.fit(ckpt_path=...)`` resumes, the settings of this run are compared with those, before
any state is restored:

- the **optimizer** settings (every field but ``in_backward``) decide the layout of the optimizer
  state: GaLore's projectors and rank, APOLLO's seed, 8-bit or fp32 moments. A difference cannot be
  honoured by a resume, so it is refused with both settings and the two fixes: resume with the saved
  settings, or start from the weights alone (``MemKitStrategy(resume="weights")``);
- the other families (activations, cross-entropy, sequence, ``in_backward``) keep no state: a change
  takes effect from the first resumed step, and it is logged once, so nothing changes silently.

``resume="weights"`` loads the model's weights only: the optimizer state, the LR schedulers, the
loop counters (step, epoch, data position) and the callbacks' state start fresh, and the settings may
differ from the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from lightning_memkit.config import (
    ActivationsConfig,
    CrossEntropyConfig,
    MemKitConfigError,
    OptimizerConfig,
    SequenceConfig,
    ZeroConfig,
    check_choice,
)

#: the checkpoint key under which the settings are stored
CHECKPOINT_KEY = "memkit"
#: the file beside a DeepSpeed (ZeRO) checkpoint folder's shards holding the same record, read before the engine loads
ZERO_SETTINGS_FILE = "memkit_settings.json"
#: ``MemKitStrategy(resume=...)``: "exact" restores everything and refuses changed optimizer settings;
#: "weights" restores the model's weights only
RESUME_MODES = ("exact", "weights")
#: format of the record (bumped when its meaning changes)
RECORD_VERSION = 1
#: optimizer fields that do not change the optimizer state's layout (a change is allowed and logged)
_STATELESS_OPTIMIZER_FIELDS = ("in_backward",)
#: checkpoint keys a weights-only resume keeps (everything else is training state that starts fresh)
_WEIGHTS_KEYS = ("state_dict", "epoch", "global_step", "pytorch-lightning_version", "hyper_parameters",
                 "hparams_name", "datamodule_hyper_parameters", CHECKPOINT_KEY)


def parse_resume(value: Any) -> str:
    """``MemKitStrategy(resume=...)``: ``"exact"`` (default) or ``"weights"``."""
    return check_choice("resume", value, RESUME_MODES)


def _plain(value: Any) -> Any:
    """JSON-able copy (tuples become lists, as they would after a round trip)."""
    return json.loads(json.dumps(value))


def settings_record(activations: ActivationsConfig, cross_entropy: CrossEntropyConfig, optimizer: OptimizerConfig,
                    sequence: SequenceConfig, zero: ZeroConfig) -> dict[str, Any]:
    """The settings a checkpoint records (plain JSON values)."""
    return _plain({
        "version": RECORD_VERSION,
        "activations": dataclasses.asdict(activations),
        "cross_entropy": dataclasses.asdict(cross_entropy),
        "optimizer": dataclasses.asdict(optimizer),
        "sequence": dataclasses.asdict(sequence),
        "zero": {"stage": zero.stage, "offload_optimizer": zero.offload_optimizer,
                 "offload_parameters": zero.offload_parameters},
    })


def _family_defaults(family: str) -> dict[str, Any]:
    cls = {"activations": ActivationsConfig, "cross_entropy": CrossEntropyConfig, "optimizer": OptimizerConfig,
           "sequence": SequenceConfig}[family]
    return _plain(dataclasses.asdict(cls()))


def as_setting(family: str, record: Mapping[str, Any]) -> Any:
    """A family's recorded settings as the user writes them: the fields that differ from the defaults
    (``"none"`` when none do; an optimizer's name alone when only the name is set)."""
    defaults = _family_defaults(family)
    short = {k: v for k, v in record.items() if defaults.get(k, object()) != v}
    if family == "optimizer":
        short = {"name": record.get("name", "none"), **short}
        return short["name"] if len(short) == 1 else short
    return short or "none"


def describe_family(family: str, record: Mapping[str, Any]) -> str:
    """``optimizer={'name': 'galore_adamw8bit', 'rank': 8}``: a family's setting as the user writes it."""
    setting = as_setting(family, record)
    own = " (configure_optimizers' own optimizer)" if family == "optimizer" and setting == "none" else ""
    return f"{family}={setting!r}{own}"


def _optimizer_state_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in _STATELESS_OPTIMIZER_FIELDS}


def check_resume(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], *, checkpoint: str,
                 mode: str) -> list[str]:
    """Compare the settings a checkpoint records with this run's before anything is restored.

    Args:
        saved: the checkpoint's record (None: written without memkit, or by a memkit before records).
        current: this run's record (:func:`settings_record`).
        checkpoint: the checkpoint's path (for the message).
        mode: ``"exact"`` or ``"weights"`` (see :data:`RESUME_MODES`).

    Returns:
        one line per family whose setting changed and takes effect now (to be logged); empty when
        nothing changed, when the checkpoint has no record, or with ``mode="weights"``.

    Raises:
        MemKitConfigError: with ``mode="exact"``, the optimizer settings differ from the checkpoint's,
            or the record is of a format this memkit does not read.
    """
    if saved is None or mode == "weights":
        return []
    if not isinstance(saved, Mapping) or saved.get("version") != RECORD_VERSION:
        raise MemKitConfigError(
            f"the checkpoint {checkpoint!r} holds memkit settings of an unknown format ({CHECKPOINT_KEY!r}: "
            f"{saved!r:.200}). Fix: resume it with the memkit version that wrote it, or start from its weights alone "
            "with MemKitStrategy(resume='weights')."
        )
    old, new = saved["optimizer"], current["optimizer"]
    if _optimizer_state_fields(old) != _optimizer_state_fields(new):
        differ = sorted(k for k in set(old) | set(new) if k not in _STATELESS_OPTIMIZER_FIELDS
                        and old.get(k) != new.get(k))
        what = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise MemKitConfigError(
            f"the checkpoint {checkpoint!r} was trained with {describe_family('optimizer', old)}, but this run sets "
            f"{describe_family('optimizer', new)} ({what}). Its optimizer state cannot drive the new optimizer, and "
            "memkit does not drop it silently. Fix: resume with the saved setting "
            f"(optimizer: {as_setting('optimizer', old)!r}), or start from the checkpoint's weights alone "
            "with MemKitStrategy(resume='weights') (the optimizer state, LR schedule and step counter start fresh)."
        )
    changed = []
    for family in ("activations", "cross_entropy", "sequence"):
        if saved.get(family) != current[family]:
            changed.append(f"{family}: {describe_family(family, saved.get(family) or {})} -> "
                           f"{describe_family(family, current[family])}")
    if old.get("in_backward") != new.get("in_backward"):
        changed.append(f"optimizer.in_backward: {old.get('in_backward')} -> {new.get('in_backward')}")
    return changed


def keep_weights_only(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Lightning checkpoint that a ``resume="weights"`` run restores (the model's weights).

    The optimizer state, schedulers, loops, callbacks and precision state are dropped; ``lr_schedulers``
    becomes an empty list, which Lightning's restore reads as "nothing to restore".
    """
    kept = {k: v for k, v in checkpoint.items() if k in _WEIGHTS_KEYS}
    kept["lr_schedulers"] = []
    return kept


def write_zero_record(folder: str, record: Mapping[str, Any]) -> None:
    """Write ``record`` beside a DeepSpeed checkpoint's shards (rank 0), atomically."""
    path = os.path.join(folder, ZERO_SETTINGS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_zero_record(folder: str) -> Optional[dict[str, Any]]:
    """The record beside a DeepSpeed checkpoint's shards, or None (a checkpoint written without memkit)."""
    path = os.path.join(folder, ZERO_SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)

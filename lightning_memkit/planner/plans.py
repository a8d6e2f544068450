"""Will it fit? One full-size training step of a recipe on fake tensors per combination of techniques.

:func:`plan` measures the recipe's own combination; ``compare=True`` measures the candidates of
:func:`candidates` too and ranks those that fit by expected step time. :func:`choose` is the auto
mode's search (cheapest first, stop at the first that fits). ZeRO rows run the step without
DeepSpeed (it cannot run on fake tensors) and take the model states (parameters, gradients,
optimizer state, DeepSpeed's buffers) from :func:`lightning_memkit.zero.rules.zero_memory`, whose partition
sizes matched real engines within 1% (the ZeRO tests).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence


from lightning_memkit.config import MemKitConfigError, parse_size
from lightning_memkit.planner.search import (  # noqa: F401  (re-exported: the planner's search, imported from here)
    GIB,
    OVERHEAD,
    Candidate,
    CombinationRefused,
    Plan,
    Progress,
    Row,
    candidates,
    check_weights_fit,
    choose,
    configured_candidate,
    describe_row,
    format_breakdown,
    format_comparison,
    judge,
    measure,
    parse_budget,
    plot,
    same_setting,
    setting_of,
    weights_bytes,
)
from lightning_memkit.planner.step import Setting, StepRunner



def plan(config: Any, overrides: Sequence[str] = (), *, gpu_memory: Any = None, cpu_memory: Any = None,
         compare: bool = False, allow_approximate: bool = True, progress: Optional[Progress] = None) -> Plan:
    """Peak memory of one full-size training step of a recipe, on fake tensors.

    Args:
        config: the recipe's YAML file(s); overrides: more ``memkit fit`` arguments.
        gpu_memory, cpu_memory: budgets (``"24GiB"`` or bytes) the rows are judged against.
        compare: measure the candidates of :func:`candidates` as well (ZeRO offload rows when the run has
            one device).
        allow_approximate: let the candidates use approximate optimizers.
        progress: called with (i, n, row) after each row is measured (``compare``: n is the number of rows).

    Raises:
        MemKitConfigError: an unparseable size; a GPU budget smaller than the weights (unless comparing,
            or the recipe offloads the parameters); a recipe that does not parse.
        CombinationRefused: the recipe's own combination cannot run with this model and Trainer.
        ModelBuildError: the model cannot be built on the fake device (names the part).
    """
    from lightning_memkit.planner.load import example_batch, load

    gpu = parse_size("gpu_memory", gpu_memory) if gpu_memory is not None else None
    cpu = parse_size("cpu_memory", cpu_memory) if cpu_memory is not None else None
    loaded = load(config, overrides, fake=True)
    strategy = loaded.trainer.strategy
    setting = setting_of(strategy)
    if gpu is not None and not compare and setting.zero_stage < 3:
        check_weights_fit("gpu_memory", gpu, loaded.module)
    batch = example_batch(loaded)
    runner = StepRunner(loaded.module, loaded.trainer, batch)
    world = int(getattr(loaded.trainer, "world_size", 1) or 1)
    with loaded.fake_mode:
        others: list[Candidate] = []
        if compare:
            seq_len = int(batch["input_ids"].shape[-1]) if isinstance(batch, dict) and "input_ids" in batch else 2048
            others = [c for c in candidates(setting, seq_len=seq_len, allow_approximate=allow_approximate,
                                            zero=world == 1)
                      if not same_setting(c.setting, setting)]  # the recipe's own row is measured first
        recipe = judge(measure(runner, configured_candidate(setting), world_size=world), gpu, cpu)
        if recipe.result is None:
            raise CombinationRefused(f"the recipe's own combination cannot run: {recipe.skipped}")
        rows = [recipe]
        if progress is not None and compare:
            progress(1, 1 + len(others), recipe)
        for cand in others:
            rows.append(judge(measure(runner, cand, world_size=world), gpu, cpu))
            if progress is not None:
                progress(len(rows), 1 + len(others), rows[-1])
    return Plan(recipe=recipe, rows=rows, gpu_memory=gpu, cpu_memory=cpu, weights=weights_bytes(loaded.module),
                description=_describe(loaded, batch))


def _describe(loaded: Any, batch: Any) -> str:
    module = loaded.module
    n = sum(p.numel() for p in module.parameters())
    dtype = str(next(iter(module.parameters())).dtype).replace("torch.", "")
    shape = tuple(batch["input_ids"].shape) if isinstance(batch, dict) and "input_ids" in batch else "?"
    return (f"{type(module).__name__}: {n / 1e9:.3f}B parameters in {dtype}, batch {shape}, precision "
            f"{loaded.trainer.precision}, {loaded.trainer.world_size} process(es)")


@dataclass
class LongestSequence:
    """The answer of :func:`longest_sequence`.

    Attributes:
        length: the longest length that fits (0: not even the shortest).
        row: its plan (None when nothing fits).
        capped: the upper bound itself fits (the answer is "at least ``length``").
        varies: the arguments set to each length tried, e.g. ``("--data.init_args.seq_len",)``.
        tried: (length, its row) in the order tried; a row without a result could not run at that length.
    """

    length: int
    row: Optional[Row]
    capped: bool
    varies: tuple[str, ...]
    tried: list[tuple[int, Row]] = field(default_factory=list)


def sequence_arguments(config: Any, overrides: Sequence[str] = ()) -> tuple[str, ...]:
    """The arguments that set a recipe's sequence length: the data module's ``seq_len`` (required; the batch
    takes its length from the data), and the model's ``max_seq_len`` when the model takes one (the reference
    model's RoPE tables follow it).

    Raises:
        MemKitConfigError: the recipe's data takes no ``seq_len``, or the recipe does not build.
    """
    from lightning_memkit.planner.load import load

    loaded = load(config, overrides, fake=True)

    def init_args(name: str) -> tuple[str, set[str]]:
        node = loaded.config.get(name)
        init = getattr(node, "init_args", None)
        return str(getattr(node, "class_path", None)), set(init.keys() if hasattr(init, "keys") else ())

    data_class, data_keys = init_args("data")
    if "seq_len" not in data_keys:
        raise MemKitConfigError(
            f"memkit plan --max-seq-len varies data.init_args.seq_len, and the recipe's data ({data_class}) has no "
            "seq_len argument. Fix: give the datamodule a seq_len init argument that sets the batch's length, or "
            "plan single lengths with memkit plan and your own overrides."
        )
    out = ("--data.init_args.seq_len",)
    if "max_seq_len" in init_args("model")[1]:
        out += ("--model.init_args.max_seq_len",)
    return out


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's informational messages (seed, devices, tips) off: each planned length builds a Trainer."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def longest_sequence(config: Any, overrides: Sequence[str] = (), *, gpu_memory: Any, cpu_memory: Any = None,
                     multiple: int = 1024, upper: int = 1 << 17,
                     progress: Optional[Callable[[int, int, Row], None]] = None) -> LongestSequence:
    """The longest sequence length (a multiple of ``multiple``, at most ``upper``) at which the recipe's step fits.

    The length is set with :func:`sequence_arguments` (the data's ``seq_len``, and the model's ``max_seq_len``
    when it takes one). Bisection over fake steps: about log2(upper / multiple) plans. A length at which the
    recipe's combination cannot run (e.g. a chunk size longer than the sequence) counts as not fitting; a recipe
    that does not build is an error, not a length that does not fit.

    Args:
        progress: called with (the index of the try, the length, its row) after each length is planned.

    Raises:
        MemKitConfigError: the recipe does not build (at any length), its data takes no ``seq_len``, or its
            combination cannot run even at ``multiple`` tokens (the reason is given).
    """
    gpu = parse_size("gpu_memory", gpu_memory)
    varies = sequence_arguments(config, overrides)
    tried: list[tuple[int, Row]] = []

    def attempt(length: int) -> Row:
        try:
            with _quiet_lightning():  # the Trainer's messages were shown once (sequence_arguments' load)
                row = plan(config, [*overrides, *(f"{arg}={length}" for arg in varies)], gpu_memory=gpu,
                           cpu_memory=cpu_memory).recipe
        except CombinationRefused as err:
            row = Row(configured_candidate(Setting()), skipped=str(err))
        tried.append((length, row))
        if progress is not None:
            progress(len(tried), length, row)
        return row

    lo, hi, best = 0, upper // multiple, None
    while lo < hi:  # the largest k with a fitting step at k * multiple
        mid = (lo + hi + 1) // 2
        row = attempt(mid * multiple)
        if row.fits:
            lo, best = mid, row
        else:
            hi = mid - 1
    if best is None:
        shortest = next((r for n, r in tried if n == multiple), None) or attempt(multiple)
        if shortest.result is None:
            raise MemKitConfigError(f"memkit plan --max-seq-len: at {multiple} tokens (the shortest length tried) "
                                    f"{shortest.skipped}")
    return LongestSequence(lo * multiple, best, lo == upper // multiple, varies, tried)

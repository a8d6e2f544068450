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
        per_token: device bytes per token of the line ``peak = fixed + per_token * length`` through the first two
            lengths measured (None when they do not give one: a length that cannot run, or a peak that does not
            grow with the length).
        fixed: that line's bytes at zero tokens (None with ``per_token``).
        predicted: the length the line predicted as the longest that fits (None: no prediction was made).
        error: the measured peak at ``predicted`` minus the line's, in bytes (None: not measured).
        linear: every length the line predicted was planned within ``LINEAR_TOLERANCE`` x the budget of the
            line's peak; False when the search fell back to bisection.
    """

    length: int
    row: Optional[Row]
    capped: bool
    varies: tuple[str, ...]
    tried: list[tuple[int, Row]] = field(default_factory=list)
    per_token: Optional[float] = None
    fixed: Optional[float] = None
    predicted: Optional[int] = None
    error: Optional[int] = None
    linear: bool = False


def sequence_arguments(config: Any, overrides: Sequence[str] = ()) -> tuple[str, ...]:
    """The arguments that set a recipe's sequence length: the data module's ``seq_len`` (required; the batch
    takes its length from the data), and the model's ``max_seq_len`` when the model takes one (the reference
    model's RoPE tables follow it).

    Raises:
        MemKitConfigError: the recipe's data takes no ``seq_len``, or the recipe does not build.
    """
    return _sequence_setup(config, overrides)[0]


def _sequence_setup(config: Any, overrides: Sequence[str]) -> tuple[tuple[str, ...], Optional[int]]:
    """:func:`sequence_arguments`, and the recipe's own ``data.seq_len`` (None when it is no positive int)."""
    from lightning_memkit.planner.load import load

    loaded = load(config, overrides, fake=True)

    def init_args(name: str) -> tuple[str, Any]:
        node = loaded.config.get(name)
        init = getattr(node, "init_args", None)
        return str(getattr(node, "class_path", None)), init

    def keys(init: Any) -> set[str]:
        return set(init.keys() if hasattr(init, "keys") else ())

    data_class, data_init = init_args("data")
    if "seq_len" not in keys(data_init):
        raise MemKitConfigError(
            f"memkit plan --max-seq-len varies data.init_args.seq_len, and the recipe's data ({data_class}) has no "
            "seq_len argument. Fix: give the datamodule a seq_len init argument that sets the batch's length, or "
            "plan single lengths with memkit plan and your own overrides."
        )
    out = ("--data.init_args.seq_len",)
    if "max_seq_len" in keys(init_args("model")[1]):
        out += ("--model.init_args.max_seq_len",)
    own = data_init.get("seq_len") if hasattr(data_init, "get") else None
    return out, own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else None


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


#: The line ``peak = fixed + per_token * length`` is trusted while each length it predicts plans within this fraction
#: of the budget of the line's peak; past it, :func:`longest_sequence` bisects between the lengths measured.
LINEAR_TOLERANCE = 0.02
#: Lengths the line may choose after the first two: the predicted answer, the next multiple, one correction.
_GUIDED = 3


def _line(points: Sequence[tuple[int, int]], budget: int) -> Optional[tuple[float, float]]:
    """``(fixed, per_token)`` of the line through two measured (length, device peak) points: the longest below
    ``budget`` and the shortest above it, or the two nearest the budget when all are on one side."""
    pts = sorted(points)
    below = [p for p in pts if p[1] <= budget]
    above = [p for p in pts if p[1] > budget]
    pair = [below[-1], above[0]] if below and above else (below[-2:] if below else above[:2])
    if len(pair) < 2 or pair[0][0] == pair[1][0]:
        return None
    (t0, p0), (t1, p1) = pair
    per_token = (p1 - p0) / (t1 - t0)
    return p0 - per_token * t0, per_token


def longest_sequence(config: Any, overrides: Sequence[str] = (), *, gpu_memory: Any, cpu_memory: Any = None,
                     multiple: int = 1024, upper: int = 1 << 17,
                     progress: Optional[Callable[[int, int, Row], None]] = None) -> LongestSequence:
    """The longest sequence length (a multiple of ``multiple``, at most ``upper``) at which the recipe's step fits.

    The length is set with :func:`sequence_arguments` (the data's ``seq_len``, and the model's ``max_seq_len``
    when it takes one). Beyond the model states, the device peak grows by a fixed number of bytes per token
    (activations, the loss's chunks, the batch), so the search plans two lengths (the recipe's own, then twice it
    when it fits or half when not), draws ``peak = fixed + per_token * length`` through them, plans the longest
    multiple the line says fits (checking the line: the planned peak within ``LINEAR_TOLERANCE`` x the budget of
    the line's) and the next multiple: four plans when the cost is linear, instead of log2(upper / multiple) by
    bisection. A missed prediction moves to the neighbouring multiple along the line through the measured lengths
    nearest the budget; a prediction off the line by more than the tolerance, a length that cannot run, or a
    peak that does not grow with the length, ends the line's guesses: bisection between the lengths measured
    finishes. Either way the answer is a length planned to fit whose next multiple was planned not to (or is past
    ``upper``). A length at which the recipe's combination cannot run (e.g. a chunk size longer than the sequence)
    counts as not fitting; a recipe that does not build is an error, not a length that does not fit.

    Args:
        multiple: the lengths tried are its multiples; upper: the longest length tried.
        progress: called with (the index of the try, the length, its row) after each length is planned.

    Raises:
        MemKitConfigError: the recipe does not build (at any length), its data takes no ``seq_len``, its
            combination cannot run even at ``multiple`` tokens (the reason is given), or ``multiple`` and ``upper``
            leave no length to try.
    """
    gpu = parse_size("gpu_memory", gpu_memory)
    top = upper // multiple if multiple >= 1 else 0
    if top < 1:
        raise MemKitConfigError(f"longest_sequence: multiple={multiple} and upper={upper} leave no length to try. "
                                "Fix: a multiple of at least 1 and an upper bound of at least the multiple.")
    varies, own = _sequence_setup(config, overrides)
    tried: list[tuple[int, Row]] = []
    points: list[tuple[int, int]] = []  # (length, device peak) of the lengths that ran
    lo, hi = 0, top + 1  # lo * multiple: the longest measured to fit (0: none); hi * multiple: the shortest not to

    def probe(k: int) -> Row:
        nonlocal lo, hi
        length = k * multiple
        try:
            with _quiet_lightning():  # the Trainer's messages were shown once (sequence_arguments' load)
                row = plan(config, [*overrides, *(f"{arg}={length}" for arg in varies)], gpu_memory=gpu,
                           cpu_memory=cpu_memory).recipe
        except CombinationRefused as err:
            row = Row(configured_candidate(Setting()), skipped=str(err))
        tried.append((length, row))
        if row.result is not None:
            points.append((length, row.peak))
        if row.fits:
            lo = k
        else:
            hi = k
        if progress is not None:
            progress(len(tried), length, row)
        return row

    first = min(max(own // multiple, 1), top) if own is not None else (top + 1) // 2
    second = min(2 * first, top) if probe(first).fits else max(first // 2, 1)
    if lo < second < hi:
        probe(second)
    start = _line(points, gpu) if len(points) == 2 else None
    fixed, per_token = start if start is not None and start[1] > 0 else (None, None)
    predicted: Optional[int] = None
    error: Optional[int] = None
    guided, linear = 0, per_token is not None
    while hi - lo > 1:  # lo + 1 .. hi - 1 not measured yet
        line = _line(points, gpu) if linear and guided < _GUIDED else None
        if line is None or line[1] <= 0:
            linear = False
            probe((lo + hi) // 2)  # bisection
            continue
        k = min(max(int((gpu - line[0]) // (line[1] * multiple)), lo + 1), hi - 1)
        expected = line[0] + line[1] * k * multiple
        row = probe(k)
        guided += 1
        miss = row.peak - round(expected) if row.result is not None else None
        if predicted is None:
            predicted, error = k * multiple, miss
        linear = miss is not None and abs(miss) <= LINEAR_TOLERANCE * gpu
    best = next((r for n, r in tried if n == lo * multiple), None) if lo else None
    if best is None:
        shortest = next(r for n, r in tried if n == multiple)  # lo == 0, so hi == 1 was measured
        if shortest.result is None:
            raise MemKitConfigError(f"memkit plan --max-seq-len: at {multiple} tokens (the shortest length tried) "
                                    f"{shortest.skipped}")
    return LongestSequence(lo * multiple, best, lo == top, varies, tried, per_token=per_token, fixed=fixed,
                           predicted=predicted, error=error, linear=linear and per_token is not None)

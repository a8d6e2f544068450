"""The planner's search: candidate combinations of techniques, one measured step per candidate, the auto mode's
choice, and the rows' formatting. Below the strategy (its auto mode uses :func:`choose`); recipe-level entry
points (:func:`~lightning_memkit.planner.plans.plan`, ``longest_sequence``) are in
:mod:`lightning_memkit.planner.plans`.

ZeRO rows run the step without DeepSpeed (it cannot run on fake tensors) and take the model states (parameters,
gradients, optimizer state, DeepSpeed's buffers) from :func:`lightning_memkit.zero.rules.zero_memory`, whose
partition sizes matched real engines within 1% (the ZeRO tests).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from lightning_memkit.config import (
    MemKitConfigError,
    MemKitSettings,
    parse_activations,
    parse_optimizer,
    parse_sequence,
    parse_size,
)
from lightning_memkit.planner.step import CATEGORIES, LABELS, Setting, StepError, StepResult, StepRunner
from lightning_memkit.planner.tracker import storage_bytes
from lightning_memkit.units import GIB, human_bytes, in_unit, table_unit  # noqa: F401  (GIB: plans.py re-exports it)

#: ``progress(i, n, row)``: called after each candidate is measured (``memkit plan`` prints a line per call)
Progress = Callable[[int, int, "Row"], None]


class CombinationRefused(MemKitConfigError):
    """The recipe builds, but its own combination of techniques cannot run its step (the reason says why)."""

#: Expected step time relative to the same step without the technique, and where the figure comes from.
#: Products of these rank the candidates. Measured figures are from this project's benchmarks (docs/benchmarks.md).
OVERHEAD: dict[str, tuple[float, str]] = {
    "checkpoint": (1.20, "measured: H100, Llama-3.2-1B shape, seq 4096 (benchmarks/activations.py --cuda)"),
    "streambp": (1.32, "measured on CPU: 1.10x checkpointing + fused loss (benchmarks/sequence.py), x checkpointing's "
    "1.20"),
    "int8": (1.76, "measured: H100, Llama-3.2-1B shape (benchmarks/activations.py --cuda)"),
    "plain_ce": (1.05, "measured: the fused loss ran at 0.95x the plain one (benchmarks/cross_entropy.py)"),
    "adamw_in_backward": (1.00, "estimate: the same update, run from the gradient hooks"),
    "adamw8bit": (1.02, "estimate: the optimizer step is a few percent of a full-size step"),
    "apollo_mini": (1.03, "estimate: the optimizer step is a few percent of a full-size step"),
    "galore_adamw8bit": (1.05, "estimate: as APOLLO plus an SVD per weight every 200 steps"),
    "spam": (1.03, "estimate: the optimizer step is a few percent of a full-size step (SPAM's CPU step, 44.8M "
             "parameters: 87 ms dense, 96 ms at density 0.25, against 84 ms for memkit's AdamW)"),
    "natural_galore8bit": (1.06, "estimate: GaLore-8bit's plus a 10 x 10 solve and a history update per weight and "
                           "step (CPU, 1024 x 1024: 0.21 s against GaLore's 0.06 s and AdamW's 0.10 s)"),
    "sgd_sai": (1.06, "estimate: its step is cheaper than AdamW's (CPU, 44.8M parameters: 53 against 84 ms), but "
                "it needs ~100-200x AdamW's learning rate, which the candidate does not change, and it trailed "
                "AdamW by 0.11 in validation loss after 30 steps with a tuned rate: ranked after the Adam-like "
                "optimizers"),
    "cosmos": (1.50, "estimate (only for a recipe that sets it; not a candidate): a Newton-Schulz orthogonalization "
               "of every weight each step (CPU, 1024 x 1024: 2.4 s against AdamW's 0.10 s)"),
    "zeroth_order": (20.0, "a ranking figure, not a measurement: a step is two forward passes (less than a "
                     "forward + backward), but training needs far more steps (from scratch, 200 zo_sgd steps reached "
                     "validation loss 4.99 where 30 AdamW steps reached 3.26); it ranks after every other candidate"),
    "sampled_backward": (1.00, "measured on CPU: 0.92x the plain step (small model, 4 x 256 tokens, keep 0.3: the "
                         "weight gradients' products run over 30% of the rows); 1.00 taken"),
    "zero2_offload": (1.50, "estimate (not measured here): the optimizer step runs on the CPU"),
    "zero3_offload": (2.00, "estimate (not measured here): parameters cross PCIe twice a step"),
    "zero3_offload_nvme": (3.00, "estimate (not measured here): NVMe bandwidth bounds the step"),
}


@dataclass(frozen=True)
class Candidate:
    """A named combination of techniques with its expected cost.

    Attributes:
        note: what the user should know before choosing it beyond its time factor and exactness (e.g. a learning
            rate it needs); shown under ``memkit plan --compare`` and warned about when the auto mode picks it.
    """

    name: str
    setting: Setting
    overhead: float
    exact: bool
    parts: tuple[str, ...] = ()
    note: str = ""


@dataclass
class Row:
    """One candidate's plan: device bytes by category, host and NVMe bytes, and whether it fits."""

    candidate: Candidate
    result: Optional[StepResult] = None
    skipped: Optional[str] = None  # why it cannot run with this recipe
    fits: Optional[bool] = None

    @property
    def peak(self) -> int:
        return self.result.peak if self.result is not None else 0


@dataclass
class Plan:
    """The answer of :func:`plan`."""

    recipe: Row
    rows: list[Row] = field(default_factory=list)
    gpu_memory: Optional[int] = None
    cpu_memory: Optional[int] = None
    weights: int = 0
    description: str = ""

    def fitting(self) -> list[Row]:
        """The rows that fit, cheapest first."""
        return sorted((r for r in self.rows if r.fits), key=lambda r: (r.candidate.overhead, r.peak))

    def table(self) -> str:
        return format_breakdown(self.recipe, self.gpu_memory, self.cpu_memory)

    def comparison(self) -> str:
        return format_comparison(self.rows, self.gpu_memory)


def format_breakdown(row: Row, gpu_memory: Optional[int], cpu_memory: Optional[int]) -> str:
    """The peak of one row by category (GiB at the peak, and each category's own maximum)."""
    from lightning_memkit.memory import format_table

    r = row.result
    assert r is not None
    unit, sc = table_unit(max(r.peak, gpu_memory or 0))
    rows = [(LABELS[c], in_unit(r.at_peak.get(c, 0), sc), in_unit(r.maximum.get(c, 0), sc)) for c in CATEGORIES]
    rows.append(("peak (device)", in_unit(r.peak, sc), ""))
    if r.host or r.nvme:
        rows.append(("host memory", in_unit(r.host, sc), ""))
        rows.append(("NVMe", in_unit(r.nvme, sc), ""))
    text = format_table(rows, ("category", f"{unit} at peak", f"{unit} max"))
    if gpu_memory is not None:
        verdict = "fits" if row.fits else "does NOT fit"
        text += f"\n{verdict} in {in_unit(gpu_memory, sc)} {unit} of GPU memory"
        if cpu_memory is not None:
            text += f" and {in_unit(cpu_memory, sc)} {unit} of host memory"
        text += f" (headroom {in_unit(gpu_memory - r.peak, sc)} {unit})"
    for note in r.notes:
        text += f"\nnote: {note}"
    return text


def format_comparison(rows: Sequence[Row], gpu_memory: Optional[int]) -> str:
    """Candidates that fit first (cheapest first), then the others by peak, then those that cannot run."""
    from lightning_memkit.memory import format_table

    fit = sorted((r for r in rows if r.fits), key=lambda r: (r.candidate.overhead, r.peak))
    rest = sorted((r for r in rows if r.result is not None and not r.fits), key=lambda r: r.peak)
    unit, sc = table_unit(max([r.peak for r in rows] + [gpu_memory or 0]))
    out = []
    for i, r in enumerate(fit + rest):
        c, res = r.candidate, r.result
        assert res is not None
        states = res.at_peak["parameters"] + res.at_peak["gradients"] + res.at_peak["optimizer_state"]
        work = res.at_peak["activations"] + res.at_peak["logits_loss"] + res.at_peak["temporaries"]
        out.append((str(i + 1) if r.fits else "-", c.name, f"{c.overhead:.2f}x", "yes" if c.exact else "no",
                    in_unit(res.peak, sc), in_unit(states, sc), in_unit(work, sc),
                    in_unit(res.host, sc) if res.host else "-",
                    "yes" if r.fits else ("no" if r.fits is False else "?")))
    text = format_table(out, ("rank", "candidate", "time", "exact", f"peak {unit}", "model states",
                              "activations+temp", f"host {unit}", "fits"))
    skipped = [r for r in rows if r.skipped]
    for r in skipped:
        text += f"\nnot applicable: {r.candidate.name}: {r.skipped}"
    notes = dict.fromkeys(r.candidate.note for r in fit + rest if r.candidate.note)  # once each, in table order
    for note in notes:
        text += f"\nnote: {note}"
    return text


def plot(rows: Sequence[Row], path: str, gpu_memory: Optional[int] = None, title: str = "") -> None:
    """A stacked bar per candidate (device GiB by category), with the budget as a line (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.result is not None]
    unit, sc = table_unit(max([r.peak for r in rows] + [gpu_memory or 0]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2.5), 5.0))
    bottoms = [0.0] * len(rows)
    for cat in CATEGORIES:
        values = [r.result.at_peak.get(cat, 0) / sc for r in rows]  # type: ignore[union-attr]
        ax.bar(range(len(rows)), values, bottom=bottoms, label=LABELS[cat])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    if gpu_memory is not None:
        ax.axhline(gpu_memory / sc, color="black", linestyle="--", linewidth=1, label=f"budget {gpu_memory / sc:.1f} "
            f"{unit}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.candidate.name for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(f"{unit} on the device at the step's peak")
    ax.set_title(title or "memkit plan", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- candidates -----------------------------------------------------------------------------------
#: the memory options (see :func:`candidates`) by kind: "" is no activation technique (or the base's)
_NO_MEMORY, _CHECKPOINT, _STREAMBP, _SAMPLED = "", "checkpointing", "streambp", "sampled"
#: WTA-CRS as a candidate: keep 30% of the rows of every linear layer's input inside the transformer blocks
SAMPLED_KEEP = 0.3

SGD_SAI_NOTE = ("SGD-SaI needs its own learning rate, ~100-200x AdamW's (0.6 where AdamW used 3e-3 in the tests); "
                "the candidate keeps the one configure_optimizers sets: raise it")
ZO_NOTE = ("ZO-SGD (MeZO) runs two forward passes per step and no backward: no gradients, no activations kept, "
           "so inference-level memory, but it converges far more slowly than backpropagation (its 20x time factor "
           "is a ranking figure, not a measurement); meant for fine-tuning a pretrained model, with a learning rate "
           "and perturbation size of its own")
SAMPLED_NOTE = (f"WTA-CRS (activations.sampled_backward keep {SAMPLED_KEEP}) estimates the linear layers' weight "
                "gradients from a sample of their input rows: unbiased, with more variance than the exact gradient")


@dataclass(frozen=True)
class _Option:
    """One optimizer option of :func:`candidates`: ``memory`` lists the memory-option kinds it is combined with
    (None: every one)."""

    label: str
    setting: Any
    parts: tuple[str, ...]
    exact: bool
    memory: Optional[tuple[str, ...]] = None
    note: str = ""


def _optimizer_options(allow_approximate: bool) -> list[_Option]:
    opts = [_Option("your optimizer", None, (), True),
            _Option("AdamW in backward", {"name": "adamw", "in_backward": True}, ("adamw_in_backward",), True)]
    if allow_approximate:
        # the newer optimizers appear once each, with no activation technique (or the base's), to keep the number
        # of rows, and so the plan's time, small: with checkpointing or StreamBP they would never be the cheapest
        # row that fits, as APOLLO-Mini (SPAM's time factor, SGD-SaI's is higher) and GaLore-8bit (Natural
        # GaLore-8bit's is higher) keep less state there
        newer = (_NO_MEMORY,)
        opts += [
            _Option("adamw8bit", "adamw8bit", ("adamw8bit",), False),
            _Option("APOLLO-Mini in backward", {"name": "apollo_mini", "in_backward": True}, ("apollo_mini",), False),
            _Option("GaLore-8bit in backward", {"name": "galore_adamw8bit", "in_backward": True},
                    ("galore_adamw8bit",), False),
            _Option("APOLLO-Mini (all weights) in backward",
                    {"name": "apollo_mini", "in_backward": True, "target_modules": ["*"]}, ("apollo_mini",), False),
            _Option("SPAM (density 0.25) in backward", {"name": "spam", "density": 0.25, "in_backward": True},
                    ("spam",), False, newer),
            _Option("Natural GaLore-8bit in backward", {"name": "natural_galore8bit", "in_backward": True},
                    ("natural_galore8bit",), False, newer),
            _Option("SGD-SaI in backward", {"name": "sgd_sai", "in_backward": True}, ("sgd_sai",), False, newer,
                    SGD_SAI_NOTE),
            # the forward runs under no_grad: checkpointing and WTA-CRS change nothing, StreamBP is refused
            _Option("ZO-SGD (forward only)", "zo_sgd", ("zeroth_order",), False, (_NO_MEMORY,), ZO_NOTE),
        ]
    return opts


def candidates(base: Setting, *, free: Iterable[str] = ("activations", "optimizer", "sequence"), seq_len: int = 2048,
               allow_approximate: bool = True, zero: bool = False) -> list[Candidate]:
    """The combinations the planner tries, built on ``base`` (the families not in ``free`` keep its value).

    Activations: none, checkpointing every block, or StreamBP (chunks of ``min(2048, seq_len/4)``;
    it keeps only block inputs itself); with ``allow_approximate``, WTA-CRS (``sampled_backward`` keep
    :data:`SAMPLED_KEEP`), with your optimizer and AdamW in backward only. Optimizer: yours, AdamW stepped in
    backward (exact), and with ``allow_approximate`` adamw8bit, APOLLO-Mini, GaLore-8bit, SPAM (density 0.25),
    Natural GaLore-8bit, SGD-SaI (in backward) and ZO-SGD (forward only); the last four with no activation
    technique only. ``zero``: single-GPU ZeRO-2/3 offload rows (your optimizer, checkpointing on or off).
    """
    free = set(free)
    chunk = max(1, min(2048, seq_len // 4))
    # (kind, label, activations, sequence, parts, the optimizer labels it goes with (None: all), note)
    memory_options: list[tuple[str, str, Any, Any, tuple[str, ...], Optional[tuple[str, ...]], str]] = [
        (_NO_MEMORY, "", base.activations, base.sequence, (), None, "")]
    if "activations" in free or "sequence" in free:
        memory_options = []
        seq0 = base.sequence if "sequence" not in free else None
        if "activations" in free:
            memory_options += [(_NO_MEMORY, "", None, seq0, (), None, ""),
                               (_CHECKPOINT, "checkpointing", {"checkpoint": "blocks"}, seq0, ("checkpoint",), None,
                                "")]
        else:
            memory_options.append((_NO_MEMORY, "", base.activations, seq0, (), None, ""))
        if "sequence" in free:
            memory_options.append((_STREAMBP, f"StreamBP {chunk}", base.activations if "activations" not in free
                                   else None, {"method": "streambp", "chunk_size": chunk}, ("streambp",), None, ""))
        if "activations" in free and allow_approximate:
            # without int8: int8 costs 1.76x, more than checkpointing (1.20x), which keeps less (only block inputs)
            memory_options.append((_SAMPLED, f"WTA-CRS {SAMPLED_KEEP}", {"sampled_backward": SAMPLED_KEEP}, seq0,
                                   ("sampled_backward",), ("", "your optimizer", "AdamW in backward"), SAMPLED_NOTE))
    opt_options = _optimizer_options(allow_approximate) if "optimizer" in free else [
        _Option("", base.optimizer, (), True)]
    # zero=True (memkit plan --compare): the rows below run on memkit's DDP backend and the ZeRO rows are added;
    # zero=False (the auto mode, whose backend is fixed): every row keeps the base's ZeRO settings and their cost
    if zero:
        base_rows, zparts = dataclasses.replace(base, zero_stage=0, offload_optimizer=None, offload_parameters=None), ()
    else:
        base_rows, zparts = base, _zero_parts(base)
    out: list[Candidate] = []
    for kind, mlabel, act, seq, mparts, with_optimizers, mnote in memory_options:
        for o in opt_options:
            if (o.memory is not None and kind not in o.memory) or (
                    with_optimizers is not None and o.label not in with_optimizers):
                continue
            setting = dataclasses.replace(base_rows, activations=act, sequence=seq, optimizer=o.setting)
            oexact = o.exact
            if "optimizer" not in free:
                oexact = base.optimizer is None or _is_exact_optimizer(base.optimizer)
            exact = oexact and _exact_memory(act, seq)
            parts = mparts + o.parts + zparts
            name = ", ".join(x for x in (mlabel, o.label) if x) or "as configured"
            note = "; ".join(n for n in (mnote, o.note) if n)
            out.append(Candidate(name, setting, _overhead(parts), exact, parts, note))
    if zero:
        for zlabel, zargs, part in (("ZeRO-2 offload",
                                     dict(zero_stage=2, offload_optimizer="cpu", offload_parameters=None),
                                     "zero2_offload"),
                                    ("ZeRO-3 offload", dict(zero_stage=3, offload_optimizer="cpu",
                                                            offload_parameters="cpu"), "zero3_offload"),
                                    ("ZeRO-3 NVMe", dict(zero_stage=3, offload_optimizer="nvme",
                                                         offload_parameters="nvme"), "zero3_offload_nvme")):
            for alabel, act, aparts in (("", None, ()), (", checkpointing", {"checkpoint": "blocks"}, ("checkpoint",))):
                setting = dataclasses.replace(base, activations=act, sequence=None, optimizer=None, **zargs)
                out.append(Candidate(zlabel + alabel, setting, _overhead((part, *aparts)), True, (part, *aparts)))
    return sorted(out, key=lambda c: c.overhead)


def same_setting(a: Setting, b: Setting) -> bool:
    """The two settings configure the same techniques."""
    try:
        return a.parsed() == b.parsed() and (a.zero_stage, a.offload_optimizer, a.offload_parameters) == (
            b.zero_stage, b.offload_optimizer, b.offload_parameters)
    except MemKitConfigError:
        return False


def _is_exact_optimizer(setting: Any) -> bool:
    """The optimizer setting (a name, a mapping or an ``OptimizerConfig``) leaves the update unchanged."""
    return parse_optimizer(setting).name in ("none", "adamw")


def _exact_memory(activations: Any, sequence: Any) -> bool:
    """The activation and sequence settings leave the results unchanged (no 8-bit activations, no SpaCO)."""
    seq = parse_sequence(sequence)
    a = parse_activations(activations)
    return a.compress == "none" and a.sampled_backward is None and (not seq.enabled or seq.exact)


def _overhead(parts: Iterable[str]) -> float:
    return math.prod(OVERHEAD[p][0] for p in parts)


def _zero_parts(setting: Setting) -> tuple[str, ...]:
    """The time factor of a setting's offload (ZeRO without offload has none)."""
    if not setting.zero_stage or not (setting.offload_parameters or setting.offload_optimizer):
        return ()
    if "nvme" in (setting.offload_parameters, setting.offload_optimizer):
        return ("zero3_offload_nvme",)
    return ("zero3_offload",) if setting.offload_parameters else ("zero2_offload",)


#: the time factor (an :data:`OVERHEAD` key) of the newer optimizers when a recipe sets them
_CONFIGURED_PARTS = {"spam": "spam", "sgd_sai": "sgd_sai", "natural_galore": "natural_galore8bit",
                     "natural_galore8bit": "natural_galore8bit", "cosmos": "cosmos", "zo_sgd": "zeroth_order",
                     "zo_adam": "zeroth_order"}


def configured_candidate(setting: Setting) -> Candidate:
    """The recipe's own combination as a candidate (its overhead from the same table)."""
    a, ce, o, s = setting.parsed()
    parts: list[str] = []
    if a.checkpoint != "none":
        parts.append("checkpoint")
    if a.compress != "none":
        parts.append("int8")
    if not ce.fused:
        parts.append("plain_ce")
    if s.enabled and s.method == "streambp":
        parts.append("streambp")
    if a.sampled_backward is not None:
        parts.append("sampled_backward")
    if o.enabled and o.name in ("adamw8bit", "paged_adamw8bit", "apollo_mini", "galore_adamw8bit"):
        parts.append(o.name if o.name != "paged_adamw8bit" else "adamw8bit")
    elif o.enabled and o.name in _CONFIGURED_PARTS:
        parts.append(_CONFIGURED_PARTS[o.name])
    parts.extend(_zero_parts(setting))
    exact = (o.name in ("none", "adamw")) and a.compress == "none" and a.sampled_backward is None \
        and not (s.enabled and not s.exact)
    return Candidate("as configured", setting, _overhead(parts), exact, tuple(parts))


# ----- measuring ------------------------------------------------------------------------------------
def _zero_rows(runner: StepRunner, setting: Setting, result: StepResult, world_size: int) -> StepResult:
    """Replace the step's model states by ZeRO's (per device), and add host / NVMe bytes."""
    from lightning_memkit.zero.rules import zero_memory

    module = runner.module
    n = sum(p.numel() for p in module.parameters())
    blocks = [b for b in module.modules() if type(b).__name__.endswith(("Block", "DecoderLayer"))]
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    opt = parse_optimizer(setting.optimizer).name
    mem = zero_memory(n, world_size=world_size, stage=setting.zero_stage,
                      offload_optimizer=setting.offload_optimizer or "none",
                      offload_parameters=setting.offload_parameters or "none",
                      optimizer=opt if opt in ("adamw8bit", "paged_adamw8bit") else "adamw",
                      largest_block_params=largest)
    dev = mem["device"]
    at_peak = dict(result.at_peak, **result.work_at_peak)  # the passes' peak; ZeRO's gradients and step replace ours
    at_peak.update(parameters=int(dev["parameters"]), gradients=int(dev["gradients"]),
                   optimizer_state=int(dev["optimizer"]))
    at_peak["other"] += int(dev["buffers"])
    maximum = dict(result.maximum)
    maximum.update(parameters=at_peak["parameters"], gradients=at_peak["gradients"],
                   optimizer_state=at_peak["optimizer_state"], other=at_peak["other"])
    notes = result.notes + [f"ZeRO-{setting.zero_stage}: model states from lightning_memkit.zero.zero_memory (16-bit "
                            "weights, fp32 master weights and AdamW states; DeepSpeed's buffers under 'buffers + "
                            "batch'); activations etc. at the forward/backward peak of the step without DeepSpeed"]
    return dataclasses.replace(result, at_peak=at_peak, maximum=maximum, host=int(mem["host"]["total"]) + result.host,
                               nvme=int(mem["nvme"]["total"]), notes=notes)


def measure(runner: StepRunner, candidate: Candidate, *, world_size: int = 1) -> Row:
    """Run ``candidate``'s step on the runner's fake module. A combination that cannot run with this
    recipe (refused at setup) comes back with ``skipped`` set."""
    setting = candidate.setting
    run_setting = setting
    eight_bit = None
    try:
        a, ce, o, s = setting.parsed()
        if setting.zero_stage:
            _check_zero(setting, a, ce, o, s)
            run_setting = dataclasses.replace(setting, zero_stage=0, offload_optimizer=None, offload_parameters=None,
                                              optimizer=None)
        elif o.name in ("adamw8bit", "paged_adamw8bit"):
            eight_bit = o  # bitsandbytes cannot run on fake tensors: its state is predicted from the shapes
            run_setting = dataclasses.replace(setting, optimizer=None)
        result = runner.run(run_setting, measure=True, warm=True)
    except MemKitConfigError as err:
        return Row(candidate, skipped=str(err).split(". Fix:")[0])
    except StepError as err:
        return Row(candidate, skipped=str(err))
    if setting.zero_stage:
        result = _zero_rows(runner, setting, result, world_size)
    elif eight_bit is not None:
        from lightning_memkit.optim.memory import predict_state_bytes

        params = [(n, tuple(p.shape), p.dtype) for n, p in runner.module.named_parameters() if p.requires_grad]
        state = predict_state_bytes(params, eight_bit)
        result.at_peak["optimizer_state"] = result.maximum["optimizer_state"] = state
        result.notes.append(f"{eight_bit.name}: optimizer state predicted from the shapes "
                            "(lightning_memkit.optim.memory.predict_state_bytes; bitsandbytes cannot run on fake "
                            "tensors)")
    if world_size > 1 and not setting.zero_stage:
        grads = result.maximum.get("gradients", 0)
        result.at_peak["other"] += grads
        result.notes.append("DDP: the reducer's gradient buckets (one copy of the gradients) under 'buffers + batch'")
    return Row(candidate, result=result)


def _check_zero(setting: Setting, a: Any, ce: Any, o: Any, s: Any) -> None:
    from lightning_memkit.config import ZeroConfig
    from lightning_memkit.zero.rules import check_compatibility

    import tempfile

    nvme = "nvme" in (setting.offload_optimizer, setting.offload_parameters)
    zero = ZeroConfig(stage=setting.zero_stage, offload_optimizer=setting.offload_optimizer or "none",
                      offload_parameters=setting.offload_parameters or "none",
                      # the folder is the user's; only the rules are checked
                      nvme_path=tempfile.gettempdir() if nvme else None)
    check_compatibility(zero, a, ce, o, s)


def judge(row: Row, gpu_memory: Optional[int], cpu_memory: Optional[int]) -> Row:
    if row.result is not None and gpu_memory is not None:
        row.fits = row.result.peak <= gpu_memory and (cpu_memory is None or row.result.host <= cpu_memory)
    return row


# ----- the public entry points ----------------------------------------------------------------------
def setting_of(strategy: Any) -> Setting:
    """The :class:`Setting` a ``MemKitStrategy`` (or a preset name's strategy) is configured with (its
    :class:`~lightning_memkit.config.MemKitSettings`). Lightning's single-device and DDP strategies plan as memkit
    with nothing on (the plain loss); others are refused."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    settings = getattr(strategy, "settings", None)
    if not isinstance(settings, MemKitSettings):
        if type(strategy) in (DDPStrategy, SingleDeviceStrategy):
            return Setting(cross_entropy="plain")
        raise MemKitConfigError(
            f"trainer.strategy is {type(strategy).__name__}: the planner runs memkit's strategies and Lightning's "
            "single-device / DDP ones. Fix: plan with strategy: memkit (or MemKitStrategy(zero_stage=...) for "
            "DeepSpeed)."
        )
    zero = settings.zero
    return Setting(
        activations=settings.activations, cross_entropy=settings.cross_entropy, optimizer=settings.optimizer,
        sequence=settings.sequence, zero_stage=zero.stage or 0,
        offload_optimizer=None if zero.offload_optimizer == "none" else zero.offload_optimizer,
        offload_parameters=None if zero.offload_parameters == "none" else zero.offload_parameters,
    )


def parse_budget(key: str, value: Any, device: Optional[torch.device] = None) -> int:
    """Bytes of a memory budget: a size (``"24GiB"``, bytes) or ``"auto"`` (the CUDA device's free memory)."""
    if value == "auto":
        if device is None or device.type != "cuda":
            raise MemKitConfigError(
                f"{key}='auto' reads the CUDA device's free memory, and this run's device is "
                f"{device.type if device is not None else 'not known'}. Fix: give the budget as a size, e.g. '24GiB'."
            )
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return parse_size(key, value)


def weights_bytes(module: Any) -> int:
    return storage_bytes(module.parameters())


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def check_weights_fit(key: str, budget: int, module: Any) -> None:
    """Refuse a budget smaller than the weights alone."""
    weights = weights_bytes(module)
    if budget < weights:
        dtype = next(iter(module.parameters())).dtype
        raise MemKitConfigError(
            f"{key}={human_bytes(budget)} is smaller than the model's weights alone: {human_bytes(weights)} "
            f"({_count(sum(p.numel() for p in module.parameters()))} parameters in "
            f"{str(dtype).replace('torch.', '')}). "
            "Fix: a larger budget, 16-bit weights (trainer.precision: bf16-true), or ZeRO-3 with "
            "offload_parameters (the memkit_zero3_offload preset)."
        )


def describe_row(row: Row, named: bool = True) -> str:
    """One line for a measured candidate: its name (``named``), its peak and whether it fits (or why it cannot run)."""
    name = f"{row.candidate.name}: " if named else ""
    if row.result is None:
        return f"{name}cannot run ({row.skipped})"
    verdict = "" if row.fits is None else (", fits" if row.fits else ", does not fit")
    return f"{name}{human_bytes(row.peak)}{verdict}"


def choose(runner: StepRunner, base: Setting, budget: int, *, free: Iterable[str], allow_approximate: bool = True,
           world_size: int = 1, seq_len: int = 2048) -> tuple[Row, list[Row]]:
    """The auto mode's search: candidates cheapest first, the first that fits wins.

    Returns:
        (the chosen row, every row measured).

    Raises:
        MemKitConfigError: nothing fits; the message names the closest candidate and its peak.
    """
    rows: list[Row] = []
    for cand in candidates(base, free=free, seq_len=seq_len, allow_approximate=allow_approximate):
        row = judge(measure(runner, cand, world_size=world_size), budget, None)
        rows.append(row)
        if row.fits:
            return row, rows
    measured = [r for r in rows if r.result is not None]
    if not measured:
        reasons = "; ".join(f"{r.candidate.name}: {r.skipped}" for r in rows)
        raise MemKitConfigError("memory_budget: no candidate combination can run with this module and Trainer "
            f"({reasons}).")
    closest = min(measured, key=lambda r: r.peak)
    raise MemKitConfigError(
        f"memory_budget={human_bytes(budget)}: none of the {len(rows)} combinations tried fits. The closest is "
        f"'{closest.candidate.name}' ({closest.candidate.setting.strategy_arguments()}) at {human_bytes(closest.peak)} "
        f"({human_bytes(closest.peak - budget)} over). Fix: a shorter sequence or a smaller batch, "
        + ("allow approximate optimizers (memory_search='any'), " if not allow_approximate else "")
        + "ZeRO offload (zero_stage=2/3 with offload_optimizer), or a larger budget. See `memkit plan --compare`."
    )

"""``memkit verify``: one batch of the user's recipe, with and without each technique, on real tensors.

The reference step is the module with nothing installed (plain cross-entropy, the user's optimizer).
Each technique the recipe enables then runs alone, and all of them together, from the same weights,
batch and random state. Per run:

- gradients (after backward, before the step; not available when the step runs in backward): the
  largest absolute difference, that difference relative to the largest reference gradient, and the
  relative error ``||g - g_ref|| / ||g_ref||``;
- the parameters' update after one optimizer step: relative error and cosine similarity.

An exact technique passes when its gradients are within the weights' dtype tolerance
(:data:`EXACT_TOLERANCE`, relative to the largest gradient) and its update within
:data:`UPDATE_TOLERANCE`. An approximate one passes when its results are finite and its update points
the same way as the exact one (cosine > 0); its errors are reported for the user to judge. ZeRO is not
run here (it needs DeepSpeed's engine and process group); the test suite checks it against DDP.

A zeroth-order optimizer (``zo_sgd``, ``zo_adam``) computes no gradient: its step measures, for each
perturbation ``z``, the projected gradient ``(L(θ+εz) - L(θ-εz)) / 2ε`` by running the module's
``training_step`` forward only. That is checked against the exact directional derivative ``z · g_ref``
from the reference gradients. The error is taken relative to ``||g_ref||`` (over the perturbed
parameters), the spread of ``z · g_ref``, since ``z · g_ref`` itself may be near 0 by chance: the
gradient columns hold the largest ``|ĝ - z·g_ref|``, the largest ``|ĝ - z·g_ref| / ||g_ref||`` (judged
against :data:`SPSA_TOLERANCE`: central differences at MeZO's ε = 1e-3 move the weights by
``ε ||z||``, so the third-order term shows) and ``||ĝ - z·g|| / ||(||g_ref||)||`` over the perturbations.
Its update (a step along ``z``) is reported, not judged: its direction is a random projection of the
gradient's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from lightning_memkit.config import ActivationsConfig, MemKitConfigError
from lightning_memkit.planner.step import Setting, StepResult, StepRunner

#: largest |g - g_ref| / max |g_ref| an exact technique may show, by weight dtype
EXACT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 1e-2}
#: largest ||u - u_ref|| / ||u_ref|| of the update of an exact technique, by weight dtype
UPDATE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 2e-2}

#: largest relative error of a zeroth-order step's projected gradients against ``z · g_ref``, by compute dtype
SPSA_TOLERANCE = {torch.float32: 5e-2, torch.float64: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.5}

REFERENCE = Setting(activations=None, cross_entropy="plain", optimizer=None, sequence=None)


@dataclass
class Check:
    """One technique's comparison with the reference step."""

    technique: str
    exact: bool
    max_grad_diff: Optional[float]
    max_grad_rel: Optional[float]
    grad_rel_error: Optional[float]
    update_rel_error: float
    update_cosine: float
    passed: bool
    note: str = ""


def techniques_of(setting: Setting) -> list[tuple[str, Setting, bool]]:
    """(name, setting with only that technique on top of the reference, exact?) for each enabled technique,
    then all of them together when there are several."""
    a, ce, o, s = setting.parsed()
    out: list[tuple[str, Setting, bool]] = []
    if a.checkpoint != "none":
        only = dataclasses.replace(a, compress="none", offload=False, sampled_backward=None)
        out.append((f"activations: checkpoint={a.checkpoint}", dataclasses.replace(REFERENCE, activations=only), True))
    if a.compress != "none" or a.offload:
        only = dataclasses.replace(a, checkpoint="none", checkpoint_every=1, activation_budget=None,
                                   sampled_backward=None)
        label = f"activations: compress={a.compress}" + (", offload" if a.offload else "")
        out.append((label, dataclasses.replace(REFERENCE, activations=only), a.compress == "none"))
    if a.sampled_backward is not None:  # alone: every layer it names samples (none is inside a checkpointed block)
        wta = a.sampled_backward
        only = ActivationsConfig(sampled_backward=wta)
        # keep=1.0 is the plain layer, bit for bit
        out.append((f"activations: sampled_backward keep={wta.keep:g}",
                    dataclasses.replace(REFERENCE, activations=only), wta.keep >= 1.0))
    if ce.fused:
        out.append((f"cross_entropy: fused ({ce.impl})", dataclasses.replace(REFERENCE, cross_entropy=ce),
                    ce.filter_eps is None))
    if s.enabled:
        out.append((f"sequence: {s.method}", dataclasses.replace(REFERENCE, sequence=s), s.exact))
    if o.enabled:
        label = f"optimizer: {o.name}" + (" (step in backward)" if o.in_backward else "")
        out.append((label, dataclasses.replace(REFERENCE, optimizer=o), o.name == "adamw"))
    if len(out) > 1:
        out.append(("all together", Setting(a, ce, o, s), all(x[2] for x in out)))
    return out


def _flat(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    if not names:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([tensors[n].detach().double().flatten() for n in names])


@dataclass
class Projections:
    """A zeroth-order step's projected gradients and the exact ones, one per perturbation (see :func:`projections`)."""

    estimated: list[float]
    exact: list[float]
    #: ``||g||`` over each perturbation's parameters: the spread of ``z · g`` (z has independent N(0, 1) entries)
    scale: list[float]


def _zeroth_order(optimizer: Any) -> Any:
    """The zeroth-order optimizer behind ``optimizer`` (memkit's wrappers unwrapped), or None."""
    from lightning_memkit.optim.zeroth_order import ZerothOrderOptimizer

    inner = getattr(optimizer, "optimizer", optimizer) if hasattr(optimizer, "remove_hooks") else optimizer
    return inner if isinstance(inner, ZerothOrderOptimizer) else None


def projections(optimizer: Any, module: Any, gradients: dict[str, torch.Tensor]) -> Projections:
    """The projected gradients ``(L+ - L-) / 2ε`` the last step of a zeroth-order ``optimizer`` measured, and the
    exact ones, ``z · g`` for its perturbations ``z`` (regenerated from their seeds) and ``gradients`` by parameter
    name (at the same weights and batch)."""
    names = {p: n for n, p in module.named_parameters()}
    groups = optimizer.param_groups
    step, n, eps = groups[0]["zo_step"] - 1, groups[0]["n_perturbations"], groups[0]["perturbation"]
    estimated, exact, scale = [], [], []
    pairs = iter(optimizer.last_losses)  # in the step's order: block by block, perturbation by perturbation
    with torch.no_grad():
        for b, block in enumerate(optimizer.blocks()):
            for k in range(n):
                plus, minus = next(pairs)
                estimated.append((plus - minus) / (2.0 * eps))
                held = [p for p in block if names.get(p) in gradients]
                exact.append(sum(float(torch.dot(optimizer.noise(p, optimizer._key(step, b, k, p)).double().flatten(),
                                                 gradients[names[p]].double().flatten())) for p in held))
                scale.append(math.sqrt(sum(float(gradients[names[p]].double().square().sum()) for p in held)))
    return Projections(estimated, exact, scale)


def compare(name: str, exact: bool, ref: StepResult, run: StepResult, dtype: torch.dtype,
            projected: Optional[Projections] = None) -> Check:
    """Compare one run with the reference run (``projected``: a zeroth-order run's projected gradients)."""
    grad_diff = grad_rel_max = grad_rel = None
    ok, notes = True, []
    names = [n for n in ref.gradients if n in run.gradients]
    if projected is not None:
        est = torch.tensor(projected.estimated, dtype=torch.float64)
        true = torch.tensor(projected.exact, dtype=torch.float64)
        spread = torch.tensor(projected.scale, dtype=torch.float64).clamp(min=1e-30)
        diff = (est - true).abs()
        grad_diff = float(diff.max())
        grad_rel_max = float((diff / spread).max())
        grad_rel = float(diff.norm() / spread.norm())
        ok &= math.isfinite(grad_rel) and grad_rel_max <= SPSA_TOLERANCE.get(dtype, 5e-2)
        notes.append(f"zeroth-order (forward only, no gradients): the gradient columns compare its {len(est)} "
                     "projected gradient(s) (L+ - L-)/2eps with z . g_ref, relative to ||g_ref|| (the spread of "
                     "z . g_ref); the update is reported, not judged")
    elif run.gradients and names:
        g_ref, g = _flat(ref.gradients, names), _flat(run.gradients, names)
        diff = (g - g_ref).abs()
        grad_diff = float(diff.max())
        grad_rel_max = grad_diff / max(float(g_ref.abs().max()), 1e-30)
        grad_rel = float(diff.norm() / max(float(g_ref.norm()), 1e-30))
        if exact:
            ok &= grad_rel_max <= EXACT_TOLERANCE.get(dtype, 1e-4)
        else:
            ok &= math.isfinite(grad_rel) and grad_rel < 1.0
    else:
        notes.append("gradients are consumed by the step in backward: the update is compared")
    unames = sorted(ref.update)
    u_ref, u = _flat(ref.update, unames), _flat(run.update, unames)
    update_rel = float((u - u_ref).norm() / max(float(u_ref.norm()), 1e-30))
    cosine = float(torch.dot(u, u_ref) / max(float(u.norm() * u_ref.norm()), 1e-30))
    if not (math.isfinite(update_rel) and math.isfinite(cosine)):
        ok = False
    elif projected is not None:
        pass  # a step along a random direction z: judged by its projected gradients above
    elif exact:
        ok &= update_rel <= UPDATE_TOLERANCE.get(dtype, 1e-3)
    else:
        ok &= cosine > 0
    return Check(name, exact, grad_diff, grad_rel_max, grad_rel, update_rel, cosine, bool(ok), "; ".join(notes))


def compute_dtype(module: Any, trainer: Any) -> torch.dtype:
    """The dtype the step computes in (the tolerances follow it): mixed precision computes in 16 bits."""
    precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
    if precision.startswith("bf16-mixed"):
        return torch.bfloat16
    if precision.startswith("16-mixed"):
        return torch.float16
    return next(iter(module.parameters())).dtype


def verify_module(module: Any, trainer: Any, batch: Any, setting: Setting, *, seed: int = 0) -> list[Check]:
    """Run the reference step and one step per technique of ``setting`` on ``module`` (real tensors), from
    the same weights each time (restored after every run)."""
    runner = StepRunner(module, trainer, batch)
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    dtype = compute_dtype(module, trainer)

    def run(s: Setting) -> StepResult:
        torch.manual_seed(seed)
        try:
            return runner.run(s, capture=True)
        finally:
            module.load_state_dict(initial)

    ref = run(REFERENCE)
    checks = []
    for name, s, exact in techniques_of(setting):
        result = run(s)
        zo = _zeroth_order(runner.last_optimizer)
        projected = projections(zo, module, ref.gradients) if zo is not None else None
        checks.append(compare(name, exact, ref, result, dtype, projected))
    return checks


def verify(config: Any, overrides: Sequence[str] = (), *, seed: int = 0) -> tuple[list[Check], str]:
    """``memkit verify``: build the recipe on the CPU (real tensors), take one batch of its data, and check
    each technique. Returns the checks and a description of what ran."""
    from lightning_memkit.planner.load import load, make_batch
    from lightning_memkit.planner.plans import setting_of

    loaded = load(config, overrides, fake=False)
    module, trainer = loaded.module, loaded.trainer
    setting = setting_of(trainer.strategy)
    module = trainer.precision_plugin.convert_module(module)
    if loaded.datamodule is None:
        raise MemKitConfigError("memkit verify needs the recipe's data: add a data: section.")
    batch = make_batch(module, loaded.datamodule, None, synthetic=False)
    notes = ""
    if setting.zero_stage:
        notes = (f" ZeRO-{setting.zero_stage} is not run by verify (DeepSpeed's engine needs its process group); "
                 "tests/test_zero.py checks every stage against DDP.")
        setting = dataclasses.replace(setting, zero_stage=0, offload_optimizer=None, offload_parameters=None)
    checks = verify_module(module, trainer, batch, setting, seed=seed)
    n = sum(p.numel() for p in module.parameters())
    shape = tuple(batch["input_ids"].shape) if isinstance(batch, dict) and "input_ids" in batch else "?"
    return checks, f"{type(module).__name__}: {n / 1e6:.2f}M parameters, one batch {shape} of the recipe's data.{notes}"


def format_checks(checks: Sequence[Check]) -> str:
    from lightning_memkit.memory import format_table

    def f(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.2e}"

    rows = [(c.technique, "exact" if c.exact else "approx", f(c.max_grad_diff), f(c.max_grad_rel), f(c.grad_rel_error),
             f(c.update_rel_error), f"{c.update_cosine:.4f}", "ok" if c.passed else "FAIL") for c in checks]
    text = format_table(rows, ("technique", "kind", "max |dg|", "max |dg| / max |g|", "grad rel err",
                               "update rel err", "update cos", "verdict"))
    for c in checks:
        if c.note:
            text += f"\n{c.technique}: {c.note}"
    return text

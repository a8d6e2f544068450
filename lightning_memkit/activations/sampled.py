"""``activations.sampled_backward``: WTA-CRS, the weight gradient of chosen linear layers from a sample of rows.

Winner-Take-All Column-Row Sampling (Liu et al., NeurIPS 2023). For a linear layer ``Y = X W^T + b`` with
``X`` of ``N`` rows (tokens: every leading dimension folded), the weight gradient is a sum over rows,
``dW = dY^T X = sum_i dY_i^T X_i``. WTA-CRS keeps only ``k = max(min_rows, floor(keep * N))`` rows of ``X``
for the backward pass and estimates that sum without bias:

- every row gets the probability ``p_i = ||X_i|| / sum_j ||X_j||``;
- the ``c`` most probable rows (the winners, set ``C``) are kept deterministically with weight 1, where
  ``c`` in ``[0, k-1]`` minimizes the paper's variance factor ``(1 - P_C) / (k - c)`` (``P_C``: their total
  probability; the authors' ``deter_adaptive`` rule);
- ``s = k - c`` rows are drawn with replacement from the others with probability ``p_j / (1 - P_C)``, each
  weighted ``(1 - P_C) / (s p_j)``, so ``E[estimate] = dW`` exactly.

The estimate is ``dY[idx]^T diag(scales) X[idx]``: only ``X[idx]`` (``k`` rows), ``idx`` (int64) and ``scales``
(fp32) are saved. ``dX = dY W`` and the bias gradient are exact; the forward output is exact.

Deviation from the paper, on purpose: the paper's probabilities are ``||X_i|| ||dY_i||``, but ``dY`` does not
exist when ``X`` must be sampled (in the forward pass); the authors' code caches each training example's
``||dY_i||`` from the previous epoch, keyed by the example's index in the data set, and falls back to
``||X_i||`` when no cache exists yet. memkit uses ``||X_i||`` always (no per-example cache, any data
loader); the estimator stays unbiased, with somewhat more variance than the paper's choice. Rows with
``X_i = 0`` have ``p_i = 0`` and contribute nothing, so never drawing them keeps the estimate unbiased.

Layers that take the same input tensor in one step (q/k/v, gate/up) share one sample through the technique,
so the rows are saved once (the saved-tensor compression dedupes them too). With ``activations.compress``,
the sampled rows are what is compressed (they are an activation of the graph, ``requires_grad`` like ``X``).

The functional API is :func:`sampled_linear` (plus :func:`plan_rows` / :func:`draw_rows`, the sampling
distribution and one draw from it); :class:`SampledBackwardTechnique` installs it on a module's linear layers
(:func:`apply_sampled_backward` / :func:`remove_sampled_backward` without a Trainer).
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_memkit._tensors import is_symbolic
from lightning_memkit.activations.checkpoint import hf_checkpointed, is_checkpointed
from lightning_memkit.config import (  # noqa: F401  (the setting's parser lives with the other configs)
    DEFAULT_MIN_ROWS,
    MemKitConfigError,
    SampledBackwardConfig,
    SampledBackwardSetting,
    parse_sampled_backward,
)
from lightning_memkit.models.interface import find_blocks
from lightning_memkit.technique import ForwardWrapper, Technique, find_forward_wrapper, unwrap_forward, wrap_forward

_KEY = "activations.sampled_backward"

# ----- the sampling distribution and one draw ----------------------------------------------------------------------
def sample_size(rows: int, keep: float, min_rows: int = DEFAULT_MIN_ROWS) -> int:
    """``k``: how many rows of ``rows`` are kept (``rows`` itself means no sampling)."""
    return min(rows, max(min_rows, math.floor(keep * rows)))


@dataclass
class RowPlan:
    """The WTA-CRS sampling distribution of one input: the winners and the law of the other draws.

    Attributes:
        winners: (c,) int64 indices kept deterministically, weight 1.
        weights: (N,) unnormalized probabilities of the draws, ``||X_i||`` (fp32; fp64 for fp64 rows), the winners'
            set to 0.
        rest: their sum, ``(1 - P_C)`` times the total (a Python float, fp64).
        draws: ``s``, how many rows are drawn with replacement (0 when the winners carry all the mass).
    """

    winners: Tensor
    weights: Tensor
    rest: float
    draws: int


@torch.no_grad()
def plan_rows(x2d: Tensor, k: int) -> RowPlan:
    """The sampling distribution of the rows of ``x2d`` (N, D) for ``k < N`` kept rows.

    Raises:
        ValueError: ``k`` not in ``[1, N)``.
    """
    n = x2d.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"plan_rows: k={k} must be in [1, {n}) for {n} rows")
    weights = torch.linalg.vector_norm(x2d, dim=1, dtype=torch.promote_types(x2d.dtype, torch.float32))
    total = weights.sum(dtype=torch.float64)
    if not bool(torch.isfinite(total)):  # inf / nan rows: keep every row, so the gradient carries them as is
        return RowPlan(torch.arange(n, device=x2d.device), torch.zeros_like(weights), 0.0, 0)
    top, top_idx = torch.topk(weights, k)  # descending
    cum = torch.cat([top.new_zeros(1, dtype=torch.float64), torch.cumsum(top.double(), 0)[:-1]])  # P_c * total
    c = torch.arange(k, device=x2d.device)
    score = (total - cum).clamp_(min=0) / (k - c)  # (1 - P_C) / (k - c), times the total; c = 0 .. k-1
    winners_n = int(torch.argmin(score))  # the first minimum: the fewest winners among ties
    winners = top_idx[:winners_n]
    rest_weights = weights.clone()
    rest_weights[winners] = 0
    rest = float(rest_weights.sum(dtype=torch.float64))
    draws = k - winners_n if rest > 0 else 0  # nothing left to draw: the winners are every nonzero row
    return RowPlan(winners, rest_weights, rest, draws)


@torch.no_grad()
def draw_rows(plan: RowPlan, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """(idx int64, scales fp32) of one draw from ``plan``: the winners with scale 1, then ``plan.draws`` rows drawn
    with replacement with probability ``weights / rest`` and scale ``rest / (draws * weights[j])``."""
    ones = torch.ones(plan.winners.shape[0], dtype=torch.float32, device=plan.winners.device)
    if plan.draws == 0:
        return plan.winners, ones
    drawn = torch.multinomial(plan.weights, plan.draws, replacement=True, generator=generator)
    return torch.cat([plan.winners, drawn]), torch.cat([ones, draw_scales(plan, drawn)])


def draw_scales(plan: RowPlan, drawn: Tensor) -> Tensor:
    """fp32 importance weights ``rest / (draws * weights[j])`` of the drawn rows ``drawn`` (int64)."""
    return ((plan.rest / plan.draws) / plan.weights[drawn].double()).float()


def estimate_weight_grad(grad2d: Tensor, rows: Tensor, idx: Tensor, scales: Tensor) -> Tensor:
    """``dY[idx]^T diag(scales) X[idx]`` (out, in), in the rows' dtype: the WTA-CRS estimate of ``dY^T X``."""
    if idx.numel() == 0:
        return grad2d.new_zeros(grad2d.shape[1], rows.shape[1]).to(rows.dtype)
    g = (grad2d.index_select(0, idx).float() * scales.unsqueeze(1)).to(rows.dtype)
    return g.t().mm(rows)


# ----- the autograd function ----------------------------------------------------------------------------------------
class _SampledLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; the backward's weight gradient from the sampled rows (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, idx: Tensor,
                scales: Tensor) -> Tensor:
        ctx.save_for_backward(weight, rows, idx, scales)  # not x: only its sampled rows
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        weight, rows, idx, scales = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2d.mm(weight).view(*grad.shape[:-1], weight.shape[1])  # exact
        if ctx.needs_input_grad[1]:
            grad_w = estimate_weight_grad(grad2d, rows, idx, scales).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)  # exact
        return grad_x, grad_w, grad_b, None, None, None


@dataclass
class RowSample:
    """One input's sampled rows: what the backward keeps."""

    rows: Tensor  # (k, D), in the graph like x
    idx: Tensor  # (k,) int64
    scales: Tensor  # (k,) fp32


def sample_input(x: Tensor, keep: float, *, generator: Optional[torch.Generator] = None,
                 min_rows: int = DEFAULT_MIN_ROWS) -> Optional[RowSample]:
    """The sampled rows of ``x`` (rows: every leading dimension folded), or None when every row is kept."""
    x2d = x.reshape(-1, x.shape[-1])
    k = sample_size(x2d.shape[0], keep, min_rows)
    if k >= x2d.shape[0]:
        return None
    if is_symbolic(x):  # memory planning (fake / meta tensors): no values to draw from, the k rows' shapes only
        idx = torch.arange(k, device=x.device)
        scales = torch.ones(k, dtype=torch.float32, device=x.device)
    else:
        idx, scales = draw_rows(plan_rows(x2d.detach(), k), generator)
    return RowSample(x2d.index_select(0, idx), idx, scales)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def sampled_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, keep: float,
                   generator: Optional[torch.Generator] = None, min_rows: int = DEFAULT_MIN_ROWS,
                   sample: Optional[RowSample] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is the WTA-CRS estimate from ``keep`` of x's rows.

    The output, ``dx`` and the bias gradient are exact; ``E[dweight]`` is the exact ``dweight``. With
    ``keep=1.0`` (or a batch of at most ``min_rows`` rows) this is ``F.linear`` itself, bit for bit.

    Args:
        x: (..., in) input; its leading dimensions are the rows sampled.
        weight: (out, in). bias: (out,) or None.
        keep: fraction of the rows kept, in (0, 1].
        generator: the random generator of the draw (on x's device); None: torch's global one.
        min_rows: never fewer rows than this.
        sample: rows already drawn from this same ``x`` (layers sharing an input share its sample).

    Raises:
        ValueError: ``keep`` outside (0, 1], ``min_rows`` < 1, or shapes that do not fit.
    """
    if not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0 < keep <= 1):
        raise ValueError(f"sampled_linear: keep={keep!r} must be a fraction in (0, 1]")
    if not (isinstance(min_rows, int) and min_rows >= 1):
        raise ValueError(f"sampled_linear: min_rows={min_rows!r} must be an integer >= 1")
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"sampled_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit: "
                         "x must be (..., in) and weight (out, in)")
    if not (torch.is_grad_enabled() and weight.requires_grad):  # nothing to estimate: the plain layer
        return F.linear(x, weight, bias)
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:  # what autocast does for linear, then the function runs outside it
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return sampled_linear(x, weight, bias, keep=keep, generator=generator, min_rows=min_rows, sample=sample)
    if sample is None:
        sample = sample_input(x, keep, generator=generator, min_rows=min_rows)
        if sample is None:
            return F.linear(x, weight, bias)
    return _SampledLinear.apply(x, weight, bias, sample.rows, sample.idx, sample.scales)


# ----- installing it on a module -----------------------------------------------------------------------------------
def _is_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")
            and isinstance(weight, Tensor) and weight.ndim == 2)


def samplable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass with its own forward: quantized layers) or Hugging Face's ``Conv1D``."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward) or _is_conv1d(module)


def choose_linears(module: nn.Module, patterns: Optional[tuple[str, ...]]) -> dict[str, nn.Module]:
    """name -> samplable linear layer with a trainable weight: inside the transformer blocks (``patterns=None``), or
    matched by a pattern (or inside a matched module).

    Raises:
        MemKitConfigError: no transformer blocks (patterns None), or a pattern that matches no samplable trainable
            linear layer.
    """
    named = dict(module.named_modules())

    def trainable(m: nn.Module) -> bool:
        return samplable(m) and bool(m.weight.requires_grad)

    if patterns is None:
        blocks = find_blocks(module)
        if not blocks:
            raise MemKitConfigError(
                f"{_KEY}: {type(module).__name__} has no recognizable transformer blocks whose linear layers to "
                "sample. Fix: name the layers with sampled_backward.modules, e.g. ['*.mlp.*'], or define "
                "memkit_blocks().")
        inside = {id(m) for b in blocks for m in b.modules()}
        return {n: m for n, m in named.items() if id(m) in inside and trainable(m)}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {}
        for name, m in named.items():
            if name and fnmatch.fnmatchcase(name, pattern):
                hits.update({f"{name}.{s}" if s else name: sub for s, sub in m.named_modules() if trainable(sub)})
        if not hits:
            sample = ", ".join(n for n, m in named.items() if samplable(m))[:300]
            raise MemKitConfigError(
                f"{_KEY}.modules pattern {pattern!r} matches no nn.Linear with a trainable weight (nor a module "
                f"holding one). Fix: name linear layers or modules around them; candidates: {sample or 'none'}.")
        chosen.update(hits)
    return chosen


class _SampledForward(ForwardWrapper):
    """Runs a linear layer through :func:`sampled_linear` while gradients are on; otherwise its own forward."""

    technique: "SampledBackwardTechnique"
    conv1d: bool  # Hugging Face's Conv1D: weight (in, out)
    module_ref: Any  # weakref to the layer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module_ref()
        if module is None or not torch.is_grad_enabled() or kwargs or len(args) != 1 \
                or not isinstance(args[0], Tensor) or not module.weight.requires_grad:
            return self.inner(*args, **kwargs)
        x, t = args[0], self.technique
        rows = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
        if sample_size(rows, t.config.keep, t.config.min_rows) >= rows:
            return self.inner(x)  # every row kept: the layer itself, bit for bit
        weight = module.weight.t() if self.conv1d else module.weight
        t.calls += 1
        return sampled_linear(x, weight, module.bias, keep=t.config.keep, min_rows=t.config.min_rows,
                              sample=t.shared_sample(x))


class SampledBackwardTechnique(Technique):
    """``activations.sampled_backward``: WTA-CRS weight gradients for the chosen linear layers (approximate,
    unbiased). Install it before the saved-tensor compression, so that the compression's hooks see the rows."""

    name = "sampled_backward"
    exact = False

    def __init__(self, config: SampledBackwardConfig) -> None:
        self.config = config
        self._changed: list[nn.Module] = []
        self._left_to_checkpoint = 0
        self._trainer_ref: Any = None
        self._step: Optional[int] = None
        self._micro = 0
        self._rank = 0  # processes draw differently: their data differ, their draws need not be correlated
        self._generators: dict[torch.device, torch.Generator] = {}
        self._samples: dict[int, tuple[Any, int, Any, Tensor, Tensor]] = {}
        self.calls = 0  # layer calls that sampled (since the last step began)
        self.sampled_bytes = 0  # bytes of the sampled rows, indices and scales (since the last step began)
        self.input_bytes = 0  # bytes of the inputs they were sampled from

    def describe(self) -> str:
        left = f"; {self._left_to_checkpoint} inside checkpointed blocks left to the checkpoint" \
            if self._left_to_checkpoint else ""
        return f"WTA-CRS sampled weight gradients, keep={self.config.keep:g} ({len(self._changed)} linear layers{left})"

    def setup_trainer(self, trainer: Any) -> None:
        self._trainer_ref = weakref.ref(trainer)

    def setup_module(self, module: nn.Module) -> None:
        checkpointed = [n for n, m in module.named_modules() if is_checkpointed(m) or hf_checkpointed(m)]
        candidates = choose_linears(module, self.config.modules)
        chosen = {n: m for n, m in candidates.items()
                  if not any(n == c or n.startswith(c + ".") for c in checkpointed)}
        self._left_to_checkpoint = len(candidates) - len(chosen)
        if candidates and not chosen:
            raise MemKitConfigError(
                f"{_KEY}: every linear layer it names lies inside a checkpointed block, which saves no activations "
                "(it recomputes them), so sampling would save nothing. Fix: name layers outside the checkpointed "
                "blocks in sampled_backward.modules, set checkpoint_every >= 2, or checkpoint='none'.")
        if not chosen:
            raise MemKitConfigError(f"{_KEY}: the transformer blocks hold no nn.Linear with a trainable weight. Fix: "
                                    "name the layers with sampled_backward.modules, or drop sampled_backward.")
        for m in chosen.values():
            if find_forward_wrapper(m, _SampledForward) is not None:
                continue

            def make(inner: Any, had: bool, m: nn.Module = m) -> _SampledForward:
                wrapper = _SampledForward(inner, had)
                wrapper.technique, wrapper.conv1d, wrapper.module_ref = self, _is_conv1d(m), weakref.ref(m)
                return wrapper

            wrap_forward(m, make)
            self._changed.append(m)

    def step_context(self) -> Any:
        if torch.is_grad_enabled():  # a training step: a new draw
            trainer = self._trainer_ref() if self._trainer_ref is not None else None
            step = int(trainer.global_step) if trainer is not None else None
            self._rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
            if step is not None and step == self._step:
                self._micro += 1  # gradient accumulation: another micro-batch of the same step
            else:
                self._micro = 0 if step is not None else self._micro + 1
            self._step = step
            self._new_step()
        return super().step_context()

    def _new_step(self) -> None:
        self._generators = {}
        self._samples = {}
        self.calls = self.sampled_bytes = self.input_bytes = 0

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The generator of this step's draws on ``device`` (None with ``seed=None``: torch's global generator)."""
        if self.config.seed is None:
            return None
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            step = self._step if self._step is not None else -1
            g.manual_seed(hash((self.config.seed, step, self._micro, self._rank)) & (2**63 - 1))
            self._generators[device] = g
        return g

    def shared_sample(self, x: Tensor) -> Optional[RowSample]:
        """The sample of ``x`` this step: drawn at its first use, reused by the other layers reading the same tensor
        (unchanged since)."""
        seen = self._samples.get(id(x))
        if seen is not None and seen[0]() is x and seen[1] == x._version:
            rows = seen[2]()
            if rows is not None:  # held weakly: the graph keeps the rows, not this cache
                return RowSample(rows, seen[3], seen[4])
        sample = sample_input(x, self.config.keep, generator=self.generator(x.device), min_rows=self.config.min_rows)
        if sample is not None:
            if len(self._samples) >= 256:  # no step_context (direct use): forget the inputs that are gone
                self._samples = {i: e for i, e in self._samples.items() if e[0]() is not None}
            self._samples[id(x)] = (weakref.ref(x), x._version, weakref.ref(sample.rows), sample.idx, sample.scales)
            self.input_bytes += x.numel() * x.element_size()
            self.sampled_bytes += sum(t.numel() * t.element_size() for t in (sample.rows, sample.idx, sample.scales))
        return sample

    def teardown(self, module: nn.Module) -> None:
        for m in self._changed:
            unwrap_forward(m, _SampledForward)
        self._changed = []
        self._new_step()


def apply_sampled_backward(module: nn.Module, setting: SampledBackwardSetting) -> SampledBackwardTechnique:
    """Install WTA-CRS on ``module``'s chosen linear layers without a Trainer; returns the technique (call
    ``step_context()`` around each training step for a fresh draw, :func:`remove_sampled_backward` to undo).

    Raises:
        MemKitConfigError: a bad setting, or nothing to sample.
    """
    config = parse_sampled_backward(setting)
    if config is None:
        raise MemKitConfigError(f"{_KEY}=None turns sampling off; there is nothing to apply. Fix: e.g. 0.3.")
    technique = SampledBackwardTechnique(config)
    technique.setup_module(module)
    return technique


def remove_sampled_backward(module: nn.Module) -> None:
    """Undo :func:`apply_sampled_backward` on every layer of ``module`` (other forward wrappers stay)."""
    for m in module.modules():
        while find_forward_wrapper(m, _SampledForward) is not None:
            unwrap_forward(m, _SampledForward)

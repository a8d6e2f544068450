"""``sequence_loss``: a causal LM's loss whose backward runs SeCO, SpaCO or StreamBP.

The returned loss is an ordinary scalar with a ``grad_fn``: Lightning's ``backward``, gradient
accumulation (the loss divided by the number of micro-batches), precision plugins and gradient
scalers act on it as on any loss. Its forward runs the method's no-grad pass. The model's trainable
parameters are inputs of its autograd node, whose backward runs the method's chunked recomputation
and returns each parameter's gradient in one piece: autograd takes the buffers over as ``.grad``
(no copy), adds any other term of the step's loss, and hooks on parameters (step-in-backward
optimizers, DDP) see one gradient per parameter per backward.

Inside the backward the trainable parameters are swapped for detached aliases (same storage) with
``torch.func.functional_call``; the chunks' gradients accumulate in place on the aliases. StreamBP
finishes the blocks one at a time (top down): with ``early_gradients`` (one process, a step-in-backward
optimizer) each block's gradients are handed over as soon as the block is done, so the optimizer
updates the block and frees its gradients before the next block starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_memkit.config import CrossEntropyConfig, MemKitConfigError, SequenceConfig
from lightning_memkit.loss.linear_ce import linear_cross_entropy
from lightning_memkit.sequence.adapter import SequenceAdapter, get_adapter
from lightning_memkit.sequence.core import BlockCall, direct_call
from lightning_memkit.sequence.seco import SeCO
from lightning_memkit.sequence.streambp import StreamBP

Method = Any  # SeCO | StreamBP


def _loss_fn(ad: SequenceAdapter, cross_entropy: Optional[CrossEntropyConfig], ignore_index: int) -> Callable:
    """Summed cross-entropy of a chunk's normed hidden states: fused (no logits) or through the head."""

    softcap = ad.logit_softcap

    def loss(hidden: Tensor, targets: Tensor) -> Tensor:
        head = ad.lm_head  # read at call time: inside the backward these are the parameter aliases
        if cross_entropy is not None and cross_entropy.fused:
            return linear_cross_entropy(
                hidden, head.weight, targets, bias=head.bias, ignore_index=ignore_index, reduction="sum",
                impl=cross_entropy.impl, chunk_size=cross_entropy.chunk_size, filter_eps=cross_entropy.filter_eps,
                softcap=softcap,
            )
        logits = head(hidden)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                               reduction="sum")

    return loss


class _Runner(nn.Module):
    """Lets ``functional_call`` swap the parameters of ``model`` while ``fn`` runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class _SequenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: "_Run", anchor: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.run = run
        return run.forward()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        run: Optional[_Run] = ctx.run
        if run is None:
            raise RuntimeError(
                "the sequence-chunked loss was back-propagated twice; its buffers are freed by the first backward. "
                "Fix: call backward once per loss (retain_graph is not supported with sequence=)."
            )
        ctx.run = None
        return (None, None, *run.backward(grad))


class _Hand(torch.autograd.Function):
    """Hands finished gradients to autograd from inside a nested backward, as the only reference to them,
    so autograd takes each buffer over as ``.grad`` (no copy) and runs the parameters' hooks."""

    @staticmethod
    def forward(ctx: Any, grads: list, *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        out = (None, *grads)
        grads.clear()
        return out


class _Run:
    """One loss evaluation: the method, the parameters it returns gradients for, the autocast state.

    The trainable parameters are inputs of the loss's autograd node, whose backward returns their
    gradients: autograd adds them to whatever else the step's loss puts on the parameters, and hooks
    (step-in-backward optimizers, DDP's reducer) fire once per parameter. With ``early`` (StreamBP, one
    process, a step-in-backward optimizer) the blocks' and the head's parameters are not inputs:
    their gradients are handed over by a nested backward as soon as their part is done, so the
    optimizer frees them while the blocks below still run. They must then get no other gradient in
    that backward (the loss is the step's only term on them).
    """

    def __init__(self, model: nn.Module, method: Method, count: Optional[Tensor], early: bool) -> None:
        self.model, self.method, self.count = model, method, count
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.early_blocks: list[list[str]] = []
        self.early_head: list[str] = []
        if early and isinstance(method, StreamBP) and not _several_processes():
            self._plan_early()
        early_names = {n for names in self.early_blocks for n in names} | set(self.early_head)
        self.returned = [(n, p) for n, p in self.trainable if n not in early_names]
        device = method.ids.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def _plan_early(self) -> None:
        """Which parameters StreamBP can hand over early: those only one block uses, and (when the adapter
        names its embedding) the head's, unless tied to the embedding."""
        ad = self.method.ad
        owner: dict[int, set[int]] = {}
        for i, block in enumerate(ad.blocks):
            for p in block.parameters():
                owner.setdefault(id(p), set()).add(i)
        embedding = ad.embedding
        embed_ids = {id(p) for p in embedding.parameters()} if embedding is not None else set()
        head_ids = {id(p) for p in ad.lm_head.parameters()}
        self.early_blocks = [[] for _ in ad.blocks]
        for name, p in self.trainable:
            blocks = owner.get(id(p), set())
            if id(p) in embed_ids:
                continue  # the embedding runs last (and may be tied to the head)
            if len(blocks) == 1 and id(p) not in head_ids:
                self.early_blocks[next(iter(blocks))].append(name)
            elif not blocks and embedding is not None and id(p) in head_ids:
                self.early_head.append(name)

    def forward(self) -> Tensor:
        with self._autocast():
            total = self.method.forward()
        total = _at_least_fp32(total)
        return total if self.count is None else total / self.count

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        device, enabled, dtype = self.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            yield

    def backward(self, grad: Tensor) -> list[Optional[Tensor]]:
        # only trainable parameters are swapped (frozen ones, e.g. quantized weights, stay as they are)
        aliases = {n: p.detach().requires_grad_() for n, p in self.trainable}
        scale = grad if self.count is None else grad / self.count
        params = dict(self.trainable)

        def hand(names: list[str]) -> None:
            ready = [(params[n], aliases[n]) for n in names if aliases[n].grad is not None]
            if not ready:
                return
            grads = []
            for p, alias in ready:
                g, alias.grad = alias.grad, None
                grads.append(g if g.dtype == p.dtype else g.to(p.dtype))
                del g
            out = _Hand.apply(grads, *(p for p, _ in ready))
            del grads
            torch.autograd.backward(out)

        kwargs: dict[str, Any] = {}
        if self.early_blocks:
            kwargs["block_done"] = lambda layer: hand(self.early_blocks[layer])
        if self.early_head:
            kwargs["head_done"] = lambda: hand(self.early_head)

        def run() -> None:
            with torch.enable_grad(), self._autocast():
                self.method.backward(scale, **kwargs)

        try:
            torch.func.functional_call(_Runner(self.model), {f"model.{n}": a for n, a in aliases.items()}, (run,),
                                       strict=False, tie_weights=True)
        finally:
            self.method.free()
        out: list[Optional[Tensor]] = []
        for name, p in self.returned:
            g, aliases[name].grad = aliases[name].grad, None  # autograd holds the only reference: it takes it over
            out.append(None if g is None else g if g.dtype == p.dtype else g.to(p.dtype))
            del g
        return out


def _several_processes() -> bool:
    """Under DDP gradients go back through the outer backward, where DDP's reducer expects them."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def shifted_targets(labels: Tensor, ignore_index: int) -> Tensor:
    """Labels of position i+1 at position i (the last position gets ``ignore_index``)."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def sequence_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    method: str = "streambp",
    chunk_size: Optional[int] = None,
    keep: Optional[float] = None,
    seed: Optional[int] = None,
    step: int = 0,
    ignore_index: int = -100,
    shift: bool = False,
    cross_entropy: Optional[CrossEntropyConfig] = None,
    call: BlockCall = direct_call,
    reduction: str = "mean",
    early_gradients: bool = False,
    offload: bool = False,
) -> Tensor:
    """Next-token cross-entropy of ``model`` on ``input_ids`` (B, T), with a chunked backward.

    Args:
        model: the reference ``Transformer``, an ``HFCausalLM``, a Hugging Face ``*ForCausalLM`` of a family with a
            block layout in :data:`~lightning_memkit.models.families.HF_FAMILIES`, or a model with
            ``memkit_sequence_adapter()``.
        labels: (B, T) targets for each position (or the inputs themselves with ``shift=True``);
            ``ignore_index`` marks positions out of the loss (padding, prompts). The mean is over the
            positions that count, as ``F.cross_entropy`` takes it (NaN when none counts, as there).
        method: ``"streambp"`` or ``"seco"`` (exact), ``"spaco"`` (unbiased estimate).
        chunk_size: tokens per chunk; any sequence length works (the last chunk may be shorter). None:
            2048, or the model's maximum sequence length where that is shorter.
        keep, seed, step: SpaCO: each chunk is back-propagated with probability ``keep``, drawn from
            ``(seed, step)``.
        cross_entropy: fused cross-entropy settings for the per-chunk loss; None: the head's logits for
            one chunk at a time, then ``F.cross_entropy``.
        call: how a block's computation on a chunk is run (the strategy passes one that applies the
            block's checkpointing / saved-tensor wrappers).
        reduction: ``"mean"`` or ``"sum"`` over the counted positions.
        early_gradients: StreamBP with one process: hand each block's gradients to autograd as soon as
            the block is done (for step-in-backward optimizers). The loss must then be the only term of
            the backward that reaches those weights.
        offload: StreamBP only: the blocks' inputs wait in host memory between the forward and the backward
            (pinned, on a side stream on CUDA; on CPU a separate buffer per input, which saves nothing but runs
            the same steps); the gradients are the same bit for bit.

    Without gradients (validation) the loss is computed block by block, chunk by chunk, keeping no
    more than one block's input and keys/values. ``torch.autograd.grad(loss, params)`` is not
    supported (the gradients are produced inside the loss's backward); use ``loss.backward()``.
    """
    config = SequenceConfig(method=method, chunk_size=chunk_size, keep=keep, seed=seed, offload=offload)
    if not config.enabled:
        raise MemKitConfigError("sequence_loss(method='none') has nothing to do. Fix: use 'streambp', 'seco' or "
            "'spaco'.")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported. Fix: use 'mean' or 'sum'.")
    if input_ids.ndim != 2 or labels.shape != input_ids.shape or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids and labels must both be (B, T) with T >= 1; got {tuple(input_ids.shape)} and "
            f"{tuple(labels.shape)}."
        )
    ad = get_adapter(model)
    ad.check_length(input_ids.shape[1])
    config = dataclasses.replace(config, chunk_size=config.chunk_for(ad.max_seq_len))
    targets = shifted_targets(labels, ignore_index) if shift else labels
    count = (targets != ignore_index).sum() if reduction == "mean" else None
    loss_fn = _loss_fn(ad, cross_entropy, ignore_index)
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    if not needs_grad:
        streamed = StreamBP(ad, input_ids, targets, config.chunk_size, loss_fn, direct_call)
        try:
            total = _at_least_fp32(streamed.forward(keep_inputs=False))
            return total if count is None else total / count
        finally:
            streamed.free()
    if config.method == "streambp":
        fused = cross_entropy is not None and cross_entropy.fused
        runner: Method = StreamBP(ad, input_ids, targets, config.chunk_size, loss_fn, call, loss_streams=fused,
                                  offload=config.offload)
    else:
        runner = SeCO(ad, input_ids, targets, config.chunk_size, loss_fn, call, keep=config.keep,
                      draw=None if config.method != "spaco" else int(config.seed) * 1_000_003 + int(step))
    run = _Run(model, runner, count, early=early_gradients)
    anchor = torch.zeros((), device=input_ids.device, requires_grad=True)  # the loss needs a graph in any case
    return _SequenceLoss.apply(run, anchor, *(p for _, p in run.returned))

"""SeCO (exact) and SpaCO (sampled, unbiased): chunk-wise backpropagation through the whole model.

Forward, no grad: chunks in order, each through every block, keys/values of every layer kept in
:class:`~lightning_memkit.sequence.core.LayerKV` buffers; the loss is summed per chunk.

Backward: chunks last-first. A chunk is recomputed with gradients through every block (its queries
read the buffers, see :func:`~lightning_memkit.sequence.core.join`) and back-propagated from its
share of the loss. Gradients reaching earlier positions' keys/values wait in fp32 accumulators
until their chunk is processed. Only one chunk's graph exists at a time; the buffers (keys and values
of every layer, plus their fp32 gradients) grow with the sequence.

SpaCO back-propagates each chunk with probability ``keep``; a chunk that is skipped contributes
nothing (neither its loss nor what later chunks sent to its keys/values), a chunk that is kept has
everything it passes on scaled by ``1/keep``. Every path of the chain rule runs through distinct
chunks, each kept independently, so every term of the gradient keeps its expected value: the
estimate is unbiased (tested by averaging over seeds), its cost about ``keep`` times SeCO's backward.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_memkit.sequence.adapter import SequenceAdapter, causal_bias
from lightning_memkit.sequence.core import BlockCall, LayerKV, block_chunk, chunks

LossFn = Callable[[Tensor, Tensor], Tensor]


class SeCO:
    """One training step of SeCO (``keep`` None) or SpaCO (``keep`` in (0, 1], with ``generator``)."""

    def __init__(self, ad: SequenceAdapter, input_ids: Tensor, targets: Tensor, chunk_size: int, loss_fn: LossFn,
                 call: BlockCall, keep: Optional[float] = None, draw: Optional[int] = None) -> None:
        self.ad, self.ids, self.targets, self.loss_fn, self.call = ad, input_ids, targets, loss_fn, call
        self.spans = chunks(input_ids.shape[1], chunk_size)
        self.keep = keep
        # SpaCO's chunk choice: from Python's generator seeded with ``draw`` (no tensor: it also runs under
        # fake tensors, and it is the same on every device)
        rng = random.Random(0 if draw is None else draw)
        self.chosen = [keep is None or rng.random() < keep for _ in self.spans]
        self.kv: list[LayerKV] = []
        self.rope: Optional[tuple[Tensor, Tensor]] = None
        self.backpropagated: list[int] = []  # chunk indices back-propagated by the last backward

    def _rope(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.rope is None:
            positions = torch.arange(self.ids.shape[1], device=self.ids.device)
            self.rope = self.ad.rope(positions, x)
        return self.rope

    def _chunk(self, s: int, e: int, comp: Optional[float]) -> Tensor:
        ad = self.ad
        x = ad.embed(self.ids[:, s:e])
        cos, sin = self._rope(x)
        cos, sin = cos[..., s:e, :], sin[..., s:e, :]
        bias = None
        for layer, block in enumerate(ad.blocks):
            if bias is None and s:
                bias = causal_bias(e - s, e, x)
            x = self.call(block, block_chunk, ad, block, x, cos, sin, s, self.kv[layer], bias, comp)
        return self.loss_fn(ad.final_norm(x), self.targets[:, s:e])

    def forward(self) -> Tensor:
        """The summed loss over all chunks (no gradients); fills the key/value buffers."""
        self.kv = [LayerKV(self.ids.shape[1]) for _ in self.ad.blocks]
        total = None
        for s, e in self.spans:
            loss = self._chunk(s, e, None)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def backward(self, scale: Tensor) -> None:
        """Back-propagate ``scale * summed loss`` into the parameters' ``.grad``."""
        chosen = self.chosen
        comp = 1.0 if self.keep is None else 1.0 / self.keep
        for kv in self.kv:
            kv.start_backward()
        self.backpropagated = []
        for index in reversed(range(len(self.spans))):
            if not chosen[index]:
                continue
            s, e = self.spans[index]
            loss = self._chunk(s, e, comp)
            torch.autograd.backward(loss * (scale * comp))
            self.backpropagated.append(index)
            if torch.is_autocast_enabled(self.ids.device.type):
                torch.clear_autocast_cache()  # the weights' low-precision copies: made again for the next chunk
        self.free()

    def free(self) -> None:
        for kv in self.kv:
            kv.free()
        self.kv = []
        self.rope = None

"""StreamBP: exact backpropagation layer by layer, each layer streamed along the sequence.

Forward, no grad: block by block over the whole sequence, each block computed chunk by chunk; the
input of every block is kept (as activation checkpointing keeps it), nothing else.

Backward, top down:

1. The final norm, head and loss, chunk by chunk: the gradient at the last hidden states.
2. For each block (last first): its keys and values for every position are recomputed without
   gradients into a buffer; then chunk by chunk, last first, the block's output at that chunk's
   positions is recomputed from the chunk's input rows and the buffer (see
   :func:`~lightning_memkit.sequence.core.join`) and back-propagated from its output gradient. The
   chunk's input gradient is complete when its turn comes, since later chunks have already sent
   their share through its keys/values. By linearity of the chain rule the sums equal full backprop.
3. The embedding, chunk by chunk.

A chunk's queries only meet keys up to the chunk's end (causality), so the recomputation costs the
causal half of attention, no more. Memory: the blocks' inputs, one block's keys/values (plus fp32
gradients), and one chunk's graph through one block; logits exist for one chunk at a time.

With ``offload`` the blocks' inputs go to host memory as the forward produces them (a
:class:`~lightning_memkit.sequence.offload.BlockStore`) and come back one block ahead of the backward
(block ``i-1``'s input is copied back while block ``i`` runs): the device holds two blocks' inputs at a
time instead of all of them. The copies are exact: the gradients are the same bit for bit.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_memkit.sequence.adapter import SequenceAdapter, causal_bias
from lightning_memkit.sequence.core import BlockCall, LayerKV, block_chunk, chunks
from lightning_memkit.sequence.offload import BlockStore

LossFn = Callable[[Tensor, Tensor], Tensor]


class StreamBP:
    """One training step of StreamBP; with ``offload`` the blocks' inputs wait in host memory (see the module
    docstring). :attr:`store` counts the bytes they take in each pool."""

    def __init__(self, ad: SequenceAdapter, input_ids: Tensor, targets: Tensor, chunk_size: int, loss_fn: LossFn,
                 call: BlockCall, loss_streams: bool = False, offload: bool = False) -> None:
        self.ad, self.ids, self.targets, self.loss_fn, self.call = ad, input_ids, targets, loss_fn, call
        self.spans = chunks(input_ids.shape[1], chunk_size)
        # a loss that never materializes logits (the fused one) takes the whole sequence at once: one
        # head-weight gradient instead of one per chunk added into another
        self.whole_sequence_loss = loss_streams
        self.head_graph: Optional[tuple] = None  # (normed hidden states, loss, head parameters)
        self.head_names: list[str] = []
        self.store = BlockStore(offload, input_ids.device)
        self.inputs: list[int] = []  # each block's input (B, T, D): its handle in the store
        self.last: Optional[Tensor] = None  # the last block's output
        self.rope: Optional[tuple[Tensor, Tensor]] = None

    def _bias(self, s: int, e: int, like: Tensor) -> object:
        return causal_bias(e - s, e, like) if s else None

    def _rope(self, s: int, e: int) -> tuple[Tensor, Tensor]:
        assert self.rope is not None
        cos, sin = self.rope
        return cos[..., s:e, :], sin[..., s:e, :]

    def _embed(self) -> Tensor:
        out: Optional[Tensor] = None
        for s, e in self.spans:
            x = self.ad.embed(self.ids[:, s:e])
            if out is None:
                out = x.new_empty(x.shape[0], self.ids.shape[1], x.shape[2])
                positions = torch.arange(self.ids.shape[1], device=self.ids.device)
                self.rope = self.ad.rope(positions, x)
            out[:, s:e] = x
        assert out is not None
        return out

    def _block_forward(self, block: torch.nn.Module, x: Tensor) -> Tensor:
        kv = LayerKV(x.shape[1])
        out: Optional[Tensor] = None
        for s, e in self.spans:
            y = block_chunk(self.ad, block, x[:, s:e], *self._rope(s, e), s, kv, self._bias(s, e, x))
            if out is None:
                out = y.new_empty(x.shape[0], x.shape[1], y.shape[2])
            out[:, s:e] = y
        assert out is not None
        return out

    def _loss(self, x: Tensor) -> Tensor:
        total = None
        for s, e in self.spans:
            loss = self.loss_fn(self.ad.final_norm(x[:, s:e]), self.targets[:, s:e])
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def _normed(self, x: Tensor) -> Tensor:
        """The final norm of ``x`` (B, T, D), chunk by chunk, without gradients."""
        normed: Optional[Tensor] = None
        with torch.no_grad():
            for s, e in self.spans:
                h = self.ad.final_norm(x[:, s:e])
                if normed is None:
                    normed = h.new_empty(h.shape[0], x.shape[1], h.shape[2])
                normed[:, s:e] = h
        assert normed is not None
        return normed

    def forward(self, keep_inputs: bool = True) -> Tensor:
        """The summed loss (no gradients); with ``keep_inputs`` the blocks' inputs are kept for backward.

        With the fused loss and ``keep_inputs``, the loss on the whole sequence is computed here with its
        graph (the fused loss makes its gradients in the same pass as its value), and the backward
        takes the gradients from it: the head is not run a second time.
        """
        x = self._embed()
        self.inputs = []
        for block in self.ad.blocks:
            if keep_inputs:
                self.inputs.append(self.store.put(x))
            x = self._block_forward(block, x)
        if not keep_inputs:
            return self._loss(x)
        self.last = x
        if not self.whole_sequence_loss:
            return self._loss(x)
        normed = self._normed(x).requires_grad_()
        head = self.ad.lm_head
        self.head_names = [n for n, p in head.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.loss_fn(normed, self.targets)
        self.head_graph = (normed, loss, [getattr(head, n) for n in self.head_names])
        return loss.detach()

    def backward(self, scale: Tensor, block_done: Optional[Callable[[int], None]] = None,
                 head_done: Optional[Callable[[], None]] = None) -> None:
        """Back-propagate ``scale * summed loss`` into the parameters' ``.grad``; ``head_done()`` and
        ``block_done(i)`` are called when the final norm and head, and block ``i``, are done."""
        ad = self.ad
        assert self.last is not None
        if self.inputs:
            self.store.prefetch(self.inputs[-1])  # the top block's input comes back while the head runs
        # the gradient of the last block's output is written over that output, chunk by chunk, once the chunk's
        # final norm (and loss) have been back-propagated: one (B, T, D) buffer instead of two
        grad = self.last
        if self.head_graph is not None:
            # the loss on the whole normed sequence was computed in the forward with its graph (one
            # head-weight gradient, no logits); the final norm's backward then goes chunk by chunk
            normed, loss, params = self.head_graph
            self.head_graph = None
            grads = torch.autograd.grad(loss, [normed, *params], grad_outputs=scale.to(loss.dtype))
            del loss, normed, params
            normed_grad = grads[0]
            head = ad.lm_head  # inside the backward: the parameters' aliases, which collect the gradients
            for name, g in zip(self.head_names, grads[1:]):  # none when the head is frozen (LoRA, lm_head off)
                alias = getattr(head, name)
                alias.grad = g if alias.grad is None else alias.grad + g
                del g
            del grads
            for s, e in self.spans:
                x = self.last[:, s:e].detach().requires_grad_()
                torch.autograd.backward(ad.final_norm(x), normed_grad[:, s:e])
                grad[:, s:e] = x.grad
            del normed_grad
        else:
            for s, e in self.spans:  # head and loss, one chunk's logits at a time
                x = self.last[:, s:e].detach().requires_grad_()
                torch.autograd.backward(self.loss_fn(ad.final_norm(x), self.targets[:, s:e]) * scale)
                grad[:, s:e] = x.grad
        self.last = None
        if head_done is not None:
            head_done()
        for layer in reversed(range(len(ad.blocks))):
            block, x_full = ad.blocks[layer], self.store.get(self.inputs[layer])
            if layer:
                self.store.prefetch(self.inputs[layer - 1])  # comes back while this block runs
            kv = LayerKV(x_full.shape[1])
            with torch.no_grad():  # the block's keys and values for every position
                for s, e in self.spans:
                    kv.write(s, *ad.kv(block, ad.attn_norm(block, x_full[:, s:e]), *self._rope(s, e)))
            kv.start_backward()
            # the gradient below replaces the one from above in place, chunk by chunk: a chunk's backward reads only
            # its own span of ``grad`` (what crosses chunks is in the keys' and values' accumulators), so one
            # (B, T, D) buffer serves the whole backward instead of two
            same = grad.dtype == x_full.dtype
            below = grad if same else torch.empty_like(x_full)
            for s, e in reversed(self.spans):
                x = x_full[:, s:e].detach().requires_grad_()
                y = self.call(block, block_chunk, ad, block, x, *self._rope(s, e), s, kv, self._bias(s, e, x), 1.0)
                torch.autograd.backward(y, grad[:, s:e].to(y.dtype))
                below[:, s:e] = x.grad
                # x (a view of the block's input) and y (whose graph's nodes hold the key/value accumulators) would
                # otherwise keep this block's input and accumulators alive into the next block's backward
                del x, y
            kv.free()
            self.store.release(self.inputs[layer])
            del x_full
            grad = below
            if torch.is_autocast_enabled(self.ids.device.type):
                torch.clear_autocast_cache()  # this block's weight copies are not needed again
            if block_done is not None:
                block_done(layer)
        for s, e in self.spans:  # embedding
            x = ad.embed(self.ids[:, s:e])
            if x.requires_grad:  # a frozen embedding has nothing to receive
                torch.autograd.backward(x, grad[:, s:e].to(x.dtype))
        self.free()

    def free(self) -> None:
        self.store.free()
        self.inputs, self.last, self.rope, self.head_graph = [], None, None, None

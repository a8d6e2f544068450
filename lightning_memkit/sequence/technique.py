"""``MemKitStrategy(sequence=...)`` as a technique."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_memkit.config import DEFAULT_SEQUENCE_CHUNK, MemKitConfigError, SequenceConfig, is_planning
from lightning_memkit.models.families import is_hf_causal_lm
from lightning_memkit.sequence.adapter import SequenceAdapter, find_adapter
from lightning_memkit.sequence.core import BlockCall
from lightning_memkit.sequence.offload import offload_nbytes
from lightning_memkit.sequence.runtime import SequenceRuntime, patch_hf_forward, unpatch_hf_forward, use_sequence
from lightning_memkit.technique import Technique, call_through_wrappers


def drivable_models(module: nn.Module) -> tuple[list[tuple[nn.Module, SequenceAdapter]], list[str]]:
    """The causal LMs under ``module`` the sequence methods can drive, outermost first (an ``HFCausalLM``
    and the Hugging Face model inside it count once), and why each recognized one that cannot be
    driven cannot (e.g. a teacher or reward model of another family)."""
    found: list[tuple[nn.Module, SequenceAdapter]] = []
    refused: list[str] = []
    taken: set[int] = set()
    for name, m in module.named_modules():
        if id(m) in taken:
            continue
        try:
            adapter = find_adapter(m)
        except MemKitConfigError as err:
            refused.append(f"self.{name} ({type(m).__name__})" if name else type(m).__name__)
            refused[-1] += f": {err}"
            taken.update(id(sub) for sub in m.modules())
            continue
        if adapter is None:
            continue
        found.append((m, adapter))
        taken.update(id(sub) for sub in m.modules())
    return found, refused


def wrapped_block_call(method: str) -> BlockCall:
    """How the method runs a block on a chunk: inside the wrappers other techniques put on the block
    (saved-tensor compression and offload; checkpointing for SeCO / SpaCO). StreamBP already keeps only
    the blocks' inputs, so a checkpoint wrapper would only recompute each chunk a second time: skipped."""
    skip: tuple[type, ...] = ()
    if method == "streambp":
        from lightning_memkit.activations.checkpoint import _CheckpointedForward

        skip = (_CheckpointedForward,)

    def call(block: nn.Module, fn: Any, *args: Any) -> Any:
        return call_through_wrappers(block, fn, *args, skip=skip)

    return call


class SequenceTechnique(Technique):
    """Activates the sequence method around every step and patches Hugging Face causal LMs."""

    name = "sequence"

    def __init__(self, config: SequenceConfig, step_in_backward: bool = False) -> None:
        self.config = config
        self.step_in_backward = step_in_backward
        self.exact = config.exact  # type: ignore[misc]
        self._trainer: Any = None
        self._models: list[nn.Module] = []
        self._patched: list[nn.Module] = []
        self._runtime: Optional[SequenceRuntime] = None
        self._checked = False
        self._chunk_size: Optional[int] = config.chunk_size  # the default is resolved at setup, from the model
        self._offload = config.offload  # off on a device that is host memory (decided at setup)

    def describe(self) -> str:
        c = self.config
        what = {"seco": "SeCO (exact)", "streambp": "StreamBP (exact)",
                "spaco": f"SpaCO (unbiased estimate, keep={c.keep}, seed={c.seed})"}[c.method]
        chunks = f"chunks of {self._chunk_size if self._chunk_size is not None else DEFAULT_SEQUENCE_CHUNK} tokens"
        if c.chunk_size is None and self._chunk_size is not None and self._chunk_size < DEFAULT_SEQUENCE_CHUNK:
            chunks += f" (the default {DEFAULT_SEQUENCE_CHUNK}, clamped to the model's max_seq_len)"
        offload = ", blocks' inputs offloaded to host memory" if self._offload else ""
        return f"sequence-chunked backprop: {what}, {chunks}{offload}, {len(self._models)} model(s)"

    def setup_trainer(self, trainer: Any) -> None:
        self._trainer = trainer
        self._offload = self.config.offload
        # a plan is for the recipe's GPU: offload stays on, and the planner counts the copies as host memory
        if self._offload and _device_type(trainer) != "cuda" and not is_planning():
            self._offload = False
            rank_zero_warn(
                f"memkit: sequence.offload=True has no effect on a {_device_type(trainer)} device: the device is "
                "host memory, so the blocks' inputs stay where they are. Fix: drop sequence.offload, or train on a "
                "CUDA device."
            )

    def _check_host_memory(self, models: list[tuple[nn.Module, SequenceAdapter]], seq_len: Any) -> None:
        """Refuse offload at setup when the host cannot hold every block's input of one batch (a plan compares
        the host memory it measures with ``--cpu-memory`` instead)."""
        if not self._offload or not isinstance(seq_len, int) or is_planning():
            return
        from lightning_memkit.activations.saved import host_memory_available

        datamodule = getattr(self._trainer, "datamodule", None)
        batch = getattr(datamodule, "batch_size", None)
        batch = batch if isinstance(batch, int) and batch > 0 else 1
        need = max(offload_nbytes(len(ad.blocks), batch, seq_len, ad.lm_head.in_features,
                                  ad.lm_head.weight.element_size()) for _, ad in models)
        activations = getattr(getattr(self._trainer, "strategy", None), "activations", None)
        limit = getattr(activations, "offload_host_memory", None)
        source = "activations.offload_host_memory" if limit is not None else "the host's available memory"
        available = limit if limit is not None else host_memory_available()
        if available is not None and need > available:
            raise MemKitConfigError(
                f"sequence.offload=True needs {need / 2**30:.2f} GiB of pinned host memory for the blocks' inputs "
                f"({need} bytes: layers x batch {batch} x data.seq_len {seq_len} x hidden x element size), but "
                f"{source} is {available / 2**30:.2f} GiB ({available} bytes). Fix: lower data.seq_len or the batch "
                "size, raise activations.offload_host_memory if the host has it, or drop sequence.offload."
            )

    def setup_module(self, module: nn.Module) -> None:
        c = self.config
        models, refused = drivable_models(module)
        if refused and not models:
            raise MemKitConfigError(f"sequence={c.method!r} cannot drive the model {refused[0]}")
        if refused:
            rank_zero_warn(f"memkit: sequence={c.method!r} leaves these models to ordinary backprop: "
                f"{'; '.join(refused)}")
        for model, _ in models:
            hf = getattr(model, "hf", model)
            if getattr(hf, "is_gradient_checkpointing", False):
                rank_zero_warn(
                    "memkit: the Hugging Face model has gradient checkpointing enabled; the sequence methods run "
                    "its blocks piece by piece, so that setting has no effect. Fix: use activations='checkpoint' "
                    "(SeCO / SpaCO apply it per chunk; StreamBP needs none)."
                )
        if not models:
            raise MemKitConfigError(
                f"sequence={c.method!r} found no causal LM it can drive in {type(module).__name__}: it drives the "
                "reference Transformer, HFCausalLM, Hugging Face *ForCausalLM models of the families in "
                "docs/models.md, and models with memkit_sequence_adapter(). Fix: keep the model as an attribute of the "
                "LightningModule and "
                "compute the loss with lightning_memkit.loss.causal_lm_loss(model, input_ids, labels) (or call the "
                "Hugging Face model with labels=), or define memkit_sequence_adapter() on your model."
            )
        seq_len = getattr(getattr(self._trainer, "datamodule", None), "seq_len", None)
        for model, adapter in models:
            if c.chunk_size is not None and c.chunk_size > adapter.max_seq_len:
                raise MemKitConfigError(
                    f"sequence.chunk_size={c.chunk_size} is longer than {type(model).__name__}'s max_seq_len="
                    f"{adapter.max_seq_len}. Fix: set sequence.chunk_size <= {adapter.max_seq_len} (any length "
                    "works; it need not divide the sequence length)."
                )
            if isinstance(seq_len, int):
                try:
                    adapter.check_length(seq_len)
                except ValueError as err:
                    raise MemKitConfigError(f"data.seq_len={seq_len}: {err}") from None
        self._check_host_memory(models, seq_len)
        self._models = [m for m, _ in models]
        # left unset, the chunk is the default clamped to the shortest max_seq_len of the driven models
        self._chunk_size = c.chunk_for(min(adapter.max_seq_len for _, adapter in models))
        self._patched = [m for m in self._models if is_hf_causal_lm(m) and patch_hf_forward(m)]
        self._runtime = SequenceRuntime(dataclasses.replace(c, chunk_size=self._chunk_size, offload=self._offload),
                                        wrapped_block_call(c.method), self._draw_index,
                                        early_gradients=self.step_in_backward)
        self._checked = False

    def _draw_index(self) -> int:
        """SpaCO's draw for this micro-batch: the Trainer's batch counter (restored on resume)."""
        loop = getattr(getattr(self._trainer, "fit_loop", None), "epoch_loop", None)
        return int(loop.batch_progress.total.ready) if loop is not None else 0

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        runtime = self._runtime
        before = runtime.calls if runtime is not None else 0
        if runtime is not None:
            runtime.calls_this_step = 0
        with use_sequence(runtime):
            yield
        if not self._checked and runtime is not None:
            self._checked = True
            if runtime.calls == before:
                rank_zero_warn(
                    f"memkit: sequence={self.config.method!r} is on, but the first step computed its loss without it. "
                    "It acts through lightning_memkit.loss.causal_lm_loss(model, input_ids, labels) and Hugging Face "
                    "causal LMs called with labels=; call one of them in your step."
                )

    def step_context(self) -> contextlib.AbstractContextManager:
        return self._step()

    def teardown(self, module: nn.Module) -> None:
        for m in self._patched:
            unpatch_hf_forward(m)
        self._patched = []
        self._runtime = None


def _device_type(trainer: Any) -> str:
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return getattr(device, "type", "cpu")

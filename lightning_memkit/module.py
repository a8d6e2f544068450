"""``CausalLMModule``: the LightningModule the recipes train.

memkit never requires it: any LightningModule works with ``strategy="memkit"``. This one exists so
a recipe can name a model and train it: the reference Llama-style model by name, or a Hugging Face
causal LM from a local folder.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from lightning_memkit.config import MemKitConfigError, check_number
from lightning_memkit.export import PEFT_CHECKPOINT_KEY, peft_checkpoint_entry, save_module
from lightning_memkit.loss.causal_lm import causal_lm_loss
from lightning_memkit.models.llama import NAMED_CONFIGS, Transformer, get_config


class CausalLMModule(pl.LightningModule):
    """Next-token prediction on batches of ``{"input_ids": (B, T), "labels": (B, T)}``.

    Args:
        model: a name from :data:`~lightning_memkit.models.NAMED_CONFIGS` (the reference model), used
            when ``hf_path`` is None.
        hf_path: a local folder with a Hugging Face causal LM (the families of docs/models.md).
        vocab_size: override the named shape's vocabulary (the CLI links it to the data's tokenizer).
        max_seq_len: override the named shape's maximum sequence length.
        learning_rate, weight_decay, betas: AdamW settings (LightningCLI's ``--optimizer`` replaces
            AdamW altogether). Norms, biases and embeddings get no weight decay.
        warmup_steps: linear warm-up, then cosine decay to 10% over the Trainer's ``max_steps``.
        ignore_index: label value excluded from the loss.
    """

    def __init__(
        self,
        model: str = "small",
        hf_path: Optional[str] = None,
        vocab_size: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_number("model.learning_rate", learning_rate, minimum=0.0, min_exclusive=True)
        check_number("model.weight_decay", weight_decay, minimum=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise MemKitConfigError(f"model.betas={betas!r} must be two numbers in [0, 1). Fix: e.g. [0.9, 0.95].")
        for i, beta in enumerate(betas):
            check_number(f"model.betas[{i}]", beta, minimum=0.0, maximum=1.0, max_exclusive=True)
        check_number("model.warmup_steps", warmup_steps, minimum=0, integer=True)
        if hf_path is None and model not in NAMED_CONFIGS:
            raise MemKitConfigError(f"model.model={model!r} is not a named model shape. Fix: use one of "
                                    f"{sorted(NAMED_CONFIGS)}.")
        self.model: Optional[torch.nn.Module] = None
        self.val_loss = MeanMetric()
        self.val_history: list[float] = []  # validation perplexity after each evaluation
        self._build_model()

    def _build_model(self) -> None:
        hp = self.hparams
        if hp.hf_path is not None:
            from lightning_memkit.models.hf import load_hf_causal_lm

            self.model = load_hf_causal_lm(hp.hf_path).train()  # from_pretrained hands back eval mode
            if hp.vocab_size is not None and hp.vocab_size > self.model.vocab_size:
                raise ValueError(
                    f"the data's vocabulary ({hp.vocab_size}) is larger than the model's ({self.model.vocab_size}). "
                    "Fix: use the model's own tokenizer (data.tokenizer=<the model folder>)."
                )
        else:
            overrides = {k: hp[k] for k in ("vocab_size", "max_seq_len") if hp[k] is not None}
            self.model = Transformer(get_config(hp.model, **overrides))

    def save_pretrained(self, folder: str, **kwargs: Any) -> None:
        """Save the Hugging Face model (``hf_path`` models) and the ``hf_path`` folder's tokenizer into ``folder``.

        ``AutoModelForCausalLM.from_pretrained(folder)`` then loads it. Call it on one process, on whole weights
        (not inside a ZeRO-3 run: export a checkpoint with :func:`lightning_memkit.export.export_checkpoint`).

        Args:
            folder: where to write.
            kwargs: passed to the model's ``save_pretrained``. A PEFT model writes its adapters alone, or a merged
                copy with ``merge_lora=True`` (the live module keeps its adapters).

        Raises:
            MemKitConfigError: the module holds the reference model, or ZeRO-3 partitions its parameters.
        """
        save_module(self, folder, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record a PEFT (LoRA) model's adapter configuration, so ``memkit export`` can rebuild it."""
        entry = peft_checkpoint_entry(getattr(self.model, "hf", self.model))
        if entry is not None:
            checkpoint[PEFT_CHECKPOINT_KEY] = entry

    @property
    def max_seq_len(self) -> int:
        return int(self.model.max_seq_len)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        # fused (no logits) when the strategy's cross_entropy="fused" is active, plain otherwise
        return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], ignore_index=self.hparams.ignore_index)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.max_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} is above the model's maximum sequence length {self.max_seq_len}. "
                f"Fix: set data.seq_len <= {self.max_seq_len} (or model.max_seq_len higher for the reference model)."
            )
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.model.vocab_size:
            raise ValueError(
                f"the tokenizer's vocabulary ({vocab}) is larger than the model's ({self.model.vocab_size}). "
                f"Fix: set model.vocab_size={vocab} (the memkit CLI links it for you)."
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.loss(batch)
        tokens = (batch["labels"] != self.hparams.ignore_index).sum()
        self.val_loss.update(loss, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # token-weighted mean over all processes
        self.val_loss.reset()
        ppl = math.exp(min(loss.item(), 50.0))
        self.log_dict({"val_loss": loss, "val_ppl": ppl}, prog_bar=True, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.val_history.append(ppl)

    def on_fit_end(self) -> None:
        if self.val_history:
            first, last = self.val_history[0], self.val_history[-1]
            self.print(
                f"validation perplexity: first evaluation {first:.2f}, final {last:.2f} "
                f"({len(self.val_history)} evaluations)"
            )

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # a group left empty (a LoRA model's norms are all frozen) is left out: DeepSpeed would drop it, and the
        # LR scheduler built over both groups would then fail at its first step
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate, betas=tuple(hp.betas))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        warmup = hp.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if total is None or total <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / (total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

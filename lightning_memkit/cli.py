"""The ``memkit`` console script: LightningCLI with lightning_memkit's additions.

    memkit fit --config recipes/quickstart.yaml
    memkit fit --config recipes/quickstart.yaml --trainer.max_steps=50
    memkit fit --config recipes/quickstart.yaml --print_config

Any LightningModule / LightningDataModule can be named by ``class_path``. Unknown keys fail with the
key named (jsonargparse's strict parsing). When the model is :class:`CausalLMModule` without a
``vocab_size`` and the data is :class:`TextDataModule`, the tokenizer's vocabulary size is filled in.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

import lightning_memkit  # noqa: F401  (registers the memkit strategy names)
from lightning_memkit.config import MemKitConfigError
from lightning_memkit.strategy import PRESETS

_MODULE = "lightning_memkit.module.CausalLMModule"
_DATA = "lightning_memkit.data.text.TextDataModule"


def _class_path(node: Any) -> str:
    path = getattr(node, "class_path", None) or (node.get("class_path") if hasattr(node, "get") else None) or ""
    aliases = {"lightning_memkit.CausalLMModule": _MODULE, "lightning_memkit.TextDataModule": _DATA,
               "lightning_memkit.data.TextDataModule": _DATA}
    return aliases.get(path, path)


class MemKitCLI(LightningCLI):
    """LightningCLI that checks memkit strategy names and fills in the vocabulary size."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = config.trainer.strategy
        if isinstance(strategy, str) and strategy.startswith("memkit") and strategy not in PRESETS:
            raise MemKitConfigError(
                f"trainer.strategy={strategy!r} is not a memkit preset. Fix: use one of {sorted(PRESETS)}, "
                "or class_path: lightning_memkit.MemKitStrategy with init_args."
            )
        model, data = config.get("model"), config.get("data")
        if _class_path(model) == _MODULE and _class_path(data) == _DATA and model.init_args.vocab_size is None:
            from lightning_memkit.data.tokenizers import load_tokenizer

            model.init_args.vocab_size = load_tokenizer(data.init_args.tokenizer).vocab_size


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``memkit`` console script."""
    MemKitCLI(save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])

"""Building a recipe's objects: ``MemKitCLI`` (LightningCLI with memkit's checks) and its error messages.

The ``memkit`` console script (:mod:`lightning_memkit.cli`) and the planner (:mod:`lightning_memkit.planner.load`)
both build a recipe's model, data and strategy through :class:`MemKitCLI`; neither library code nor the planner
imports the command line itself.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

import lightning_memkit  # noqa: F401  (registers the memkit strategy names)
from lightning_memkit.config import MemKitConfigError, recorded_errors
from lightning_memkit.strategy import PRESETS

_MODULE = "lightning_memkit.module.CausalLMModule"
_DATA = "lightning_memkit.data.text.TextDataModule"


def _class_path(node: Any) -> str:
    path = getattr(node, "class_path", None) or (node.get("class_path") if hasattr(node, "get") else None) or ""
    aliases = {"lightning_memkit.CausalLMModule": _MODULE, "lightning_memkit.TextDataModule": _DATA,
               "lightning_memkit.data.TextDataModule": _DATA}
    return aliases.get(path, path)


DEBUG_FLAG, DEBUG_ENV = "--debug", "MEMKIT_DEBUG"
BUILDING_NOTE = "memkit: raised while building the recipe's objects"

# lines of jsonargparse's messages that describe its own machinery, not the user's value
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Given value:")


def memkit_cause(err: BaseException, seen: Optional[list[MemKitConfigError]] = None) -> Optional[MemKitConfigError]:
    """The MemKitConfigError behind ``err``: ``err`` itself, one in its ``__cause__`` / ``__context__`` chain, or
    the last of ``seen`` (recorded while ``err`` was raised) whose message ``err``'s text contains."""
    node: Optional[BaseException] = err
    chain: set[int] = set()
    while node is not None and id(node) not in chain:
        if isinstance(node, MemKitConfigError):
            return node
        chain.add(id(node))
        node = node.__cause__ or node.__context__
    text = str(err)
    for candidate in reversed(seen or []):
        first = str(candidate).strip().splitlines()[0] if str(candidate).strip() else ""
        if first and first[:200] in text:
            return candidate
    return None


def short_message(err: BaseException, max_lines: int = 3) -> str:
    """``err``'s message without jsonargparse's Union machinery (the subtypes tried, "Expected a <class 'str'>"
    when another subtype says what is wrong, the whole value echoed back), in at most ``max_lines`` lines."""
    lines: list[str] = []
    for raw in str(err).splitlines():
        line = raw.strip()
        if line.startswith("- "):
            line = line[2:].strip()
        if not line or line.startswith(_NOISE) or line in lines:
            continue
        if lines and lines[-1].endswith(":"):  # a header such as 'Parser key "model":' joins what it heads
            lines[-1] = f"{lines[-1]} {line}"
        else:
            lines.append(line)
    specific = [line for line in lines if "Expected a <class" not in line]
    if specific:  # another subtype of a Union says what is wrong
        lines = specific
    if not lines:
        lines = [type(err).__name__]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += f" ... (more with {DEBUG_FLAG})"
    return "\n".join(line if len(line) <= 1200 else line[:1200] + " ..." for line in lines)


class MemKitCLI(LightningCLI):
    """LightningCLI that checks memkit strategy names, fills in the vocabulary size, and raises the memkit
    error behind a class that cannot be built (jsonargparse's own error buries it in Union machinery)."""

    def instantiate_classes(self) -> None:
        with recorded_errors() as seen:
            try:
                super().instantiate_classes()
            except MemKitConfigError:
                raise
            except Exception as err:
                cause = memkit_cause(err, seen)
                if cause is None:  # main() shows it short, as a recipe error (add_note is Python 3.11+)
                    err.__notes__ = [*getattr(err, "__notes__", []), BUILDING_NOTE]
                    raise
                raise cause from err

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

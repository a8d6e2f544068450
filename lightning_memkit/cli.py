"""The ``memkit`` console script: LightningCLI with lightning_memkit's additions.

    memkit fit --config recipes/quickstart.yaml
    memkit fit --config recipes/quickstart.yaml --trainer.max_steps=50
    memkit fit --config recipes/quickstart.yaml --print_config
    memkit plan --config recipes/llama3_8b_24gb.yaml --gpu-memory 24GiB --compare --plot plan.png
    memkit verify --config recipes/quickstart.yaml --model.init_args.model=tiny

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


PLAN_HELP = """memkit plan --config RECIPE.yaml [--gpu-memory 24GiB] [--cpu-memory 64GiB] [--compare] [--plot out.png]
            [--exact-only] [--max-seq-len] [any memkit fit override, e.g. --data.init_args.seq_len=8192]

Runs one full-size training step of the recipe's model and techniques on fake tensors (nothing is
allocated) and prints the peak device memory by category and whether it fits."""

VERIFY_HELP = """memkit verify --config RECIPE.yaml [--seed 0] [any memkit fit override, e.g. --model.init_args.model=tiny]

Runs one batch of the recipe's data with and without each technique (real tensors, on the CPU) and
reports the gradient and update differences; exact techniques must match to the dtype's tolerance."""


def _planner_args(name: str, usage: str, args: list[str]) -> tuple[Any, list[str]]:
    import argparse

    parser = argparse.ArgumentParser(prog=f"memkit {name}", usage=usage, add_help=True)
    parser.add_argument("--config", action="append", required=True, help="the recipe (repeatable)")
    if name == "plan":
        parser.add_argument("--gpu-memory", default=None, help="device memory budget, e.g. 24GiB")
        parser.add_argument("--cpu-memory", default=None, help="host memory budget (ZeRO offload), e.g. 64GiB")
        parser.add_argument("--compare", action="store_true", help="rank the candidate combinations that fit")
        parser.add_argument("--plot", default=None, help="write a stacked bar chart per candidate (PNG)")
        parser.add_argument("--exact-only", action="store_true", help="leave approximate optimizers out of --compare")
        parser.add_argument("--max-seq-len", action="store_true",
                            help="find the longest data.seq_len (multiple of 1024) that fits --gpu-memory")
    else:
        parser.add_argument("--seed", type=int, default=0)
    return parser.parse_known_args(args)


def plan_main(args: list[str]) -> int:
    """``memkit plan``."""
    from lightning_memkit.planner.plans import longest_sequence, plan, plot

    opts, overrides = _planner_args("plan", PLAN_HELP, args)
    if opts.max_seq_len:
        if opts.gpu_memory is None:
            raise MemKitConfigError("memkit plan --max-seq-len needs --gpu-memory (the budget to fill).")
        length, row, capped = longest_sequence(opts.config, overrides, gpu_memory=opts.gpu_memory,
                                               cpu_memory=opts.cpu_memory)
        if row is None:
            print(f"nothing fits {opts.gpu_memory}, even at 1024 tokens")
            return 1
        print(f"longest data.seq_len that fits {opts.gpu_memory}: {'at least ' if capped else ''}{length} "
              f"(peak {row.peak / 2**30:.2f} GiB)")
        return 0
    result = plan(opts.config, overrides, gpu_memory=opts.gpu_memory, cpu_memory=opts.cpu_memory,
                  compare=opts.compare or opts.plot is not None, allow_approximate=not opts.exact_only)
    print(result.description)
    print(result.table())
    if opts.compare:
        print()
        print(result.comparison())
    if opts.plot:
        plot(result.rows, opts.plot, result.gpu_memory, title=result.description)
        print(f"plot written to {opts.plot}")
    return 0 if result.recipe.fits is not False else 1


def verify_main(args: list[str]) -> int:
    """``memkit verify``."""
    from lightning_memkit.planner.verify import format_checks, verify

    opts, overrides = _planner_args("verify", VERIFY_HELP, args)
    checks, description = verify(opts.config, overrides, seed=opts.seed)
    print(description)
    print(format_checks(checks))
    return 0 if all(c.passed for c in checks) else 1


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``memkit`` console script (``plan`` and ``verify`` are memkit's; the rest is LightningCLI)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("plan", "verify"):
        from lightning_memkit.planner.step import StepError

        try:
            code = (plan_main if argv[0] == "plan" else verify_main)(argv[1:])
        except (MemKitConfigError, StepError) as err:
            print(f"memkit {argv[0]}: {err}", file=sys.stderr)
            code = 2
        sys.exit(code)
    MemKitCLI(save_config_kwargs={"overwrite": True}, args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":  # pragma: no cover
    main()

"""The ``memkit`` console script: LightningCLI with lightning_memkit's additions.

    memkit recipes                                   # the shipped recipes: what each trains, budget, planned peak
    memkit fit --config quickstart                   # a shipped recipe by name (recipes/quickstart.yaml)
    memkit fit --config recipes/quickstart.yaml --trainer.max_steps=50
    memkit fit --config recipes/quickstart.yaml --print_config
    memkit plan --config recipes/llama3_8b_full_24gb.yaml --gpu-memory 24GiB --compare --plot plan.png
    memkit verify --config recipes/quickstart.yaml --model.init_args.model=tiny
    memkit recipes quickstart > my_recipe.yaml       # a copy to edit

``--config NAME`` takes a shipped recipe (:mod:`lightning_memkit.recipes`) by name, with or without ``.yaml`` or
``recipes/``, when no such file exists; a name that matches nothing ends the command listing the shipped names.
Any LightningModule / LightningDataModule can be named by ``class_path``. Unknown keys fail with the
key named (jsonargparse's strict parsing). A bad value in a recipe ends the command with the message in a
few lines on stderr and exit code 2; ``--debug`` (anywhere on the command line) or ``MEMKIT_DEBUG=1``
shows the full traceback instead. When the model is :class:`CausalLMModule` without a
``vocab_size`` and the data is :class:`TextDataModule`, the tokenizer's vocabulary size is filled in.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Optional

import lightning_memkit  # noqa: F401  (registers the memkit strategy names)
from lightning_memkit.config import MemKitConfigError
from lightning_memkit.export import main as export_main
from lightning_memkit.recipe import BUILDING_NOTE, DEBUG_ENV, DEBUG_FLAG, MemKitCLI, short_message

PLAN_HELP = """memkit plan --config RECIPE [--gpu-memory 24GiB] [--cpu-memory 64GiB] [--compare] [--plot out.png]
            [--exact-only] [--max-seq-len] [any memkit fit override, e.g. --data.init_args.seq_len=8192]

Runs one full-size training step of the recipe's model and techniques on fake tensors (nothing is
allocated) and prints the peak device memory by category and whether it fits. --compare and --max-seq-len
print a line per candidate / length on stderr as it is measured; the result goes to stdout.
RECIPE is a YAML file or the name of a shipped recipe (memkit recipes lists them)."""

VERIFY_HELP = """memkit verify --config RECIPE [--seed 0] [any memkit fit override, e.g. --model.init_args.model=tiny]

Runs one batch of the recipe's data with and without each technique (real tensors, on the CPU) and
reports the gradient and update differences; exact techniques must match to the dtype's tolerance.
RECIPE is a YAML file or the name of a shipped recipe (memkit recipes lists them)."""

RECIPES_HELP = """memkit recipes [NAME]

Without NAME: a table of the recipes shipped with memkit: what each trains, the memory budget it is sized
for and the peak `memkit plan` measures for it (both from the recipe's header comment; "-" when it states
none). With NAME: the recipe's YAML on stdout, e.g. memkit recipes quickstart > my_recipe.yaml to edit a copy.
Any command's --config NAME runs a shipped recipe by name."""

#: memkit's own subcommands, one line each (``memkit --help`` lists them above LightningCLI's); main() runs each
#: with the function ``_MEMKIT_MAINS`` gives it
MEMKIT_COMMANDS = {
    "plan": "will it fit? peak memory of one full-size step on fake tensors (--compare, --max-seq-len)",
    "verify": "one batch with and without each technique: gradients and updates against the plain step",
    "recipes": "the shipped recipes: what each trains, its memory budget and planned peak (NAME: its YAML)",
    "export": "write a checkpoint (file or ZeRO folder) of an hf_path model as a Hugging Face folder",
}
CONFIG_FLAGS = ("--config", "-c")  # LightningCLI's names of the option; plan and verify take --config


def _help_section() -> str:
    config = f"{CONFIG_FLAGS[0]} NAME"
    width = max(len(name) for name in (*MEMKIT_COMMANDS, DEBUG_FLAG, config))
    lines = ["memkit's own subcommands (memkit SUBCOMMAND --help for their options):"]
    lines += [f"    {name:<{width}}  {text}" for name, text in MEMKIT_COMMANDS.items()]
    lines.append(f"    {config:<{width}}  (fit, validate, plan, verify, ...) a shipped recipe by name, "
                 "e.g. --config quickstart")
    lines.append(f"    {DEBUG_FLAG:<{width}}  (any subcommand) errors with their full traceback (or {DEBUG_ENV}=1)")
    lines.append("LightningCLI's subcommands (fit, validate, test, predict):")
    return "\n".join(lines)


def _planner_args(name: str, usage: str, args: list[str]) -> tuple[Any, list[str]]:
    parser = argparse.ArgumentParser(prog=f"memkit {name}", usage=usage, add_help=True)
    parser.add_argument("--config", action="append", required=True, help="the recipe (repeatable)")
    if name == "plan":
        parser.add_argument("--gpu-memory", default=None, help="device memory budget, e.g. 24GiB")
        parser.add_argument("--cpu-memory", default=None, help="host memory budget (ZeRO offload), e.g. 64GiB")
        parser.add_argument("--compare", action="store_true", help="rank the candidate combinations that fit")
        parser.add_argument("--plot", default=None, help="write a stacked bar chart per candidate (PNG)")
        parser.add_argument("--exact-only", action="store_true", help="leave approximate optimizers out of --compare")
        parser.add_argument("--max-seq-len", action="store_true",
                            help="find the longest sequence (multiple of 1024) that fits --gpu-memory: varies the "
                                 "data's seq_len, and the model's max_seq_len when it takes one")
    else:
        parser.add_argument("--seed", type=int, default=0)
    return parser.parse_known_args(args)


def _progress_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def plan_main(args: list[str]) -> int:
    """``memkit plan``."""
    from lightning_memkit.planner.plans import describe_row, longest_sequence, plan, plot

    opts, overrides = _planner_args("plan", PLAN_HELP, args)
    if opts.max_seq_len:
        if opts.gpu_memory is None:
            raise MemKitConfigError("memkit plan --max-seq-len needs --gpu-memory (the budget to fill). "
                                    "Fix: add e.g. --gpu-memory 24GiB.")
        found = longest_sequence(
            opts.config, overrides, gpu_memory=opts.gpu_memory, cpu_memory=opts.cpu_memory,
            progress=lambda i, length, row: _progress_line(f"[{i}] {length} tokens: {describe_row(row, named=False)}"))
        from lightning_memkit.units import human_bytes

        varied = " and ".join(a.lstrip("-") for a in found.varies)
        measured = ", ".join(f"{n} ({human_bytes(r.peak)}, {'fits' if r.fits else 'does not fit'})"
                             if r.result is not None else f"{n} (cannot run)" for n, r in found.tried)
        if found.per_token is not None:
            off = f"planned {human_bytes(found.error)} off the line at the predicted {found.predicted} tokens"
            how = ("no length between them to predict" if found.error is None else off if found.linear else
                   f"{off}: not linear, the lengths between were bisected")
            print(f"device cost per token: {found.per_token / 2**10:.1f} KiB/token (line through the first two "
                  f"lengths, {human_bytes(found.fixed)} at 0 tokens; {how})")
        print(f"planned {len(found.tried)} lengths: {measured}")
        if found.row is None:
            print(f"nothing fits {opts.gpu_memory}, even at 1024 tokens (varied {varied})")
            return 1
        print(f"longest sequence that fits {opts.gpu_memory}: {'at least ' if found.capped else ''}{found.length} "
              f"tokens (peak {found.row.peak / 2**30:.2f} GiB; varied {varied})")
        return 0
    result = plan(opts.config, overrides, gpu_memory=opts.gpu_memory, cpu_memory=opts.cpu_memory,
                  compare=opts.compare or opts.plot is not None, allow_approximate=not opts.exact_only,
                  progress=lambda i, n, row: _progress_line(f"[{i}/{n}] {describe_row(row)}"))
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


def recipes_main(args: list[str]) -> int:
    """``memkit recipes [NAME]``: the table of the shipped recipes, or one recipe's YAML.

    Args:
        args: the arguments after ``recipes``.

    Raises:
        MemKitConfigError: NAME is no shipped recipe (the message lists them).
    """
    from lightning_memkit.recipes import RECIPES_DIR, find_recipe, list_recipes

    parser = argparse.ArgumentParser(prog="memkit recipes", usage=RECIPES_HELP, add_help=True)
    parser.add_argument("name", nargs="?", default=None, help="a shipped recipe: print its YAML")
    opts = parser.parse_args(args)
    if opts.name is not None:
        path = find_recipe(opts.name, key="NAME")
        print(path.read_text(encoding="utf-8"), end="")
        return 0
    header = ("name", "budget", "planned peak", "trains")
    rows = [header] + [(r.name, r.budget, r.planned_peak, r.trains) for r in list_recipes()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[-1])
    print(f"\nRun one: memkit fit --config NAME. Check it: memkit plan --config NAME --gpu-memory 24GiB. "
          f"Edit a copy: memkit recipes NAME > my_recipe.yaml.\n(files in {RECIPES_DIR})")
    return 0


#: memkit's own subcommands (MEMKIT_COMMANDS) -> the function that runs one and returns its exit code
_MEMKIT_MAINS = {"plan": plan_main, "verify": verify_main, "recipes": recipes_main, "export": export_main}


def _looks_like_a_path(value: str) -> bool:
    """A file name or path, not a YAML document (jsonargparse's ``--config`` takes either)."""
    return bool(re.fullmatch(r"[\w.~/\\-]+", value))


def resolve_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config NAME`` that is no file replaced by the shipped recipe's path.

    Args:
        argv: the command line (``--config X``, ``--config=X`` or ``-c X``; X a path, a name or a YAML document).

    Raises:
        MemKitConfigError: a ``--config`` value that is no file and no shipped recipe's name.
    """
    from lightning_memkit.recipes import find_recipe

    out = list(argv)
    for i, arg in enumerate(out):
        flag, sep, value = arg.partition("=")
        if flag not in CONFIG_FLAGS or (not sep and i + 1 >= len(out)):
            continue
        value = value if sep else out[i + 1]
        if os.path.exists(value) or not _looks_like_a_path(value):
            continue
        path = str(find_recipe(value))
        if sep:
            out[i] = f"{flag}={path}"
        else:
            out[i + 1] = path
    return out


def _is_recipe_error(err: BaseException) -> bool:
    """A parse error, a memkit setting, or a class of the recipe that cannot be built (not a crash in training)."""
    return (isinstance(err, (argparse.ArgumentError, MemKitConfigError))
            or BUILDING_NOTE in getattr(err, "__notes__", ()))


def _fail(command: str, err: BaseException) -> None:
    """Print ``err`` in at most 5 lines on stderr and exit with code 2."""
    prog = f"memkit {command}".strip()
    lines = [f"{prog}: {short_message(err, max_lines=2)}"]
    tip = f"{prog} --help lists the accepted options; " if isinstance(err, argparse.ArgumentError) else ""
    lines.append(f"({tip}{DEBUG_FLAG} or {DEBUG_ENV}=1 shows the full traceback)")
    print("\n".join(lines), file=sys.stderr)
    sys.exit(2)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``memkit`` console script (MEMKIT_COMMANDS are memkit's; the rest is LightningCLI).

    ``--debug`` is memkit's (taken out before LightningCLI sees the arguments): errors show their full traceback.
    ``--config NAME`` finds a shipped recipe by name when no such file exists (:func:`resolve_configs`).
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    if command != "recipes":
        try:
            argv = resolve_configs(argv)
        except MemKitConfigError as err:
            if debug:
                raise
            _fail(command, err)
    if command in _MEMKIT_MAINS:
        from lightning_memkit.planner.step import StepError

        try:
            code = _MEMKIT_MAINS[command](argv[1:])
        except (MemKitConfigError, StepError) as err:
            if debug:
                raise
            _fail(command, err)
        sys.exit(code)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help_section() + "\n")
    saved_argv = sys.argv
    # LightningCLI reads sys.argv (without --debug); a DDP launcher re-runs this command from it, too
    sys.argv = [saved_argv[0] if saved_argv else "memkit", *argv]
    try:
        MemKitCLI(save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except Exception as err:
        if debug or not _is_recipe_error(err):
            raise
        _fail(command, err)
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":  # pragma: no cover
    main()

"""What a user sees for each fault a real run meets: a bad value, a changed setting on resume, a damaged
checkpoint, a missing backend. Every case runs the real thing in this process (tiny model, CPU) and the
table shows when it stopped (before the first training step, or not at all) and the first line of what it
said. The kill / resume faults run in subprocesses in ``tests/test_resume.py``; their outcomes are the
tests' assertions (docs/faults.md gives both).

    python benchmarks/faults.py [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import warnings
from typing import Any, Callable

os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_memkit import MemKitStrategy  # noqa: E402
from lightning_memkit.module import CausalLMModule  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES: list[tuple[str, str, Callable[[str], Any]]] = []  # (group, fault, run(workdir) -> what it said)


def case(group: str, fault: str) -> Callable:
    def register(fn: Callable) -> Callable:
        CASES.append((group, fault, fn))
        return fn
    return register


class Counting(CausalLMModule):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(model="tiny", vocab_size=258, learning_rate=3e-3, warmup_steps=0, **kwargs)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


def _loader() -> DataLoader:
    ids = torch.randint(0, 258, (4, 65), generator=torch.Generator().manual_seed(1))
    return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=4)


def fit(workdir: str, steps: int = 2, ckpt_path: Any = None, save: bool = False, module: Any = None,
        **strategy: Any) -> Counting:
    """Fit the tiny model; returns the module (its ``steps_run`` says how far the fit got)."""
    pl.seed_everything(0, verbose=False)
    module = module or Counting()
    callbacks = [ModelCheckpoint(dirpath=workdir, filename="saved", every_n_train_steps=steps)] if save else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy.pop("lightning", None) or
                         MemKitStrategy(**strategy), max_steps=steps, logger=False, enable_checkpointing=save,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=workdir)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    module.trainer_ = trainer
    return module


def resume_with(saved: dict, resumed: dict) -> Callable[[str], Any]:
    def run(workdir: str) -> Any:
        fit(workdir, save=True, **saved)
        module = Counting()
        try:
            fit(workdir + "/r", steps=4, ckpt_path=os.path.join(workdir, "saved.ckpt"), module=module, **resumed)
        finally:
            CURRENT["steps"] = module.steps_run
    return run


CURRENT: dict[str, Any] = {}
GALORE8 = {"name": "galore_adamw8bit", "rank": 8}

case("changed settings", "AdamW checkpoint resumed with `optimizer='galore_adamw8bit'`")(
    resume_with({}, {"optimizer": "galore_adamw8bit"}))
case("changed settings", "GaLore-8bit rank 8 resumed with `rank: 4`")(
    resume_with({"optimizer": GALORE8}, {"optimizer": {**GALORE8, "rank": 4}}))
case("changed settings", "GaLore-8bit resumed with APOLLO-Mini in backward")(
    resume_with({"optimizer": GALORE8}, {"optimizer": {"name": "apollo_mini", "in_backward": True}}))
case("changed settings", "APOLLO-Mini resumed with the module's own AdamW")(
    resume_with({"optimizer": "apollo_mini"}, {}))
case("changed settings", "a checkpoint of Lightning's own strategy (no memkit record) resumed with APOLLO-Mini")(
    resume_with({"lightning": "auto"}, {"optimizer": "apollo_mini"}))
case("changed settings", "`activations='checkpoint'` turned on at resume")(
    resume_with({}, {"activations": "checkpoint"}))
case("changed settings", "other optimizer, `resume='weights'`")(
    resume_with({}, {"optimizer": GALORE8, "resume": "weights"}))


@case("changed settings", "`data.batch_size` 4 -> 8 at a mid-epoch resume (TextDataModule)")
def _batch_size(workdir: str) -> Any:
    from lightning_memkit.data import TextDataModule, stdlib_dir

    def run(batch_size: int, ckpt_path: Any, module: Counting) -> None:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MemKitStrategy(), max_steps=4, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             callbacks=[ModelCheckpoint(dirpath=workdir, filename="saved", every_n_train_steps=2)],
                             default_root_dir=workdir)
        data = TextDataModule(paths=os.path.join(stdlib_dir(), "email"), seq_len=32, batch_size=batch_size)
        trainer.fit(module, data, ckpt_path=ckpt_path)

    run(4, None, Counting())
    module = Counting()
    try:
        run(8, os.path.join(workdir, "saved.ckpt"), module)
    finally:
        CURRENT["steps"] = module.steps_run


def damaged(how: str) -> Callable[[str], Any]:
    def run(workdir: str) -> Any:
        fit(workdir, save=True)
        good = open(os.path.join(workdir, "saved.ckpt"), "rb").read()
        bad = os.path.join(workdir, "bad.ckpt")
        if how == "empty":
            data = b""
        elif how == "truncated":
            data = good[: len(good) // 2]
        else:  # 4 KiB overwritten in the middle of the file (inside a tensor)
            middle = len(good) // 2
            data = good[:middle] + bytes(4096) + good[middle + 4096:]
        with open(bad, "wb") as f:
            f.write(data)
        module = Counting()
        try:
            fit(workdir + "/r", steps=3, ckpt_path=bad if how != "missing" else workdir + "/nothing.ckpt",
                module=module)
        finally:
            CURRENT["steps"] = module.steps_run
    return run


for _how, _what in (("empty", "an empty checkpoint file"), ("truncated", "a checkpoint cut to half its size"),
                    ("overwritten", "4 KiB of a checkpoint overwritten with zeros"),
                    ("missing", "a `ckpt_path` that does not exist")):
    case("damaged checkpoints", _what)(damaged(_how))


@case("damaged checkpoints", "a ZeRO checkpoint folder resumed on the DDP backend")
def _zero_folder(workdir: str) -> Any:
    os.makedirs(os.path.join(workdir, "last.ckpt", "checkpoint"))
    fit(workdir + "/r", ckpt_path=os.path.join(workdir, "last.ckpt"))


@case("bad values", "`optimizer={name: apollo_mini, scale: nan}` (Python)")
def _nan_scale(workdir: str) -> Any:
    MemKitStrategy(optimizer={"name": "apollo_mini", "scale": float("nan")})


@case("bad values", "`norm_growth_limit: .inf` in a recipe (LightningCLI)")
def _inf_recipe(workdir: str) -> Any:
    return _memkit_cli(workdir, ["fit"], "      cross_entropy: fused",
                       "      optimizer: {name: apollo, norm_growth_limit: .inf}")


@case("bad values", "`optimizer: bogus` in a recipe, `memkit fit`")
def _bogus_recipe(workdir: str) -> Any:
    return _memkit_cli(workdir, ["fit"], "      cross_entropy: fused", "      optimizer: bogus")


@case("bad values", "a typo in a recipe key (`max_stepz`), `memkit fit`")
def _typo(workdir: str) -> Any:
    return _memkit_cli(workdir, ["fit"], "  max_steps:", "  max_stepz:")


@case("bad values", "`model: tinny`, `memkit plan`")
def _tinny(workdir: str) -> Any:
    return _memkit_cli(workdir, ["plan"], None, None, ["--model.init_args.model=tinny"])


@case("bad values", "compression and checkpointing of the same blocks named by `modules`")
def _compress_checkpointed(workdir: str) -> Any:
    module = Counting()
    try:
        fit(workdir, module=module, activations={"checkpoint": "blocks", "compress": "int8",
                                                 "modules": ["model.blocks.*"]})
    finally:
        CURRENT["steps"] = module.steps_run


@case("missing backend", "`cross_entropy={impl: triton}` on a CPU-only machine")
def _triton_cpu(workdir: str) -> Any:
    module = Counting()
    saved = os.environ.pop("TRITON_INTERPRET")
    try:
        fit(workdir, module=module, cross_entropy={"impl": "triton"})
    finally:
        os.environ["TRITON_INTERPRET"] = saved
        CURRENT["steps"] = module.steps_run


@case("missing backend", "`optimizer='galore_adamw8bit'` without bitsandbytes")
def _no_bnb(workdir: str) -> Any:
    module = Counting()
    hidden = {k: sys.modules[k] for k in list(sys.modules) if k == "bitsandbytes" or k.startswith("bitsandbytes.")}
    names = {*hidden, "bitsandbytes"}
    sys.modules.update({k: None for k in names})  # an import of it now fails, as on a machine without it
    try:
        fit(workdir, module=module, optimizer=GALORE8)
    finally:
        for k in names:
            del sys.modules[k]
        sys.modules.update(hidden)
        CURRENT["steps"] = module.steps_run


@case("defaults on a small model", "`optimizer='galore_adamw'` (default rank 128) on a 64-wide model")
def _default_rank(workdir: str) -> Any:
    module = fit(workdir, optimizer="galore_adamw")
    CURRENT["steps"] = module.steps_run
    return module.trainer_.strategy.techniques[-1].describe()


def _memkit_cli(workdir: str, command: list[str], old: Any, new: Any, extra: tuple = ()) -> str:
    """``memkit <command> --config <quickstart with old->new>``: exit code, and stderr's line count and text."""
    from lightning_memkit.cli import main

    recipe = open(os.path.join(ROOT, "recipes", "quickstart.yaml")).read()
    if old is not None:
        assert old in recipe, old
        recipe = recipe.replace(old, new)
    path = os.path.join(workdir, "recipe.yaml")
    with open(path, "w") as f:
        f.write(recipe)
    err = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*command, "--config", path, *extra])
        except SystemExit as stop:
            code = stop.code
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith("Seed set")]
    CURRENT["exit"] = code
    return f"exit {code}, {len(lines)} lines: " + " / ".join(lines)


def run_all() -> list[tuple[str, str, str, str]]:
    rows = []
    for group, fault, fn in CASES:
        CURRENT.clear()
        with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                said = fn(workdir)
                outcome = "runs" if "exit" not in CURRENT else ("refused" if CURRENT["exit"] else "runs")
                said = said if isinstance(said, str) else "(no error)"
            except BaseException as error:  # noqa: BLE001 - every fault is reported, not raised
                outcome = f"{type(error).__name__}"
                said = str(error).splitlines()[0] if str(error) else type(error).__name__
        when = "" if "steps" not in CURRENT else (
            "before step 1" if CURRENT["steps"] == 0 else f"after {CURRENT['steps']} step(s)")
        rows.append((group, fault, f"{outcome} {when}".strip(), said))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    rows = run_all()
    if args.markdown:
        print("| fault | outcome | what the user sees (first line) |\n|---|---|---|")
        for _, fault, outcome, said in rows:
            print(f"| {fault} | {outcome} | {said.replace('|', '/')} |")
    else:
        for group, fault, outcome, said in rows:
            print(f"[{group}] {fault}\n    {outcome}: {said}\n")


if __name__ == "__main__":
    main()

"""Build what a recipe describes (module, Trainer, datamodule) and one batch, on fake tensors or real ones.

``memkit plan`` builds the recipe's model at full size inside ``FakeTensorMode`` (nothing is
allocated; an 8B model takes seconds), in the dtype its ``trainer.precision`` trains in. A model that
cannot be built there (it reads a file, calls ``.item()`` or ``.numpy()`` on a weight, ...) is refused
with the module that failed named.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_memkit.config import MemKitConfigError, planning
from lightning_memkit.planner.fake import WEIGHT_DTYPES, make_batch, swap_to_fake, weight_dtype  # noqa: F401

class ModelBuildError(MemKitConfigError):
    """The recipe's model cannot be built on the fake (or meta) device; the message names the part."""


@dataclass
class Loaded:
    """A recipe's objects: the LightningModule (attached to the Trainer), the Trainer, the datamodule, and
    the fake mode they were built in (None: real tensors)."""

    module: Any
    trainer: Any
    datamodule: Any
    fake_mode: Any
    config: Any


def _first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, without jsonargparse's Union machinery."""
    from lightning_memkit.recipe import short_message

    text = short_message(err, max_lines=1).strip().splitlines()
    return text[0] if text else type(err).__name__


# errors a constructor raises about its arguments (a value in the recipe), as opposed to the meta device
_ARGUMENT_ERRORS = (ValueError, TypeError, KeyError, LookupError)


def _failing_part(model_config: Any, err: BaseException) -> Optional[tuple[str, BaseException]]:
    """The innermost module being built (``__init__`` of an ``nn.Module``) when the model's construction
    fails, and the exception it raised. jsonargparse wraps the error without its traceback (and often its
    message in Union machinery), so the model class is built once more here (same device/dtype context)."""
    import importlib

    failure: Optional[BaseException] = None
    try:
        path = model_config.class_path
        init = model_config.get("init_args")
        kwargs = init.as_dict() if hasattr(init, "as_dict") else dict(init or {})
        module_name, _, cls_name = path.rpartition(".")
        getattr(importlib.import_module(module_name), cls_name)(**kwargs)
    except Exception as again:  # noqa: BLE001 - the failure we are looking for
        failure = again
    if failure is None:
        return None
    return _innermost_module(failure) or f"{model_config.class_path} (outside any nn.Module.__init__)", failure


def _innermost_module(err: BaseException) -> Optional[str]:
    """The innermost ``nn.Module.__init__`` (class and line) in ``err``'s traceback."""
    part = None
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(owner, nn.Module):
            part = f"{type(owner).__qualname__} ({frame.f_code.co_filename}:{lineno})"
    return part


def load(config: Union[str, Sequence[str]], overrides: Sequence[str] = (), *, fake: bool = True) -> Loaded:
    """Build the objects of a LightningCLI recipe without training.

    Args:
        config: the YAML file(s) given to ``--config``.
        overrides: more command-line arguments, such as ``["--model.init_args.model=tiny"]``.
        fake: build inside ``FakeTensorMode`` (full size, nothing allocated).

    Raises:
        MemKitConfigError: the recipe does not parse (the message is jsonargparse's).
        ModelBuildError: the model cannot be built on the fake device (names the module).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.recipe import MemKitCLI

    configs = [config] if isinstance(config, str) else list(config)
    args = [a for c in configs for a in ("--config", c)] + list(overrides)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None

    class _Loader(MemKitCLI):
        def instantiate_classes(self) -> None:
            trainer = self.config.trainer
            strategy = trainer.get("strategy")
            init = getattr(strategy, "init_args", None) or (
                strategy.get("init_args") if isinstance(strategy, dict) else None)
            stage = int((init or {}).get("zero_stage", 0) or 0) if hasattr(init or {}, "get") else 0
            if isinstance(strategy, str) and strategy.startswith("memkit_zero"):
                stage = int(strategy[len("memkit_zero")])
            dtype = weight_dtype(trainer.get("precision"), stage)
            previous = torch.get_default_dtype()
            with contextlib.ExitStack() as stack:
                if fake_mode is not None:  # meta first (any tensor code runs there), then fake CPU tensors
                    stack.enter_context(torch.device("meta"))
                if dtype is not None:
                    torch.set_default_dtype(dtype)
                    stack.callback(torch.set_default_dtype, previous)
                stack.enter_context(planning())  # the plan is for the recipe's machine, not this one
                try:
                    super().instantiate_classes()
                except MemKitConfigError:
                    raise
                except Exception as err:
                    found = _failing_part(self.config.get("model"), err)
                    if found is None:  # the model builds: something else in the recipe failed
                        raise MemKitConfigError(f"the recipe's objects cannot be built: {_first_line(err)}") from err
                    part, failure = found
                    if isinstance(failure, MemKitConfigError):
                        raise failure from err
                    if isinstance(failure, _ARGUMENT_ERRORS) and "meta" not in str(failure):
                        # a bad value in the recipe: the constructor's own message says what and how to fix it
                        raise MemKitConfigError(f"the recipe's model cannot be built: {part} failed with "
                                                f"{type(failure).__name__}: {_first_line(failure)}") from failure
                    where = "the meta device" if fake_mode is not None else "the CPU"
                    raise ModelBuildError(
                        f"the recipe's model cannot be built on {where}: {part} "
                        f"failed with {type(failure).__name__}: {_first_line(failure)}. Fix: build that part from "
                        "shapes only (no file reads, no .item()/.tolist()/.numpy() on tensors in __init__), or load "
                        "weights in a hook such as setup() instead of __init__."
                    ) from failure
                if is_overridden("configure_model", self.model, pl.LightningModule):
                    try:  # Lightning builds such models before the strategy's setup; so does the planner
                        self.model.configure_model()
                    except Exception as err:
                        raise ModelBuildError(
                            "the recipe's model cannot be built on the meta device: "
                            f"{_innermost_module(err) or 'configure_model'} "
                            f"failed with {type(err).__name__}: {_first_line(err)}. Fix: build it from shapes only."
                        ) from err
            if fake_mode is not None:
                swap_to_fake(self.model, fake_mode, self.trainer.strategy.root_device, only_meta=True)

    import sys
    from unittest import mock

    try:
        with mock.patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI warns when args and sys.argv both have some
            cli = _Loader(args=args, run=False, parser_kwargs={"exit_on_error": False})
    except SystemExit as err:  # jsonargparse reports parse errors by exiting
        raise MemKitConfigError(
            f"the recipe {configs} does not parse (see the message above): exit {err.code}") from err
    except MemKitConfigError:
        raise
    except Exception as err:
        if type(err).__name__ in ("ArgumentError", "NSKeyError", "ParserError"):
            raise MemKitConfigError(f"the recipe {configs} does not parse: {_first_line(err)}") from err
        raise
    module, trainer, datamodule = cli.model, cli.trainer, cli.datamodule
    module.trainer = trainer
    if datamodule is not None:
        datamodule.trainer = trainer
    return Loaded(module=module, trainer=trainer, datamodule=datamodule, fake_mode=fake_mode, config=cli.config)


def example_batch(loaded: Loaded) -> Any:
    """A batch of the recipe's shape (see :func:`make_batch`)."""
    return make_batch(loaded.module, loaded.datamodule, loaded.fake_mode)

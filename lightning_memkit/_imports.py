"""Lazy access to optional, heavy backends.

``import lightning_memkit`` never imports transformers, deepspeed, bitsandbytes or triton: a missing
or broken backend must not break the package. Code that needs one calls :func:`require`, which
imports it on first use and, when that fails, raises an error that says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> the pip requirement that provides it
_INSTALL = {
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "sentencepiece": "sentencepiece",
    "deepspeed": "deepspeed",
    "bitsandbytes": "bitsandbytes",
    "triton": "triton",
}


class MissingBackendError(ImportError):
    """A feature needs an optional backend that is not installed (or fails to import)."""


def require(module: str, *, feature: str) -> ModuleType:
    """Import ``module`` for ``feature`` or raise :class:`MissingBackendError` saying what to install.

    Args:
        module: the importable name, e.g. ``"transformers"``.
        feature: what the caller was doing, for the message (e.g. ``"loading a Hugging Face model"``).

    Raises:
        MissingBackendError: the module is absent or raised while importing.
    """
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken install can raise anything, not only ImportError
        pkg = _INSTALL.get(module.split(".")[0], module.split(".")[0])
        raise MissingBackendError(
            f"{feature} needs the optional backend {module!r}, which could not be imported "
            f"({type(err).__name__}: {err}). Fix: pip install -c constraints.txt {pkg}"
        ) from err

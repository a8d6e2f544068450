"""The recipes shipped with lightning_memkit, installed as ``lightning_memkit.recipes``.

Each ``*.yaml`` file here is a LightningCLI configuration (``memkit fit --config NAME``). Its header comment
says what it trains (the first line), and, for the recipes sized to a GPU, the memory budget
(``# Budget: 24 GiB of GPU memory. ...``) and the peak ``memkit plan`` measures for it
(```memkit plan` measures this recipe's step at 21.14 GiB``). This module reads them:

    >>> [r.name for r in list_recipes()][:2]
    ['llama2_13b_zero_offload_24gb', 'llama3_8b_full_24gb']
    >>> find_recipe("quickstart").name
    'quickstart.yaml'

The folder is the top-level ``recipes/`` of the repository, mapped to this package in ``pyproject.toml``
(``[tool.setuptools.package-dir]``), so an editable install reads the files in place and a wheel carries
them as package data. This module imports nothing heavier than the standard library and memkit's config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lightning_memkit.config import MemKitConfigError

__all__ = ["RECIPES_DIR", "Recipe", "find_recipe", "list_recipes", "read_header"]

#: the folder of the shipped recipes (``recipes/`` of the repository in an editable install)
RECIPES_DIR = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml")
#: a memory amount as the headers write it: "24 GiB", "~180 GiB", "4.78 GiB"
_AMOUNT = r"~?\d+(?:\.\d+)?\s*[KMGT]i?B"
#: where a budget's amount lives, as the headers name it
_PLACES = ("GPU", "host", "CPU", "NVMe", "disk")


@dataclass(frozen=True)
class Recipe:
    """One shipped recipe, described by its header comment.

    Attributes:
        name: the file name without ``.yaml``: what ``--config`` takes.
        path: the YAML file.
        trains: the header's first line (what the recipe trains, and where).
        budget: the memory it is sized for, e.g. ``"24 GiB GPU, 64 GiB host"``; ``"-"`` when the header states none.
        planned_peak: the peak ``memkit plan`` measures for it, e.g. ``"21.14 GiB"``; ``"-"`` when not stated.
    """

    name: str
    path: Path
    trains: str
    budget: str
    planned_peak: str


def read_header(path: os.PathLike | str) -> list[str]:
    """The leading comment lines of a YAML file, without their ``#`` (blank comment lines kept as ``""``)."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if not raw.startswith("#"):
                break
            lines.append(raw[1:].strip())
    return lines


def _budget(text: str) -> str:
    """``"24 GiB GPU, 64 GiB host, ~180 GiB NVMe"`` from the header's ``Budget:`` sentence, or ``"-"``."""
    found = re.search(r"Budget:\s*(.+?)(?:\.\s|\.$|$)", text)
    if not found:
        return "-"
    parts = []
    for clause in found.group(1).split(","):
        amount = re.search(_AMOUNT, clause)
        place = re.search(r"\b(" + "|".join(_PLACES) + r")\b", clause)
        parts.append(f"{amount.group(0)} {place.group(1)}" if amount and place else clause.strip())
    return ", ".join(parts)


def _planned_peak(text: str) -> str:
    """``"21.14 GiB"`` (or ``"4.78 GiB GPU, 48.49 GiB host"``) from the header's ```memkit plan` measures ...``."""
    found = re.search(r"`memkit plan` measures ([^(]*?)(?:\(|\.\s|\.$|$)", text)
    if not found:
        return "-"
    per_place = re.findall(r"the (\w+) at (" + _AMOUNT + ")", found.group(1))
    if per_place:
        return ", ".join(f"{amount} {place}" for place, amount in per_place)
    amount = re.search(_AMOUNT, found.group(1))
    return amount.group(0) if amount else "-"


def describe(path: os.PathLike | str) -> Recipe:
    """The :class:`Recipe` of one YAML file, read from its header comment."""
    path = Path(path)
    header = read_header(path)
    text = " ".join(line for line in header if line)
    return Recipe(name=path.stem, path=path, trains=header[0] if header and header[0] else "-",
                  budget=_budget(text), planned_peak=_planned_peak(text))


def list_recipes() -> list[Recipe]:
    """The shipped recipes, sorted by name."""
    return [describe(p) for p in sorted(RECIPES_DIR.iterdir()) if p.suffix in _SUFFIXES and p.is_file()]


def recipe_names() -> list[str]:
    """The names of the shipped recipes (what ``--config`` takes), sorted."""
    return [r.name for r in list_recipes()]


def find_recipe(name_or_path: os.PathLike | str, key: str = "--config") -> Path:
    """The recipe file ``name_or_path`` names.

    An existing file is returned as given. Otherwise a shipped recipe is looked up by name: ``quickstart``,
    ``quickstart.yaml`` and ``recipes/quickstart.yaml`` (the repository's path, from any folder) all name it.

    Args:
        name_or_path: a path to a YAML file, or the name of a shipped recipe.
        key: what the error message calls ``name_or_path`` (the option it came from).

    Raises:
        MemKitConfigError: no such file, and no shipped recipe of that name (the message lists the names).
    """
    given = os.fspath(name_or_path)
    if os.path.isfile(given):
        return Path(given)
    folder, base = os.path.split(os.path.normpath(given)) if given else ("", "")
    stem = next((base[: -len(s)] for s in _SUFFIXES if base.endswith(s)), base)
    if folder in ("", "recipes"):
        for recipe in list_recipes():
            if recipe.name == stem:
                return recipe.path
    raise MemKitConfigError(
        f"{key} {given!r}: no such file, and no recipe of that name ships with memkit. Fix: give the path of "
        f"a YAML file, or one of the shipped recipes: {', '.join(recipe_names())} (memkit recipes describes them)."
    )

"""The package's imports flow one way: no import cycle among its modules, counting imports inside functions
(which hide a cycle from Python, not from a reader), and the layers the docs describe hold."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_memkit"


def _modules() -> dict[str, Path]:
    out = {}
    for f in (ROOT / PACKAGE).rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _edges() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (packages' ``__init__`` not counted as
    targets: importing ``a.b`` runs ``a/__init__`` first, which is no dependency of the importer on ``a``'s
    other modules)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".")
                    parts = parts[: len(parts) - node.level + (1 if f.name == "__init__.py" else 0)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and mods[t].name != "__init__.py":
                    edges[m].add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_edges()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_never_import_upper_ones():
    """kernels -> config -> technique families -> techniques -> strategy -> planner -> CLI: library code never
    imports the command line, the technique families never import the strategy, the planner's search or the
    command line, and the ZeRO rules import neither Lightning nor DeepSpeed."""
    edges = _edges()
    families = ("activations", "loss", "optim", "sequence", "models", "data")
    for module, targets in edges.items():
        if module not in (f"{PACKAGE}.cli",):
            assert f"{PACKAGE}.cli" not in targets, module
        layer = (module.split(".") + [""])[1]
        if layer in families:
            upper = {t for t in targets if (t.split(".") + [""])[1] in ("strategy", "planner", "recipe", "cli", "zero",
                                                                        "export", "technique_set")}
            assert not upper, (module, upper)
    rules = (ROOT / PACKAGE / "zero" / "rules.py").read_text()
    code = rules.split('"""', 2)[-1]  # after the module docstring
    assert "import lightning\n" not in code and "from lightning." not in code and "import deepspeed" not in code

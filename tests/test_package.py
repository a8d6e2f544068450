import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_import_is_lazy_and_survives_missing_backends():
    """With deepspeed, bitsandbytes and triton unimportable, the package imports and names what to install."""
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("deepspeed", "bitsandbytes"):
                    raise ModuleNotFoundError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        import lightning_memkit
        from lightning.pytorch import Trainer
        assert "deepspeed" not in sys.modules and "bitsandbytes" not in sys.modules
        Trainer(strategy="memkit", accelerator="cpu", logger=False)
        from lightning_memkit._imports import MissingBackendError, require
        try:
            require("deepspeed", feature="ZeRO")
        except MissingBackendError as err:
            assert "pip install" in str(err) and "deepspeed" in str(err), err
            print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_package_import_does_not_pull_heavy_backends():
    code = "import sys, lightning_memkit; print(sorted(m for m in ('deepspeed', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_missing_transformers_is_reported_when_used(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code = textwrap.dedent(
        f"""
        import sys
        from lightning_memkit.models import load_hf_causal_lm  # Lightning's own imports may load transformers
        for name in [m for m in sys.modules if m.split(".")[0] == "transformers"]:
            del sys.modules[name]
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "transformers":
                    raise ModuleNotFoundError("blocked")
        sys.meta_path.insert(0, Block())
        from lightning_memkit._imports import MissingBackendError
        try:
            load_hf_causal_lm({str(tmp_path)!r})
        except MissingBackendError as err:
            assert "pip install -c constraints.txt transformers" in str(err), err
            print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def _shipped_recipes() -> dict[str, str]:
    folder = os.path.join(ROOT, "recipes")
    return {f: open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder)) if f.endswith(".yaml")}


# lists the recipes of the installed package, from any folder, as ``memkit recipes`` does
_LIST_RECIPES = """
import json
from lightning_memkit.recipes import RECIPES_DIR, list_recipes
print(json.dumps({"dir": str(RECIPES_DIR), "recipes": {r.path.name: r.path.read_text() for r in list_recipes()}}))
"""


def test_the_installed_package_sees_the_recipes(tmp_path):
    """The install in use (editable: scripts/setup_env.sh's pip install -e .) reads recipes/ from another folder."""
    proc = subprocess.run([sys.executable, "-c", _LIST_RECIPES], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["recipes"] == _shipped_recipes() and len(found["recipes"]) >= 6
    import lightning_memkit

    if os.path.dirname(os.path.dirname(lightning_memkit.__file__)) == ROOT:  # editable: the files in place
        assert os.path.samefile(found["dir"], os.path.join(ROOT, "recipes"))


@pytest.mark.slow
def test_wheel_contains_the_kernels_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "lightning_memkit/kernels/__init__.py" in names
    # every source module of the package is in the wheel
    for folder, _, files in os.walk(os.path.join(ROOT, "lightning_memkit")):
        rel = os.path.relpath(folder, ROOT)
        if "__pycache__" in rel:
            continue
        for f in files:
            if f.endswith(".py"):
                assert os.path.join(rel, f).replace(os.sep, "/") in names, f"{rel}/{f} missing from the wheel"
    for f in os.listdir(os.path.join(ROOT, "kernels")):
        if f.endswith(".py"):
            assert f"lightning_memkit/kernels/{f}" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    entry_points = zipfile.ZipFile(tmp_path / wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"memkit = lightning_memkit.cli:main" in entry_points
    # the recipes are package data of lightning_memkit.recipes, and the installed wheel finds them
    for f in _shipped_recipes():
        assert f"lightning_memkit/recipes/{f}" in names, f"recipes/{f} missing from the wheel"
    assert "lightning_memkit/recipes/__init__.py" in names and not any(n.startswith("recipes/") for n in names)
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(tmp_path / wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install's finder
    proc = subprocess.run([sys.executable, "-c", _LIST_RECIPES], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["dir"] == str(target / "lightning_memkit" / "recipes")
    assert found["recipes"] == _shipped_recipes()

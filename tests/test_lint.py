"""The repository passes ``ruff check`` with the settings in pyproject.toml ([tool.ruff]).

ruff is a test extra, pinned in constraints.txt (a newer release may add checks); without it the test is skipped.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_is_clean():
    """``ruff check .`` from the repository root finds nothing (every violation is listed on failure)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"ruff check found violations (fix them):\n{proc.stdout}{proc.stderr}"

"""Dependency direction: core ← passes ← rest of p3b_fx ← tools, no cycle at module level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


CORE = [*sorted((ROOT / "p3b_fx" / "core").glob("*.py")), ROOT / "p3b_fx" / "errors.py"]
PASSES = sorted((ROOT / "passes").glob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_imports_neither_passes_nor_the_method(path: Path) -> None:
    bad = {
        m
        for m in _imports(path)
        if m.startswith("passes")
        or (m.startswith("p3b_fx") and not m.startswith(("p3b_fx.core", "p3b_fx.errors")))
    }
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", PASSES, ids=lambda p: p.name)
def test_passes_import_only_the_core(path: Path) -> None:
    bad = {
        m
        for m in _imports(path)
        if m.startswith("p3b_fx") and not m.startswith(("p3b_fx.core", "p3b_fx.errors"))
    }
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("module", ["passes.find_groups", "passes.pointwise_conv", "p3b_fx.core.masks"])
def test_a_pass_or_the_core_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """``import passes.find_groups`` before anything else once failed with a circular import (the
    core's package ran the facade, whose compiler imports that pass); the facade now loads lazily."""
    code = f"import {module}; import p3b_fx; assert p3b_fx.trace and p3b_fx.KeepPlan"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]

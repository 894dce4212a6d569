"""Package structure (issue 10): no import circles, shipped task code off the test fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "lm_eval_quant"


def _imports(path: Path) -> set[str]:
    """Every module a file imports at run time, at any depth (functions included), as absolute
    names; ``if TYPE_CHECKING:`` blocks (types only) are left out."""
    rel = path.relative_to(REPO).with_suffix("")
    pkg_parts = list(rel.parts[:-1])
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("a,b", [
    ("accounting.py", "methods/base.py"),
    ("sweep/runner.py", "sweep/ray_launcher.py"),
])
def test_no_import_circle(a, b):
    ma = "lm_eval_quant." + a[:-3].replace("/", ".")
    mb = "lm_eval_quant." + b[:-3].replace("/", ".")
    a_imports_b = mb in _imports(PKG / a)
    b_imports_a = ma in _imports(PKG / b)
    assert not (a_imports_b and b_imports_a), f"{a} and {b} import each other"


def test_launchers_take_one_object():
    import inspect

    from lm_eval_quant.sweep import ray_launcher, runner

    assert list(inspect.signature(ray_launcher.launch_ray).parameters) == ["job", "ray_address"]
    assert list(inspect.signature(runner._launch_local).parameters) == ["job", "server"]


def test_shipped_task_code_does_not_import_the_toy_fixtures():
    for py in (REPO / "task_configs").rglob("*.py"):
        assert not any(m.startswith("lm_eval_quant.toy") for m in _imports(py)), py

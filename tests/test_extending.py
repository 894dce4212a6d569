"""docs/EXTENDING.md: every ```python block runs, in order, in one namespace (issue 10)."""

from __future__ import annotations

import re
from pathlib import Path

from lm_eval_quant import _plugins
from lm_eval_quant import formats as F
from lm_eval_quant import methods as M

DOC = Path(__file__).resolve().parents[1] / "docs" / "EXTENDING.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_extending_examples_run(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) == 3  # a method, a format, a task
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{DOC.name}[python block {i + 1}]", "exec"), ns)
        assert M.get_method("halfrtn").__class__.__name__ == "HalfRTN"
        assert F.make_format("evengrid", 3).grid.numel() == 8
    finally:
        M._REGISTERED.pop("halfrtn", None)
        M._INSTANCES.pop("halfrtn", None)
        F._REGISTERED.pop("evengrid", None)
        F.make_format.cache_clear()
        _plugins.reset()

"""``lm-eval-quant sweep``: models × methods × bits × group sizes × formats, one lm-eval run per cell,
resumable, on this machine or a Ray cluster.

Python API (stable; the report and the demo use it)::

    from lm_eval_quant.sweep import run_sweep, SweepSpec
    res = run_sweep("examples/sweep_tiny.yaml", "out/", launcher="local", progress=True)
    for c in res.cells:            # CellResult(name, status, results_path, error_line, seconds, key, labels, model_args)
        print(c.name, c.status)    # done | skipped_done | failed | skipped (invalid combination)

``SweepSpec.from_yaml(path)`` / ``SweepSpec.from_dict(d)`` parse a spec; ``spec.cells()`` expands it.
``load_status(out_dir)`` reads a sweep folder's cells back; ``read_log(out_dir)`` its run log.
Each finished cell folder ``OUT/cells/<cell>/`` holds lm-eval's own ``results_<ts>.json`` with an
extra top-level ``"sweep"`` key (cell, key, model, pretrained, family, size, method, method_label,
bits, group_size, format, sym, options, seconds). See docs/sweep.md.
"""

from __future__ import annotations

from lm_eval_quant.sweep.runner import (
    CellResult,
    SweepResult,
    load_status,
    read_log,
    run_sweep,
)
from lm_eval_quant.sweep.spec import Cell, MethodSpec, ModelSpec, SweepSpec

__all__ = [
    "run_sweep",
    "SweepSpec",
    "ModelSpec",
    "MethodSpec",
    "Cell",
    "CellResult",
    "SweepResult",
    "load_status",
    "read_log",
]

"""Sweep runner overhead: wall time per cell when each cell is spawned as a new interpreter
(`python -m lm_eval_quant.sweep.cell`) versus forked from the pre-imported cell server, and the
cost of resuming a finished sweep (nothing is redone).

    PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python bench/bench_sweep.py [--cells 4]

Offline: a tiny random llama and a 3-way multiple-choice task written to a temp folder; every
cell evaluates 6 documents, so the times are the runner's overhead, not model compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=4, help="cells per sweep (bits 16 + rtn at 8,7,6,5,4,3,2 ...)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from test_sweep import TASK, write_task

    from lm_eval_quant.sweep import read_log, run_sweep
    from lm_eval_quant.toy import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="lmq-bench-sweep-"))
    model = make_tiny_model(tmp / "tiny", hidden=32, layers=1, heads=2, intermediate=64, seed=0)
    tasks = write_task(tmp / "tasks")
    bits = ([16, 8, 7, 6, 5, 4, 3, 2] * 4)[: a.cells]
    spec = {"name": "bench", "models": [{"pretrained": str(model), "name": "tiny"}], "methods": ["rtn"],
            "bits": bits, "group_sizes": [16], "tasks": [TASK], "model_args": {"dtype": "float32"},
            "harness": {"limit": 6, "device": "cpu", "include_path": [str(tasks)], "include_defaults": False}}
    rows = []
    results = {}
    for start in ("spawn", "fork"):
        out = tmp / f"out-{start}"
        t = time.time()
        res = run_sweep(spec, out, progress=False, start=start)
        wall = time.time() - t
        assert all(c.status == "done" for c in res.cells), [(c.name, c.error_line) for c in res.cells]
        results[start] = {c.name: json.loads(Path(c.results_path).read_text())["results"] for c in res.cells}
        cell_s = sum(c.seconds for c in res.cells)
        rows.append((f"run ({start})", len(res.cells), wall, cell_s / len(res.cells)))
        if start == "fork":
            t = time.time()
            res2 = run_sweep(spec, out, progress=False)
            wall2 = time.time() - t
            assert all(c.status == "skipped_done" for c in res2.cells)
            last = read_log(out)[-1]["run"]
            assert not [e for e in read_log(out) if e["run"] == last and e["event"] == "cell_start"]
            rows.append(("resume finished sweep", len(res2.cells), wall2, 0.0))
    same = results["spawn"] == results["fork"]
    print(f"sweep runner overhead, tiny llama (hidden 32), {a.cells} cells x 6 docs, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<24}{'cells':>6}{'wall s':>9}{'s/cell (in cell)':>18}")
    for r in rows:
        print(f"{r[0]:<24}{r[1]:>6}{r[2]:>9.1f}{r[3]:>18.2f}")
    print(f"spawn and fork results identical: {same}")


if __name__ == "__main__":
    main()

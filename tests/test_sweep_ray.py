"""`--launcher ray`: cells as Ray tasks on a local Ray instance (skipped when Ray is not installed;
CI installs the `ray` extra). Small: one tiny model, 3 cells, one of which fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray")

from lm_eval_quant.sweep import load_status, read_log, run_sweep  # noqa: E402

from test_sweep import TASK, env, write_task  # noqa: E402

pytestmark = pytest.mark.slow  # starts a local Ray instance


def test_ray_launcher_runs_cells_as_ray_tasks(tmp_path, monkeypatch):
    import ray

    for k, v in env().items():
        if k.startswith(("HF_", "OMP_", "MKL_", "TOKENIZERS_", "PYTHONPATH")):
            monkeypatch.setenv(k, v)
    from lm_eval_quant.toy import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-r", hidden=32, layers=1, heads=2, intermediate=64, seed=3)
    tasks = write_task(tmp_path / "tasks")
    short = tmp_path / "short_calib.txt"
    short.write_text("Too short to calibrate on.\n")  # the gptqbad cell fails at load time, one line
    spec = {
        "name": "ray",
        "models": [{"pretrained": str(model), "name": "tiny-r"}],
        "methods": ["rtn", {"name": "gptq", "label": "gptqbad", "bits": [4], "group_sizes": [16],
                             "options": {"calib": str(short), "nsamples": 1, "seqlen": 64}}],
        "bits": [16, 4],
        "group_sizes": [16],
        "tasks": [TASK],
        "model_args": {"dtype": "float32"},
        "harness": {"limit": 4, "device": "cpu", "include_path": [str(tasks)], "include_defaults": False},
    }
    # no address: run_sweep starts a local Ray instance itself, and shuts it down after
    res = run_sweep(spec, tmp_path / "out", launcher="ray", ray_address=None, progress=False)
    driver_pid = __import__("os").getpid()
    assert not ray.is_initialized()
    st = {c.name: c for c in res.cells}
    assert {n: c.status for n, c in st.items()} == {
        "tiny-r__none-w16": "done", "tiny-r__rtn-w4-g16-int": "done", "tiny-r__gptqbad-w4-g16-int": "failed"}
    assert "seqlen=64" in st["tiny-r__gptqbad-w4-g16-int"].error_line
    for n in ("tiny-r__none-w16", "tiny-r__rtn-w4-g16-int"):
        r = json.loads(Path(st[n].results_path).read_text())
        assert r["config"]["model"] == "hf-quant" and TASK in r["results"]
        assert r["n-samples"][TASK]["effective"] == 4
    ev = read_log(tmp_path / "out")
    starts = [e for e in ev if e["event"] == "cell_start"]
    assert len(starts) == 3 and all(e["launcher"] == "ray" and e["resources"] == {"num_cpus": 1} for e in starts)
    assert [e["launcher"] for e in ev if e["event"] == "sweep_start"] == ["ray"]
    # the cells ran in Ray worker processes, not in the driver
    ends = [e for e in ev if e["event"] in ("cell_done", "cell_failed")]
    assert len(ends) == 3 and all(e["worker_pid"] != driver_pid for e in ends)
    assert [c.status for c in load_status(tmp_path / "out")] == [c.status for c in res.cells]
    # resuming with the local launcher redoes nothing that Ray finished
    res2 = run_sweep(spec, tmp_path / "out", launcher="local", progress=False, retry_failed=False)
    assert [c.status for c in res2.cells] == ["skipped_done", "skipped_done", "failed"]
    # the same cells run locally (forked from the cell server) give the same numbers as the
    # Ray tasks (spawned `python -m lm_eval_quant.sweep.cell` processes)
    res3 = run_sweep(spec, tmp_path / "local", launcher="local", progress=False, start="fork")
    st3 = {c.name: c for c in res3.cells}
    assert [c.status for c in res3.cells] == ["done", "done", "failed"]
    assert st3["tiny-r__gptqbad-w4-g16-int"].error_line == st["tiny-r__gptqbad-w4-g16-int"].error_line
    for n in ("tiny-r__none-w16", "tiny-r__rtn-w4-g16-int"):
        a = json.loads(Path(st[n].results_path).read_text())["results"]
        b = json.loads(Path(st3[n].results_path).read_text())["results"]
        assert a == b, n

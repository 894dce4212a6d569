"""Sweep runner: spec expansion, resumability after SIGKILL, failing cells, spec changes, CLI.

The integration tests run real sweeps (each cell a fresh `python -m lm_eval_quant.sweep.cell`
process evaluating `hf-quant` with lm-eval) on two tiny random models and a small multiple-choice
task the test writes itself (nothing from the hub).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.sweep import SweepSpec, load_status, read_log, run_sweep
from lm_eval_quant.sweep.cli import build_parser, spec_from_args
from lm_eval_quant.sweep.cli import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
TASK = "lmq_sweep_tiny_mc"


# ------------------------------------------------------------------------------ fixtures
def write_task(d: Path, n: int = 30, seed: int = 0) -> Path:
    """A 3-way multiple-choice task over a jsonl written here (no hub)."""
    d.mkdir(parents=True, exist_ok=True)
    r = random.Random(seed)
    words = "the cat dog sat ran on a mat big small red blue tree house once upon time".split()
    rows = []
    for _ in range(n):
        ctx = " ".join(r.choice(words) for _ in range(8))
        rows.append({"ctx": ctx, "choices": [" ".join(r.choice(words) for _ in range(3)) for _ in range(3)],
                     "label": r.randrange(3)})
    (d / "tiny_mc.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    (d / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {d / 'tiny_mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n"
    )
    return d


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pp = e.get("PYTHONPATH", "")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    return e


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny random llamas (different widths) and the task folder."""
    os.environ.update({k: v for k, v in env().items() if k.startswith(("HF_", "OMP_", "MKL_", "TOKENIZERS_"))})
    from lm_eval_quant.toy import make_tiny_model

    root = tmp_path_factory.mktemp("sweepworld")
    m1 = make_tiny_model(root / "tiny-a", hidden=32, layers=1, heads=2, intermediate=64, seed=0)
    m2 = make_tiny_model(root / "tiny-b", hidden=64, layers=1, heads=2, intermediate=128, seed=1)
    tasks = write_task(root / "tasks")
    short = root / "short_calib.txt"
    short.write_text("Too short to calibrate on.\n")
    return {"root": root, "models": [m1, m2], "tasks": tasks, "short_calib": short}


def spec_dict(world, **over) -> dict:
    d = {
        "name": "t",
        "models": [
            {"pretrained": str(world["models"][0]), "name": "tiny-a", "family": "tiny", "size": "a"},
            {"pretrained": str(world["models"][1]), "name": "tiny-b", "family": "tiny", "size": "b"},
        ],
        "methods": [
            "rtn",
            # calibration text shorter than one window: this cell fails at load time with a one-line error
            {"name": "gptq", "label": "gptqbad", "bits": [4], "group_sizes": [16],
             "options": {"calib": str(world["short_calib"]), "nsamples": 1, "seqlen": 64}},
        ],
        "bits": [16, 8, 4, 2],
        "group_sizes": [16],
        "tasks": [TASK],
        "model_args": {"dtype": "float32"},
        "harness": {"limit": 6, "batch_size": 1, "device": "cpu", "include_path": [str(world["tasks"])],
                    "include_defaults": False},
    }
    d.update(over)
    return d


def metrics_of(results_path) -> dict:
    r = json.loads(Path(results_path).read_text())
    return r["results"]


# ------------------------------------------------------------------------------ spec (fast)
def test_spec_expansion_counts_and_pruning():
    d = {
        "models": ["/m/a", {"pretrained": "/m/b", "name": "bee"}],
        "methods": ["none", "rtn", {"name": "bnb", "bits": [4, 8, 3]},
                    {"name": "rtn", "label": "rtn-fp", "formats": ["fp", "int"], "sym": [False, True], "bits": [4]}],
        "bits": [16, 8, 4, 2],
        "group_sizes": [32, -1],
        "tasks": ["x"],
    }
    cells = SweepSpec.from_dict(d).cells(check_methods=False)
    names = [c.name for c in cells]
    # per model: baseline 1; rtn 3 bits x 2 groups = 6; bnb: w4-nf4, w8, w3 (skipped) = 3;
    # rtn-fp: fp (sym collapsed) x 2 groups = 2, int x sym{F,T} x 2 groups = 4  -> 16 per model
    assert len(cells) == 32, names
    assert len(set(names)) == 32
    assert names.count("a__none-w16") == 1 and names.count("bee__none-w16") == 1
    assert "a__rtn-w4-gch-int" in names and "bee__rtn-w2-g32-int" in names
    assert "a__rtn-fp-w4-g32-fp" in names and "a__rtn-fp-w4-g32-int-sym" in names
    assert "a__rtn-fp-w4-g32-fp-sym" not in names
    skipped = {c.name: c.skip_reason for c in cells if c.skip_reason}
    assert skipped == {"a__bnb-w3-nf4": "bnb supports bits 4 or 8, not 3",
                       "bee__bnb-w3-nf4": "bnb supports bits 4 or 8, not 3"}
    base = next(c for c in cells if c.name == "a__none-w16")
    assert base.model_args_string() == "pretrained=/m/a,method=none,bits=16"
    c = next(c for c in cells if c.name == "bee__rtn-fp-w4-gch-int-sym")
    assert c.model_args_string() == "pretrained=/m/b,method=rtn,bits=4,group_size=-1,format=int,sym=True"
    b8 = next(c for c in cells if c.name == "a__bnb-w8")
    assert b8.model_args_string() == "pretrained=/m/a,method=bnb,bits=8"


def test_spec_method_validate_marks_invalid_cells_skipped():
    # the methods' own validate() is asked; bits 9 never reaches it (bits 2..8 rule)
    d = {"models": ["/m/a"], "methods": ["rtn"], "bits": [9, 4], "group_sizes": [32], "tasks": ["x"]}
    cells = SweepSpec.from_dict(d).cells()
    by = {c.name: c for c in cells}
    assert by["a__rtn-w9-g32-int"].skip_reason.startswith("rtn supports bits 2..8")
    assert by["a__rtn-w4-g32-int"].skip_reason is None
    # an option rtn does not have: skipped with a line naming it
    d2 = dict(d, bits=[4], methods=[{"name": "rtn", "options": {"no_such_opt": 1}}])
    (c,) = SweepSpec.from_dict(d2).cells()
    assert c.skip_reason and "no_such_opt" in c.skip_reason


@pytest.mark.parametrize("bad, needle", [
    ({"models": ["/m/a"], "tasks": []}, "'tasks' is empty"),
    ({"models": [], "tasks": ["x"]}, "'models' is empty"),
    ({"models": ["/m/a"], "tasks": ["x"], "methods": ["qat"]}, "unknown method 'qat'"),
    ({"models": ["/m/a"], "tasks": ["x"], "group_sizes": [0]}, "group_size=0 is invalid"),
    ({"models": ["/m/a"], "tasks": ["x"], "bogus": 1}, "unknown key(s) ['bogus']"),
    ({"models": ["/m/a", "/n/a"], "tasks": ["x"]}, "used twice"),
    ({"models": ["/m/a"], "tasks": ["x"], "model_args": {"dtype": "a,b"}}, "contains ','"),
    ({"models": ["/m/a"], "tasks": ["x"], "model_args": {"bits": 4}}, "are sweep axes"),
    ({"models": ["/m/a"], "tasks": ["x"], "harness": {"limitt": 3}}, "unknown harness option 'limitt'"),
    ({"models": ["/m/a"], "tasks": ["x"], "limit": "many"}, "wrong type"),
    ({"models": ["/m/a"], "tasks": ["x"], "bits": ["four"]}, "must be integers"),
])
def test_spec_errors_are_one_line(bad, needle):
    with pytest.raises(QuantArgError) as ei:
        SweepSpec.from_dict(bad)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


def test_cell_keys_follow_config():
    d = {"models": ["/m/a"], "methods": ["rtn"], "bits": [16, 4], "group_sizes": [32], "tasks": ["x"],
         "harness": {"limit": 5}}
    k0 = {c.name: c.key for c in SweepSpec.from_dict(d).cells(check_methods=False)}
    # adding a bits value keeps the existing cells' keys
    k1 = {c.name: c.key for c in SweepSpec.from_dict(dict(d, bits=[16, 4, 3])).cells(check_methods=False)}
    assert {n: k1[n] for n in k0} == k0 and len(k1) == 3
    # run controls do not change keys; anything that changes numbers does
    k2 = {c.name: c.key for c in SweepSpec.from_dict(dict(d, harness={"limit": 5, "cell_timeout": 9})).cells(False)}
    assert k2 == k0
    k3 = {c.name: c.key for c in SweepSpec.from_dict(dict(d, harness={"limit": 6})).cells(False)}
    assert all(k3[n] != k0[n] for n in k0)
    k4 = {c.name: c.key for c in SweepSpec.from_dict(dict(d, model_args={"dtype": "float32"})).cells(False)}
    assert all(k4[n] != k0[n] for n in k0)


def test_cli_flags_equal_yaml(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("name: s\nmodels: [/m/a, /m/b]\nmethods: [rtn, gptq]\nbits: [16, 4, 3]\ngroup_sizes: [64]\n"
                 "formats: [int]\ntasks: [x, y]\nlimit: 5\nbatch_size: 2\nmodel_args: {dtype: float32}\n")
    from_yaml = SweepSpec.from_yaml(y)
    a = build_parser().parse_args(["--name", "s", "--models", "/m/a,/m/b", "--methods", "rtn,gptq", "--bits", "16,4,3",
                                   "--group-sizes", "64", "--formats", "int", "--tasks", "x,y", "--limit", "5",
                                   "--batch-size", "2", "--model-args", "dtype=float32"])
    from_flags = spec_from_args(a)
    assert [c.to_dict() for c in from_flags.cells(False)] == [c.to_dict() for c in from_yaml.cells(False)]
    # a flag overrides the YAML field
    a2 = build_parser().parse_args([str(y), "--bits", "8", "--limit", "7"])
    s2 = spec_from_args(a2)
    assert s2.bits == [8] and s2.harness["limit"] == 7 and s2.tasks == ["x", "y"]
    # method options with a method prefix reach only that method
    a3 = build_parser().parse_args([str(y), "--method-args", "gptq:damp=0.02"])
    s3 = spec_from_args(a3)
    assert [m.options for m in s3.methods] == [{}, {"damp": 0.02}]


@pytest.mark.parametrize("argv, needle", [
    (["--models", "/m/a"], "no tasks given"),
    (["/nonexistent/spec.yaml"], "spec file not found"),
    (["--models", "/m/a", "--tasks", "x", "--bits", "x"], "must be integers"),
    (["--models", "/m/a", "--tasks", "x", "--launcher", "slurm"], "invalid choice"),
    (["--models", "/does/not/exist", "--tasks", "x", "--out", "{tmp}"], "model folder /does/not/exist does not exist"),
])
def test_cli_bad_input_one_line(argv, needle, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path / "o")) for a in argv]
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm-eval-quant: error: ") and needle in err, err
    assert len(err.splitlines()) == 1


def test_cell_dir_commit_states(tmp_path):
    """finished = DONE with this key naming an existing results file; a results file of this key
    without DONE (killed between the rename and the marker) is recovered, not rerun; results of
    another key move to .stale/; temp leftovers of a killed cell are removed."""
    from lm_eval_quant.sweep.runner import RunLog, _prepare_cell_dir, finished_results

    (cell,) = SweepSpec.from_dict({"models": ["/m/a"], "methods": ["rtn"], "bits": [4], "group_sizes": [32],
                                   "tasks": ["x"]}).cells(check_methods=False)
    out = tmp_path / "out"
    cdir = out / "cells" / cell.name
    cdir.mkdir(parents=True)
    log = RunLog(out / "sweep_log.jsonl", "r1")
    res = cdir / "results_2026-01-01T00-00-00.json"
    res.write_text(json.dumps({"results": {}, "sweep": {"key": cell.key}}))
    (cdir / ".tmp-123").mkdir()
    (cdir / ".tmp-123" / "partial.json").write_text("{")
    assert finished_results(cdir, cell.key) is None          # no DONE yet
    assert _prepare_cell_dir(out, cdir, cell, log) == res     # recovered
    assert finished_results(cdir, cell.key) == res
    assert not (cdir / ".tmp-123").exists()
    assert finished_results(cdir, "0" * 16) is None          # another key is not finished
    # the config changed: the old results and marker move to .stale, the folder is clean
    other = SweepSpec.from_dict({"models": ["/m/a"], "methods": ["rtn"], "bits": [4], "group_sizes": [32],
                                 "tasks": ["x"], "limit": 3}).cells(check_methods=False)[0]
    assert other.name == cell.name and other.key != cell.key
    assert _prepare_cell_dir(out, cdir, other, log) is None
    assert not list(cdir.glob("results_*")) and not (cdir / "DONE").exists()
    (stale,) = list((out / ".stale").iterdir())
    assert stale.name.startswith(f"{cell.name}-{cell.key}-")
    assert sorted(p.name for p in stale.iterdir()) == ["DONE", res.name]
    log.close()
    assert [e["event"] for e in read_log(out)] == ["cell_recovered", "cell_stale_moved"]


# ------------------------------------------------------------------------------ real sweeps
def _start_sweep(spec_path: Path, out: Path, extra=()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lm_eval_quant.sweep.cli", str(spec_path), "--out", str(out), "--no-progress", *extra],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT),
    )


def _events(out, name=None, run=None):
    ev = read_log(out)
    return [e for e in ev if (name is None or e["event"] == name) and (run is None or e["run"] == run)]


@pytest.mark.slow
def test_sweep_sigkill_resume_equals_uninterrupted(world, tmp_path):
    import yaml

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(world)))
    cells = SweepSpec.from_yaml(spec_path).cells()
    assert len(cells) == 10 and not any(c.skip_reason for c in cells)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"

    # the uninterrupted reference and the run to be killed, side by side
    ref = _start_sweep(spec_path, ref_out)
    victim = _start_sweep(spec_path, out)
    deadline = time.time() + 150
    while time.time() < deadline:
        if len(_events(out, "cell_done")) >= 2 and victim.poll() is None:
            # wait until a third cell is under way, then kill mid-cell
            n_start = len(_events(out, "cell_start"))
            if n_start >= 3:
                break
        assert victim.poll() is None, victim.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail("sweep did not finish 2 cells in time")
    time.sleep(0.3)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done_before = {e["cell"] for e in _events(out, "cell_done")}
    assert len(done_before) >= 2
    first_run = read_log(out)[0]["run"]
    killed_cell = _events(out, "cell_start")[-1]["cell"]
    assert killed_cell not in done_before  # it was killed mid-cell

    # resume: same command
    resumed = _start_sweep(spec_path, out)
    rout = resumed.communicate(timeout=400)[0].decode()
    assert resumed.returncode == 1, rout[-3000:]  # 1: the gptqbad cells failed (and nothing else)
    ref_txt = ref.communicate(timeout=400)[0].decode()
    assert ref.returncode == 1, ref_txt[-3000:]

    runs = [e["run"] for e in _events(out, "sweep_start")]
    assert len(runs) == 2 and runs[0] == first_run
    second = runs[1]
    # the resumed run redid no finished cell, and skipped exactly those
    started_again = {e["cell"] for e in _events(out, "cell_start", second)}
    assert not (started_again & done_before), started_again & done_before
    assert {e["cell"] for e in _events(out, "cell_skipped_done", second)} == done_before
    assert killed_cell in started_again
    # every cell ran to completion exactly once across both runs (none lost, none twice)
    done_all = [e["cell"] for e in _events(out, "cell_done")]
    assert sorted(done_all) == sorted(set(done_all))
    # the failing cells: recorded with their one-line error, the others went on
    status = {c.name: c for c in load_status(out)}
    failed = {n for n, c in status.items() if c.status == "failed"}
    assert failed == {"tiny-a__gptqbad-w4-g16-int", "tiny-b__gptqbad-w4-g16-int"}
    for n in failed:
        line = status[n].error_line
        assert "seqlen=64" in line and "\n" not in line and len(line) < 400, line
        assert (out / "cells" / n / "error.txt").read_text().strip() == line
        assert not list((out / "cells" / n).glob("results_*.json"))
    assert set(done_all) == {c.name for c in cells} - failed
    # no leftovers of the killed cell process
    assert not list(out.glob("cells/*/.tmp-*"))

    # results equal the uninterrupted run's, cell by cell
    ref_status = {c.name: c for c in load_status(ref_out)}
    assert {n for n, c in ref_status.items() if c.status == "done"} == set(done_all)
    accs = {}
    for n in done_all:
        mine, theirs = metrics_of(status[n].results_path), metrics_of(ref_status[n].results_path)
        assert mine == theirs, n
        accs[n] = mine[TASK]["acc,none"]
    assert len(set(accs.values())) >= 2  # the cells really differ (not one number copied around)

    # the results are lm-eval's own format, plus our "sweep" key
    r = json.loads(Path(status["tiny-b__rtn-w4-g16-int"].results_path).read_text())
    for k in ("results", "configs", "versions", "n-shot", "config", "n-samples", "higher_is_better"):
        assert k in r, k
    assert r["config"]["model"] == "hf-quant"
    assert r["config"]["model_args"] == (f"pretrained={world['models'][1]},dtype=float32,method=rtn,bits=4,"
                                         "group_size=16,format=int,sym=False")
    assert r["config"]["limit"] == 6 and r["n-samples"][TASK]["effective"] == 6
    assert r["sweep"]["bits"] == 4 and r["sweep"]["family"] == "tiny" and r["sweep"]["size"] == "b"
    # as with the lm_eval CLI, the tasks got the model_args as metadata
    assert r["configs"][TASK]["metadata"]["pretrained"] == str(world["models"][1])
    assert r["configs"][TASK]["metadata"]["bits"] == 4
    assert Path(status["tiny-b__rtn-w4-g16-int"].results_path).parent == out / "cells" / "tiny-b__rtn-w4-g16-int"

    # a third run of the finished sweep redoes nothing (failed cells left alone on request)
    res = run_sweep(spec_path, out, progress=False, retry_failed=False)
    assert {c.status for c in res.cells} == {"skipped_done", "failed"}
    third = read_log(out)[-1]["run"]
    assert not _events(out, "cell_start", third)

    # a spec change reruns only the changed cells: dry run with one more bits value and a new
    # per-model option on tiny-b
    d = spec_dict(world, bits=[16, 8, 4, 3, 2])
    d["models"][1]["model_args"] = {"attn_implementation": "eager"}
    plan = run_sweep(d, out, progress=False, dry_run=True)
    st = {c.name: c.status for c in plan.cells}
    assert st["tiny-a__rtn-w3-g16-int"] == "planned"
    assert all(st[n] == "skipped_done" for n in done_all if n.startswith("tiny-a"))
    assert all(st[n] == "planned" for n in st if n.startswith("tiny-b"))


def test_cli_dry_run_lists_cells(world, tmp_path, capsys):
    import yaml

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(world, bits=[16, 4, 3])))
    rc = sweep_main([str(spec_path), "--out", str(tmp_path / "o"), "--dry-run", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "8 cells: 0 done, 0 already done, 0 failed, 0 skipped (invalid), 8 to run" in out
    assert "tiny-a__rtn-w3-g16-int" in out
    assert not (tmp_path / "o" / "sweep_log.jsonl").exists() or not read_log(tmp_path / "o")


@pytest.mark.slow  # spawns a cell subprocess and kills it (issue 10: subprocess and SIGKILL tests are slow)
def test_cell_timeout_kills_the_cell_and_the_sweep_goes_on(world, tmp_path):
    d = spec_dict(world, bits=[16], methods=["none"])
    d["models"] = d["models"][:1]
    d["harness"]["cell_timeout"] = 0.5  # far below a cell's start-up time: always exceeded
    res = run_sweep(d, tmp_path / "o", progress=False, start="spawn")
    (c,) = res.cells
    assert c.status == "failed" and c.error_line == "cell exceeded cell_timeout=0.5s and was killed"
    assert 0.4 < c.seconds < 30
    ev = read_log(tmp_path / "o")
    assert [e["event"] for e in ev] == ["sweep_start", "cell_start", "cell_failed", "sweep_end"]
    assert ev[1]["start"] == "spawn"
    # the killed process is gone
    with pytest.raises(ProcessLookupError):
        os.kill(ev[1]["pid"], 0)

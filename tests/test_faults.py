"""Faults a hostile new user meets, driven through the real command lines (issue 11).

Each case runs one command (``lm-eval-quant`` as ``python -m lm_eval_quant.cli``, its ``export``,
``sweep`` and ``report`` subcommands, or a bare interpreter start for the ``.pth`` hook) and
classifies what the user sees:

* ``error``   -- exit status ≠ 0, exactly one ``lm-eval-quant: error:`` line, no traceback;
* ``warning`` -- the run goes on (exit 0) and one line names the problem;
* ``traceback`` / ``silent`` -- the failures this file exists to prevent.

``LMQ_FAULTS_SRC`` points the commands at another source tree (to measure the code before a
change); ``LMQ_FAULTS_TABLE`` appends one JSON line per case (case, expected, got) to that file.
The fast tests at the end check the same pieces in-process, without subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("LMQ_FAULTS_SRC") or ROOT)
ERR = "lm-eval-quant: error:"


# ------------------------------------------------------------------------------------ helpers
def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               LMQ_CACHE_DIR=str(tmp / "cache"), LMQ_NO_AUTOREGISTER="1")
    env.update(extra)
    return env


def _cli(args: list, tmp: Path, timeout: int = 400, **env) -> subprocess.CompletedProcess:
    """Run the command; one that outlives `timeout` is reported as exit 0 with a HANG line (it
    was accepted and kept running: 'silent')."""
    cmd = [sys.executable, "-m", "lm_eval_quant.cli", *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=tmp, env=_env(tmp, **env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, 0, "", err + f"\nHANG: still running after {timeout} s\n")


def _classify(p: subprocess.CompletedProcess, expect: str, needle: str) -> str:
    err = p.stderr
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if expect == "error":
        lines = [ln for ln in err.splitlines() if ln.startswith(ERR)]
        if p.returncode != 0 and len(lines) == 1 and needle.lower() in lines[0].lower():
            return "error"
        return "silent" if p.returncode == 0 else "other"
    hits = [ln for ln in err.splitlines() if needle.lower() in ln.lower()]
    if p.returncode == 0 and hits:
        return "warning"
    return "silent" if p.returncode == 0 else "other"


def _record(case: str, expect: str, got: str, p: subprocess.CompletedProcess) -> None:
    path = os.environ.get("LMQ_FAULTS_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "expected": expect, "got": got, "rc": p.returncode,
                                "stderr_tail": p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []})
                    + "\n")


def _check(case: str, p, expect: str, needle: str) -> None:
    got = _classify(p, expect, needle)
    _record(case, expect, got, p)
    assert got == expect, f"{case}: expected {expect} ({needle!r}), got {got}; rc={p.returncode}\n{p.stderr[-3000:]}"


def _eval_args(model_args: str, task_dir: Path) -> list:
    return ["--model", "hf-quant", "--model_args", model_args, "--tasks", "lmq_toy_mc", "--include_path",
            str(task_dir), "--limit", "2", "--device", "cpu", "--batch_size", "4"]


@pytest.fixture(scope="module")
def models(toy_root) -> dict:
    from lm_eval_quant.toy import cached_tiny_model

    return {
        # hidden 128, widths 128/512: every group size up to 128 divides
        "ok": cached_tiny_model(toy_root, arch="llama", hidden=128, layers=2, heads=4, intermediate=256),
        # an MLP width of 172 (like stories260K): no 3-bit GPTQ packing, no bnb 4-bit CPU kernel
        "w172": cached_tiny_model(toy_root, arch="llama", hidden=64, layers=1, heads=4, intermediate=172),
    }


@pytest.fixture()
def files(tmp_path) -> dict:
    """Bad inputs on disk: folders without / with a broken config.json, binary calibration files,
    a non-empty folder, a plain file, a path below a plain file."""
    f = {}
    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "model.safetensors").write_bytes(b"\0" * 16)
    f["noconf"] = tmp_path / "noconf"
    (tmp_path / "badconf").mkdir()
    (tmp_path / "badconf" / "config.json").write_text('{"model_type": "llama", ')
    f["badconf"] = tmp_path / "badconf"
    blob = bytes(range(256)) * 64
    (tmp_path / "calib.jsonl").write_bytes(blob)
    (tmp_path / "calib.txt").write_bytes(blob)
    f["bin_jsonl"], f["bin_txt"] = tmp_path / "calib.jsonl", tmp_path / "calib.txt"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    f["nonempty"] = tmp_path / "full"
    (tmp_path / "afile").write_text("x")
    f["file"] = tmp_path / "afile"
    f["under_file"] = tmp_path / "afile" / "out"
    return f


# ------------------------------------------------------------------------------------ hf-quant
HF_CASES = [
    # case, model_args template, expected kind, the words the line must hold
    ("unknown key", "pretrained={ok},method=rtn,bits=4,group_sise=32", "error", "did you mean group_size"),
    ("unknown key foo", "pretrained={ok},foo=bar", "error", "unknown argument foo=bar"),
    ("empty pretrained", "pretrained=,method=rtn", "error", "pretrained"),
    ("no config.json", "pretrained={noconf},method=rtn", "error", "no config.json"),
    ("broken config.json", "pretrained={badconf},method=rtn", "error", "not valid JSON"),
    ("dtype float33", "pretrained={ok},dtype=float33", "error", "not a torch dtype"),
    ("tokenizer missing", "pretrained={ok},tokenizer=/nope/tok", "error", "does not exist"),
    ("duplicate key", "pretrained={ok},bits=4,bits=3", "error", "given twice"),
    ("sym with nf", "pretrained={ok},method=rtn,bits=4,format=nf,sym=true", "error", "sym=true only applies"),
    ("sym with fp", "pretrained={ok},method=rtn,bits=4,format=fp,sym=true", "error", "sym=true only applies"),
    ("fp e0m3", "pretrained={ok},method=rtn,bits=4,format=fp:e0m3", "error", "exponent"),
    ("nsamples 1e9", "pretrained={ok},method=gptq,bits=4,calib={good_txt},nsamples=1000000000", "error", "nsamples"),
    ("binary calib jsonl", "pretrained={ok},method=gptq,bits=4,calib={bin_jsonl},nsamples=2,seqlen=16",
     "error", "not UTF-8 text"),
    ("binary calib txt", "pretrained={ok},method=gptq,bits=4,calib={bin_txt},nsamples=2,seqlen=16",
     "error", "not UTF-8 text"),
    ("save_quantized non-empty", "pretrained={ok},method=rtn,bits=4,group_size=32,save_quantized={nonempty}",
     "error", "not empty"),
    ("save_quantized a file", "pretrained={ok},method=rtn,bits=4,group_size=32,save_quantized={file}",
     "error", "is a file"),
    ("save_quantized unwritable", "pretrained={ok},method=rtn,bits=4,group_size=32,save_quantized={under_file}",
     "error", "cannot create"),
    ("save_quantized g16", "pretrained={ok},method=rtn,bits=4,group_size=16,save_quantized={under_ok}",
     "error", "group_size=16"),
    ("bnb width 172", "pretrained={w172},method=bnb,bits=4", "error", "divisible by 32"),
    ("skip typo", "pretrained={ok},method=rtn,bits=4,group_size=32,skip=lm_hed", "warning", "matches no module"),
    ("seqlen above max", "pretrained={ok},method=gptq,bits=4,group_size=32,calib={good_txt},nsamples=2,seqlen=4096",
     "warning", "above the model's maximum"),
    ("cache dir unwritable", "pretrained={ok},method=rtn,bits=4,group_size=32,cache_dir={under_file}",
     "warning", "cannot use"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,margs,expect,needle", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_quant_cli(case, margs, expect, needle, models, files, toy_task_dir, tmp_path):
    if case == "bnb width 172":
        pytest.importorskip("bitsandbytes")
        from bitsandbytes.functional import has_avx512bf16

        if not has_avx512bf16():
            pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' repacking kernel is not used")
    good = tmp_path / "good.txt"
    from lm_eval_quant.toy import make_corpus

    good.write_text(make_corpus(20_000, seed=1))
    fmt = dict(ok=models["ok"], w172=models["w172"], good_txt=good, under_ok=tmp_path / "exp", **files)
    p = _cli(_eval_args(margs.format(**fmt), toy_task_dir), tmp_path, timeout=120 if "1000000000" in margs else 400)
    _check(case, p, expect, needle)


# ------------------------------------------------------------------------------------ cache
def _entries(cache: Path) -> list[Path]:
    d = cache / "entries"
    return sorted(d.iterdir()) if d.is_dir() else []


@pytest.mark.slow
def test_cache_subfolder_is_part_of_the_key(models, toy_task_dir, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(models["ok"], repo / "a")
    shutil.copytree(models["w172"], repo / "b")
    cache = tmp_path / "c"
    for sub in ("a", "b"):
        p = _cli(_eval_args(f"pretrained={repo},subfolder={sub},method=rtn,bits=4,"
                            f"group_size=-1,cache_dir={cache}", toy_task_dir), tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    got = "error" if len(_entries(cache)) == 2 else "silent"   # one shared entry = a wrong hit
    _record("cache subfolder key", "error", got, p)
    assert got == "error", "subfolder=b reused subfolder=a's cache entry"


def _swap_blocks(path: Path) -> None:
    """Swap two 4 KiB blocks inside the first 512 KiB chunk of the tensors file (the data part)."""
    b = bytearray(path.read_bytes())
    hdr = 8 + int.from_bytes(b[:8], "little")
    i, j = hdr + 4096, hdr + 3 * 4096
    assert j + 4096 <= len(b)
    b[i:i + 4096], b[j:j + 4096] = b[j:j + 4096], b[i:i + 4096]
    path.write_bytes(bytes(b))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["block swap", "manifest wrong layer"])
def test_cache_damage_is_detected(damage, models, toy_task_dir, tmp_path):
    cache = tmp_path / "c"
    args = _eval_args(f"pretrained={models['ok']},method=rtn,bits=4,group_size=32,cache_dir={cache}", toy_task_dir)
    p = _cli(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (e,) = _entries(cache)
    if damage == "block swap":
        _swap_blocks(e / "tensors.safetensors")
    else:  # still valid JSON, names a layer the model does not have
        man = json.loads((e / "manifest.json").read_text())
        man["report"]["modified"][0] = "model.layers.7.mlp.up_proj.weight"
        (e / "manifest.json").write_text(json.dumps(man))
    p = _cli(args, tmp_path)
    _check(f"cache {damage}", p, "warning", "is corrupt")
    # discarded and rewritten: a third run is a clean hit
    p = _cli(args, tmp_path)
    assert p.returncode == 0 and "corrupt" not in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------------------ export
EXPORT_CASES = [
    ("export non-empty output", "pretrained={ok},method=rtn,bits=4,group_size=32", "{nonempty}", "error", "not empty"),
    ("export output is a file", "pretrained={ok},method=rtn,bits=4,group_size=32", "{file}", "error", "is a file"),
    ("export unwritable output", "pretrained={ok},method=rtn,bits=4,group_size=32", "{under_file}", "error",
     "cannot create"),
    ("export group_size 4", "pretrained={ok},method=rtn,bits=4,group_size=4", "{new}", "error", "group_size=4"),
    ("export group_size 16", "pretrained={ok},method=rtn,bits=4,group_size=16", "{new}", "error", "group_size=16"),
    ("export shape 3-bit 172", "pretrained={w172},method=rtn,bits=3,group_size=-1", "{new}", "error",
     "divisible by 32"),
    ("export unknown key", "pretrained={ok},method=rtn,bits=4,grup_size=32", "{new}", "error", "did you mean"),
    ("export duplicate key", "pretrained={ok},method=rtn,bits=4,bits=3", "{new}", "error", "given twice"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,margs,out,expect,needle", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_cli(case, margs, out, expect, needle, models, files, tmp_path):
    fmt = dict(ok=models["ok"], w172=models["w172"], new=tmp_path / "new", **files)
    p = _cli(["export", "--model_args", margs.format(**fmt), "--output", out.format(**fmt)], tmp_path)
    _check(case, p, expect, needle)


@pytest.mark.slow
def test_export_cleans_stale_temp_folders(models, tmp_path):
    out = tmp_path / "q"
    stale = tmp_path / "q.tmp-999999"      # a dead writer's leftovers (no such pid)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 64)
    # loading the leftover is one line, not a traceback
    p = _cli(_eval_args(f"pretrained={stale},method=none", tmp_path), tmp_path)
    _check("load an export temp folder", p, "error", "did not finish")
    p = _cli(["export", "--model_args", f"pretrained={models['ok']},method=rtn,bits=4,group_size=32",
              "--output", out], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    got = "error" if not stale.exists() else "silent"
    _record("export stale temp folder", "error", got, p)
    assert got == "error", "stale temp folder left behind"


# ------------------------------------------------------------------------------------ sweep
def _spec(tmp: Path, model: Path, task_dir: Path, **over) -> Path:
    import yaml

    d = {"models": [str(model)], "methods": ["rtn"], "bits": [4], "group_sizes": [32], "tasks": ["lmq_toy_mc"],
         "include_path": [str(task_dir)], "limit": 2, "device": "cpu"}
    d.update(over)
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.slow
def test_sweep_cli_faults(models, files, toy_task_dir, tmp_path):
    # a spec that is not UTF-8
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\nmodels: [x]\ntasks: [y]\n".encode("latin-1"))
    p = _cli(["sweep", bad, "--dry-run"], tmp_path)
    _check("sweep spec not UTF-8", p, "error", "not UTF-8")
    # bits: []
    p = _cli(["sweep", _spec(tmp_path, models["ok"], toy_task_dir, bits=[]), "--dry-run"], tmp_path)
    _check("sweep bits empty list", p, "error", "empty list")
    # a duplicate key in the spec's model_args string
    p = _cli(["sweep", _spec(tmp_path, models["ok"], toy_task_dir, model_args="dtype=float32,dtype=bfloat16"),
              "--dry-run"], tmp_path)
    _check("sweep model_args duplicate", p, "error", "given twice")
    # --out where no folder can be made
    p = _cli(["sweep", _spec(tmp_path, models["ok"], toy_task_dir), "--out", files["under_file"]], tmp_path)
    _check("sweep --out unwritable", p, "error", "--out")


# ------------------------------------------------------------------------------------ report
def _results(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    r = {"results": {"lmq_toy_mc": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
         "config": {"model": "hf-quant", "model_args": "pretrained=/m/a,method=none"},
         "higher_is_better": {"lmq_toy_mc": {"acc": True}}}
    p = d / name
    p.write_text(json.dumps(r))
    return p


@pytest.mark.slow
def test_report_cli_faults(files, tmp_path):
    runs = tmp_path / "runs"
    _results(runs / "a", "results_2026-01-01T00-00-00.json")
    t = _results(runs / "b", "results_2026-01-02T00-00-00.json")
    t.write_text(t.read_text()[:40])                 # truncated, as a full disk leaves it
    p = _cli(["report", runs, "--out", tmp_path / "rep", "--no-plots", "-q"], tmp_path)
    _check("report truncated results", p, "warning", "skipped")
    assert str(t) in p.stderr
    p = _cli(["report", runs, "--out", files["under_file"], "--no-plots", "-q"], tmp_path)
    _check("report --out unwritable", p, "error", "--out")


# ------------------------------------------------------------------------------------ .pth hook
@pytest.mark.slow
@pytest.mark.parametrize("state", ["missing", "broken"])
def test_pth_hook_failure_is_one_line(state, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "lm_eval_quant_startup.pth").write_text((SRC / "lm_eval_quant_startup.pth").read_text())
    if state == "broken":
        (site / "lm_eval_quant").mkdir()
        (site / "lm_eval_quant" / "__init__.py").write_text("raise RuntimeError('half-installed')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMQ_NO_AUTOREGISTER")}
    p = subprocess.run([sys.executable, "-S", "-c", f"import site; site.addsitedir({str(site)!r}); print('ok')"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    got = "traceback" if "Traceback" in p.stderr else ("warning" if len(lines) <= 1 and p.stdout.strip() == "ok"
                                                        else "other")
    _record(f".pth hook {state} package", "warning", got, p)
    assert got == "warning", p.stderr


# ------------------------------------------------------------------------------------ fast, in-process
def test_args_layer_one_lines():
    from lm_eval_quant.args import resolve, split_model_args
    from lm_eval_quant.errors import QuantArgError

    with pytest.raises(QuantArgError, match="given twice"):
        split_model_args("bits=4,bits=3")
    with pytest.raises(QuantArgError, match="did you mean group_size"):
        resolve("method=rtn,group_sise=32", known_rest=["pretrained"])
    with pytest.raises(QuantArgError, match="sym=true only applies"):
        resolve("method=rtn,format=nf,sym=true", known_rest=[])
    with pytest.raises(QuantArgError, match="exponent"):
        resolve("method=rtn,bits=4,format=fp:e0m3", known_rest=[])
    r = resolve({"pretrained": "x", "method": "gptq", "bits": "3", "damp": "0.02", "cache": "false"},
                known_rest=["pretrained"])
    assert (r.cfg.bits, r.cfg.options["damp"], r.wrapper.cache, r.rest) == (3, 0.02, False, {"pretrained": "x"})


def test_calibration_rejects_binary_and_huge(tmp_path):
    from lm_eval_quant.errors import QuantArgError
    from lm_eval_quant.methods.calibration import validate_calib_args

    p = tmp_path / "c.txt"
    p.write_bytes(b"hello \xff\xfe world")
    with pytest.raises(QuantArgError, match="not UTF-8 text"):
        validate_calib_args(str(p), 2, 16)
    p.write_bytes(b"hello\x00world")
    with pytest.raises(QuantArgError, match="not UTF-8 text"):
        validate_calib_args(str(p), 2, 16)
    p.write_text("plain text")
    validate_calib_args(str(p), 2, 16)
    with pytest.raises(QuantArgError, match="nsamples"):
        validate_calib_args(str(p), 10**9, 16)


def test_truncated_results_are_not_committed(tmp_path):
    from lm_eval_quant.sweep.cell import check_results_file

    p = tmp_path / "results_x.json"
    p.write_text('{"results": {"a": {"acc,none": 0.5}}, "config": {')
    with pytest.raises(RuntimeError, match="unreadable results file"):
        check_results_file(p)
    p.write_text('{"results": {"a": {"acc,none": 0.5}}, "config": {}}')
    check_results_file(p)


def _no_space_open(real_open):
    import errno

    def fake(file, mode="r", *a, **kw):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **kw)
    return fake


def test_no_space_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    import builtins

    from lm_eval_quant.sweep import _io

    p = tmp_path / "status.json"
    p.write_text('{"old": true}')
    monkeypatch.setattr(_io, "open", _no_space_open(builtins.open), raising=False)
    with pytest.raises(OSError, match="No space left"):
        _io.atomic_write_text(p, '{"new": true}')
    assert p.read_text() == '{"old": true}'
    assert [q.name for q in tmp_path.iterdir()] == ["status.json"]


def test_sweep_no_space_is_one_line_and_commits_nothing(tmp_path, monkeypatch, capsys):
    """A full disk while the sweep writes its spec/status/log: exit 2, one line, no half-written file."""
    import builtins

    from lm_eval_quant.sweep import _io
    from lm_eval_quant.sweep.cli import main

    spec = {"name": "nospace", "models": [str(tmp_path / "m")], "methods": ["rtn"], "bits": [4],
            "group_sizes": [32], "tasks": ["lmq_toy_mc"], "limit": 2, "device": "cpu"}
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    monkeypatch.setattr(_io, "open", _no_space_open(builtins.open), raising=False)
    import lm_eval_quant.sweep.runner as runner

    monkeypatch.setattr(runner, "_check_models", lambda spec: None, raising=False)
    monkeypatch.setattr(runner, "_check_tasks", lambda spec: None, raising=False)
    rc = main([str(tmp_path / "spec.yaml"), "--out", str(out), "--launcher", "local", "--start", "spawn"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errs = [ln for ln in err if ln.startswith(ERR)]
    assert rc == 2 and len(errs) == 1 and "No space left" in errs[0], err
    assert "Traceback" not in "\n".join(err)
    left = [q.name for q in out.rglob("*") if q.is_file()]
    assert not any(".tmp-" in n for n in left), left
    for q in out.rglob("*.json"):
        json.loads(q.read_text())          # whatever exists is whole

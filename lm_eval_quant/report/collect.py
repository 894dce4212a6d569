"""Read lm-evaluation-harness results files into one row per run.

Two kinds of files are understood:

* ours (``--model hf-quant``): ``config.quantization`` carries the quantization config and the bit
  accounting (``lm_eval_quant.accounting.account``);
* any plain harness run (``--model hf`` …): no quantization block. The precision then comes from
  ``config.model_dtype`` (bfloat16/float16 = 16 bits, float32 = 32, float64 = 64), the size from
  ``config.model_num_parameters``, and the method is ``none``.

Files are found recursively under the given folders: harness output lives in
``<output_path>/<model_name_sanitized>/results_<timestamp>.json`` (or ``<stem>_<timestamp>.json``
when ``--output_path`` names a file). Any ``*.json`` whose top level holds ``results`` and
``config`` dicts is accepted; other JSON files (sweep specs, status files) are skipped silently.

A *run* is one model at one quantization setting and sample limit (see ``RunKey``). When several
files belong to the same run, each task's numbers come from the newest file that has that task
(newest by the timestamp in the file name, then the ``date`` field, then the file's mtime), so a
re-run replaces the old numbers and an extra run with other tasks adds columns to the same row.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lm_eval_quant.errors import QuantArgError

#: bits per parameter for the dtypes the harness reports as ``config.model_dtype``
DTYPE_BITS = {
    "float64": 64, "double": 64,
    "float32": 32, "float": 32, "fp32": 32,
    "bfloat16": 16, "float16": 16, "half": 16, "fp16": 16, "bf16": 16,
    "float8_e4m3fn": 8, "float8_e5m2": 8, "int8": 8, "uint8": 8,
}

#: bytes per gigabyte used for every "GB" figure in the report (decimal, like the accounting)
GB = 1e9

_TS_RE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)")


@dataclass
class TaskResult:
    """All numeric metrics of one task (or group) of one results file."""

    name: str
    metrics: dict[str, float]                 # "acc" -> value, for the preferred filter
    stderrs: dict[str, float | None]          # "acc" -> stderr (None when "N/A")
    higher_is_better: dict[str, bool]
    n_samples: int | None = None
    is_group: bool = False
    subtasks: tuple[str, ...] = ()
    source: str = ""                          # the results file
    stamp: float = 0.0                        # newest wins


@dataclass
class Run:
    """One row of the report: a model at one precision, with its task results."""

    key: tuple
    model: str                 # display name (last path component of a local path, hub id otherwise)
    model_path: str            # as given to the harness (pretrained=...)
    method: str                # none | rtn | gptq | awq | bnb | ...
    format: str                # int | fp | nf | ... ; dtype name for unquantized runs
    bits: float                # weight bits (16/32 for unquantized runs)
    group_size: int | None     # None for unquantized runs
    sym: bool | None
    bits_per_weight: float     # effective bits per quantized weight (k + stat bits / group)
    bits_per_param: float      # whole model: total bits / parameters
    params_total: int | None
    total_bits: float | None
    model_gb: float | None
    limit: Any = None
    options: dict = field(default_factory=dict)
    source_kind: str = "plain"  # "hf-quant" | "plain"
    family: str = ""            # from the sweep's labels when present (else inferred in table.py)
    method_label: str = ""      # sweep method label (two GPTQ variants differ here), else = method
    files: list[str] = field(default_factory=list)
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    # issue 14: measured next to accounted (results of execution=real/fake runs carry them)
    execution: str = ""                 # "" (not recorded) | fake | real
    kernel: str = ""
    measured_gb: float | None = None    # resident bytes of the model's weights and buffers
    peak_gb: float | None = None        # CUDA max_memory_allocated, or peak RSS above the start on CPU
    tok_s: float | None = None          # loglikelihood tokens/s of the run
    storage_dtype: str | None = None  # the checkpoint's dtype (accounting counts unquantized parts at it)
    eval_dtype: str | None = None     # the dtype the evaluation computed in

    @property
    def label(self) -> str:
        if self.method == "none":
            return f"{self.model} {self.format}"
        g = "" if self.group_size in (None, -1) else f" g{self.group_size}"
        return f"{self.model} {self.method_label or self.method} {_fmt_bits(self.bits)}-bit{g}"


def _fmt_bits(b) -> str:
    if b is None:
        return "?"
    return str(int(b)) if float(b).is_integer() else f"{b:g}"


# ----------------------------------------------------------------------------------------------
# finding and parsing files


def find_results_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every harness results file under ``paths`` (folders are searched recursively; a file given
    directly is taken as is). Raises QuantArgError for a path that does not exist."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise QuantArgError(f"report: {p} does not exist; give folders or results_*.json files")
        if p.is_file():
            out.append(p)
            continue
        for root, dirs, files in os.walk(p):
            # hidden folders (a sweep's .stale/ holds superseded results) are not current results
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.endswith(".json"):
                    out.append(Path(root) / f)
    # dedupe, keep order
    seen, uniq = set(), []
    for f in out:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(f)
    return uniq


def load_results_file(path: Path) -> dict | None:
    """The parsed file when it is a harness results file, else None."""
    try:
        if path.stat().st_size > 200 * 2**20:
            return None
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("results"), dict):
        return None
    if not isinstance(d.get("config"), dict):
        return None
    return d


def file_stamp(path: Path, d: dict) -> float:
    """Sort key "newest": the timestamp lm-eval puts in the file name, then ``date``, then mtime."""
    m = _TS_RE.search(path.name)
    if m:
        from datetime import datetime

        s = m.group(1)
        date, time = s.split("T")
        try:
            return datetime.fromisoformat(f"{date}T{time.replace('-', ':')}").timestamp()
        except ValueError:
            pass
    dt = d.get("date")
    if isinstance(dt, (int, float)):
        return float(dt)
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    return None


def parse_model_args(margs) -> dict:
    """``config.model_args`` is a dict (CLI) or a ``k=v,k=v`` string (python API); read
    leniently (results files are history: a malformed part is dropped, not an error)."""
    from lm_eval_quant.args import split_model_args

    if not isinstance(margs, (str, dict)):
        return {}
    return split_model_args(margs, where="report", strict=False)


def parse_tasks(d: dict, source: str = "", stamp: float = 0.0) -> dict[str, TaskResult]:
    """Task name -> TaskResult for every entry of ``results`` (and ``groups``)."""
    hib_all = d.get("higher_is_better") or {}
    n_samples = d.get("n-samples") or {}
    group_subtasks = d.get("group_subtasks") or {}
    entries: dict[str, dict] = {}
    for sect in ("results", "groups"):
        for name, vals in (d.get(sect) or {}).items():
            if isinstance(vals, dict):
                entries.setdefault(name, {}).update(vals)
    out = {}
    for name, vals in entries.items():
        # metric keys look like "acc,none" / "acc_stderr,none" / "exact_match,strict-match"
        by_filter: dict[str, dict[str, float]] = {}
        err_by_filter: dict[str, dict[str, float | None]] = {}
        for k, v in vals.items():
            if "," not in k:
                continue
            metric, filt = k.split(",", 1)
            if metric.endswith("_stderr"):
                err_by_filter.setdefault(filt, {})[metric[: -len("_stderr")]] = _num(v)
                continue
            x = _num(v)
            if x is not None:
                by_filter.setdefault(filt, {})[metric] = x
        if not by_filter:
            continue
        # preferred filter: "none", else the first one the harness wrote
        filt = "none" if "none" in by_filter else next(iter(by_filter))
        metrics = by_filter[filt]
        stderrs = {m: err_by_filter.get(filt, {}).get(m) for m in metrics}
        hib = {m: bool(v) for m, v in (hib_all.get(name) or {}).items()}
        ns = n_samples.get(name) or {}
        n = ns.get("effective") if isinstance(ns, dict) else None
        if n is None:
            n = vals.get("sample_len")
        out[name] = TaskResult(
            name=name,
            metrics=metrics,
            stderrs=stderrs,
            higher_is_better=hib,
            n_samples=int(n) if isinstance(n, (int, float)) else None,
            is_group=name in group_subtasks and bool(group_subtasks.get(name)),
            subtasks=tuple(group_subtasks.get(name) or ()),
            source=source,
            stamp=stamp,
        )
    return out


def _dtype_bits(dtype) -> int | None:
    if not dtype:
        return None
    s = str(dtype).replace("torch.", "").strip().lower()
    return DTYPE_BITS.get(s)


def _display_name(model_path: str) -> str:
    s = str(model_path).rstrip("/\\")
    if not s:
        return "?"
    if os.sep in s or s.startswith((".", "~")) or os.path.isabs(s) or s.count("/") > 1:
        return Path(s).name
    return s  # hub id "org/name" stays as is


def run_from_results(d: dict, path: Path) -> Run:
    """The row identity and precision figures of one results file."""
    cfg = d.get("config") or {}
    margs = parse_model_args(cfg.get("model_args"))
    model_path = str(margs.get("pretrained") or d.get("model_name") or cfg.get("model") or "?")
    q = cfg.get("quantization")
    if not isinstance(q, dict):
        # also accept it at top level, in case a front end put it there
        q = d.get("quantization") if isinstance(d.get("quantization"), dict) else None
    params = _num(cfg.get("model_num_parameters"))
    limit = cfg.get("limit")
    dtype_bits, eval_dtype, storage_dtype, counted_dtype = _precision_dtypes(cfg, margs, q)
    if q is not None:
        f = _quantized_figures(q, params, dtype_bits, counted_dtype)
    else:
        f = _plain_figures(cfg, params, dtype_bits)
    method = f["method"]
    labels = d.get("sweep") if isinstance(d.get("sweep"), dict) else {}
    method_label = str(labels.get("method_label") or method) if method != "none" else "none"
    ex = _execution_figures(q)
    if ex["execution"] == "real":  # a real-kernel run is its own row next to the fake-quantized one
        method_label = f"{method_label} (real)"
    key = (
        model_path,
        method_label,
        method,
        f["format"],
        f["bits"],
        f["group_size"],
        f["sym"],
        json.dumps(f["options"], sort_keys=True, default=str),
        json.dumps(limit, default=str),
    )
    gs, params_total = f["group_size"], f["params_total"]
    return Run(
        key=key,
        model=str(labels.get("model") or _display_name(model_path)),
        model_path=model_path,
        method=method,
        format=f["format"],
        bits=f["bits"],
        group_size=int(gs) if isinstance(gs, (int, float)) and not isinstance(gs, bool) else None,
        sym=f["sym"],
        bits_per_weight=f["bpw"],
        bits_per_param=f["bpp"],
        params_total=int(params_total) if params_total else None,
        total_bits=f["total_bits"],
        model_gb=f["gb"],
        limit=limit,
        options=f["options"],
        source_kind=f["kind"],
        family=str(labels.get("family") or ""),
        method_label=method_label,
        **ex,
        storage_dtype=storage_dtype,
        eval_dtype=eval_dtype,
    )


def _precision_dtypes(cfg: dict, margs: dict, q: dict | None) -> tuple:
    """(bits of the dtype unquantized parts count at, evaluation dtype, storage dtype, that counted dtype)."""
    dtype_bits = _dtype_bits(cfg.get("model_dtype") or margs.get("dtype"))
    eval_dtype = _dtype_name(cfg.get("model_dtype") or margs.get("dtype"), None)
    eval_dtype = None if eval_dtype == "?" else eval_dtype
    storage_dtype = None
    counted_dtype = cfg.get("model_dtype")
    if q is not None and q.get("storage_dtype"):
        # ours since 0.2: the checkpoint's dtype; unquantized parts count at the narrower of it
        # and the evaluation dtype (accounting.account)
        storage_dtype = str(q["storage_dtype"])
        eval_dtype = str(q.get("eval_dtype") or eval_dtype)
        cands = [d for d in (storage_dtype, eval_dtype) if _dtype_bits(d)]
        if cands:
            counted_dtype = min(cands, key=_dtype_bits)
            dtype_bits = _dtype_bits(counted_dtype)
    return dtype_bits, eval_dtype, storage_dtype, counted_dtype


def _quantized_figures(q: dict, params, dtype_bits, counted_dtype) -> dict:
    """Method, format and size figures of a run with our `quantization` block (an unquantized one
    reads as method none at its dtype's bits)."""
    qc = q.get("quant_config") or {}
    method = str(qc.get("method", "none"))
    bits = _num(qc.get("bits"))
    gs = qc.get("group_size")
    fmt = str(qc.get("format", "int"))
    sym = qc.get("sym")
    options = qc.get("options") or {}
    params_total = _num(q.get("params_total")) or params
    total_bits = _num(q.get("total_bits"))
    bpw = _num(q.get("bits_per_quantized_weight"))
    bpp = _num(q.get("bits_per_param"))
    if total_bits is None and bpp is not None and params_total:
        total_bits = bpp * params_total
    if bpp is None and total_bits is not None and params_total:
        bpp = total_bits / params_total
    gb = _num(q.get("total_gb"))
    if gb is None and _num(q.get("total_bytes")) is not None:
        gb = _num(q.get("total_bytes")) / GB
    if gb is None and total_bits is not None:
        gb = total_bits / 8 / GB
    unquantized = method == "none" or (bits is not None and bits >= 16) or not _num(
        q.get("params_quantized")
    )
    if unquantized:
        method = "none"
        b = dtype_bits or (bpp if bpp is not None else bits)
        bits = float(b) if b is not None else None
        gs, sym, fmt = None, None, _dtype_name(counted_dtype, bits)
        options = {}
        if bpw is None or not _num(q.get("params_quantized")):
            bpw = bits
    return dict(method=method, format=fmt, bits=bits, group_size=gs, sym=sym, options=options,
                params_total=params_total, total_bits=total_bits, bpw=bpw, bpp=bpp, gb=gb, kind="hf-quant")


def _plain_figures(cfg: dict, params, dtype_bits) -> dict:
    """The figures of a plain (not hf-quant) run: every parameter at the model's dtype."""
    bits = float(dtype_bits) if dtype_bits else None
    total_bits = params * bits if (params and bits) else None
    return dict(method="none", format=_dtype_name(cfg.get("model_dtype"), dtype_bits), bits=bits, group_size=None,
                sym=None, options={}, params_total=params, total_bits=total_bits, bpw=bits, bpp=bits,
                gb=total_bits / 8 / GB if total_bits is not None else None, kind="plain")


def _execution_figures(q: dict | None) -> dict:
    """Run fields from the issue-14 `execution` block: mode, kernel, measured and peak GB, tokens/s."""
    ex = (q or {}).get("execution") if isinstance((q or {}).get("execution"), dict) else {}  # issue 14
    res = ex.get("resident") if isinstance(ex.get("resident"), dict) else {}
    measured_gb = _num(res.get("total_bytes")) / GB if _num(res.get("total_bytes")) is not None else None
    peak = _num(ex.get("peak_device_bytes"))
    if peak is None:
        peak = _num(ex.get("peak_rss_above_baseline_bytes"))
    return dict(
        execution=str(ex.get("execution") or ""),
        kernel=str(ex.get("kernel") or ""),
        measured_gb=measured_gb,
        peak_gb=peak / GB if peak is not None else None,
        tok_s=_num(ex.get("loglikelihood_tokens_per_s")),
    )


def _dtype_name(dtype, bits) -> str:
    if dtype:
        return str(dtype).replace("torch.", "")
    return f"{_fmt_bits(bits)}-bit" if bits else "?"


def failed_cells(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """(cell, one-line error) of the failed cells recorded in the ``sweep_status.json`` files of
    sweep folders under ``paths`` (shown under the table so a missing row is explained)."""
    out = []
    for f in find_results_files(paths):
        if f.name != "sweep_status.json":
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for c in d.get("cells", []) if isinstance(d, dict) else []:
            if isinstance(c, dict) and c.get("status") == "failed":
                out.append((str(c.get("name")), str(c.get("error_line") or "failed")))
    return out


def collect(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """All runs found under ``paths``, one per RunKey, tasks merged newest-first.

    Raises QuantArgError when no results file is found at all."""
    paths = list(paths)
    files = find_results_files(paths)
    runs: dict[tuple, Run] = {}
    n_ok = 0
    for f in files:
        d = load_results_file(f)
        if d is None:
            if f.name.startswith("results_"):  # a results file we cannot read: say so, by name
                print(f"report: warning: skipped {f} (not a complete lm-eval results file: truncated or damaged?)",
                      file=sys.stderr)
            continue
        n_ok += 1
        stamp = file_stamp(f, d)
        r = run_from_results(d, f)
        tasks = parse_tasks(d, source=str(f), stamp=stamp)
        have = runs.get(r.key)
        if have is None:
            runs[r.key] = have = r
        have.files.append(str(f))
        for name, t in tasks.items():
            old = have.tasks.get(name)
            if old is None or t.stamp >= old.stamp:
                have.tasks[name] = t
    if n_ok == 0:
        where = ", ".join(str(p) for p in paths)
        raise QuantArgError(
            f"report: no lm-eval results files (results_*.json with 'results' and 'config') under {where}"
        )
    return list(runs.values())

"""Run ONE sweep cell in this (fresh) process: ``python -m lm_eval_quant.sweep.cell CELL_DIR``
(or forked by the cell server, ``python -m lm_eval_quant.sweep.cell --serve``, see ``serve``).

Reads ``CELL_DIR/cell.json`` (written by the runner), evaluates all the cell's tasks with one
``lm_eval.simple_evaluate`` call on the ``hf-quant`` model (so the model is loaded and quantized
once for all tasks), and saves the results with lm-eval's own ``EvaluationTracker`` — the same
``results_<timestamp>.json`` the ``lm_eval`` CLI writes with ``--output_path``, plus a top-level
``"sweep"`` key with the cell's labels. The commit protocol, so a SIGKILL at any instant leaves
either a finished cell or none:

1. the tracker writes into ``CELL_DIR/.tmp-<pid>/`` (not a results location);
2. the file is fsync'ed and ``os.replace``'d to ``CELL_DIR/results_<timestamp>.json`` (atomic);
3. ``CELL_DIR/DONE`` (JSON: key, results file, seconds) is written by temp + rename + fsync.

A cell counts as finished when DONE names an existing results file and carries the cell's key.
On failure the cell writes ``CELL_DIR/error.txt`` (one line) and exits 1 (2 for a QuantArgError).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from lm_eval_quant.sweep._io import CELL_JSON, DONE, ERROR, atomic_write_text, die_with_parent, fsync_dir

_log = logging.getLogger(__name__)


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The one-line form of an error: a QuantArgError's own message, else ``Type: first line``."""
    from lm_eval_quant.errors import QuantArgError

    msg = " ".join(str(exc).split())
    if not isinstance(exc, QuantArgError):
        msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def task_include_paths(harness: dict) -> list[str]:
    paths = harness.get("include_path") or []
    if isinstance(paths, str):
        paths = [p for p in paths.split(":") if p]
    paths = [str(Path(p).expanduser().resolve()) for p in paths]
    try:
        from lm_eval_quant import task_dir

        td = task_dir()
        if td.is_dir() and any(td.rglob("*.yaml")) and str(td.resolve()) not in paths:
            # first: lm-eval lets later folders override earlier ones, so the user's tasks win
            paths.insert(0, str(td.resolve()))
    except Exception as e:  # noqa: BLE001  (no shipped tasks: the user's include_path alone)
        _log.debug("shipped task folder not added: %s: %s", type(e).__name__, e)
    return paths


def make_task_manager(tasks: list[str], harness: dict, metadata: dict | None = None):
    """A TaskManager over the include paths (+ our task_configs). ``include_defaults: auto``
    first indexes only those (fast) and adds lm-eval's ~10 s built-in index only when a task
    is not found there. Returns (manager, missing task names)."""
    from lm_eval.tasks import TaskManager

    paths = task_include_paths(harness)
    inc = harness.get("include_defaults", "auto")
    if inc == "auto":
        if paths:
            tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
            missing = [t for t in tasks if not tm.match_tasks([t])]
            if not missing:
                return tm, []
        inc = True
    tm = TaskManager(include_path=paths or None, include_defaults=bool(inc), metadata=metadata)
    missing = [t for t in tasks if not tm.match_tasks([t])]
    return tm, missing


_TM_CACHE: dict[str, tuple] = {}


def with_metadata(tm, metadata: dict):
    """The server's task index with this cell's metadata (what ``TaskManager(metadata=...)``
    sets), without indexing again; None where lm-eval's internals differ (then rebuild)."""
    import copy

    try:
        from lm_eval.tasks._factory import TaskFactory

        if not hasattr(tm, "_factory") or not hasattr(tm, "metadata"):
            return None
        tm = copy.copy(tm)
        tm.metadata = metadata
        tm._factory = TaskFactory(meta=metadata)
        return tm
    except Exception:  # noqa: BLE001
        return None


def _tm_key(tasks, harness) -> str:
    return json.dumps([sorted(tasks), harness.get("include_path"), harness.get("include_defaults", "auto")],
                      sort_keys=True, default=str)


def run_cell(cell_dir: Path) -> int:
    t0 = time.time()
    cell_dir = Path(cell_dir).resolve()
    cfg = json.loads((cell_dir / CELL_JSON).read_text(encoding="utf-8"))
    (cell_dir / ERROR).unlink(missing_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    harness = dict(cfg["harness"])

    times: dict[str, float] = {}

    def lap(name: str, t=[t0]) -> None:
        now = time.time()
        times[name] = round(now - t[0], 2)
        t[0] = now

    simple_evaluate, EvaluationTracker = _import_harness()
    lap("imports")
    tasks = list(cfg["tasks"])
    tm = _cell_task_manager(cfg, tasks, harness)
    lap("task_index")
    tmp = cell_dir / f".tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    tracker = EvaluationTracker(output_path=str(tmp))
    log_samples = bool(harness.get("log_samples", True))
    _set_token_kl_env(cfg, harness, cell_dir, tmp)
    results = simple_evaluate(
        model=cfg["lm_eval_model"],
        model_args=cfg["model_args"],
        tasks=tasks,
        task_manager=tm,
        evaluation_tracker=tracker,
        log_samples=log_samples,
        **_evaluate_kwargs(harness),
        **_seed_kwargs(harness.get("seed")),
    )
    lap("evaluate")
    if results is None:  # non-zero rank in a distributed run: nothing to save here
        return 0
    samples = results.pop("samples", None) if log_samples else None
    results.pop("samples", None)
    results["sweep"] = dict(cfg["labels"], seconds=round(time.time() - t0, 3))
    tracker.save_results_aggregated(results=results, samples=samples)
    if log_samples and samples:
        for task_name in results.get("configs", {}):
            if task_name in samples:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    final = _commit_results(cell_dir, tmp)
    done = {
        "key": cfg["key"],
        "cell": cfg["name"],
        "results": final.name,
        "seconds": round(time.time() - t0, 3),
        "finished_at": time.time(),
        "pid": os.getpid(),
    }
    atomic_write_text(cell_dir / DONE, json.dumps(done, indent=2))
    _rm_tree(tmp)
    lap("save")
    print(f"[lm-eval-quant sweep cell] {cfg['name']} finished; seconds: {times}", file=sys.stderr, flush=True)
    return 0


def _import_harness():
    """Register our model and tasks, quiet known library noise; lm-eval's evaluate and tracker."""
    import lm_eval_quant
    from lm_eval_quant import _quiet

    lm_eval_quant.register()
    _quiet.install()  # known-harmless library noise (see lm_eval_quant/_quiet.py)
    _quiet.quiet_git()
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    return simple_evaluate, EvaluationTracker


def _cell_task_manager(cfg: dict, tasks: list, harness: dict):
    """The cell's TaskManager (the server's pre-built index when there is one); unknown tasks: one error."""
    from lm_eval_quant.args import split_model_args
    from lm_eval_quant.errors import QuantArgError

    # like the lm_eval CLI: tasks see the model_args (+ --metadata) as their metadata
    # (e.g. the perplexity tasks read the tokenizer's name from it)
    metadata = split_model_args(cfg["model_args"], where="sweep cell", typed=True) | dict(harness.get("metadata") or {})
    key = _tm_key(tasks, harness)
    tm = None
    if key in _TM_CACHE:  # indexed by the cell server before it forked this process
        tm, missing = with_metadata(_TM_CACHE[key][0], metadata), _TM_CACHE[key][1]
    if tm is None:
        tm, missing = make_task_manager(tasks, harness, metadata)
    if missing:
        raise QuantArgError(
            f"unknown task(s) {missing}; check the names or add their folder to include_path"
        )
    return tm


def _seed_kwargs(seed) -> dict:
    """harness.seed (one number or four) as simple_evaluate's four seed arguments."""
    if seed is None:
        return {}
    s = list(seed) if isinstance(seed, list) else [seed] * 4
    return dict(random_seed=s[0], numpy_random_seed=s[1], torch_random_seed=s[2], fewshot_random_seed=s[3])


def _evaluate_kwargs(harness: dict) -> dict:
    """The harness settings simple_evaluate takes as they are, with a device always set."""
    kw = {k: harness[k] for k in ("limit", "batch_size", "max_batch_size", "num_fewshot", "apply_chat_template",
                                  "fewshot_as_multiturn", "system_instruction", "device", "gen_kwargs",
                                  "bootstrap_iters") if harness.get(k) is not None}
    if not kw.get("device"):  # lm-eval's HF model would default to cuda even without a GPU
        import torch

        kw["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return kw


def _set_token_kl_env(cfg: dict, harness: dict, cell_dir: Path, tmp: Path) -> None:
    """Token-KL reference and output folders for hf-quant cells (read by the model wrapper)."""
    if harness.get("token_kl", True) and cfg.get("lm_eval_model", "hf-quant") == "hf-quant":
        # fp top-k reference shared by the model's cells: OUT/kl_ref/<model>/<task>.topk.npz
        # (written by the unquantized cell, which runs first); quantized cells write
        # tokkl_<task>.npz into tmp, moved beside the results below (lm_eval_quant.tokkl)
        model_name = str((cfg.get("labels") or {}).get("model") or "model")
        os.environ["LMQ_KL_REF"] = str(cell_dir.parent.parent / "kl_ref" / model_name)
        os.environ["LMQ_KL_OUT"] = str(tmp / "tokkl")


def _commit_results(cell_dir: Path, tmp: Path) -> Path:
    """Move what the tracker wrote in ``tmp`` into the cell folder, fsynced, results file last (the
    commit point); token-KL files get the results' time stamp. Returns the final results path."""
    written = sorted(tmp.rglob("*.json*"))
    res_files = [p for p in written if p.name.startswith("results_")]
    if len(res_files) != 1:
        raise RuntimeError(f"expected one results file from lm-eval's tracker, found {len(res_files)}")
    check_results_file(res_files[0])  # lm-eval's writer swallows write errors: parse before the commit
    # samples first, results last: the results file's appearance is the commit point
    for p in written:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    for p in written:
        if p not in res_files:
            os.replace(p, cell_dir / p.name)
    stamp = res_files[0].name[len("results_"):-len(".json")]
    for p in sorted((tmp / "tokkl").glob("tokkl_*.npz")):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        os.replace(p, cell_dir / f"{p.stem}_{stamp}.npz")
    final = cell_dir / res_files[0].name
    os.replace(res_files[0], final)
    fsync_dir(cell_dir)
    return final


def check_results_file(p: Path) -> None:
    """Raise (one line) unless `p` is a complete results JSON (a full disk leaves it truncated,
    and lm-eval's tracker only logs the error)."""
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"lm-eval wrote an unreadable results file {p.name} ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:120]}); disk full? nothing was committed") from None
    if not isinstance(d, dict) or not isinstance(d.get("results"), dict):
        raise RuntimeError(f"lm-eval wrote an incomplete results file {p.name} (no 'results'); nothing was committed")


def _rm_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--serve"]:
        return serve()
    if len(argv) != 1:
        print("usage: python -m lm_eval_quant.sweep.cell CELL_DIR", file=sys.stderr)
        return 2
    cell_dir = Path(argv[0])
    try:
        return run_cell(cell_dir)
    except BaseException as e:  # noqa: BLE001
        from lm_eval_quant.errors import QuantArgError

        if isinstance(e, SystemExit) and not e.code:
            return 0
        traceback.print_exc()
        _rm_tree(cell_dir / f".tmp-{os.getpid()}")
        line = one_line(e)
        try:
            atomic_write_text(cell_dir / ERROR, line + "\n")
        except OSError:
            pass
        print(f"lm-eval-quant sweep cell: error: {line}", file=sys.stderr)
        return 2 if isinstance(e, QuantArgError) else 1


# ------------------------------------------------------------------------------------ cell server
def serve() -> int:
    """Fork server (``python -m lm_eval_quant.sweep.cell --serve``): imports torch, transformers,
    lm-eval and the package once, then forks one fresh child process per cell, so a cell does not
    pay the interpreter start and the imports (seconds per cell on small models), while each cell
    still has its own process (memory freed on exit, killed alone, dies with the sweep).

    Protocol on stdin/stdout, one JSON object per line:
      server → ``{"ready": true, "fork_ok": bool}`` (fork_ok false: CUDA was initialised by an
               import, so forking is unsafe; the runner then spawns cells instead)
      runner → ``{"prepare": {"tasks": [...], "harness": {...}}}`` → ``{"prepared": true}``
               (the task index is built once, before forking)
      runner → ``{"cell_dir": "..."}`` → ``{"pid": N}`` then ``{"rc": code}`` (negative: signal)
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # library prints must not reach the protocol channel
    die_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval_quant

    lm_eval_quant.register()
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.loggers  # noqa: F401
    import lm_eval.tasks  # noqa: F401
    import torch

    fork_ok = not (torch.cuda.is_available() and torch.cuda.is_initialized())
    proto.write(json.dumps({"ready": True, "fork_ok": fork_ok}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        if "prepare" in msg:
            prep = msg["prepare"]
            tasks, harness = prep["tasks"], prep["harness"]
            missing = None
            try:
                _TM_CACHE[_tm_key(tasks, harness)] = make_task_manager(tasks, harness)
                missing = _TM_CACHE[_tm_key(tasks, harness)][1]
            except Exception as e:  # noqa: BLE001  (the cell will build it and report the error itself)
                _log.debug("task index not prebuilt: %s: %s", type(e).__name__, e)
            _preimport(prep.get("models", []), prep.get("methods", []))
            fork_ok = not (torch.cuda.is_available() and torch.cuda.is_initialized())
            proto.write(json.dumps({"prepared": True, "fork_ok": fork_ok, "missing": missing}) + "\n")
            continue
        cell_dir = Path(msg["cell_dir"])
        server_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the cell process
            code = 1
            try:
                proto.close()
                die_with_parent()
                if os.getppid() != server_pid:  # the server died before prctl took effect
                    os._exit(1)
                logfd = os.open(str(cell_dir / "cell.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(logfd, 1)
                os.dup2(logfd, 2)
                os.close(logfd)
                nul = os.open(os.devnull, os.O_RDONLY)
                os.dup2(nul, 0)
                code = main([str(cell_dir)])
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        proto.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        proto.write(json.dumps({"rc": rc}) + "\n")
    return 0


def _preimport(models: list[str], methods: list[str]) -> None:
    """Import, once in the server, what every cell would import lazily: transformers' model
    classes of the sweep's architectures, the tokenizer machinery, the quantization methods.
    Nothing is instantiated and no weights are read."""
    try:
        import transformers
        import transformers.modeling_utils  # noqa: F401
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        _ = transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer
        import lm_eval.models.huggingface  # noqa: F401
    except Exception:  # noqa: BLE001
        return
    for m in models:
        try:
            cfg = transformers.AutoConfig.from_pretrained(m)
            _ = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
        except Exception as e:  # noqa: BLE001  (hub id offline, unknown architecture: the cell will say)
            _log.debug("preimport of %s skipped: %s: %s", m, type(e).__name__, e)
    try:
        from lm_eval_quant.methods import get_method

        for name in methods:
            try:
                get_method(name)
            except Exception as e:  # noqa: BLE001  (the cell reports an unusable method itself)
                _log.debug("preimport of method %s skipped: %s: %s", name, type(e).__name__, e)
    except ImportError as e:
        _log.debug("methods not preimported: %s", e)


if __name__ == "__main__":
    sys.exit(main())

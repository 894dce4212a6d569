"""The sweep runner: expands a spec into cells, skips finished ones, runs the rest (each in a fresh
subprocess, via the local or the Ray launcher), logs every event to an append-only, fsync'ed
``sweep_log.jsonl`` and keeps ``sweep_status.json`` (atomic) up to date.

Output folder layout::

    OUT/
      sweep_spec.json          the resolved spec of the latest run
      sweep_log.jsonl          append-only run log (one JSON event per line, with timestamps)
      sweep_status.json        one entry per cell: status, results path, error line, seconds
      cells/<cell>/            one folder per cell
        cell.json              what the cell runs (model_args string, tasks, harness options, key)
        results_<ts>.json      lm-eval's own results JSON (+ a top-level "sweep" key)
        DONE                   the finished marker (key, results file name, seconds)
        cell.log               the cell process's stdout/stderr
        error.txt              the one-line error of a failed cell
      .stale/                  results of cells whose config changed (kept, never read as current)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.sweep._io import CELL_JSON, DONE, ERROR, atomic_write_text, check_writable_dir, die_with_parent
from lm_eval_quant.sweep.launch import (CELLS_DIR, CellResult, Launch, cell_env, finished_results,  # noqa: F401
                                        run_cell_subprocess)
from lm_eval_quant.sweep.spec import Cell, SweepSpec

LOG_NAME = "sweep_log.jsonl"
STATUS_NAME = "sweep_status.json"
SPEC_NAME = "sweep_spec.json"
STALE_DIR = ".stale"
LAUNCHERS = ("local", "ray")


@dataclass
class SweepResult:
    out_dir: Path
    cells: list[CellResult]
    log_path: Path
    status_path: Path

    @property
    def finished(self) -> list[CellResult]:
        return [c for c in self.cells if c.status in ("done", "skipped_done")]

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        rows = [("cell", "status", "seconds", "error / results")]
        for c in self.cells:
            rows.append((c.name, c.status, f"{c.seconds:.1f}",
                         c.error_line or (Path(c.results_path).name if c.results_path else "")))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}" for r in rows)


# ------------------------------------------------------------------------------------ run log
class RunLog:
    """Append-only JSONL log; every line is flushed and fsync'ed before the call returns."""

    def __init__(self, path: Path, run_id: str):
        self.path = Path(path)
        self.run_id = run_id
        self._f = open(self.path, "a", encoding="utf-8")

    def event(self, event: str, **kw) -> None:
        now = time.time()
        rec = {"t": round(now, 6), "time": datetime.fromtimestamp(now, timezone.utc).isoformat(),
               "run": self.run_id, "event": event}
        rec.update(kw)
        self._f.write(json.dumps(rec, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def read_log(out_dir) -> list[dict]:
    """The run log's events (a torn last line, from a kill mid-write, is ignored)."""
    p = Path(out_dir) / LOG_NAME
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def load_status(out_dir) -> list[CellResult]:
    """The cells of the latest run in ``out_dir`` as recorded in its ``sweep_status.json``."""
    p = Path(out_dir) / STATUS_NAME
    if not p.is_file():
        return []
    d = json.loads(p.read_text(encoding="utf-8"))
    return [CellResult(**c) for c in d.get("cells", [])]


# ------------------------------------------------------------------------------------ cell state
def _results_key(p: Path) -> str | None:
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("sweep", {}).get("key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _prepare_cell_dir(out_dir: Path, cell_dir: Path, cell: Cell, log: RunLog) -> Path | None:
    """Make ``cell_dir`` ready for a (re)run. Returns a results path when the cell turns out to be
    finished after all (killed between the results rename and the DONE marker: recovered)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    for p in cell_dir.glob(".tmp-*"):  # leftovers of a killed cell process
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in cell_dir.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
    results = sorted(cell_dir.glob("results_*.json"))
    same = [p for p in results if _results_key(p) == cell.key]
    if same:  # committed results of this very config without a DONE marker: finish the commit
        keep = same[-1]
        done = {"key": cell.key, "cell": cell.name, "results": keep.name, "seconds": 0.0,
                "finished_at": keep.stat().st_mtime, "recovered": True}
        atomic_write_text(cell_dir / DONE, json.dumps(done, indent=2))
        log.event("cell_recovered", cell=cell.name, key=cell.key, results=keep.name)
        return keep
    stale = [p for p in cell_dir.iterdir() if p.name.startswith("results_") or p.name.startswith("samples_")]
    old_done = cell_dir / DONE
    if stale or old_done.exists():
        old_key = "unknown"
        try:
            old_key = json.loads(old_done.read_text()).get("key", "unknown") if old_done.exists() else "partial"
        except (OSError, json.JSONDecodeError):
            pass
        dest = out_dir / STALE_DIR / f"{cell.name}-{old_key}-{int(time.time())}"
        dest.mkdir(parents=True, exist_ok=True)
        for p in stale + ([old_done] if old_done.exists() else []):
            os.replace(p, dest / p.name)
        log.event("cell_stale_moved", cell=cell.name, key=cell.key, old_key=old_key, to=str(dest))
    (cell_dir / ERROR).unlink(missing_ok=True)
    return None


def _write_cell_json(cell_dir: Path, cell: Cell) -> None:
    atomic_write_text(cell_dir / CELL_JSON, json.dumps(cell.to_dict(), indent=2, default=str))


# ------------------------------------------------------------------------------------ subprocess
class CellServer:
    """Client of the fork server (``python -m lm_eval_quant.sweep.cell --serve``, see cell.serve):
    one interpreter with the heavy imports done, forking a fresh process per cell."""

    def __init__(self, env: dict, log_path: Path, ready_timeout: float = 600.0):
        self.buf = b""
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lm_eval_quant.sweep.cell", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        msg = self._read(ready_timeout)
        self.ok = bool(msg and msg.get("ready") and msg.get("fork_ok"))
        if not self.ok:
            self.close()

    def _read(self, timeout: float | None) -> dict | None:
        import select

        fd = self.proc.stdout.fileno()
        end = None if timeout is None else time.time() + timeout
        while b"\n" not in self.buf:
            left = None if end is None else max(0.0, end - time.time())
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # the server is gone
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _send(self, msg: dict) -> bool:
        try:
            self.proc.stdin.write((json.dumps(msg, default=str) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def prepare(self, tasks, harness, models=(), methods=()) -> list | None:
        """Build the task index and import the model classes in the server; returns the task
        names that were not found (None: unknown)."""
        if self._send({"prepare": {"tasks": list(tasks), "harness": dict(harness), "models": list(models),
                                   "methods": list(methods)}}):
            msg = self._read(None)
            if not msg or not msg.get("fork_ok", False):
                self.ok = False
            return (msg or {}).get("missing")
        self.ok = False
        return None

    def run(self, cell_dir: Path, timeout: float | None, on_start=None) -> tuple[int | None, bool]:
        if not self._send({"cell_dir": str(cell_dir)}):
            self.ok = False
            return None, False
        msg = self._read(60)
        if msg is None:
            self.ok = False
            return None, False
        pid = msg["pid"]
        if on_start:
            on_start(pid)
        try:
            msg = self._read(timeout)
        except TimeoutError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            msg = self._read(60)
            return (msg or {}).get("rc"), True
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
        if msg is None:
            self.ok = False
            return None, False
        return msg["rc"], False

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:  # nothing to save in the server: give it a moment, then end it
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ------------------------------------------------------------------------------------ checks
def _check_models(spec: SweepSpec) -> None:
    """Local model folders exist (cheap; before anything is started)."""
    for m in spec.models:
        p = m.pretrained
        looks_local = p.startswith(("/", "./", "../", "~")) or Path(p).exists() or p.count("/") > 1
        if looks_local and not Path(p).expanduser().exists():
            raise QuantArgError(f"sweep: model folder {p} does not exist (give a local folder or a hub id)")


def _missing_tasks_error(missing) -> QuantArgError:
    return QuantArgError(
        f"sweep: unknown task(s) {list(missing)}; check the names (lm-eval-quant ls tasks) or add their folder to include_path"
    )


def _check_tasks(spec: SweepSpec) -> None:
    """Every task name resolves (builds lm-eval's task index here)."""
    from lm_eval_quant.sweep.cell import make_task_manager

    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    _, missing = make_task_manager(list(spec.tasks), dict(spec.harness))
    if missing:
        raise _missing_tasks_error(missing)


def _start_server(spec: SweepSpec, cells: list[Cell], out_dir: Path) -> "CellServer | None":
    """A ready fork server for these cells, or None (fork unsafe / server failed). Raises the
    one-line error for unknown tasks (the server builds the task index anyway)."""
    server = CellServer(cell_env(), out_dir / "cell_server.log")
    if not server.ok:
        return None
    missing = server.prepare(spec.tasks, spec.harness, models=sorted({c.model.pretrained for c in cells}),
                             methods=sorted({c.method for c in cells}))
    if missing:
        server.close()
        raise _missing_tasks_error(missing)
    if not server.ok:
        server.close()
        return None
    return server


class _Lock:
    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.f = None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            who = self.f.read().strip() or "?"
            self.f.close()
            raise QuantArgError(f"sweep: another sweep (pid {who}) is running in {self.path.parent}; wait for it or use another --out") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()
        return self

    def __exit__(self, *a):
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
            self.f.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------ main entry
def run_sweep(spec, out_dir, launcher: str = "local", ray_address: str | None = None, progress: bool = True,
              retry_failed: bool = True, dry_run: bool = False, check: bool = True,
              start: str = "auto") -> SweepResult:
    """Run (or resume) a sweep. ``spec``: a SweepSpec, a dict, or the path of a YAML spec.

    Cells already finished in ``out_dir`` with the same config key are not redone
    (``skipped_done``); a cell whose config changed is rerun (its old results move to
    ``.stale/``). A failing cell is recorded with its one-line error and the sweep goes on.
    ``retry_failed=False`` leaves cells that failed in an earlier run alone (status ``failed``).
    ``dry_run`` only expands and reports the cells (status ``planned``/``skipped``/``skipped_done``).
    ``start`` (local launcher): ``spawn`` starts each cell as ``python -m lm_eval_quant.sweep.cell``;
    ``fork`` forks each cell from a server process that did the imports once (Linux; much faster
    for small models); ``auto`` = fork where available, else spawn.
    """
    if start not in ("auto", "fork", "spawn"):
        raise QuantArgError(f"sweep: start must be auto, fork or spawn, not {start!r}")
    if launcher not in LAUNCHERS:
        raise QuantArgError(f"sweep: unknown launcher {launcher!r}; use {' or '.join(LAUNCHERS)}")
    spec = SweepSpec.load(spec)
    cells = spec.cells()
    out_dir = Path(out_dir).expanduser().resolve()
    check_writable_dir(out_dir, "sweep: --out")
    if launcher == "ray" and not dry_run:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise QuantArgError("sweep: --launcher ray needs Ray: pip install 'lm-eval-quant[ray]'") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(out_dir):
        return _run_locked(spec, cells, out_dir, launcher, ray_address, progress, retry_failed, dry_run, check,
                           start)


def _run_locked(spec, cells, out_dir, launcher, ray_address, progress, retry_failed, dry_run, check,
                start="auto") -> SweepResult:
    from tqdm.auto import tqdm

    run_id = uuid.uuid4().hex[:12]
    log = RunLog(out_dir / LOG_NAME, run_id)
    status_path = out_dir / STATUS_NAME
    job = Launch(spec=spec, out_dir=out_dir, run_id=run_id, status_path=status_path, log=log, all_cells=cells)
    results, res_of, save_status = job.results, job.result, job.save_status
    server = None

    try:
        todo = _cells_to_run(job, retry_failed)
        if dry_run:
            for c in todo:
                results[c.name] = res_of(c, "planned")
            return SweepResult(out_dir, [results[c.name] for c in cells], out_dir / LOG_NAME, status_path)
        if check and todo:
            _check_models(spec)
        use_fork = launcher == "local" and todo and (
            start == "fork" or (start == "auto" and sys.platform.startswith("linux") and len(todo) > 1))
        if use_fork:
            if progress:
                print(f"sweep {spec.name}: starting the cell server (imports once for all cells)...",
                      file=sys.stderr, flush=True)
            server = _start_server(spec, todo, out_dir)
            if server is None:
                log.event("cell_server_unavailable", reason="fork unsafe or the server failed; spawning cells")
        if check and todo and server is None:
            _check_tasks(spec)
        atomic_write_text(out_dir / SPEC_NAME, json.dumps(spec.to_dict(), indent=2, default=str))
        _log_sweep_start(job, launcher, todo)
        runnable = _prepare_cells(job, todo)
        save_status()
        bar = tqdm(total=len(cells), desc=f"sweep {spec.name}", unit="cell", disable=not progress,
                   initial=len(cells) - len(runnable), dynamic_ncols=True)
        job.cells, job.bar = runnable, bar
        try:
            if launcher == "local":
                _launch_local(job, server)
                server = None  # closed by _launch_local
            else:
                from lm_eval_quant.sweep.ray_launcher import launch_ray

                launch_ray(job, ray_address)
        finally:
            bar.close()
        save_status()
        final = [results[c.name] for c in cells]
        log.event("sweep_end", done=sum(c.status == "done" for c in final),
                  skipped_done=sum(c.status == "skipped_done" for c in final),
                  failed=sum(c.status == "failed" for c in final),
                  skipped=sum(c.status == "skipped" for c in final))
        return SweepResult(out_dir, final, out_dir / LOG_NAME, status_path)
    except KeyboardInterrupt:
        log.event("sweep_interrupted")
        raise
    finally:
        if server is not None:
            server.close()
        log.close()


def _cells_to_run(job: Launch, retry_failed: bool) -> list[Cell]:
    """The cells still to run; the others get their result now: skipped (with the reason), finished
    before (skipped_done), or failed before with the same key (kept unless ``retry_failed``)."""
    results, res_of = job.results, job.result
    prev_status = {c.name: c for c in load_status(job.out_dir)}
    todo: list[Cell] = []
    for cell in job.all_cells:
        cdir = job.out_dir / CELLS_DIR / cell.name
        if cell.skip_reason:
            results[cell.name] = res_of(cell, "skipped", error_line=cell.skip_reason)
            continue
        fin = finished_results(cdir, cell.key)
        if fin is not None:
            results[cell.name] = res_of(cell, "skipped_done", results_path=str(fin),
                                        seconds=_done_seconds(cdir))
            continue
        prev = prev_status.get(cell.name)
        if (not retry_failed and prev is not None and prev.status == "failed" and prev.key == cell.key):
            results[cell.name] = prev
            continue
        todo.append(cell)
    return todo


def _log_sweep_start(job: Launch, launcher: str, todo: list[Cell]) -> None:
    """The run log's sweep_start event, then one event per cell skipped or already done."""
    results, log = job.results, job.log
    log.event("sweep_start", name=job.spec.name, launcher=launcher, pid=os.getpid(), cells=len(job.all_cells),
              to_run=len(todo), already_done=sum(r.status == "skipped_done" for r in results.values()),
              skipped=sum(r.status == "skipped" for r in results.values()))
    for cell in job.all_cells:
        r = results.get(cell.name)
        if r is not None and r.status == "skipped_done":
            log.event("cell_skipped_done", cell=cell.name, key=cell.key, results=r.results_path)
        elif r is not None and r.status == "skipped":
            log.event("cell_skipped", cell=cell.name, key=cell.key, reason=r.error_line)


def _prepare_cells(job: Launch, todo: list[Cell]) -> list[Cell]:
    """Prepare each cell's folder (recovering half-committed cells, which count as done) and write
    its cell.json; the cells left to launch."""
    runnable: list[Cell] = []
    for cell in todo:
        cdir = job.out_dir / CELLS_DIR / cell.name
        rec = _prepare_cell_dir(job.out_dir, cdir, cell, job.log)
        if rec is not None:
            job.results[cell.name] = job.result(cell, "skipped_done", results_path=str(rec))
            continue
        _write_cell_json(cdir, cell)
        runnable.append(cell)
    return runnable


def _done_seconds(cdir: Path) -> float:
    try:
        return float(json.loads((cdir / DONE).read_text()).get("seconds", 0.0))
    except (OSError, json.JSONDecodeError, ValueError):
        return 0.0


def _launch_local(job: Launch, server: "CellServer | None" = None) -> None:
    """Run ``job.cells`` one after another: forked by the cell server, else spawned."""
    env = cell_env()
    try:
        for cell in job.cells:
            cdir = job.cell_dir(cell)
            if job.bar is not None:
                job.bar.set_postfix_str(cell.name, refresh=True)
            t0 = time.time()
            how = "fork" if server is not None else "spawn"

            def started(pid, c=cell, how=how):
                job.log.event("cell_start", cell=c.name, key=c.key, pid=pid, start=how, model_args=c.model_args_string())

            if server is not None:
                rc, timed_out = server.run(cdir, job.timeout, on_start=started)
                if not server.ok:  # the server died: this cell failed, the rest are spawned
                    job.log.event("cell_server_lost")
                    server.close()
                    server = None
            else:
                rc, timed_out = run_cell_subprocess(cdir, env=env, timeout=job.timeout, on_start=started)
            job.finish(cell, rc, timed_out, time.time() - t0)
    finally:
        if server is not None:
            server.close()

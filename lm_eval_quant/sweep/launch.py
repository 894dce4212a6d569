"""Running cells and recording how they ended: what the launchers share (issue 10).

The runner (``runner.py``) plans a sweep and hands a launcher one :class:`Launch` object: the
cells to run, where, the spec, the run log, and the bookkeeping (``result``, ``finish``,
``save_status``). The local launcher (``runner._launch_local``) and the Ray launcher
(``ray_launcher.launch_ray``) both import this module and nothing of each other or of the runner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_quant.sweep._io import DONE, ERROR, atomic_write_text, die_with_parent
from lm_eval_quant.sweep.spec import Cell

CELLS_DIR = "cells"


@dataclass
class CellResult:
    """Outcome of one cell. status: ``done`` (ran now), ``skipped_done`` (finished by an earlier
    run, not redone), ``failed`` (error_line says why), ``skipped`` (invalid combination, never
    run; error_line is the reason)."""

    name: str
    status: str
    results_path: str | None = None
    error_line: str | None = None
    seconds: float = 0.0
    key: str = ""
    labels: dict = field(default_factory=dict)
    model_args: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ cell state
def finished_results(cell_dir: Path, key: str) -> Path | None:
    """The results file of a finished cell with this key, else None."""
    done = cell_dir / DONE
    if not done.is_file():
        return None
    try:
        d = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if d.get("key") != key:
        return None
    res = cell_dir / str(d.get("results", ""))
    return res if res.is_file() and res.name.startswith("results_") else None


def error_line(cell_dir: Path, rc: int | None, timed_out: bool = False, timeout: float | None = None) -> str:
    if timed_out:
        return f"cell exceeded cell_timeout={timeout}s and was killed"
    p = cell_dir / ERROR
    if p.is_file():
        line = p.read_text(encoding="utf-8").strip()
        if line:
            return line.splitlines()[0]
    tail = ""
    log = cell_dir / "cell.log"
    if log.is_file():
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        tail = lines[-1][:300] if lines else ""
    if rc is None:
        msg = "cell process lost (its cell server died)"
    elif rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        msg = f"cell process killed by {sig}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
    else:
        msg = f"cell process exited with code {rc}"
    return msg + (f": {tail}" if tail else "")



# ------------------------------------------------------------------------------------ subprocess
def cell_env(extra: dict | None = None) -> dict:
    """Environment of a cell process: ours, the package importable, tokenizers quiet."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    pp = env.get("PYTHONPATH", "")
    if pkg_root not in pp.split(os.pathsep):
        env["PYTHONPATH"] = pkg_root + (os.pathsep + pp if pp else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def run_cell_subprocess(cell_dir: Path, env: dict | None = None, timeout: float | None = None,
                        on_start=None, python: str | None = None) -> tuple[int | None, bool]:
    """Run ``python -m lm_eval_quant.sweep.cell cell_dir``; returns (returncode, timed_out)."""
    cell_dir = Path(cell_dir)
    with open(cell_dir / "cell.log", "ab") as logf:
        proc = subprocess.Popen(
            [python or sys.executable, "-m", "lm_eval_quant.sweep.cell", str(cell_dir)],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env if env is not None else cell_env(),
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        if on_start:
            on_start(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
            return rc, False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return proc.returncode, True
        except BaseException:
            proc.kill()
            proc.wait()
            raise


@dataclass
class Launch:
    """One sweep run's cells and bookkeeping, handed to a launcher as one object."""

    spec: Any                       # SweepSpec
    out_dir: Path
    run_id: str
    status_path: Path
    log: Any                        # runner.RunLog: .event(name, **fields)
    all_cells: list[Cell]           # every cell of the spec (the status file lists them all)
    cells: list[Cell] = field(default_factory=list)            # the ones this launcher runs
    results: dict[str, CellResult] = field(default_factory=dict)
    bar: Any = None                 # a tqdm bar (set_postfix_str, update), or None

    @property
    def timeout(self) -> float | None:
        return self.spec.harness.get("cell_timeout")

    def cell_dir(self, cell: Cell) -> Path:
        return self.out_dir / CELLS_DIR / cell.name

    def result(self, cell: Cell, status: str, **kw) -> CellResult:
        return CellResult(name=cell.name, status=status, key=cell.key, labels=cell.labels(),
                          model_args=cell.model_args_string(), **kw)

    def save_status(self) -> None:
        cur = [self.results.get(c.name) or self.result(c, "pending") for c in self.all_cells]
        atomic_write_text(self.status_path, json.dumps(
            {"name": self.spec.name, "run": self.run_id, "updated": time.time(), "out_dir": str(self.out_dir),
             "cells": [c.to_dict() for c in cur]}, indent=2, default=str))

    def finish(self, cell: Cell, rc, timed_out: bool, seconds: float, **extra) -> CellResult:
        """Record a cell whose process has ended, save the status, advance the bar."""
        cdir = self.cell_dir(cell)
        fin = finished_results(cdir, cell.key)
        if rc == 0 and fin is not None:
            r = self.result(cell, "done", results_path=str(fin), seconds=round(seconds, 3))
            self.log.event("cell_done", cell=cell.name, key=cell.key, seconds=round(seconds, 3), results=str(fin),
                           **extra)
        else:
            line = error_line(cdir, rc, timed_out, self.timeout)
            if rc == 0:
                line = "cell process ended without writing its results"
            r = self.result(cell, "failed", error_line=line, seconds=round(seconds, 3))
            self.log.event("cell_failed", cell=cell.name, key=cell.key, seconds=round(seconds, 3), rc=rc, error=line,
                           **extra)
        self.results[cell.name] = r
        self.save_status()
        if self.bar is not None:
            self.bar.update(1)
        return r

"""Small file helpers shared by the runner and the cell process (no heavy imports)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

DONE = "DONE"
ERROR = "error.txt"
CELL_JSON = "cell.json"


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # no space / read-only: the old file stays, no half-written one appears
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def check_writable_dir(d: Path, what: str) -> None:
    """One QuantArgError line unless folder `d` exists or can be created, and can be written."""
    from lm_eval_quant.errors import QuantArgError

    d = Path(d)
    if d.exists() and not d.is_dir():
        raise QuantArgError(f"{what} {d} exists and is not a folder")
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise QuantArgError(f"{what} {d} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QuantArgError(f"{what} {d} is not writable ({probe} is read-only)")


def os_error_line(e: OSError, where: str) -> str:
    """`where`: what failed, said in one line (no space, read-only, ...)."""
    why = e.strerror or str(e)
    name = f" {e.filename}" if getattr(e, "filename", None) else ""
    return f"{where}: cannot write{name} ({why})"


def die_with_parent() -> None:
    """preexec_fn / fork child: this process gets SIGKILL when its parent dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError) as e:  # no glibc (macOS, musl): the cell outlives a killed sweep
        logger.debug("PR_SET_PDEATHSIG unavailable: %s", e)

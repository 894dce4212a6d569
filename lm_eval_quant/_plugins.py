"""Third-party extension points: the entry-point groups ``lm_eval_quant.methods`` and
``lm_eval_quant.formats`` (see docs/EXTENDING.md).

Each group is read once, the first time a registry needs it (not at import), and each entry
point is loaded then. A plug-in that fails to load, or that would replace a built-in name, costs
one logged warning line and is left out; it never stops the package. Standard library only: the
formats layer uses this module too.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Callable, Iterable

METHODS_GROUP = "lm_eval_quant.methods"
FORMATS_GROUP = "lm_eval_quant.formats"

_LOADED: dict[str, dict[str, Any]] = {}
logger = logging.getLogger("lm_eval_quant.plugins")


def _entry_points(group: str) -> Iterable[Any]:
    return metadata.entry_points(group=group)


def load_group(group: str, taken: Iterable[str] = (), check: Callable[[Any], str | None] | None = None) -> dict[str, Any]:
    """``name -> loaded object`` for every working entry point of ``group`` (read once, cached).

    ``taken``: built-in names a plug-in may not replace. ``check(obj)``: a reason string when the
    loaded object is not usable, else None."""
    if group in _LOADED:
        return _LOADED[group]
    out: dict[str, Any] = {}
    taken = {str(t).lower() for t in taken}
    try:
        eps = list(_entry_points(group))
    except Exception as e:  # noqa: BLE001  (a broken distribution's metadata must not stop us)
        logger.warning("lm-eval-quant: could not read the %s entry points: %s: %s", group, type(e).__name__, e)
        eps = []
    for ep in eps:
        name = str(ep.name).strip().lower()
        where = f"plug-in {name} ({ep.value}) in group {group}"
        if name in taken or name in out:
            logger.warning("lm-eval-quant: %s is ignored: the name %r is already taken", where, name)
            continue
        try:
            obj = ep.load()
            reason = check(obj) if check is not None else None
        except Exception as e:  # noqa: BLE001  (any failure of third-party code: one line, left out)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if reason:
            logger.warning("lm-eval-quant: %s is ignored: %s", where, reason)
            continue
        out[name] = obj
    _LOADED[group] = out
    return out


def reset() -> None:
    """Forget what was read (tests, or after installing a plug-in in a running process)."""
    _LOADED.clear()

"""`lm-eval-quant cache list|size|clean`: look at and trim the quantized-weights cache.

    lm-eval-quant cache list                      # key, model, method/bits/group, size, last use
    lm-eval-quant cache size                      # the total
    lm-eval-quant cache clean --older-than 30     # entries not used for 30 days
    lm-eval-quant cache clean --max-size 5        # least recently used first, until ≤ 5 GB
    lm-eval-quant cache clean                     # everything

The folder is ``--cache-dir``, else ``$LMQ_CACHE_DIR``, else the user cache dir (see
:func:`lm_eval_quant.cache.default_cache_dir`). Every write also keeps the cache under
``$LMQ_CACHE_MAX_GB`` (default 20 GB) the same way ``clean --max-size`` does. An entry that a
running process holds (its lock) is never removed.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import QuantArgError

_PROG = "lm-eval-quant cache"
_PREFIX = "cache"


def _human(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def _number(name: str, v: str | None) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        raise QuantArgError(f"{_PREFIX}: {name} must be a number, got {v!r}") from None
    if not x >= 0:
        raise QuantArgError(f"{_PREFIX}: {name} must be ≥ 0, got {v}")
    return x


def main(argv: list[str] | None = None) -> int:
    from .cache import MAX_GB_ENV, QuantCache, max_cache_bytes

    ap = argparse.ArgumentParser(prog=_PROG, description="List, measure and trim the quantized-weights cache.")
    ap.add_argument("action", choices=("list", "size", "clean"))
    ap.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                    help="cache folder (default: $LMQ_CACHE_DIR or the user cache dir)")
    ap.add_argument("--older-than", "--older_than", dest="older_than", default=None, metavar="DAYS",
                    help="clean: remove entries not used for more than DAYS days")
    ap.add_argument("--max-size", "--max_size", dest="max_size", default=None, metavar="GB",
                    help="clean: remove least recently used entries until the cache is at most GB")
    ns = ap.parse_args(argv)
    try:
        days = _number("--older-than", ns.older_than)
        gb = _number("--max-size", ns.max_size)
        if ns.action != "clean" and (days is not None or gb is not None):
            raise QuantArgError(f"{_PREFIX}: --older-than and --max-size go with `clean`")
        store = QuantCache(ns.cache_dir)
        if ns.action == "list":
            ents = sorted(store.entries(), key=lambda e: -e["last_used"])
            print(f"{'key':12}  {'model':36}  {'method':18}  {'dtype':8}  {'size':>10}  last used")
            for e in ents:
                what = f"{e['method']} w{e['bits']} g{e['group_size']}" + (
                    "" if e.get("format") in (None, "int") else f" {e['format']}")
                print(f"{e['key'][:12]:12}  {str(e['model'])[:36]:36}  {what:18}  {str(e['dtype']):8}  "
                      f"{_human(e['size']):>10}  {_ago(e['last_used'])}")
            print(f"{len(ents)} entries in {store.root}")
            return 0
        if ns.action == "size":
            ents = store.entries()
            total = sum(e["size"] for e in ents)
            cap = max_cache_bytes()
            capmsg = "no cap" if cap is None else f"cap {_human(cap)} ({MAX_GB_ENV})"
            print(f"{_human(total)} ({total} bytes) in {len(ents)} entries in {store.root}; {capmsg}")
            return 0
        if days is None and gb is None:
            removed = store.clean(max_bytes=0)
        else:
            removed = store.clean(older_than_days=days, max_bytes=None if gb is None else int(gb * 1e9))
        left = store.entries()
        print(f"removed {len(removed)} entries ({_human(sum(e['size'] for e in removed))}); "
              f"{len(left)} left ({_human(sum(e['size'] for e in left))}) in {store.root}")
        return 0
    except QuantArgError as e:
        print(f"lm-eval-quant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

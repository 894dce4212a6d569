"""Token-level KL divergence for perplexity tasks, read from the files the runs wrote.

A quantized run evaluated with a full-precision reference (``kl_ref=DIR`` on ``hf-quant``; sweeps
set it for every cell, see :mod:`lm_eval_quant.tokkl`) writes one ``tokkl_<task>_<ts>.npz`` per
perplexity task next to its ``results_<ts>.json`` (``tokkl_<task>.npz`` outside sweeps), holding
per scored token:

* ``kl`` — KL(p_fp ‖ p_q) in nats, computed from the fp model's stored top-k log-probabilities
  (k = 32) and the quantized model's full distribution (see :mod:`lm_eval_quant.tokkl` for the
  form and its error bound);
* ``same_top`` — whether the quantized model's most likely token is the fp model's;
* ``tail_mass`` — the fp probability outside the stored top-k (how much the bound could miss);

and ``meta`` (JSON: the reference file, k, the fp run's model and task). This module turns them into
llama.cpp's ``--kl-divergence`` summary: mean KLD, p99 KLD (numpy linear percentile over tokens)
and same-top-token %.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from . import stats as S

_TS_RE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)")


def tokkl_path(results_path: str | Path, task: str) -> Path | None:
    rp = Path(results_path)
    m = _TS_RE.search(rp.name)
    if m:
        p = rp.parent / f"tokkl_{task}_{m.group(1)}.npz"
        if p.is_file():
            return p
    p = rp.parent / f"tokkl_{task}.npz"
    return p if p.is_file() else None


def summarize(kl, same_top, tail_mass=None) -> dict:
    """llama.cpp-style summary of per-token arrays."""
    kl = np.asarray(kl, dtype=np.float64)
    st = np.asarray(same_top, dtype=bool)
    out = {"kld_tokens": int(kl.size),
           "kld_mean": float(kl.mean()) if kl.size else None,
           "kld_p99": S.percentile(kl, 99),
           "same_top_pct": 100.0 * float(st.mean()) if st.size else None}
    if tail_mass is not None and np.asarray(tail_mass).size:
        out["tail_mass_mean"] = float(np.asarray(tail_mass, dtype=np.float64).mean())
    return out


def read_tokkl(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        out = summarize(z["kl"], z["same_top"], z["tail_mass"] if "tail_mass" in z.files else None)
    out["meta"] = meta
    return out


def tokkl_stats(table, bey, ppl_tasks_of) -> list[str]:
    """Fill ``bey.stats[(row, task)]`` for perplexity tasks; returns note lines."""
    notes: list[str] = []
    missing: dict[str, list[str]] = {}
    tasks: list[str] = []
    for i, row in enumerate(table.rows):
        for task, src in ppl_tasks_of(row).items():
            if task not in tasks:
                tasks.append(task)
            if row.run.method == "none":
                bey.stats[(i, task)] = {"fp_ref": "(reference)"}
                continue
            p = tokkl_path(src, task)
            if p is None:
                missing.setdefault(row.run.label, []).append(task)
                continue
            try:
                st = read_tokkl(p)
            except (OSError, ValueError, KeyError) as e:
                notes.append(f"{row.run.label}: unreadable token-KL file {p.name} ({type(e).__name__})")
                continue
            meta = st.pop("meta", {})
            refs = [table.rows[j].run.label for j, r in enumerate(table.rows)
                    if r.run.method == "none" and r.run.model_path == row.run.model_path]
            st["fp_ref"] = refs[0] if refs else str(meta.get("ref_model") or "fp (stored top-k)")
            bey.stats[(i, task)] = st
    bey.ppl_tasks = sorted(tasks)
    if missing:
        labs = sorted(missing)
        notes.append("no token-level KL file for " + "; ".join(
            f"{lab} ({', '.join(sorted(missing[lab]))})" for lab in labs)
            + ": run with a full-precision reference (kl_ref=DIR, set by sweeps) to get KLD columns")
    return notes

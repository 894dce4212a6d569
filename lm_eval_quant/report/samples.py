"""Read lm-eval's per-sample logs (``--log_samples``) for the report.

lm-eval 0.4.13 writes, next to ``results_<ts>.json``, one ``samples_<task>_<ts>.jsonl`` per task
(same timestamp; with ``--output_path file.json`` the names get the file's stem in front). Each
line is one document under one filter::

    {"doc_id": 0, "doc": {...}, "target": "1" | 1 | [..],
     "arguments": {"gen_args_0": {"arg_0": <context>, "arg_1": <target_delimiter + choice>}, ...},
     "resps": [[[ll, is_greedy]], ...], "filtered_resps": [[ll, is_greedy], ...],
     "filter": "none", "metrics": ["acc", ...], "acc": 1.0, ..., "doc_hash": ..., "target_hash": ...}

(the log-likelihoods are written as strings). For ``output_type: multiple_choice`` tasks this
module returns, per document, the choices' log-likelihoods, the choices' lengths in characters
(what ``acc_norm`` divides by: lm-eval uses ``len(choice)`` without the target delimiter), the
gold index and lm-eval's own per-sample metric values.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

_TS_RE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)")


@dataclass
class MCSamples:
    """Per-document data of one multiple-choice task of one run (aligned lists, sorted by doc_id)."""

    task: str
    path: str
    doc_ids: list[int] = field(default_factory=list)
    lls: list[list[float]] = field(default_factory=list)
    lengths: list[list[int]] = field(default_factory=list)
    gold: list[int | list[int] | None] = field(default_factory=list)
    metrics: dict[str, list[float | None]] = field(default_factory=dict)  # "acc" -> per doc
    hashes: list[str | None] = field(default_factory=list)                 # doc_hash (pairing check)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def index(self) -> dict[int, int]:
        return {d: i for i, d in enumerate(self.doc_ids)}


def samples_path(results_path: str | Path, task: str) -> Path | None:
    """The samples file of ``task`` written with ``results_path`` (same folder, same timestamp),
    or None when the run did not log samples."""
    rp = Path(results_path)
    m = _TS_RE.search(rp.name)
    if not m:
        return None
    ts = m.group(1)
    exact = rp.parent / f"samples_{task}_{ts}.jsonl"
    if exact.is_file():
        return exact
    stem = rp.name[: m.start()].rstrip("_")
    if stem and stem != "results":
        alt = rp.parent / f"{stem}_samples_{task}_{ts}.jsonl"
        if alt.is_file():
            return alt
    return None


def _float(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _gold(target, choices: list[str]):
    """The gold index (or list of indices) from a sample's ``target``."""
    if isinstance(target, bool):
        return None
    if isinstance(target, int):
        return target
    if isinstance(target, float) and target.is_integer():
        return int(target)
    if isinstance(target, list):
        out = [_gold(t, choices) for t in target]
        return out if out and all(isinstance(o, int) for o in out) else None
    if isinstance(target, str):
        s = target.strip()
        if re.fullmatch(r"-?\d+", s):
            return int(s)
        if s.startswith("[") and s.endswith("]"):
            try:
                return _gold(json.loads(s), choices)
            except ValueError:
                pass
        for i, c in enumerate(choices):
            if c == target or c.strip() == s:
                return i
    return None


def read_mc_samples(path: str | Path, task: str, target_delimiter: str = " ",
                    filter_name: str | None = None) -> MCSamples | None:
    """Parse a multiple-choice task's samples file; None when it holds no loglikelihood
    responses (not a multiple-choice log). Only one filter is read (``filter_name``, else
    ``none``, else the first one seen)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    if not rows:
        return None
    filters = [r.get("filter", "none") for r in rows]
    want = filter_name or ("none" if "none" in filters else filters[0])
    out = MCSamples(task=task, path=str(path))
    recs = []
    for r in rows:
        if r.get("filter", "none") != want or not isinstance(r.get("doc_id"), int):
            continue
        fr = r.get("filtered_resps")
        if not isinstance(fr, list) or not fr:
            return None
        lls = []
        for x in fr:
            v = x[0] if isinstance(x, (list, tuple)) and x else x
            v = _float(v)
            if v is None:
                return None
            lls.append(v)
        args = r.get("arguments") or {}
        conts = []
        if isinstance(args, dict):
            for k in sorted(args, key=lambda s: int(s.rsplit("_", 1)[-1]) if s.rsplit("_", 1)[-1].isdigit() else 0):
                a = args[k]
                if isinstance(a, dict) and "arg_1" in a:
                    conts.append(str(a["arg_1"]))
        if len(conts) == len(lls):
            choices = [c[len(target_delimiter):] if target_delimiter and c.startswith(target_delimiter)
                       else c for c in conts]
        else:
            choices = []
        recs.append((r["doc_id"], lls, choices, _gold(r.get("target"), choices), r))
    if not recs:
        return None
    recs.sort(key=lambda t: t[0])
    metric_names = []
    for *_, r in recs:
        for m in r.get("metrics") or []:
            if m not in metric_names:
                metric_names.append(m)
    for doc_id, lls, choices, gold, r in recs:
        out.doc_ids.append(doc_id)
        out.lls.append(lls)
        out.lengths.append([len(c) for c in choices] if choices else [])
        out.gold.append(gold)
        out.hashes.append(r.get("doc_hash"))
        for m in metric_names:
            v = r.get(m)
            out.metrics.setdefault(m, []).append(
                None if isinstance(v, bool) else _float(v) if not isinstance(v, (list, dict)) else None)
    return out

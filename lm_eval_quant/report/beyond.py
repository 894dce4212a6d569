"""Beyond accuracy: flips, KL divergence and calibration against each model's own full-precision
run, and paired significance — all from the per-sample logs (``--log_samples``) the runs wrote.
Nothing is re-run.

For every **multiple-choice** task (``output_type: multiple_choice`` in the results file's
``configs``) of every row that logged samples:

* the *reference* is the same model's unquantized run (method ``none`` / 16-bit or wider, same
  ``pretrained`` path) that logged samples for the task; among several, the one with the same
  ``--limit``, then the most bits. Items are paired by ``doc_id`` (and ``doc_hash`` where both
  files have it). The reference is named in the table;
* **scores**: a choice's score is what the task's table column ranks by — the summed
  log-likelihood for ``acc``, the log-likelihood divided by the choice's length in characters for
  ``acc_norm`` (``hellaswag``, ``arc_*``, ``openbookqa``, or ``--task-metric T=acc_norm``); the
  predicted choice is the argmax (the first on ties, as lm-eval), the choice distribution is the
  softmax of the scores, the confidence its maximum, and "correct" is lm-eval's own per-sample
  value of that metric;
* ``flips`` (fraction of items whose predicted choice changed), ``agreement`` = 1 − flips,
  ``right_to_wrong`` / ``wrong_to_right``;
* ``kl_mean`` / ``kl_p99``: mean and 99th percentile over items of KL(p_fp ‖ p_q) between the
  choice distributions (nats);
* ``ece`` (15 equal-width bins) and multi-class ``brier`` of the row itself, and their change
  against the reference over the same items (``ece_delta``, ``brier_delta``);
* ``mcnemar_p`` (McNemar's exact test, row vs reference) and ``acc_diff`` with its seeded paired
  bootstrap 95% CI (``acc_diff_lo``/``acc_diff_hi``, 10,000 resamples, seed 0).

Perplexity tasks get token-level KL figures from the ``tokkl_<task>_<ts>.npz`` files the
quantized run wrote (see :mod:`lm_eval_quant.report.tokkl`).

A row without samples, or a model without a full-precision run, gets empty cells and one note
naming what is missing; nothing here raises on such input.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import stats as S
from .collect import _fmt_bits, load_results_file
from .samples import MCSamples, read_mc_samples, samples_path
from .table import Row, Table

#: statistic keys per (row, task), in table/CSV order
MC_KEYS = ("fp_ref", "n", "metric", "acc", "acc_diff", "acc_diff_lo", "acc_diff_hi", "mcnemar_p",
           "mcnemar_b", "mcnemar_c", "flips", "agreement", "right_to_wrong", "wrong_to_right",
           "kl_mean", "kl_p99", "ece", "brier", "ece_delta", "brier_delta")
PPL_KEYS = ("fp_ref", "kld_mean", "kld_p99", "same_top_pct", "kld_tokens", "tail_mass_mean")


@dataclass
class Items:
    """Per-item data of one row on one MC task (aligned, sorted by doc_id)."""

    doc_ids: np.ndarray
    hashes: list
    logp: list            # per item: log-softmax of the choice scores
    pred: np.ndarray
    correct: np.ndarray   # float 0/1 (lm-eval's per-sample metric)
    gold: list

    def subset(self, idx) -> "Items":
        idx = list(idx)
        return Items(self.doc_ids[idx], [self.hashes[i] for i in idx], [self.logp[i] for i in idx],
                     self.pred[idx], self.correct[idx], [self.gold[i] for i in idx])


@dataclass
class Beyond:
    """What the report shows beyond accuracy. ``stats[(row_index, task)]`` is a dict with
    ``MC_KEYS`` (multiple-choice tasks) or ``PPL_KEYS`` (perplexity tasks)."""

    stats: dict = field(default_factory=dict)
    mc_tasks: list = field(default_factory=list)
    ppl_tasks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    items: dict = field(default_factory=dict)     # (row_index, task) -> Items
    refs: dict = field(default_factory=dict)      # (row_index, task) -> reference row index
    seed: int = 0
    n_resamples: int = S.BOOTSTRAP_RESAMPLES

    def get(self, i: int, task: str, key: str):
        return (self.stats.get((i, task)) or {}).get(key)


_CFG_CACHE: dict[str, dict] = {}


def _configs(results_path: str) -> dict:
    try:
        key = f"{results_path}|{Path(results_path).stat().st_mtime_ns}"
    except OSError:
        return {}
    if key not in _CFG_CACHE:
        d = load_results_file(Path(results_path)) or {}
        _CFG_CACHE[key] = d.get("configs") or {}
    return _CFG_CACHE[key]


def _is_unquantized(row: Row) -> bool:
    return row.run.method == "none"


def _column_metric(table: Table, task: str) -> str:
    for c in table.columns:
        if c.task == task and c.metric in ("acc", "acc_norm"):
            return c.metric
    from .table import NORM_TASKS
    import fnmatch

    return "acc_norm" if any(fnmatch.fnmatchcase(task, p) for p in NORM_TASKS) else "acc"


def _items(s: MCSamples, metric: str) -> Items | None:
    norm = metric == "acc_norm"
    logp, pred, correct = [], [], []
    vals = s.metrics.get(metric)
    for i in range(len(s)):
        lens = s.lengths[i] if norm else None
        if norm and len(s.lengths[i]) != len(s.lls[i]):
            return None
        sc = S.choice_scores(s.lls[i], lens)
        lp = S.log_softmax(sc)
        p = S.argmax_first(sc)
        v = vals[i] if vals is not None else None
        if v is None:
            g = s.gold[i]
            if g is None:
                return None
            v = float(p in g) if isinstance(g, list) else float(p == g)
        logp.append(lp)
        pred.append(p)
        correct.append(float(v))
    return Items(np.asarray(s.doc_ids), list(s.hashes), logp, np.asarray(pred), np.asarray(correct),
                 list(s.gold))


def _calibration(it: Items) -> tuple[float | None, float | None]:
    conf = [float(np.exp(lp.max())) for lp in it.logp]
    e = S.ece(conf, it.correct)
    golds = [g[0] if isinstance(g, list) else g for g in it.gold]
    if any(g is None or not (0 <= g < len(lp)) for g, lp in zip(golds, it.logp)):
        return e, None
    return e, S.brier([np.exp(lp) for lp in it.logp], golds)


def pair(a: Items, b: Items) -> tuple[Items, Items]:
    """The items both runs have (same doc_id, and same doc_hash where both are known)."""
    ib = {int(d): i for i, d in enumerate(b.doc_ids)}
    ia, jb = [], []
    for i, d in enumerate(a.doc_ids):
        j = ib.get(int(d))
        if j is None:
            continue
        ha, hb = a.hashes[i], b.hashes[j]
        if ha and hb and ha != hb:
            continue
        if len(a.logp[i]) != len(b.logp[j]):
            continue
        ia.append(i)
        jb.append(j)
    return a.subset(ia), b.subset(jb)


def compare_items(ref: Items, q: Items, seed: int = 0, n_resamples: int = S.BOOTSTRAP_RESAMPLES) -> dict:
    """All MC statistics of ``q`` against ``ref`` over their paired items."""
    r, x = pair(ref, q)
    out: dict = {"n": len(r.doc_ids)}
    if not len(r.doc_ids):
        return out
    out["acc"] = float(x.correct.mean())
    out["acc_ref"] = float(r.correct.mean())
    out.update({k: v for k, v in S.flip_stats(r.correct, x.correct, r.pred, x.pred).items() if k != "n"})
    kl = [S.kl_from_logprobs(a, b) for a, b in zip(r.logp, x.logp)]
    out["kl_mean"] = float(np.mean(kl))
    out["kl_p99"] = S.percentile(kl, 99)
    e_q, b_q = _calibration(x)
    e_r, b_r = _calibration(r)
    out.update(ece=e_q, brier=b_q,
               ece_delta=None if e_q is None or e_r is None else e_q - e_r,
               brier_delta=None if b_q is None or b_r is None else b_q - b_r)
    m = S.mcnemar_exact(r.correct, x.correct)   # b: only the fp run right, c: only this run
    out.update(mcnemar_p=m["p"], mcnemar_b=m["b"], mcnemar_c=m["c"])
    bs = S.paired_bootstrap(x.correct, r.correct, n_resamples=n_resamples, seed=seed)
    out.update(acc_diff=bs["diff"], acc_diff_lo=bs["lo"], acc_diff_hi=bs["hi"])
    return out


def _shown(table: Table) -> set[str]:
    """Task names the table covers: its columns and the subtasks folded into group columns."""
    cols = {c.task for c in table.columns}
    out = set(cols)
    for row in table.rows:
        for t in row.run.tasks.values():
            if t.is_group and t.name in cols:
                out.update(t.subtasks)
    return out


def _mc_tasks_of(row: Row, shown: set[str] | None = None) -> dict[str, str]:
    """task -> results file, for the row's multiple-choice leaf tasks (among ``shown``)."""
    out = {}
    for name, t in row.run.tasks.items():
        if t.is_group or not t.source or (shown is not None and name not in shown):
            continue
        cfg = _configs(t.source).get(name) or {}
        if cfg.get("output_type") == "multiple_choice":
            out[name] = t.source
    return out


def _ppl_tasks_of(row: Row, shown: set[str] | None = None) -> dict[str, str]:
    out = {}
    for name, t in row.run.tasks.items():
        if t.is_group or not t.source or (shown is not None and name not in shown):
            continue
        cfg = _configs(t.source).get(name) or {}
        if cfg.get("output_type") in ("loglikelihood", "loglikelihood_rolling") and any(
                "perplexity" in m or m == "bits_per_byte" for m in t.metrics):
            out[name] = t.source
    return out


def _pick_ref(table: Table, i: int, task: str, have: dict) -> int | None:
    row = table.rows[i]
    cands = [j for j, r in enumerate(table.rows) if _is_unquantized(r) and (j, task) in have
             and (r.run.model_path == row.run.model_path)]
    if not cands:
        return None
    return max(cands, key=lambda j: (table.rows[j].run.limit == row.run.limit,
                                     table.rows[j].run.bits or 0, len(have[(j, task)].doc_ids)))


def compute(table: Table, seed: int = 0, n_resamples: int = S.BOOTSTRAP_RESAMPLES) -> Beyond:
    """Every statistic of the module docstring for every row × multiple-choice task (and the
    token-level KL of the perplexity tasks)."""
    bey = Beyond(seed=seed, n_resamples=n_resamples)
    no_samples: dict[str, list[str]] = {}
    mc_tasks: list[str] = []
    shown = _shown(table)
    for i, row in enumerate(table.rows):
        for task, src in _mc_tasks_of(row, shown).items():
            if task not in mc_tasks:
                mc_tasks.append(task)
            sp = samples_path(src, task)
            if sp is None:
                no_samples.setdefault(row.run.label, []).append(task)
                continue
            cfg = _configs(src).get(task) or {}
            s = read_mc_samples(sp, task, target_delimiter=cfg.get("target_delimiter", " "))
            it = _items(s, _column_metric(table, task)) if s is not None else None
            if it is None:
                no_samples.setdefault(row.run.label, []).append(task)
                continue
            bey.items[(i, task)] = it
    bey.mc_tasks = sorted(mc_tasks)
    if no_samples and not bey.items:
        no_samples = {}
        bey.notes.append("no run has per-sample logs (lm_eval --log_samples; on by default in sweeps): "
                         "flips/KL/calibration/significance columns omitted")
    for lab, ts in no_samples.items():
        bey.notes.append(f"{lab}: no per-sample log for {', '.join(sorted(ts))} (run without "
                         "--log_samples): its flips/KL/calibration cells are empty")
    missing_ref: dict[str, list[str]] = {}
    for (i, task), it in sorted(bey.items.items()):
        row = table.rows[i]
        metric = _column_metric(table, task)
        j = _pick_ref(table, i, task, bey.items)
        st: dict = {"metric": metric}
        if j is None or j == i:
            e, b = _calibration(it)
            st.update(n=len(it.doc_ids), acc=float(it.correct.mean()), ece=e, brier=b)
            if j == i:
                st["fp_ref"] = "(reference)"
            else:
                missing_ref.setdefault(row.run.model, []).append(task)
        else:
            bey.refs[(i, task)] = j
            st["fp_ref"] = table.rows[j].run.label
            st.update(compare_items(bey.items[(j, task)], it, seed=seed, n_resamples=n_resamples))
        bey.stats[(i, task)] = st
    for model, ts in missing_ref.items():
        bey.notes.append(f"no full-precision run (method=none) with samples for {model} on "
                         f"{', '.join(sorted(set(ts)))}: flips/KL/McNemar against fp are empty "
                         f"(add the cell {model}__none-w16)")
    from .tokkl import tokkl_stats

    tk_notes = tokkl_stats(table, bey, lambda r: _ppl_tasks_of(r, shown))
    bey.notes.extend(tk_notes)
    return bey


# ---------------------------------------------------------------------------- significance
def significance(table: Table, bey: Beyond, i: int, j: int, tasks: list[str]) -> dict:
    """Row i against row j over ``tasks`` (pooled paired items): McNemar's exact test on the
    pooled 0/1 outcomes and a bootstrap CI of the difference of the unweighted task means
    (stratified by task). ``{"ok": False, "why": …}`` when a task lacks per-sample data."""
    a_all, b_all, strata = [], [], []
    for t in tasks:
        ia, ib = bey.items.get((i, t)), bey.items.get((j, t))
        if ia is None or ib is None:
            who = table.rows[i].run.label if ia is None else table.rows[j].run.label
            why = ("not a multiple-choice task" if t not in bey.mc_tasks
                   else f"{who} has no per-sample log")
            return {"ok": False, "why": f"{t}: {why}"}
        x, y = pair(ia, ib)
        if not len(x.doc_ids):
            return {"ok": False, "why": f"{t}: no common items"}
        a_all.append(x.correct)
        b_all.append(y.correct)
        strata += [t] * len(x.doc_ids)
    a = np.concatenate(a_all)
    b = np.concatenate(b_all)
    m = S.mcnemar_exact(a, b)
    bs = S.paired_bootstrap(a, b, strata=strata if len(tasks) > 1 else None,
                            n_resamples=bey.n_resamples, seed=bey.seed)
    return {"ok": True, "n": int(len(a)), "tasks": list(tasks), "mcnemar_p": m["p"], "b": m["b"],
            "c": m["c"], "diff": bs["diff"], "lo": bs["lo"], "hi": bs["hi"]}


def metric_tasks(table: Table, metric: str) -> list[str]:
    if metric == "mean":
        return list(table.mean_tasks)
    if metric in table.category_tasks:
        return list(table.category_tasks[metric])
    return [metric]


def budget_significance(table: Table, bey: Beyond, metric: str, best: Row, budget_gb: float) -> str:
    """One paragraph: is the best run under the budget significantly better than the runner-up?"""
    fit = [r for r in table.rows if r.run.model_gb is not None and r.run.model_gb <= budget_gb
           and table.value(r, metric) is not None and r is not best]
    if not fit:
        return "No runner-up under the budget to test against."
    hib = table.higher_is_better(metric)
    second = sorted(fit, key=lambda r: (-(table.value(r, metric)) if hib else table.value(r, metric),
                                        r.run.model_gb))[0]
    i, j = table.rows.index(best), table.rows.index(second)
    tasks = metric_tasks(table, metric)
    sig = significance(table, bey, i, j, tasks)
    head = (f"Runner-up: {second.run.label} ({second.run.model_gb:.4g} GB, "
            f"{table.metric_label(metric)} = {table.value(second, metric):.4f}).")
    if not sig["ok"]:
        return head + f" Paired significance not available ({sig['why']})."
    verdict = "significantly better" if sig["mcnemar_p"] < 0.05 and sig["lo"] > 0 else (
        "not significantly different" if sig["lo"] <= 0 <= sig["hi"] or sig["mcnemar_p"] >= 0.05
        else "significantly worse")
    return (head + f" Best vs runner-up over {sig['n']} paired items of {', '.join(tasks)}: "
            f"{verdict} at the 5% level — McNemar exact p = {S.fmt_p(sig['mcnemar_p'])} "
            f"({sig['b']} items only the best got right, {sig['c']} only the runner-up), "
            f"accuracy difference {sig['diff']:+.4f}, paired bootstrap 95% CI "
            f"[{sig['lo']:+.4f}, {sig['hi']:+.4f}] ({bey.n_resamples} resamples, seed {bey.seed}"
            + (", stratified by task" if len(tasks) > 1 else "") + ").")


# ---------------------------------------------------------------------------- rendering
def _f(x, nd=4):
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** (-nd) or x == 0 else f"{x:.2e}"
    return str(x)


def _sf(x, nd=4):
    return "" if x is None else f"{x:+.{nd}f}"


def _base(row: Row) -> list[str]:
    r = row.run
    g = "" if r.group_size is None else str(r.group_size)
    return [r.model, r.method_label or r.method, r.format, _fmt_bits(r.bits), g]


def to_markdown(table: Table, bey: Beyond) -> str:
    """The "Beyond accuracy" section: one line per row × task."""
    parts = []
    if bey.mc_tasks and any(k[1] in bey.mc_tasks for k in bey.stats):
        heads = ["model", "method", "format", "bits", "group", "task (metric)", "fp reference", "n",
                 "acc", "Δacc vs fp [95% CI]", "McNemar p", "flips (r→w / w→r)", "KL mean",
                 "KL p99", "ECE (Δ)", "Brier (Δ)"]
        lines = ["| " + " | ".join(heads) + " |",
                 "|" + "|".join("---" if k < 7 else "---:" for k in range(len(heads))) + "|"]
        for task in bey.mc_tasks:
            for i, row in enumerate(table.rows):
                st = bey.stats.get((i, task))
                if st is None:
                    continue
                ci = ("" if st.get("acc_diff") is None else
                      f"{st['acc_diff']:+.4f} [{st['acc_diff_lo']:+.4f}, {st['acc_diff_hi']:+.4f}]")
                fl = ("" if st.get("flips") is None else
                      f"{st['flips']:.4f} ({st['right_to_wrong']:.4f} / {st['wrong_to_right']:.4f})")
                ece = "" if st.get("ece") is None else _f(st["ece"]) + (
                    f" ({_sf(st['ece_delta'])})" if st.get("ece_delta") is not None else "")
                bri = "" if st.get("brier") is None else _f(st["brier"]) + (
                    f" ({_sf(st['brier_delta'])})" if st.get("brier_delta") is not None else "")
                cells = _base(row) + [f"{task} ({st.get('metric', 'acc')})", st.get("fp_ref") or "—",
                                      str(st.get("n", "")), _f(st.get("acc")), ci,
                                      S.fmt_p(st.get("mcnemar_p")), fl, _f(st.get("kl_mean")),
                                      _f(st.get("kl_p99")), ece, bri]
                lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    if bey.ppl_tasks and any(k[1] in bey.ppl_tasks for k in bey.stats):
        heads = ["model", "method", "format", "bits", "group", "task", "fp reference", "tokens",
                 "KLD mean", "KLD p99", "same top token %", "fp tail mass beyond top-k (mean)"]
        lines = ["| " + " | ".join(heads) + " |",
                 "|" + "|".join("---" if k < 7 else "---:" for k in range(len(heads))) + "|"]
        for task in bey.ppl_tasks:
            for i, row in enumerate(table.rows):
                st = bey.stats.get((i, task))
                if st is None:
                    continue
                cells = _base(row) + [task, st.get("fp_ref") or "—", str(st.get("kld_tokens", "")),
                                      _f(st.get("kld_mean"), 5), _f(st.get("kld_p99"), 5),
                                      _f(st.get("same_top_pct"), 2), _f(st.get("tail_mass_mean"), 5)]
                lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def csv_columns(table: Table, bey: Beyond) -> list[dict]:
    """Per row (table order): ``{"<task>:<stat>": value}`` for report.csv."""
    out = []
    for i, _row in enumerate(table.rows):
        rec = {}
        for task in bey.mc_tasks:
            for k in MC_KEYS:
                if k == "metric":
                    continue
                rec[f"{task}:{k}"] = bey.get(i, task, k)
        for task in bey.ppl_tasks:
            for k in PPL_KEYS:
                rec[f"{task}:{k}"] = bey.get(i, task, k)
        out.append(rec)
    return out


# ---------------------------------------------------------------------------- plot
def flips_points(table: Table, bey: Beyond) -> list[dict]:
    """One point per row × MC task that has a reference: task, label, bits, method, flips, kl_mean,
    acc (over the paired items). The reference itself is drawn at flips 0."""
    from .plots import series_label

    pts = []
    for task in bey.mc_tasks:
        for i, row in enumerate(table.rows):
            st = bey.stats.get((i, task))
            if not st:
                continue
            if st.get("fp_ref") == "(reference)":
                fl, kl = 0.0, 0.0
            elif st.get("flips") is not None:
                fl, kl = st["flips"], st["kl_mean"]
            else:
                continue
            pts.append({"task": task, "model": row.run.model, "series": series_label(row),
                        "method": row.run.method_label or row.run.method, "bits": row.run.bits,
                        "flips": fl, "kl_mean": kl, "acc": st.get("acc")})
    return pts


def plot_flips(table: Table, bey: Beyond, path: Path) -> list[dict]:
    """``flips.png``: per MC task one panel, accuracy (y) against flips vs fp (x), one marker per
    method, colour by bits, labelled with the precision. Returns the plotted points."""
    pts = flips_points(table, bey)
    if not pts:
        return pts
    from .plots import _plt

    plt = _plt()
    tasks = [t for t in bey.mc_tasks if any(p["task"] == t for p in pts)]
    n = len(tasks)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    markers = {}
    cmap = plt.get_cmap("viridis")
    all_bits = sorted({p["bits"] for p in pts if p["bits"] is not None})
    for k, task in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        for p in (p for p in pts if p["task"] == task):
            m = markers.setdefault(p["method"], "osD^v<>px*"[len(markers) % 10])
            c = cmap(all_bits.index(p["bits"]) / max(1, len(all_bits) - 1)) if p["bits"] in all_bits else "k"
            ax.scatter([p["flips"]], [p["acc"]], marker=m, color=c, s=40, edgecolors="k", linewidths=0.5)
            ax.annotate(f"{p['model']} {p['series']}", (p["flips"], p["acc"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("flips vs full precision (fraction of items)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("Accuracy vs flips (markers: method; colour: bits)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pts


def write_csv(points: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        if points:
            w = csv.DictWriter(fh, fieldnames=list(points[0]), lineterminator="\n")
            w.writeheader()
            for p in points:
                w.writerow({k: (repr(v) if isinstance(v, float) else ("" if v is None else v))
                            for k, v in p.items()})
    return Path(path)


def to_json(table: Table, bey: Beyond) -> str:
    out = []
    for (i, task), st in sorted(bey.stats.items()):
        out.append({"row": table.rows[i].run.label, "task": task, **st})
    return json.dumps(out, indent=1, default=str)

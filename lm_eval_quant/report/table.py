"""The report table: one row per run, one column per task, category means; markdown and CSV.

Rules (also in docs/report.md):

* **Main metric of a task** — in this order: a ``--task-metric TASK=METRIC`` override; the
  task's paper metric from ``PAPER_METRICS`` (``wikitext2_gptq``/``c4_gptq``: token perplexity); for the
  tasks in ``NORM_TASKS`` (whose harness convention is length-normalised accuracy) ``acc_norm``;
  otherwise the first of ``METRIC_PRIORITY`` the task reports; otherwise the first metric in the
  file. The harness filter ``none`` is preferred, else the first filter written.
* **Columns** — every task (and every group with its own aggregate metric) in any run. The
  subtasks of a group that has its own aggregate are folded into the group's column (use
  ``leaves=True`` / ``--leaves`` to show them instead).
* **Accuracy-like** main metrics (higher is better and, in every run, between 0 and 1) feed the
  means; perplexities and other unbounded metrics are shown but never averaged.
* **Category** of a task — ``CATEGORIES`` (our task groups: NLU, reasoning, misinformation,
  hallucination, kbit_zeroshot), from the group YAMLs shipped in task_configs plus the fixed table
  ``STATIC_CATEGORIES`` (fnmatch patterns); a task may sit in several categories; anything else
  is "other". A group column counts for the category of its name.
* **mean** — the mean of the accuracy-like columns that *every* row has (so each row's mean is
  over the same tasks); a category mean likewise over that category's columns every row has.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_quant.errors import QuantArgError

from .collect import Run, _fmt_bits

CATEGORIES = ("NLU", "reasoning", "misinformation", "hallucination", "kbit_zeroshot")

#: tasks whose customary headline metric is length-normalised accuracy
NORM_TASKS = ("hellaswag*", "arc_easy*", "arc_challenge*", "openbookqa*", "lmq_hellaswag*", "lmq_arc*")

#: the metric the papers report for a task (GPTQ/AWQ/2212.09720 quote token perplexity on
#: WikiText-2 and C4); chosen before ``METRIC_PRIORITY``, after a ``--task-metric`` override
PAPER_METRICS = {"wikitext2_gptq": "token_perplexity", "c4_gptq": "token_perplexity"}

#: first one present wins
METRIC_PRIORITY = (
    "acc", "exact_match", "f1", "macro_f1", "mcc", "em", "acc_norm", "mc2", "mc1",
    "perplexity", "word_perplexity", "token_perplexity", "byte_perplexity", "bits_per_byte",
)

#: lower-is-better metric names (when the file has no higher_is_better entry)
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "token_perplexity", "byte_perplexity",
                   "bits_per_byte", "ppl", "loss", "nll")

#: category -> fnmatch patterns of task names (fixed part; the task_configs groups are added)
STATIC_CATEGORIES: dict[str, tuple[str, ...]] = {
    "kbit_zeroshot": ("lambada_openai", "lambada_standard", "winogrande", "hellaswag", "piqa",
                      "lmq_lambada*", "lmq_winogrande*", "lmq_hellaswag*", "lmq_piqa*"),
    "reasoning": ("arc_easy", "arc_challenge", "openbookqa", "piqa", "hellaswag", "winogrande",
                  "siqa", "social_iqa", "logiqa*", "gsm8k*", "commonsense_qa", "*arc_*",
                  "toy_story_cloze*"),
    "NLU": ("boolq", "cb", "copa", "rte", "wic", "wsc*", "multirc", "record", "sst2", "cola",
            "mnli*", "qnli", "qqp", "mrpc", "wnli", "glue", "super-glue*", "lambada*", "*boolq*",
            "*rte*"),
    "misinformation": ("*liar*", "*covid*", "*fever*", "*misinfo*"),
    "hallucination": ("truthfulqa*", "halueval*", "*hallucination*"),
}

#: group names in task_configs that mean a category
_GROUP_ALIASES = {
    "nlu": "NLU", "reasoning": "reasoning", "misinformation": "misinformation",
    "hallucination": "hallucination", "kbit_zeroshot": "kbit_zeroshot", "kbit": "kbit_zeroshot",
}


def _yaml_loader():
    import yaml

    class _L(yaml.SafeLoader):
        pass

    def _any(loader, suffix, node):
        return None

    _L.add_multi_constructor("!", _any)
    return _L


def task_config_categories(task_dir: Path | None = None) -> dict[str, set[str]]:
    """task name -> categories, from the ``group:`` YAMLs in task_configs whose group name is a
    category (``hallucination``, ``lmq_nlu``, ``reasoning``, …), members followed recursively."""
    import yaml

    if task_dir is None:
        try:
            from lm_eval_quant import task_dir as _td

            task_dir = _td()
        except Exception:  # pragma: no cover
            return {}
    if not task_dir or not Path(task_dir).is_dir():
        return {}
    groups: dict[str, list[str]] = {}
    loader = _yaml_loader()
    for f in sorted(Path(task_dir).rglob("*.yaml")):
        try:
            d = yaml.load(f.read_text(encoding="utf-8"), Loader=loader)
        except Exception:
            continue
        if not isinstance(d, dict) or not d.get("group") or not isinstance(d.get("task"), list):
            continue
        members = []
        for t in d["task"]:
            if isinstance(t, str):
                members.append(t)
            elif isinstance(t, dict) and isinstance(t.get("task"), str):
                members.append(t["task"])
        groups[str(d["group"])] = members
    out: dict[str, set[str]] = {}

    def walk(g, cat, seen):
        for m in groups.get(g, []):
            if m in seen:
                continue
            seen.add(m)
            out.setdefault(m, set()).add(cat)
            walk(m, cat, seen)

    for g in groups:
        cat = category_of_group(g)
        if cat:
            out.setdefault(g, set()).add(cat)
            walk(g, cat, {g})
    return out


def category_of_group(name: str) -> str | None:
    n = name.lower()
    for prefix in ("lmq_", "lmq-"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    return _GROUP_ALIASES.get(n)


_CFG_CATS: dict[str, set[str]] | None = None


def categories_of(task: str) -> list[str]:
    """Categories of a task name (sorted in CATEGORIES order); ["other"] when none applies."""
    global _CFG_CATS
    if _CFG_CATS is None:
        _CFG_CATS = task_config_categories()
    cats = set(_CFG_CATS.get(task, set()))
    g = category_of_group(task)
    if g:
        cats.add(g)
    for cat, pats in STATIC_CATEGORIES.items():
        if any(fnmatch.fnmatchcase(task, p) for p in pats):
            cats.add(cat)
    ordered = [c for c in CATEGORIES if c in cats]
    return ordered or ["other"]


# ----------------------------------------------------------------------------------------------
# family


_SIZE_RE = re.compile(r"(?i)[-_.]?(?<![\d.])(\d+(?:\.\d+)?)([kmb])(?=$|[-_.])")
_SUFFIX_RE = re.compile(r"(?i)[-_.](hf)$")


def family_of(model: str) -> str:
    """Model family inferred from a name (used when neither ``--family MODEL=FAMILY`` nor the
    sweep's ``family`` label gives one): the name without its organisation, its size token
    (``-125m``, ``-7b``, ``-1.3B``, ``-50k``) and a ``-hf`` suffix:
    ``facebook/opt-1.3b`` → ``opt``, ``meta-llama/Llama-2-7b-hf`` → ``Llama-2``."""
    name = model.rsplit("/", 1)[-1]
    stripped = _SIZE_RE.sub("", name)
    stripped = _SUFFIX_RE.sub("", stripped).strip("-_.")
    return stripped or name


# ----------------------------------------------------------------------------------------------
# metric choice


def _lower_better(task, metric) -> bool:
    if metric in task.higher_is_better:
        return not task.higher_is_better[metric]
    return metric in LOWER_IS_BETTER or "perplexity" in metric


def choose_metric(task_name: str, metrics: set[str], overrides: dict[str, str] | None = None,
                  order: list[str] | None = None) -> str | None:
    if overrides and task_name in overrides and overrides[task_name] in metrics:
        return overrides[task_name]
    if PAPER_METRICS.get(task_name) in metrics:
        return PAPER_METRICS[task_name]
    if "acc_norm" in metrics and any(fnmatch.fnmatchcase(task_name, p) for p in NORM_TASKS):
        return "acc_norm"
    for m in METRIC_PRIORITY:
        if m in metrics:
            return m
    for m in order or []:
        if m in metrics:
            return m
    return sorted(metrics)[0] if metrics else None


@dataclass
class Column:
    task: str
    metric: str
    higher_is_better: bool
    acc_like: bool
    categories: list[str]

    @property
    def header(self) -> str:
        return f"{self.task} ({self.metric})"


@dataclass
class Row:
    run: Run
    family: str
    values: dict[str, float | None] = field(default_factory=dict)   # task -> main metric
    stderrs: dict[str, float | None] = field(default_factory=dict)
    means: dict[str, float | None] = field(default_factory=dict)    # "mean", category -> value

    # convenience
    @property
    def model(self):
        return self.run.model

    def fields(self) -> dict:
        r = self.run
        return {
            "model": r.model,
            "family": self.family,
            "method": r.method,
            "method_label": r.method_label or r.method,
            "format": r.format,
            "bits": r.bits,
            "group": r.group_size,
            "bits_per_weight": r.bits_per_weight,
            "bits_per_param": r.bits_per_param,
            "params": r.params_total,
            "total_bits": r.total_bits,
            "model_gb": r.model_gb,
            "limit": r.limit,
            # issue 14: measured figures
            "execution": r.execution or None,
            "kernel": r.kernel or None,
            "measured_gb": r.measured_gb,
            "peak_gb": r.peak_gb,
            "tok_s": r.tok_s,
            "storage_dtype": r.storage_dtype,
            "eval_dtype": r.eval_dtype,
        }


@dataclass
class Table:
    rows: list[Row]
    columns: list[Column]
    mean_tasks: list[str]                    # tasks in "mean"
    category_tasks: dict[str, list[str]]     # category -> tasks in its mean
    notes: list[str] = field(default_factory=list)

    def value(self, row: Row, metric: str) -> float | None:
        """The value of ``metric`` (a key from ``metric_keys()``) in ``row``."""
        if metric == "mean" or metric in self.category_tasks:
            return row.means.get(metric)
        return row.values.get(metric)

    def metric_keys(self) -> list[str]:
        return (["mean"] if self.mean_tasks else []) + list(self.category_tasks) + [
            c.task for c in self.columns]

    def higher_is_better(self, metric: str) -> bool:
        if metric == "mean" or metric in self.category_tasks:
            return True
        for c in self.columns:
            if c.task == metric:
                return c.higher_is_better
        return True

    def metric_label(self, metric: str) -> str:
        if metric == "mean":
            return f"mean accuracy over {len(self.mean_tasks)} task(s)"
        if metric in self.category_tasks:
            return f"{metric} mean ({len(self.category_tasks[metric])} task(s))"
        for c in self.columns:
            if c.task == metric:
                return c.header
        return metric

    def resolve_metric(self, spec: str | None) -> str:
        """``--metric``: ``mean`` (default; falls back to the first column when there is no
        accuracy-like task), a category name, or a task name. One-line error otherwise."""
        keys = self.metric_keys()
        if not spec:
            if self.mean_tasks:
                return "mean"
            if self.columns:
                note = (f"no accuracy-like task is shared by every run, so plots and the budget "
                        f"rank by the first column, {self.columns[0].header}; choose another "
                        f"with --metric")
                if note not in self.notes:
                    self.notes.append(note)
                return self.columns[0].task
            raise QuantArgError("report: the results hold no task metrics to plot")
        if spec in keys:
            return spec
        low = {k.lower(): k for k in keys}
        if spec.lower() in low:
            return low[spec.lower()]
        raise QuantArgError(
            f"report: --metric {spec!r} is not in the table; choose one of: {', '.join(keys)}")


def build_table(runs: list[Run], task_metric: dict[str, str] | None = None,
                families: dict[str, str] | None = None, tasks: list[str] | None = None,
                leaves: bool = False) -> Table:
    """Rows sorted by family, size, method (unquantized first), bits (high to low)."""
    notes: list[str] = []
    all_tasks: dict[str, list] = {}
    for r in runs:
        for name, t in r.tasks.items():
            all_tasks.setdefault(name, []).append(t)
    names = _column_names(runs, all_tasks, tasks, leaves)
    columns = [_column(name, all_tasks[name], task_metric) for name in names]
    rows = [_row(r, columns, families) for r in runs]
    mean_tasks, category_tasks = _mean_tasks(rows, columns, notes)
    for row in rows:
        row.means["mean"] = _mean([row.values[t] for t in mean_tasks])
        for cat, ts in category_tasks.items():
            row.means[cat] = _mean([row.values[t] for t in ts])
    limits = {limit_text(row.run.limit) for row in rows}
    if len(limits) > 1:
        def _order(x):
            return (x == "none", float(x) if x != "none" else 0.0)

        notes.append("Warning: the runs used different --limit values (" + ", ".join(
            sorted(limits, key=_order)) + "): rows that differ only in limit are separate rows, and numbers "
            "from different limits are not comparable; re-run with one --limit")
    rows.sort(key=lambda row: (
        row.family,
        row.run.params_total or 0,
        row.run.method != "none",
        row.run.method,
        -(row.run.bits or 0),
        row.run.group_size or 0,
        row.run.format,
        row.run.model,
    ))
    return Table(rows=rows, columns=columns, mean_tasks=mean_tasks,
                 category_tasks=category_tasks, notes=notes)


def _column_names(runs: list[Run], all_tasks: dict[str, list], tasks: list[str] | None, leaves: bool) -> list[str]:
    """Which entries become columns: ``tasks`` when given, else groups (or with ``leaves`` the
    leaf tasks), a subtask folded into its group's column only when every run that has it has the
    group; ordered with the known categories first."""
    folded: set[str] = set()
    if not leaves:
        for r in runs:
            for t in r.tasks.values():
                if t.is_group:
                    folded.update(t.subtasks)
        folded = {s for s in folded if all(
            any(g.is_group and s in g.subtasks for g in r.tasks.values())
            for r in runs if s in r.tasks)}
    names = []
    for name, ts in all_tasks.items():
        is_group = any(t.is_group for t in ts)
        if leaves and is_group:
            continue
        if not leaves and name in folded and not is_group:
            continue
        names.append(name)
    if tasks:
        missing = [t for t in tasks if t not in all_tasks]
        if missing:
            raise QuantArgError(
                f"report: --tasks {','.join(missing)} not found; the results have: "
                f"{', '.join(sorted(all_tasks))}")
        names = [t for t in tasks]
    return sorted(set(names), key=lambda n: (categories_of(n)[0] == "other", n))


def _column(name: str, ts: list, task_metric: dict[str, str] | None) -> Column:
    """A column's main metric (common to all runs: the one most runs have), its direction, and
    whether it reads like an accuracy (higher is better, all values in [0, 1])."""
    metric_sets = [set(t.metrics) for t in ts]
    union = set().union(*metric_sets)
    order = []
    for t in ts:
        order += [m for m in t.metrics if m not in order]
    m = choose_metric(name, union, task_metric, order)
    if task_metric and name in task_metric and task_metric[name] not in union:
        raise QuantArgError(
            f"report: --task-metric {name}={task_metric[name]}: {name} reports "
            f"{', '.join(sorted(union))}")
    hib = not _lower_better(ts[0], m)
    vals = [t.metrics[m] for t in ts if m in t.metrics]
    acc_like = hib and all(0.0 <= v <= 1.0 for v in vals) and bool(vals)
    return Column(name, m, hib, acc_like, categories_of(name))


def _row(r: Run, columns: list[Column], families: dict[str, str] | None) -> Row:
    """One run's row: its family (``families`` patterns first) and each column's value and stderr."""
    fam = None
    if families:
        fam = next((v for k, v in families.items()
                    if r.model == k or fnmatch.fnmatchcase(r.model, k)), None)
    row = Row(run=r, family=fam or r.family or family_of(r.model))
    for c in columns:
        t = r.tasks.get(c.task)
        if t is not None and c.metric in t.metrics:
            row.values[c.task] = t.metrics[c.metric]
            row.stderrs[c.task] = t.stderrs.get(c.metric)
        else:
            row.values[c.task] = None
            row.stderrs[c.task] = None
    return row


def _mean_tasks(rows: list[Row], columns: list[Column], notes: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The accuracy-like columns every row has (the mean) and their split by category (empty when
    a single category would equal the overall mean); a note names the columns left out."""
    def complete(task):
        return all(row.values.get(task) is not None for row in rows)

    acc_cols = [c for c in columns if c.acc_like]
    mean_tasks = [c.task for c in acc_cols if complete(c.task)]
    dropped = [c.task for c in acc_cols if not complete(c.task)]
    if dropped:
        notes.append("not in the means (missing in some rows): " + ", ".join(dropped))
    category_tasks: dict[str, list[str]] = {}
    for cat in CATEGORIES + ("other",):
        ts = [c.task for c in acc_cols if cat in c.categories and c.task in mean_tasks]
        if ts:
            category_tasks[cat] = ts
    if len(category_tasks) == 1 and list(category_tasks.values())[0] == mean_tasks:
        category_tasks = {}   # a single category equal to the overall mean adds nothing
    return mean_tasks, category_tasks


def limit_text(limit) -> str:
    """A run's ``--limit`` as shown in notes: ``none`` for a full evaluation."""
    return "none" if limit is None else _fmt_bits(limit)


def _mean(xs):
    if not xs or any(x is None for x in xs):
        return None
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------------------------
# rendering

BASE_HEADERS = ["model", "family", "method", "format", "bits", "group", "bits/weight",
                "bits/param", "model GB"]


def _f(x, nd=4):
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** (-nd):
            return f"{x:.3g}"
        return f"{x:.{nd}f}"
    return str(x)


def _gb(x):
    if x is None:
        return ""
    return f"{x:.3f}" if x >= 0.01 else f"{x:.3g}"


def _show_limit(table: Table) -> bool:
    return any(r.run.limit is not None for r in table.rows)


def _show_measured(table: Table) -> bool:  # issue 14
    return any(r.run.measured_gb is not None for r in table.rows)


MEASURED_HEADERS = ["measured GB", "peak GB", "tok/s"]


def _base_headers(table: Table) -> list[str]:
    return (BASE_HEADERS + (MEASURED_HEADERS if _show_measured(table) else [])
            + (["limit"] if _show_limit(table) else []))


def _base_cells(row: Row, table: Table) -> list[str]:
    r = row.run
    cells = [
        r.model, row.family, r.method_label or r.method, r.format, _fmt_bits(r.bits),
        "" if r.group_size is None else str(r.group_size),
        _f(r.bits_per_weight, 3), _f(r.bits_per_param, 3), _gb(r.model_gb),
    ]
    if _show_measured(table):  # issue 14: measured next to the accounted "model GB"
        cells += [_gb(r.measured_gb), _gb(r.peak_gb), "" if r.tok_s is None else f"{r.tok_s:.0f}"]
    if _show_limit(table):
        cells.append("" if r.limit is None else _fmt_bits(r.limit))
    return cells


def mean_headers(table: Table) -> list[str]:
    return (["mean"] if table.mean_tasks else []) + [f"{c} mean" for c in table.category_tasks]


def to_markdown(table: Table) -> str:
    heads = _base_headers(table) + [c.header for c in table.columns] + mean_headers(table)
    lines = ["| " + " | ".join(heads) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i, _ in enumerate(heads)) + "|"]
    for row in table.rows:
        cells = _base_cells(row, table)
        for c in table.columns:
            v, e = row.values.get(c.task), row.stderrs.get(c.task)
            cells.append("" if v is None else _f(v) + (f" ± {_f(e)}" if e is not None else ""))
        for k in (["mean"] if table.mean_tasks else []) + list(table.category_tasks):
            cells.append(_f(row.means.get(k)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_records(table: Table, extra: list[dict] | None = None) -> list[dict]:
    """One dict per row, full precision: what report.csv holds. ``extra`` (one dict per row, in
    table order) adds columns before ``source`` (the beyond-accuracy statistics)."""
    out = []
    for k, row in enumerate(table.rows):
        rec = row.fields()
        for c in table.columns:
            rec[f"{c.task}:{c.metric}"] = row.values.get(c.task)
            rec[f"{c.task}:{c.metric}_stderr"] = row.stderrs.get(c.task)
        if table.mean_tasks:
            rec["mean"] = row.means.get("mean")
        for cat in table.category_tasks:
            rec[f"{cat}_mean"] = row.means.get(cat)
        if extra:
            rec.update(extra[k])
        rec["source"] = ";".join(row.run.files)
        out.append(rec)
    return out


def to_csv(table: Table, extra: list[dict] | None = None) -> str:
    recs = csv_records(table, extra)
    buf = io.StringIO()
    if not recs:
        return ""
    w = csv.DictWriter(buf, fieldnames=list(recs[0]), lineterminator="\n")
    w.writeheader()
    for rec in recs:
        w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                    for k, v in rec.items()})
    return buf.getvalue()


def row_markdown(table: Table, row: Row) -> str:
    """The table's header and this one row (evidence for the budget answer)."""
    md = to_markdown(Table([row], table.columns, table.mean_tasks, table.category_tasks))
    return md

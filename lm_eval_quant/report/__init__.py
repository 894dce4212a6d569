"""``lm-eval-quant report DIR…``: tables, plots and the memory-budget answer from harness results.

Python API::

    from lm_eval_quant.report import make_report
    rep = make_report(["out/"], "out/report", metric=None, budget_gb=4.0)
    rep.table            # report.table.Table (rows, columns, means)
    rep.files            # {"markdown": ..., "csv": ..., "scaling_png": ..., "pareto_png": ..., ...}
    rep.best             # the Row the budget picked (or None)

Modules: ``collect`` (find and read results files, one Run per model × precision), ``table``
(metric choice, categories, means, markdown/CSV), ``plots`` (scaling and Pareto PNGs, budget
answer), ``samples`` (lm-eval's ``--log_samples`` files), ``stats`` (flips, KL, ECE, Brier,
McNemar, paired bootstrap), ``beyond`` (those against each model's full-precision run, the
budget answer's significance, the flips plot), ``tokkl`` (token-level KL files of perplexity
tasks), ``cli`` (``main(argv) -> int``). Nothing here imports torch or lm_eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .collect import Run, collect, failed_cells
from .plots import human_size as _gb_text
from .plots import best_under, plot_pareto, plot_scaling, write_points_csv
from .table import Row, Table, build_table, row_markdown, to_csv, to_markdown

__all__ = ["make_report", "Report", "collect", "build_table", "Table", "Row", "Run",
           "budget_answer"]


@dataclass
class Report:
    table: Table
    metric: str
    files: dict[str, Path] = field(default_factory=dict)
    best: Row | None = None
    budget_gb: float | None = None
    scaling_points: list = field(default_factory=list)
    pareto_points: list = field(default_factory=list)
    flips_points: list = field(default_factory=list)
    beyond: object = None          # beyond.Beyond (None with beyond=False)
    significance: str = ""         # the budget answer's best-vs-runner-up sentence
    markdown: str = ""


def _tied(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def budget_answer(table: Table, metric: str, budget_gb: float) -> tuple[Row | None, str]:
    """(row, text): the best model/precision under ``budget_gb`` and its evidence row.

    The text says what was compared (the metric, its tasks, how many runs fit). When the best
    value is shared by another run that fits (a tie: e.g. every method answering an accuracy task
    at chance), there is no answer: (None, text naming the tied runs)."""
    best = best_under(table, metric, budget_gb)
    label = table.metric_label(metric)
    what = label
    if metric == "mean" and table.mean_tasks:
        what = f"{label} ({', '.join(table.mean_tasks)})"
    elif metric in table.category_tasks:
        what = f"{label} ({', '.join(table.category_tasks[metric])})"
    budget = _gb_text(budget_gb)
    if best is None:
        sized = [r for r in table.rows if r.run.model_gb is not None
                 and table.value(r, metric) is not None]
        if not sized:
            return None, f"No run has both a model size and {label}."
        small = min(sized, key=lambda r: r.run.model_gb)
        return None, (f"Nothing fits in {budget}: the smallest run is {small.run.label} "
                      f"at {_gb_text(small.run.model_gb)}.")
    v = table.value(best, metric)
    fit = [r for r in table.rows if r.run.model_gb is not None
           and r.run.model_gb <= budget_gb and table.value(r, metric) is not None]
    hib = table.higher_is_better(metric)
    compared = (f"compared {len(fit)} run(s) that fit by {what}; "
                f"{'higher' if hib else 'lower'} is better")
    ties = [r for r in fit if r is not best and _tied(table.value(r, metric), v)]
    if ties:
        names = ", ".join(r.run.label for r in [best] + ties)
        return None, (f"No answer under {budget}: {len(ties) + 1} runs tie at {label} = {v:.4f} "
                      f"({names}); {compared}. The metric does not tell them apart: rank by another "
                      f"--metric (perplexity separates precisions best; an accuracy task answered "
                      f"at chance never does), or evaluate more samples.")
    err = best.stderrs.get(metric)
    ve = f"{v:.4f}" + (f" ± {err:.4f}" if err is not None else "")
    text = (f"Best under {budget}: {best.run.label} ({best.family}) — "
            f"{_gb_text(best.run.model_gb)}, {label} = {ve} ({compared})\n\n"
            "Evidence:\n\n" + row_markdown(table, best))
    return best, text


def make_report(paths, out_dir, metric: str | None = None, budget_gb: float | None = None,
                task_metric: dict | None = None, families: dict | None = None,
                tasks: list | None = None, leaves: bool = False, plots: bool = True,
                title: str | None = None, beyond: bool = True, bootstrap_resamples: int = 10_000,
                seed: int = 0) -> Report:
    """Collect results under ``paths`` and write report.md, report.csv, scaling.png/.csv and
    pareto.png/.csv into ``out_dir``; with ``beyond`` (default) also the statistics against each
    model's full-precision run from the runs' per-sample logs (flips, KL, ECE, Brier, McNemar,
    bootstrap CI; ``flips.png``/``flips_points.csv``, ``beyond.json``) and the budget answer's
    significance against the runner-up. Bad arguments raise QuantArgError (one line) before any
    file is written."""
    paths = list(paths)
    runs = collect(paths)
    table = build_table(runs, task_metric=task_metric, families=families, tasks=tasks,
                        leaves=leaves)
    for cell, err in failed_cells(paths):
        table.notes.append(f"sweep cell {cell} failed: {err}")
    m = table.resolve_metric(metric)
    _check_report_args(budget_gb, beyond, bootstrap_resamples)
    bey = None
    if beyond:
        from . import beyond as B

        bey = B.compute(table, seed=seed, n_resamples=bootstrap_resamples)
        table.notes.extend(bey.notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(table=table, metric=m, budget_gb=budget_gb, beyond=bey)
    parts = _report_head(table, m, title)
    if budget_gb is not None:
        rep.best, text = budget_answer(table, m, budget_gb)
        if rep.best is not None and bey is not None:
            rep.significance = B.budget_significance(table, bey, m, rep.best, budget_gb)
            text = text.rstrip("\n") + "\n\n" + rep.significance + "\n"
        parts.append("\n## Memory budget\n\n" + text)
    if bey is not None and bey.stats:
        parts.append(_beyond_section(table, bey, bootstrap_resamples, seed))
    if plots:
        parts.append(_write_plots(rep, out, title))
    rep.markdown = "\n".join(parts)
    (out / "report.md").write_text(rep.markdown, encoding="utf-8")
    extra = B.csv_columns(table, bey) if bey is not None and bey.stats else None
    (out / "report.csv").write_text(to_csv(table, extra), encoding="utf-8")
    if bey is not None and bey.stats:
        (out / "beyond.json").write_text(B.to_json(table, bey), encoding="utf-8")
        rep.files["beyond_json"] = out / "beyond.json"
    rep.files["markdown"] = out / "report.md"
    rep.files["csv"] = out / "report.csv"
    return rep


def _check_report_args(budget_gb, beyond: bool, bootstrap_resamples) -> None:
    """One-line errors for a bad --budget-gb or --bootstrap, before any file is written."""
    from lm_eval_quant.errors import QuantArgError

    if budget_gb is not None and not budget_gb > 0:
        raise QuantArgError(f"report: --budget-gb must be a positive number of GB, got {budget_gb}")
    if beyond and not (isinstance(bootstrap_resamples, int) and bootstrap_resamples >= 100):
        raise QuantArgError(f"report: --bootstrap must be an integer >= 100 (default 10000), got {bootstrap_resamples}")


def _report_head(table, m: str, title: str | None) -> list[str]:
    """report.md's title, what the means are, the notes, and the table."""
    parts = [f"# {title or 'lm-eval-quant report'}\n",
             f"{len(table.rows)} run(s) from {sum(len(r.run.files) for r in table.rows)} "
             f"results file(s). Plot/budget metric: {table.metric_label(m)}.\n"]
    if table.mean_tasks:
        parts.append("`mean` = mean of: " + ", ".join(table.mean_tasks) + ".\n")
    for cat, ts in table.category_tasks.items():
        parts.append(f"`{cat} mean` = mean of: {', '.join(ts)}.\n")
    for n in table.notes:
        parts.append((n if n.startswith("Warning:") else f"Note: {n}") + ".\n")
    parts.append("\n" + to_markdown(table))
    return parts


def _beyond_section(table, bey, bootstrap_resamples: int, seed: int) -> str:
    """report.md's "Beyond accuracy" section: what each statistic is, then its table."""
    from . import beyond as B

    return ("\n## Beyond accuracy (against each model's full-precision run)\n\n"
            "From the runs' per-sample logs: `flips` = fraction of items whose chosen answer "
            "changed vs the fp reference (r→w: right to wrong, w→r: wrong to right); KL = "
            "KL(p_fp ‖ p_q) over the softmax of the choices' scores (the scores the task's "
            "metric ranks by: log-likelihood for acc, per-character for acc_norm), nats; ECE "
            "(15 bins) and Brier of the run itself, Δ vs fp on the same items; McNemar exact "
            f"test and paired bootstrap 95% CI ({bootstrap_resamples} resamples, seed {seed}) "
            "of the accuracy difference. Perplexity tasks: token-level KLD against the fp "
            "model's stored top-32 log-probabilities (a lower bound; see docs/report.md).\n\n"
            + B.to_markdown(table, bey))


def _write_plots(rep: Report, out: Path, title: str | None) -> str:
    """Draw scaling.png and pareto.png (and flips.png with the beyond statistics) with their point
    CSVs into ``out``, recording them in ``rep``; the report's "Plots" section."""
    table, m, bey = rep.table, rep.metric, rep.beyond
    rep.scaling_points = plot_scaling(table, m, out / "scaling.png", title=title)
    rep.pareto_points = plot_pareto(table, m, out / "pareto.png", budget_gb=rep.budget_gb)
    rep.files["scaling_png"] = out / "scaling.png"
    rep.files["pareto_png"] = out / "pareto.png"
    rep.files["scaling_csv"] = write_points_csv(rep.scaling_points, out / "scaling_points.csv")
    rep.files["pareto_csv"] = write_points_csv(rep.pareto_points, out / "pareto_points.csv")
    plots_md = "\n## Plots\n\n![scaling](scaling.png)\n\n![pareto](pareto.png)\n"
    if bey is not None:
        from . import beyond as B

        rep.flips_points = B.plot_flips(table, bey, out / "flips.png")
        if rep.flips_points:
            rep.files["flips_png"] = out / "flips.png"
            rep.files["flips_csv"] = B.write_csv(rep.flips_points, out / "flips_points.csv")
            plots_md += "\n![accuracy vs flips](flips.png)\n"
    return plots_md

"""PNG plots of a report Table (matplotlib, Agg backend) and the budget answer.

* ``scaling`` — 2212.09720's figure: for each model family one panel, the metric against the
  total model bits (log2 axis), one line per method and precision (method, format, bits, group)
  through the family's model sizes. The paper draws one line per precision; we split each
  precision by method so RTN, GPTQ and AWQ can be told apart. The unquantized runs form their own
  line ("none bfloat16" / "none float32").
* ``pareto`` — every run of every family at its memory (model GB, log axis) against the metric,
  and the Pareto frontier: the runs that no smaller-or-equal-memory run beats.

Every plotting function returns the exact points it drew (the same floats as the table), and
``write_points_csv`` stores them beside the PNG, so a test can check plot == table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .collect import _fmt_bits
from .table import Row, Table


def series_label(row: Row) -> str:
    r = row.run
    if r.method == "none":
        return f"none {r.format}"
    fmt = "" if r.format == "int" else f" {r.format}"
    g = "" if r.group_size is None else (" per-row" if r.group_size == -1 else f" g{r.group_size}")
    return f"{r.method_label or r.method}{fmt} {_fmt_bits(r.bits)}-bit{g}"


def scaling_points(table: Table, metric: str) -> list[dict]:
    """One dict per plotted point: family, series, model, method, bits, group, total_bits,
    model_gb, value — rows lacking the metric or the size are left out."""
    pts = []
    for row in table.rows:
        v = table.value(row, metric)
        tb = row.run.total_bits
        if v is None or tb is None or tb <= 0:
            continue
        pts.append({
            "family": row.family, "series": series_label(row), "model": row.run.model,
            "method": row.run.method, "format": row.run.format, "bits": row.run.bits,
            "group": row.run.group_size, "total_bits": tb, "model_gb": row.run.model_gb,
            "value": v,
        })
    return pts


def pareto_points(table: Table, metric: str) -> list[dict]:
    """All points (family, label, model_gb, value, on_frontier). A point is on the frontier when
    no run with memory ≤ its memory has a better metric (ties: the smaller memory wins)."""
    hib = table.higher_is_better(metric)
    pts = []
    for row in table.rows:
        v = table.value(row, metric)
        gb = row.run.model_gb
        if v is None or gb is None or gb <= 0:
            continue
        pts.append({"family": row.family, "label": row.run.label, "model": row.run.model,
                    "method": row.run.method, "bits": row.run.bits, "group": row.run.group_size,
                    "model_gb": gb, "value": v, "on_frontier": False})
    sign = 1.0 if hib else -1.0
    best = -math.inf
    for p in sorted(pts, key=lambda p: (p["model_gb"], -sign * p["value"])):
        if sign * p["value"] > best:
            p["on_frontier"] = True
            best = sign * p["value"]
    return pts


def best_under(table: Table, metric: str, budget_gb: float) -> Row | None:
    """The row with the best ``metric`` among those whose model GB ≤ budget (ties: less memory,
    then more bits). None when nothing fits."""
    hib = table.higher_is_better(metric)
    cands = [r for r in table.rows
             if r.run.model_gb is not None and r.run.model_gb <= budget_gb
             and table.value(r, metric) is not None]
    if not cands:
        return None
    sign = 1.0 if hib else -1.0
    return max(cands, key=lambda r: (sign * table.value(r, metric), -r.run.model_gb,
                                     r.run.bits or 0))


def write_points_csv(points: list[dict], path: Path) -> Path:
    path = Path(path)
    if not points:
        path.write_text("", encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(points[0]), lineterminator="\n")
        w.writeheader()
        for p in points:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                        for k, v in p.items()})
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def human_size(gb: float) -> str:
    """A memory figure in human units for text and legends: MB under 1 GB, GB above (10^6 /
    10^9 bytes, like the accounting); report.csv keeps the exact GB."""
    if gb < 1.0:
        mb = gb * 1e3
        return f"{mb:.3g} MB" if mb < 100 else f"{mb:.0f} MB"
    return f"{gb:.3g} GB" if gb < 100 else f"{gb:.0f} GB"


#: a y-axis is logarithmic when every value is positive and max/min is at least this (one decade)
LOG_Y_RATIO = 10.0


def use_log_y(values) -> bool:
    """True when the values span a decade or more (e.g. perplexities of 2-bit runs next to 16-bit
    ones), so one outlier does not squash the rest; accuracies (0..1, ratio < 10) stay linear."""
    vs = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vs) and min(vs) > 0 and max(vs) / min(vs) >= LOG_Y_RATIO


#: label positions tried around a point, in points (dx, dy, horizontal alignment), nearest first
_LABEL_OFFSETS = [(4, 4, "left"), (4, -10, "left"), (-4, 4, "right"), (-4, -10, "right"),
                  (4, 14, "left"), (-4, 14, "right"), (4, -20, "left"), (-4, -20, "right"),
                  (4, 24, "left"), (-4, 24, "right"), (4, -30, "left"), (-4, -30, "right")]


def place_labels(fig, ax, items, fontsize=6) -> list[tuple[str, object]]:
    """Annotate ``items`` ((text, x, y), …) so that no two labels overlap: each label takes the
    first of ``_LABEL_OFFSETS`` whose box (display coordinates) overlaps no label already placed
    and stays inside the axes; a label with no free position is left out (every point is still
    in the points CSV). Returns [(text, bbox)] of the labels drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    placed: list[tuple[str, object]] = []
    for text, x, y in items:
        for dx, dy, ha in _LABEL_OFFSETS:
            ann = ax.annotate(text, (x, y), fontsize=fontsize, xytext=(dx, dy),
                              textcoords="offset points", ha=ha)
            bb = ann.get_window_extent(renderer)
            inside = (bb.x0 >= axbox.x0 and bb.x1 <= axbox.x1 and bb.y0 >= axbox.y0
                      and bb.y1 <= axbox.y1)
            if inside and not any(bb.overlaps(o) for _, o in placed):
                placed.append((text, bb))
                break
            ann.remove()
    return placed


_MARKERS = {"none": "*", "rtn": "o", "gptq": "s", "awq": "^", "bnb": "D"}
_STYLES = {"none": "-", "rtn": "--", "gptq": "-", "awq": "-.", "bnb": ":"}


def _log2_ticks(ax, xs):
    """Ticks at powers of two (or half/quarter powers when the range is narrow), labelled 2^k."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    if not xs:
        return
    lo, hi = math.log2(min(xs)), math.log2(max(xs))
    pad = max(0.15, 0.05 * (hi - lo))
    ax.set_xlim(2 ** (lo - pad), 2 ** (hi + pad))
    span = hi - lo + 2 * pad
    step = next((s for s in (0.25, 0.5, 1, 2, 5, 10) if span / s <= 8), 20)
    k0, k1 = math.floor((lo - pad) / step), math.ceil((hi + pad) / step)
    ticks = [2 ** (k * step) for k in range(k0, k1 + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _: f"$2^{{{math.log2(x):g}}}$" if x > 0 else ""))


def plot_scaling(table: Table, metric: str, path: Path, title: str | None = None) -> list[dict]:
    """Write the scaling figure to ``path`` (PNG); return its points."""
    plt = _plt()
    pts = scaling_points(table, metric)
    families = sorted({p["family"] for p in pts})
    n = max(1, len(families))
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.0 * ncol, 4.4 * nrow), squeeze=False)
    bit_values = sorted({p["bits"] for p in pts if p["bits"] is not None})
    cmap = plt.get_cmap("viridis")
    colour = {b: cmap(i / max(1, len(bit_values) - 1)) for i, b in enumerate(bit_values)}
    for ax, fam in zip(axes.flat, families):
        fp = [p for p in pts if p["family"] == fam]
        series: dict[str, list[dict]] = {}
        for p in fp:
            series.setdefault(p["series"], []).append(p)

        def order(item):
            s = item[1][0]
            return (s["method"] != "none", -(s["bits"] or 0), s["method"], s["series"])

        for label, sp in sorted(series.items(), key=order):
            sp = sorted(sp, key=lambda p: p["total_bits"])
            m = sp[0]["method"]
            ax.plot([p["total_bits"] for p in sp], [p["value"] for p in sp],
                    linestyle=_STYLES.get(m, "-"), marker=_MARKERS.get(m, "x"),
                    color="black" if m == "none" else colour.get(sp[0]["bits"]),
                    label=label, markersize=7 if m == "none" else 5)
        ax.set_xscale("log", base=2)
        _log2_ticks(ax, [p["total_bits"] for p in fp])
        if use_log_y([p["value"] for p in fp]):
            ax.set_yscale("log")
        ax.set_xlabel("total model bits (log2 axis)")
        ax.set_ylabel(table.metric_label(metric))
        ax.set_title(f"{fam}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.suptitle(title or f"{table.metric_label(metric)} vs total model bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pts


def plot_pareto(table: Table, metric: str, path: Path, title: str | None = None,
                budget_gb: float | None = None) -> list[dict]:
    """Write the Pareto figure to ``path`` (PNG); return its points."""
    plt = _plt()
    pts = pareto_points(table, metric)
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    families = sorted({p["family"] for p in pts})
    cmap = plt.get_cmap("tab10")
    for i, fam in enumerate(families):
        fp = [p for p in pts if p["family"] == fam]
        ax.scatter([p["model_gb"] for p in fp], [p["value"] for p in fp], s=22,
                   color=cmap(i % 10), label=fam, alpha=0.75)
    front = sorted((p for p in pts if p["on_frontier"]), key=lambda p: p["model_gb"])
    if front:
        ax.step([p["model_gb"] for p in front], [p["value"] for p in front], where="post",
                color="red", linewidth=1.5, label="Pareto frontier")
        ax.scatter([p["model_gb"] for p in front], [p["value"] for p in front], s=60,
                   facecolors="none", edgecolors="red")
    if budget_gb is not None:
        ax.axvline(budget_gb, color="grey", linestyle=":", label=f"budget {human_size(budget_gb)}")
    ax.set_xscale("log")
    if use_log_y([p["value"] for p in pts]):
        ax.set_yscale("log")
    ax.set_xlabel("model memory (GB, weights incl. quantization statistics)")
    ax.set_ylabel(table.metric_label(metric))
    ax.set_title(title or "best metric per memory across families")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    # frontier labels last, once the layout (and so the display coordinates) is final
    place_labels(fig, ax, [(p["label"], p["model_gb"], p["value"]) for p in front])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pts

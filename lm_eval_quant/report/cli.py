"""``lm-eval-quant report DIR… [--out DIR] [--metric M] [--budget-gb N] …``"""

from __future__ import annotations

import argparse
import sys

from lm_eval_quant.errors import QuantArgError


def _pairs(items, flag) -> dict[str, str]:
    out = {}
    for it in items or []:
        for part in it.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise QuantArgError(f"report: {flag} takes NAME=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lm-eval-quant report",
        description="Tables (markdown + CSV), scaling and Pareto plots, and a memory-budget answer "
                    "from lm-eval results files (ours or any plain lm_eval run), found recursively.",
    )
    p.add_argument("paths", nargs="+", metavar="DIR", help="folders (searched recursively) or results JSON files")
    p.add_argument("--out", "-o", default=None,
                   help="where to write report.md/.csv and the PNGs (default: <first DIR>/report)")
    p.add_argument("--metric", default=None,
                   help="what the plots and --budget-gb rank by: 'mean' (default: mean of the "
                        "accuracy-like tasks every run has), a category (reasoning, NLU, ...) or a task name")
    p.add_argument("--budget-gb", type=float, default=None, metavar="N",
                   help="print the best model/precision whose weights fit in N GB, with its evidence row")
    p.add_argument("--task-metric", action="append", default=[], metavar="TASK=METRIC",
                   help="use METRIC as TASK's main metric (repeatable or comma-separated)")
    p.add_argument("--family", action="append", default=[], metavar="MODEL=FAMILY",
                   help="set a model's family (MODEL may be an fnmatch pattern)")
    p.add_argument("--tasks", default=None, help="comma-separated task columns to keep")
    p.add_argument("--leaves", action="store_true",
                   help="show the subtasks of groups instead of the group's aggregate")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--no-beyond", action="store_true",
                   help="skip the statistics against each model's full-precision run (flips, KL, "
                        "ECE/Brier, McNemar, bootstrap CI) read from the runs' --log_samples files")
    p.add_argument("--bootstrap", type=int, default=10_000, metavar="N",
                   help="paired bootstrap resamples for the accuracy-difference CIs (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--title", default=None)
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from pathlib import Path

        from lm_eval_quant.report import make_report

        out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
        if Path(args.paths[0]).is_file() and not args.out:
            out = Path(args.paths[0]).parent / "report"
        from lm_eval_quant.sweep._io import check_writable_dir

        check_writable_dir(out, "report: --out")
        rep = make_report(
            args.paths, out, metric=args.metric, budget_gb=args.budget_gb,
            task_metric=_pairs(args.task_metric, "--task-metric"),
            families=_pairs(args.family, "--family"),
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
            leaves=args.leaves, plots=not args.no_plots, title=args.title,
            beyond=not args.no_beyond, bootstrap_resamples=args.bootstrap, seed=args.seed,
        )
    except QuantArgError as e:
        print(f"lm-eval-quant: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out read-only, disk full
        why = e.strerror or str(e)
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"lm-eval-quant: error: report: cannot write{where} ({why}); choose another --out", file=sys.stderr)
        return 2
    if not args.quiet:
        from lm_eval_quant.report.table import to_markdown

        print(to_markdown(rep.table))
        for n in rep.table.notes:
            print(n + "." if n.startswith("Warning:") else f"Note: {n}.")
    if args.budget_gb is not None:
        from lm_eval_quant.report import budget_answer

        _, text = budget_answer(rep.table, rep.metric, args.budget_gb)
        print(text)
        if rep.significance:
            print(rep.significance)
    print(f"report: {rep.files['markdown']}  table: {rep.files['csv']}")
    if "scaling_png" in rep.files:
        print(f"plots: {rep.files['scaling_png']}  {rep.files['pareto_png']}")
    return 0 if (args.budget_gb is None or rep.best is not None) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`lm-eval-quant report`: reading harness results (ours and plain `lm_eval --model hf`), the
table's numbers, the plots' data = the table's, the memory-budget answer on a hand-built case."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest

from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.report import budget_answer, build_table, collect, make_report
from lm_eval_quant.report.cli import main as report_main
from lm_eval_quant.report.collect import file_stamp
from lm_eval_quant.report.plots import best_under, pareto_points, scaling_points
from lm_eval_quant.report.table import categories_of, choose_metric, family_of

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "report"
REAL_PLAIN = FIXTURES / "lm_eval_hf_plain"   # written by a real `lm_eval --model hf` 0.4.13 run

# --------------------------------------------------------------------------------------------
# fixture writers: the shapes of lm_eval 0.4.13's results JSON (see the real file above)


def _task_entry(name, metrics: dict, n=100):
    e = {"name": name, "alias": name, "sample_len": n}
    for m, (v, se) in metrics.items():
        e[f"{m},none"] = v
        e[f"{m}_stderr,none"] = "N/A" if se is None else se
    return e


HIB = {"acc": True, "acc_norm": True, "word_perplexity": False, "byte_perplexity": False,
       "bits_per_byte": False}


def results_doc(model_args: dict, tasks: dict[str, dict], *, model="hf", dtype="torch.bfloat16",
                n_params=None, quant=None, limit=None, date=1795459627.0):
    real = json.loads(next(REAL_PLAIN.rglob("results_*.json")).read_text())
    d = {k: copy.deepcopy(real[k]) for k in real if k not in (
        "results", "groups", "group_subtasks", "configs", "versions", "n-shot",
        "higher_is_better", "n-samples", "config")}
    d["results"] = {t: _task_entry(t, m) for t, m in tasks.items()}
    d["group_subtasks"] = {t: [] for t in tasks}
    d["configs"] = {t: {"task": t, "output_type": "multiple_choice"} for t in tasks}
    d["versions"] = {t: 1.0 for t in tasks}
    d["n-shot"] = {t: 0 for t in tasks}
    d["higher_is_better"] = {t: {m: HIB[m] for m in ms} for t, ms in tasks.items()}
    d["n-samples"] = {t: {"original": 100, "effective": 100} for t in tasks}
    cfg = copy.deepcopy(real["config"])
    cfg.update({"model": model, "model_args": model_args, "model_num_parameters": n_params,
                "model_dtype": dtype, "limit": limit})
    if quant is not None:
        cfg["quantization"] = quant
    d["config"] = cfg
    d["model_name"] = model_args["pretrained"]
    d["model_name_sanitized"] = model_args["pretrained"].replace("/", "__")
    d["date"] = date
    return d


def write_lm_eval_layout(out: Path, d: dict, ts="2026-11-23T10-00-00.000000") -> Path:
    """Where lm_eval writes with --output_path OUT: OUT/<model_name_sanitized>/results_<ts>.json"""
    p = out / d["model_name_sanitized"] / f"results_{ts}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(d, indent=2))
    return p


def quant_block(method, bits, group, params_total, params_q, other_bits=16, fmt="int", sym=False):
    """A block shaped like lm_eval_quant.accounting.account()'s, for a model whose quantized
    weights cost the fixture's own bits + 32/group and whose other params sit at other_bits."""
    bpw = bits + 32 / group
    total_bits = params_q * bpw + (params_total - params_q) * other_bits
    return {
        "quant_config": {"method": method, "bits": bits, "group_size": group, "format": fmt,
                         "sym": sym, "skip": ["lm_head"], "options": {}},
        "params_total": params_total, "params_quantized": params_q,
        "bits_per_quantized_weight": bpw, "total_bits": total_bits,
        "total_bytes": total_bits / 8, "total_gb": total_bits / 8 / 1e9,
        "bits_per_param": total_bits / params_total, "lm_eval_quant_version": "0.1.0",
    }


# the hand-built study: family "llama" at 7B and 13B; 16-bit rows from plain `lm_eval --model hf`,
# 4-bit (and 3-bit) rows from hf-quant. Accuracies chosen so that 13B at 4 bits beats 7B at 16.
P7, P13 = 7_000_000_000, 13_000_000_000
Q7, Q13 = 6_500_000_000, 12_500_000_000
ACC = {  # (model, bits) -> (piqa acc, hellaswag acc_norm, wikitext word_perplexity)
    ("llama-7b", 16): (0.78, 0.76, 9.0),
    ("llama-7b", 4): (0.77, 0.74, 9.6),
    ("llama-7b", 3): (0.70, 0.62, 14.0),
    ("llama-13b", 16): (0.80, 0.79, 8.0),
    ("llama-13b", 4): (0.795, 0.78, 8.3),
    ("llama-13b", 3): (0.74, 0.70, 11.0),
}


def _tasks(piqa, hs, ppl):
    return {"piqa": {"acc": (piqa, 0.01)},
            "hellaswag": {"acc": (hs - 0.05, 0.004), "acc_norm": (hs, 0.005)},
            "wikitext": {"word_perplexity": (ppl, None), "byte_perplexity": (1.5, None),
                         "bits_per_byte": (0.6, None)}}


@pytest.fixture()
def study(tmp_path):
    root = tmp_path / "study"
    for name, params, pq in (("llama-7b", P7, Q7), ("llama-13b", P13, Q13)):
        pre = f"meta/{name}"
        # 16-bit: a plain harness run
        d = results_doc({"pretrained": pre, "dtype": "bfloat16"}, _tasks(*ACC[(name, 16)]),
                        n_params=params)
        write_lm_eval_layout(root / "plain", d)
        # 4 and 3 bits: ours
        for bits in (4, 3):
            q = quant_block("rtn", bits, 128, params, pq)
            d = results_doc({"pretrained": pre, "method": "rtn", "bits": bits, "group_size": 128},
                            _tasks(*ACC[(name, bits)]), model="hf-quant", n_params=params, quant=q)
            write_lm_eval_layout(root / "ours" / f"{name}-rtn{bits}", d)
    return root


# --------------------------------------------------------------------------------------------
# reading


def test_real_plain_lm_eval_file():
    """A file written by a real `lm_eval --model hf` run (stories260K, float32, a group of two
    MC tasks + a rolling-loglikelihood task, --limit 8)."""
    runs = collect([REAL_PLAIN])
    assert len(runs) == 1
    r = runs[0]
    assert (r.method, r.bits, r.format, r.source_kind) == ("none", 32.0, "float32", "plain")
    assert r.params_total == 260032
    assert r.total_bits == 260032 * 32
    assert r.model_gb == pytest.approx(260032 * 4 / 1e9)
    assert r.limit == 8
    assert set(r.tasks) == {"probe_grp", "probe_mc", "probe_mc2", "probe_ppl"}
    assert r.tasks["probe_grp"].is_group and r.tasks["probe_grp"].subtasks == ("probe_mc", "probe_mc2")
    assert r.tasks["probe_ppl"].metrics["word_perplexity"] == pytest.approx(4.516145924016302)
    assert r.tasks["probe_ppl"].stderrs["word_perplexity"] is None   # "N/A"
    t = build_table(runs)
    # the group's subtasks fold into the group's column
    assert [c.task for c in t.columns] == ["probe_grp", "probe_ppl"]
    assert [c.metric for c in t.columns] == ["acc", "word_perplexity"]
    assert t.columns[1].higher_is_better is False and not t.columns[1].acc_like
    assert t.mean_tasks == ["probe_grp"]
    assert t.rows[0].means["mean"] == 1.0
    t2 = build_table(runs, leaves=True)
    assert [c.task for c in t2.columns] == ["probe_mc", "probe_mc2", "probe_ppl"]


def test_collect_both_kinds(study):
    runs = {(r.model, r.bits): r for r in collect([study])}
    assert len(runs) == 6
    plain = runs[("llama-7b", 16.0)]
    assert (plain.method, plain.source_kind, plain.format) == ("none", "plain", "bfloat16")
    assert plain.model_gb == pytest.approx(14.0)             # 7e9 * 16 bit / 8 / 1e9
    assert plain.bits_per_weight == 16 and plain.total_bits == P7 * 16
    q = runs[("llama-13b", 4.0)]
    assert (q.method, q.source_kind, q.group_size) == ("rtn", "hf-quant", 128)
    assert q.bits_per_weight == pytest.approx(4.25)
    # 12.5e9 weights at 4.25 bits + 0.5e9 at 16 bits = 61.125e9 bits = 7.640625 GB
    assert q.model_gb == pytest.approx(7.640625)
    assert q.bits_per_param == pytest.approx(61.125e9 / P13)


def test_dtype_bits_from_plain_runs(tmp_path):
    for dt, bits in (("torch.float32", 32), ("torch.float16", 16), ("torch.bfloat16", 16)):
        d = results_doc({"pretrained": f"org/m-{bits}"}, {"piqa": {"acc": (0.5, 0.01)}},
                        dtype=dt, n_params=1000)
        write_lm_eval_layout(tmp_path / dt, d)
    runs = collect([tmp_path])
    assert sorted((r.format, r.bits, r.total_bits) for r in runs) == [
        ("bfloat16", 16, 16000), ("float16", 16, 16000), ("float32", 32, 32000)]


def test_latest_file_per_run_and_merge(tmp_path):
    pre = {"pretrained": "org/m-1b"}
    old = results_doc(pre, {"piqa": {"acc": (0.50, 0.01)}, "hellaswag": {"acc_norm": (0.4, 0.01)}},
                      n_params=10**9)
    new = results_doc(pre, {"piqa": {"acc": (0.60, 0.01)}}, n_params=10**9)
    write_lm_eval_layout(tmp_path, old, ts="2026-01-01T10-00-00.000000")
    write_lm_eval_layout(tmp_path, new, ts="2026-01-02T09-00-00.000000")
    # noise the report must skip: a non-results JSON and a superseded result in a hidden folder
    (tmp_path / "sweep_status.json").write_text(json.dumps({"cells": []}))
    stale = copy.deepcopy(new)
    stale["results"]["piqa"]["acc,none"] = 0.99
    write_lm_eval_layout(tmp_path / ".stale", stale, ts="2026-12-31T00-00-00.000000")
    runs = collect([tmp_path])
    assert len(runs) == 1
    r = runs[0]
    assert r.tasks["piqa"].metrics["acc"] == 0.60        # newest file wins
    assert r.tasks["hellaswag"].metrics["acc_norm"] == 0.4   # the older file's other task stays
    assert len(r.files) == 2


def test_file_stamp_orders_by_name_timestamp(tmp_path):
    a = tmp_path / "results_2026-01-01T10-00-00.5.json"
    b = tmp_path / "results_2026-01-01T10-00-01.000001.json"
    assert file_stamp(a, {}) < file_stamp(b, {})


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(QuantArgError, match="does not exist"):
        collect([tmp_path / "nope"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(QuantArgError, match="no lm-eval results files"):
        collect([tmp_path])


# --------------------------------------------------------------------------------------------
# table rules


def test_metric_rule():
    assert choose_metric("hellaswag", {"acc", "acc_norm"}) == "acc_norm"
    assert choose_metric("arc_challenge", {"acc", "acc_norm"}) == "acc_norm"
    assert choose_metric("piqa", {"acc", "acc_norm"}) == "acc"
    assert choose_metric("wikitext", {"word_perplexity", "byte_perplexity", "bits_per_byte"}) == "word_perplexity"
    assert choose_metric("lambada_openai", {"perplexity", "acc"}) == "acc"
    assert choose_metric("squadv2", {"f1", "exact"}) == "f1"
    assert choose_metric("x", {"zzz", "yyy"}, order=["zzz", "yyy"]) == "zzz"
    assert choose_metric("piqa", {"acc", "acc_norm"}, {"piqa": "acc_norm"}) == "acc_norm"


def test_categories():
    assert categories_of("truthfulqa_mc2") == ["hallucination"]
    assert categories_of("halueval_qa") == ["hallucination"]
    assert categories_of("liar") == ["misinformation"]
    assert categories_of("climate_fever") == ["misinformation"]
    assert categories_of("hellaswag") == ["reasoning", "kbit_zeroshot"]
    assert categories_of("boolq") == ["NLU"]
    assert categories_of("my_custom_task") == ["other"]


def test_family_rule():
    assert family_of("facebook/opt-1.3b") == "opt"
    assert family_of("meta-llama/Llama-2-7b-hf") == "Llama-2"
    assert family_of("EleutherAI/pythia-70m") == "pythia"
    assert family_of("stories260K") == "stories"
    assert family_of("gpt2") == "gpt2"


def test_table_values_and_means(study):
    t = build_table(collect([study]))
    assert [c.header for c in t.columns] == ["hellaswag (acc_norm)", "piqa (acc)",
                                             "wikitext (word_perplexity)"]
    assert t.mean_tasks == ["hellaswag", "piqa"]           # perplexity is never averaged
    assert t.category_tasks == {"reasoning": ["hellaswag", "piqa"],
                                "kbit_zeroshot": ["hellaswag", "piqa"]}
    # rows: family, size, unquantized first, bits high → low
    assert [(r.model, r.run.bits) for r in t.rows] == [
        ("llama-7b", 16), ("llama-7b", 4), ("llama-7b", 3),
        ("llama-13b", 16), ("llama-13b", 4), ("llama-13b", 3)]
    for row in t.rows:
        piqa, hs, ppl = ACC[(row.model, int(row.run.bits))]
        assert row.family == "llama"
        assert row.values == {"piqa": piqa, "hellaswag": hs, "wikitext": ppl}
        assert row.stderrs["piqa"] == 0.01 and row.stderrs["hellaswag"] == 0.005
        assert row.means["mean"] == pytest.approx((piqa + hs) / 2)
        assert row.means["reasoning"] == pytest.approx((piqa + hs) / 2)


def test_markdown_and_csv_files(study, tmp_path):
    rep = make_report([study], tmp_path / "rep")
    md = rep.files["markdown"].read_text()
    assert "| llama-13b | llama | rtn | int | 4 | 128 | 4.250 |" in md
    assert "0.7950 ± 0.0100" in md                # 13B 4-bit piqa with its stderr
    assert "7.64" in md
    with open(rep.files["csv"]) as fh:
        recs = list(csv.DictReader(fh))
    assert len(recs) == 6
    by = {(r["model"], float(r["bits"])): r for r in recs}
    r = by[("llama-13b", 4.0)]
    assert float(r["piqa:acc"]) == 0.795 and float(r["piqa:acc_stderr"]) == 0.01
    assert float(r["hellaswag:acc_norm"]) == 0.78
    assert float(r["model_gb"]) == pytest.approx(7.640625)
    assert float(r["mean"]) == pytest.approx((0.795 + 0.78) / 2)
    assert r["wikitext:word_perplexity_stderr"] == ""


def test_mean_uses_tasks_every_row_has(tmp_path):
    a = results_doc({"pretrained": "o/a-1b"}, {"piqa": {"acc": (0.6, None)},
                                                "boolq": {"acc": (0.7, None)}}, n_params=10**9)
    b = results_doc({"pretrained": "o/b-1b"}, {"piqa": {"acc": (0.5, None)}}, n_params=10**9)
    write_lm_eval_layout(tmp_path, a)
    write_lm_eval_layout(tmp_path, b)
    t = build_table(collect([tmp_path]))
    assert t.mean_tasks == ["piqa"]
    assert any("boolq" in n for n in t.notes)
    assert {r.model: r.means["mean"] for r in t.rows} == {"a-1b": 0.6, "b-1b": 0.5}


# --------------------------------------------------------------------------------------------
# plots = table


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_written_and_equal_table(study, tmp_path):
    rep = make_report([study], tmp_path / "rep")
    for k in ("scaling_png", "pareto_png"):
        data = rep.files[k].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    t = rep.table
    assert rep.metric == "mean"
    # every table row is a point, with the table's own numbers (from the CSV written beside it)
    with open(rep.files["scaling_csv"]) as fh:
        pts = list(csv.DictReader(fh))
    assert len(pts) == len(t.rows) == 6
    table_pts = sorted((r.model, r.run.method, float(r.run.bits), r.run.total_bits, r.means["mean"])
                       for r in t.rows)
    plot_pts = sorted((p["model"], p["method"], float(p["bits"]), float(p["total_bits"]),
                       float(p["value"])) for p in pts)
    assert plot_pts == table_pts
    # series: one per method × precision within the family
    assert sorted({p["series"] for p in pts}) == ["none bfloat16", "rtn 3-bit g128", "rtn 4-bit g128"]
    with open(rep.files["pareto_csv"]) as fh:
        par = list(csv.DictReader(fh))
    assert sorted((p["label"], float(p["model_gb"]), float(p["value"])) for p in par) == sorted(
        (r.run.label, r.run.model_gb, r.means["mean"]) for r in t.rows)


def test_pareto_frontier_hand_computed(study):
    t = build_table(collect([study]))
    pts = pareto_points(t, "mean")
    front = sorted((p["label"] for p in pts if p["on_frontier"]),
                   key=lambda lab: [p["model_gb"] for p in pts if p["label"] == lab][0])
    # memory GB: 7b-3 3.64, 7b-4 4.45, 13b-3 6.08, 13b-4 7.64, 7b-16 14, 13b-16 26
    # mean:        0.66     0.755     0.72      0.7875     0.77    0.795
    assert front == ["llama-7b rtn 3-bit g128", "llama-7b rtn 4-bit g128",
                     "llama-13b rtn 4-bit g128", "llama-13b bfloat16"]
    # perplexity (lower is better): 14.0, 9.6, 11.0, 8.3, 9.0, 8.0 → frontier 14.0, 9.6, 8.3, 8.0
    ppl = sorted((p for p in pareto_points(t, "wikitext") if p["on_frontier"]),
                 key=lambda p: p["model_gb"])
    assert [p["value"] for p in ppl] == [14.0, 9.6, 8.3, 8.0]
    assert [round(p["model_gb"], 4) for p in ppl] == [3.6406, 4.4531, 7.6406, 26.0]


def test_scaling_points_skip_rows_without_metric(study):
    t = build_table(collect([study]))
    assert len(scaling_points(t, "piqa")) == 6
    assert {p["value"] for p in scaling_points(t, "piqa")} == {v[0] for v in ACC.values()}


# --------------------------------------------------------------------------------------------
# budget


def test_budget_larger_4bit_beats_smaller_16bit(study):
    t = build_table(collect([study]))
    # 15 GB: fits 7b-16 (14 GB, mean 0.77) and 13b-4 (7.64 GB, mean 0.7875) → 13B at 4 bits
    best = best_under(t, "mean", 15.0)
    assert (best.model, best.run.bits) == ("llama-13b", 4)
    # 7 GB: only 7b-3, 7b-4, 13b-3 fit → 7b 4-bit (0.755) beats 13b 3-bit (0.72)
    best = best_under(t, "mean", 7.0)
    assert (best.model, best.run.bits) == ("llama-7b", 4)
    # by perplexity (lower is better) under 7 GB: 7b-4 9.6 vs 13b-3 11.0 vs 7b-3 14 → 7b-4
    assert best_under(t, "wikitext", 7.0).model == "llama-7b"
    # by perplexity under 8 GB: 13b-4 8.3 wins
    assert best_under(t, "wikitext", 8.0).model == "llama-13b"
    assert best_under(t, "mean", 1.0) is None
    row, text = budget_answer(t, "mean", 15.0)
    # human units in the text (exact GB in the CSV), and what was compared
    assert text.startswith("Best under 15 GB: llama-13b rtn 4-bit g128 (llama) — 7.64 GB, "
                           "mean accuracy over 2 task(s) = 0.7875 (compared 5 run(s) that fit by "
                           "mean accuracy over 2 task(s) (hellaswag, piqa); higher is better)")
    assert "| llama-13b | llama | rtn | int | 4 | 128 | 4.250 |" in text


def test_cli_budget(study, tmp_path, capsys):
    rc = report_main([str(study), "--out", str(tmp_path / "r"), "--budget-gb", "15", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Best under 15 GB: llama-13b rtn 4-bit g128" in out
    assert (tmp_path / "r" / "report.md").read_text().count("## Memory budget") == 1
    rc = report_main([str(study), "--out", str(tmp_path / "r2"), "--budget-gb", "1", "-q",
                      "--no-plots"])
    assert rc == 1
    assert "Nothing fits in 1 GB: the smallest run is llama-7b rtn 3-bit g128" in capsys.readouterr().out
    rc = report_main([str(study), "--out", str(tmp_path / "r3"), "--metric", "piqa",
                      "--budget-gb", "15", "-q", "--no-plots"])
    assert rc == 0 and "piqa (acc) = 0.7950 ± 0.0100" in capsys.readouterr().out


@pytest.mark.parametrize("args, msg", [
    (["--metric", "nosuch"], "--metric 'nosuch' is not in the table"),
    (["--budget-gb", "-3"], "--budget-gb must be a positive"),
    (["--task-metric", "piqa"], "--task-metric takes NAME=VALUE"),
    (["--task-metric", "piqa=f1"], "piqa reports acc"),
    (["--tasks", "mmlu"], "--tasks mmlu not found"),
])
def test_cli_bad_input_one_line(study, tmp_path, capsys, args, msg):
    rc = report_main([str(study), "--out", str(tmp_path / "r"), "-q"] + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lm-eval-quant: error: report: ") and msg in err
    assert err.count("\n") == 1
    assert not (tmp_path / "r").exists()          # no files written before the check


def test_cli_missing_dir(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_metric_and_family_overrides(study, tmp_path):
    rep = make_report([study], tmp_path / "r", metric="hellaswag", plots=False,
                      families={"llama-13b": "big"}, task_metric={"hellaswag": "acc"})
    t = rep.table
    assert rep.metric == "hellaswag"
    assert {r.family for r in t.rows} == {"llama", "big"}
    row = next(r for r in t.rows if r.model == "llama-7b" and r.run.bits == 16)
    assert row.values["hellaswag"] == pytest.approx(0.76 - 0.05)     # acc, not acc_norm
    assert math.isclose(t.value(row, "hellaswag"), 0.71)


def test_failed_sweep_cells_are_named(study, tmp_path, capsys):
    (study / "ours" / "sweep_status.json").write_text(json.dumps({"cells": [
        {"name": "llama-7b__gptq-w2-g128-int", "status": "failed",
         "error_line": "hf-quant: group_size=48 does not divide in_features=64"},
        {"name": "llama-7b__rtn-w4-g128-int", "status": "done", "error_line": None}]}))
    rc = report_main([str(study), "--out", str(tmp_path / "r"), "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count(" failed: ") == 1
    assert "Note: sweep cell llama-7b__gptq-w2-g128-int failed: hf-quant: group_size=48" in out
    assert "llama-7b__gptq-w2-g128-int failed" in (tmp_path / "r" / "report.md").read_text()

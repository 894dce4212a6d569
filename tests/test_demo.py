"""The demo: its bundled task is well formed and answerable, its spec is a valid sweep, and a small
end-to-end run (one tiny model, 16 and 4 bits) writes the report with plots equal to the table."""

from __future__ import annotations

import csv
import json
import re

import pytest

from lm_eval_quant.demo import (
    GROUP_SIZE,
    SMALL_MODEL_HINT,
    SIZES,
    cloze_items,
    demo_spec,
    main as demo_main,
    write_tasks,
)


def test_cloze_items_deterministic_and_answerable():
    a, b = cloze_items(30), cloze_items(30)
    assert a == b
    assert [it["kind"] for it in a[:6]] == ["name", "object", "place"] * 2
    for it in a:
        ch, gold = it["choices"], it["choices"][it["label"]]
        assert len(ch) == 4 and len(set(ch)) == 4
        ctx = it["context"]
        if it["kind"] == "name":
            assert ctx.endswith("At the end of the day,")
            # the hero is the one "named X" at the start; the friend is a distractor
            hero = re.search(r"named (\w+)\.", ctx).group(1)
            friend = re.search(r"went to (\w+) and said", ctx).group(1)
            assert gold == hero and friend in ch
        elif it["kind"] == "object":
            # the object was named earlier in the story: "found a <color> <object>"
            assert re.search(rf"found a \w+ {gold} in the", ctx)
            assert sum(bool(re.search(rf"found a \w+ {c} in", ctx)) for c in ch) == 1
        else:
            assert ctx.endswith(" in the")
            assert f"liked to" in ctx and re.search(rf"liked to \w+ in the {gold}\.", ctx)
    # gold positions are shuffled, not always the same slot
    assert len({it["label"] for it in a}) >= 3


def test_write_tasks_loads_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    d = write_tasks(tmp_path / "tasks", n_items=9, n_ppl=4)
    tm = TaskManager(include_path=str(d), include_defaults=False)
    tasks = tm.load(["toy_story_cloze", "toy_story_ppl"])["tasks"]
    cloze = tasks["toy_story_cloze"]
    docs = list(cloze.test_docs())
    assert len(docs) == 9
    assert cloze.doc_to_choice(docs[0]) == docs[0]["choices"]
    assert cloze.doc_to_target(docs[0]) == docs[0]["label"]
    assert len(list(tasks["toy_story_ppl"].test_docs())) == 4


def test_spec_is_a_valid_sweep(tmp_path):
    from lm_eval_quant.sweep import SweepSpec

    models = [{"pretrained": str(tmp_path / n), "name": n, "family": "toyllama", "size": "1"}
              for n in ("a", "b")]
    spec = demo_spec(models, ["rtn", "gptq"], [16, 8, 4, 3, 2], tmp_path / "t", tmp_path / "c.txt")
    cells = SweepSpec.from_dict(spec).cells(check_methods=False)
    names = sorted(c.name for c in cells)
    # per model: none-16, rtn 8/4/3/2, gptq 4/3/2 → 8 cells
    assert len(cells) == 16
    assert "a__none-w16" in names and f"b__gptq-w2-g{GROUP_SIZE}-int" in names
    assert not any("gptq-w8" in n for n in names)
    g = next(c for c in cells if c.method == "gptq")
    assert g.options["calib"] == str(tmp_path / "c.txt")


@pytest.mark.parametrize("args, msg", [
    (["--sizes", "XL"], "--sizes 'XL'"),
    (["--bits", "16,1"], "--bits '16,1'"),
    (["--bits", "four"], "--bits takes a comma-separated list"),
    (["--items", "1"], "--items must be at least 3"),
])
def test_bad_arguments_one_line(tmp_path, capsys, args, msg):
    rc = demo_main(["--out", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lm-eval-quant: error: demo: ") and msg in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys, monkeypatch):
    """One tiny model trained for a few steps, unquantized and RTN 4-bit, 12 questions."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "demo"
    rc = demo_main(["--out", str(out), "--sizes", "S", "--methods", "rtn", "--bits", "16,4",
                    "--items", "12", "--train-scale", "0.08", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "2 of 2 cells finished (0 failed)" in text
    assert "toy_story_cloze (acc)" in text and "toy_story_ppl (word_perplexity)" in text
    assert "lower is better" in text
    assert SMALL_MODEL_HINT in text                                  # steers small models to perplexity
    rep = out / "report"
    for f in ("report.md", "report.csv", "scaling.png", "pareto.png", "scaling_points.csv"):
        assert (rep / f).stat().st_size > 0, f
    assert (rep / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    with open(rep / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["method"], float(r["bits"])) for r in rows) == [("none", 16.0), ("rtn", 4.0)]
    name = SIZES["S"][0]
    for r in rows:
        assert r["model"] == name and r["family"] == "toyllama"
        assert 0.0 <= float(r["toy_story_cloze:acc"]) <= 1.0
        assert float(r["toy_story_ppl:word_perplexity"]) > 1.0
    q = next(r for r in rows if r["method"] == "rtn")
    base = next(r for r in rows if r["method"] == "none")
    # the budget line: an answer, or (this barely trained model can score the same at 4 and 16
    # bits) a refused tie; sizes in human units either way (MB here, not 0.000394 GB)
    head = "No answer under" if q["toy_story_ppl:word_perplexity"] == base["toy_story_ppl:word_perplexity"] \
        else "Best under"
    line = next(ln for ln in text.splitlines() if ln.startswith(("Best under", "No answer under")))
    assert line.startswith(head) and " MB" in line and " GB" not in line
    assert float(q["bits_per_weight"]) == 4 + 20 / GROUP_SIZE     # fp16 scale + 4-bit zero per 32
    assert float(q["model_gb"]) < float(next(r for r in rows if r["method"] == "none")["model_gb"])
    # the plot's points are the table's
    with open(rep / "scaling_points.csv") as fh:
        pts = list(csv.DictReader(fh))
    assert sorted((p["method"], float(p["total_bits"]), float(p["value"])) for p in pts) == sorted(
        (r["method"], float(r["total_bits"]), float(r["toy_story_ppl:word_perplexity"])) for r in rows)
    # the cells wrote standard lm-eval results files carrying our quantization block
    res = sorted((out / "sweep" / "cells").glob("*/results_*.json"))
    assert len(res) == 2
    d = json.loads(res[-1].read_text())
    assert "toy_story_cloze" in d["results"] and d["config"]["model"] == "hf-quant"
    assert "quantization" in d["config"]


def test_default_budget_rounds_up():
    from lm_eval_quant.demo import _round_up

    assert _round_up(0.000393216) == 0.000394     # the 16-bit model still fits its own budget
    assert _round_up(0.0004) == 0.0004 and _round_up(14.0) == 14.0
    assert _round_up(7.640625) == 7.65

"""Issue 15 (what a new user trips over): report defaults, accounting consistency, the CPU fp16
hint, known-harmless noise. Hand-built inputs, offline, seconds."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
import torch
from torch import nn

from lm_eval_quant.report import budget_answer, build_table, collect, make_report
from lm_eval_quant.report import _gb_text
from lm_eval_quant.report.plots import place_labels, use_log_y
from lm_eval_quant.report.table import choose_metric

from test_report import quant_block, results_doc, write_lm_eval_layout  # noqa: E402

# --------------------------------------------------------------------------------------------
# 1. report defaults


def test_paper_metric_is_token_perplexity():
    ms = {"word_perplexity", "token_perplexity", "byte_perplexity"}
    assert choose_metric("wikitext2_gptq", ms) == "token_perplexity"
    assert choose_metric("c4_gptq", ms) == "token_perplexity"
    # an explicit --task-metric still wins; other tasks keep the priority list
    assert choose_metric("wikitext2_gptq", ms, {"wikitext2_gptq": "word_perplexity"}) == "word_perplexity"
    assert choose_metric("wikitext", {"word_perplexity", "byte_perplexity"}) == "word_perplexity"


def test_log_y_when_values_span_a_decade():
    assert use_log_y([40.4, 7.6e6, 5.4e10])          # perplexities of 16- and 2-bit runs
    assert use_log_y([10.0, 100.0])                   # exactly one decade
    assert not use_log_y([10.0, 99.0])
    assert not use_log_y([0.25, 0.50, 0.80])          # accuracies stay linear
    assert not use_log_y([-1.0, 50.0])                # a non-positive value: never log
    assert not use_log_y([])


def test_pareto_labels_never_overlap():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    # 10 points, 6 of them nearly on top of each other (the case that overlapped before)
    xs = [0.10, 0.101, 0.102, 0.103, 0.104, 0.105, 0.3, 0.5, 1.0, 2.0]
    ys = [0.50, 0.501, 0.502, 0.503, 0.504, 0.505, 0.6, 0.7, 0.8, 0.9]
    ax.scatter(xs, ys)
    ax.set_xscale("log")
    fig.tight_layout()
    items = [(f"model-{i} rtn 4-bit g128", x, y) for i, (x, y) in enumerate(zip(xs, ys))]
    placed = place_labels(fig, ax, items)
    boxes = [b for _, b in placed]
    assert len(placed) >= 6   # the spread-out ones and some of the cluster
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (placed[i][0], placed[j][0])
    drawn = [t.get_text() for t in ax.texts]
    assert sorted(drawn) == sorted(t for t, _ in placed)   # nothing left behind unaccounted
    plt.close(fig)


def _two_runs_same_acc(root, limits=(None, None)):
    """Two quantized runs of one 1B model with the same accuracy (chance level), 4 and 3 bits."""
    for bits, limit in zip((4, 3), limits):
        q = quant_block("rtn", bits, 128, 1_000_000_000, 900_000_000)
        d = results_doc({"pretrained": "org/tiny-1b", "method": "rtn", "bits": bits, "group_size": 128},
                        {"piqa": {"acc": (0.5, 0.05)}}, model="hf-quant", n_params=1_000_000_000,
                        quant=q, limit=limit)
        write_lm_eval_layout(root / f"rtn{bits}", d)


def test_budget_refuses_ties_and_says_what_it_compared(tmp_path):
    _two_runs_same_acc(tmp_path)
    t = build_table(collect([tmp_path]))
    row, text = budget_answer(t, "mean", 5.0)
    assert row is None
    assert text.startswith("No answer under 5 GB: 2 runs tie at mean accuracy over 1 task(s) = 0.5000")
    assert "tiny-1b rtn 4-bit g128" in text and "tiny-1b rtn 3-bit g128" in text
    assert "compared 2 run(s) that fit by mean accuracy over 1 task(s) (piqa)" in text
    # the CLI exits 1 (no answer), the report says the same
    rep = make_report([tmp_path], tmp_path / "r", budget_gb=5.0, plots=False)
    assert rep.best is None and "No answer under 5 GB" in rep.markdown


def test_mixed_limits_warn(tmp_path, capsys):
    _two_runs_same_acc(tmp_path, limits=(40, None))
    t = build_table(collect([tmp_path]))
    notes = [n for n in t.notes if "different --limit" in n]
    assert len(notes) == 1 and "(40, none)" in notes[0]
    t2 = build_table(collect([tmp_path / "rtn4"]))
    assert not any("different --limit" in n for n in t2.notes)
    from lm_eval_quant.report.cli import main as report_main

    report_main([str(tmp_path), "--out", str(tmp_path / "r"), "--no-plots"])
    out = capsys.readouterr().out
    assert "\nWarning: the runs used different --limit values (40, none)" in out
    assert "Warning: the runs used different --limit" in (tmp_path / "r" / "report.md").read_text()


def test_no_mean_fallback_is_said(tmp_path):
    d = results_doc({"pretrained": "org/tiny-1b", "dtype": "float16"},
                    {"wikitext": {"word_perplexity": (30.0, None)}}, n_params=10**9)
    write_lm_eval_layout(tmp_path, d)
    t = build_table(collect([tmp_path]))
    assert t.resolve_metric(None) == "wikitext"
    assert any("no accuracy-like task is shared by every run" in n and "wikitext (word_perplexity)" in n
               for n in t.notes)


@pytest.mark.parametrize("gb, text", [
    (0.000394, "0.394 MB"), (0.269, "269 MB"), (0.0538, "53.8 MB"), (7.641, "7.64 GB"),
    (15.0, "15 GB"), (140.0, "140 GB"),
])
def test_human_units(gb, text):
    assert _gb_text(gb) == text


# --------------------------------------------------------------------------------------------
# 2. accounting: storage dtype vs evaluation dtype, one bits/weight definition


def _lin_model(dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16, bias=False))
    return m.to(dtype)


def test_baseline_counts_the_checkpoint_dtype():
    from lm_eval_quant.accounting import account
    from lm_eval_quant.methods import build_config

    m = _lin_model(torch.float32)                     # evaluated in float32 ...
    cfg = build_config(method="none")
    acc = account(m, cfg, [], storage_dtype="float16")  # ... from a float16 checkpoint
    n = 10 * 8 + 8 * 16
    assert acc["total_bits"] == n * 16                # counted as stored, not as evaluated
    assert (acc["storage_dtype"], acc["eval_dtype"]) == ("float16", "float32")
    assert acc["quant_config"]["bits"] == 16
    # an fp32 checkpoint's baseline is 32-bit, not 16
    acc32 = account(m, cfg, [], storage_dtype="float32")
    assert acc32["quant_config"]["bits"] == 32 and acc32["total_bits"] == n * 32
    # no storage dtype known: the dtype in memory
    assert account(m, cfg, [])["total_bits"] == n * 32
    # an fp32 checkpoint evaluated in bfloat16 is a bf16 model (the downcast is what was evaluated)
    acc_bf = account(_lin_model(torch.bfloat16), cfg, [], storage_dtype="float32")
    assert acc_bf["quant_config"]["bits"] == 16 and acc_bf["total_bits"] == n * 16
    assert (acc_bf["storage_dtype"], acc_bf["eval_dtype"]) == ("float32", "bfloat16")


def test_quantized_weights_same_figure_on_the_fly_and_as_the_definition():
    from lm_eval_quant.accounting import account
    from lm_eval_quant.methods import build_config

    m = _lin_model(torch.float32)
    cfg = build_config(method="rtn", bits=4, group_size=4, sym=False)
    acc = account(m, cfg, ["1"], storage_dtype="bfloat16")
    # 16×8 weights: 4-bit codes + per group of 4 an fp16 scale and a 4-bit zero; embedding at bf16
    assert acc["bits_per_quantized_weight"] == 4 + (16 + 4) / 4 == 9.0
    assert acc["total_bits"] == 128 * 9 + 80 * 16
    sym = account(m, build_config(method="rtn", bits=4, group_size=4, sym=True), ["1"])
    assert sym["bits_per_quantized_weight"] == 4 + 16 / 4


def test_report_shows_storage_dtype_for_the_baseline(tmp_path):
    """A hf-quant baseline of an fp16 checkpoint evaluated in float32: bits 16 and GB at fp16."""
    n = 134_515_008
    q = {"quant_config": {"method": "none", "bits": 16, "group_size": 128, "format": "int",
                          "sym": False, "skip": [], "options": {}},
         "params_total": n, "params_quantized": 0, "bits_per_quantized_weight": None,
         "total_bits": n * 16, "total_bytes": n * 2, "total_gb": n * 2 / 1e9,
         "bits_per_param": 16.0, "storage_dtype": "float16", "eval_dtype": "float32"}
    d = results_doc({"pretrained": "org/smol", "method": "none", "dtype": "float32"},
                    {"piqa": {"acc": (0.6, 0.01)}}, model="hf-quant", dtype="torch.float32",
                    n_params=n, quant=q)
    write_lm_eval_layout(tmp_path, d)
    (run,) = collect([tmp_path])
    assert (run.bits, run.format, run.storage_dtype, run.eval_dtype) == (16.0, "float16", "float16", "float32")
    assert run.model_gb == pytest.approx(0.269030016)
    rec = make_report([tmp_path], tmp_path / "r", plots=False).table.rows[0].fields()
    assert (rec["storage_dtype"], rec["eval_dtype"]) == ("float16", "float32")


# --------------------------------------------------------------------------------------------
# 5. CPU fp16 hint


def test_cpu_half_hint_once(caplog, monkeypatch):
    from lm_eval_quant.models import hf_quant

    monkeypatch.setattr(hf_quant, "_CPU_HALF_WARNED", False)
    half, full = _lin_model(torch.float16), _lin_model(torch.float32)
    assert hf_quant.cpu_half_hint(full, "cpu") is None
    assert hf_quant.cpu_half_hint(_lin_model(torch.bfloat16), "cpu") is None
    msg = hf_quant.cpu_half_hint(half, "cpu")
    assert "float16 on the CPU" in msg and "dtype=float32" in msg and "\n" not in msg
    with caplog.at_level(logging.WARNING, logger="lm_eval_quant"):
        assert hf_quant.warn_cpu_half_once(half, torch.device("cpu")) is True
        assert hf_quant.warn_cpu_half_once(half, torch.device("cpu")) is False
    assert [r.getMessage() for r in caplog.records].count(msg) == 1


# --------------------------------------------------------------------------------------------
# 6. noise


def test_known_noise_filtered_rest_kept(caplog):
    from lm_eval_quant import _quiet

    _quiet.install()
    _quiet.install()  # idempotent
    assert sum(isinstance(f, _quiet.DropKnown) for f in logging.getLogger("torchao").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning(
            "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
            "Could not load this library")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque "
            "value type.", "<enum 'KernelPreference'>")
        logging.getLogger("transformers.tokenization_utils_base").warning(
            "Token indices sequence length is longer than the specified maximum sequence length "
            "for this model (600 > 512).")
        logging.getLogger("torchao").warning("something else from torchao")
        logging.getLogger("torch.utils._pytree").warning("another pytree warning")
    got = [r.getMessage() for r in caplog.records]
    assert got == ["something else from torchao", "another pytree warning"]


def test_git_hash_quiet_outside_a_repo(tmp_path, capfd, monkeypatch):
    from lm_eval_quant import _quiet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    try:
        subprocess.run(["git", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not installed")
    assert _quiet.quiet_git_hash() is None
    assert "fatal" not in capfd.readouterr().err
    _quiet.quiet_git()
    import lm_eval.evaluator as ev

    assert ev.get_git_commit_hash is _quiet.quiet_git_hash


def test_end_to_end_fp16_checkpoint_evaluated_in_fp32(tiny_llama, toy_task_dir, tmp_path):
    """The wrapper records both dtypes and counts the baseline at the checkpoint's fp16 (not the
    float32 it was evaluated in), and quantized runs' embeddings/head likewise."""
    import shutil

    from transformers import AutoModelForCausalLM

    from test_model import _evaluate

    ck = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama)).half().save_pretrained(str(ck))
    for f in os.listdir(tiny_llama):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tiny_llama, f), ck / f)
    r = _evaluate("hf-quant", f"pretrained={ck},method=none,dtype=float32,device=cpu", toy_task_dir, limit=4)
    q = r["config"]["quantization"]
    assert (q["storage_dtype"], q["eval_dtype"]) == ("float16", "float32")
    assert q["quant_config"]["bits"] == 16
    assert q["total_bits"] == q["params_total"] * 16 and q["bits_per_param"] == 16
    r4 = _evaluate("hf-quant", f"pretrained={ck},method=rtn,bits=4,group_size=128,dtype=float32,"
                   "device=cpu,cache=false", toy_task_dir, limit=4)
    q4 = r4["config"]["quantization"]
    n_q = q4["params_quantized"]
    assert q4["total_bits"] == n_q * (4 + 20 / 128) + (q4["params_total"] - n_q) * 16


# --------------------------------------------------------------------------------------------
# 7. docs and examples


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_examples_referenced_by_docs_exist_and_parse():
    import re

    from lm_eval_quant.sweep.spec import SweepSpec

    texts = [p.read_text(encoding="utf-8") for p in
             [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "lm_eval_quant").rglob("*.py"))]]
    named = sorted({m for t in texts for m in re.findall(r"examples/[\w.-]+\.yaml", t)})
    assert "examples/sweep_tiny.yaml" in named
    for rel in named:
        assert (ROOT / rel).is_file(), f"{rel} is referenced but missing"
    for f in sorted((ROOT / "examples").glob("*.yaml")):
        text = f.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{f.name}: a path outside a clone"
        spec = SweepSpec.from_yaml(f)
        assert spec.cells(check_methods=False), f.name
    stories = SweepSpec.from_yaml(ROOT / "examples" / "sweep_stories260k.yaml")
    assert not any("wikitext" in t or "c4" in t for t in stories.tasks)   # a story model on stories


def test_python_route_needs_no_device_nor_task_manager(tiny_llama, toy_task_dir, monkeypatch):
    """simple_evaluate without device= on a machine without CUDA runs on the CPU; add_tasks puts
    our tasks on the search path of the TaskManager simple_evaluate builds itself."""
    if torch.cuda.is_available():
        pytest.skip("the CPU fallback is for machines without CUDA")
    import lm_eval

    import lm_eval_quant
    from lm_eval_quant.cli import add_task_dir

    lm_eval_quant.register()
    lm_eval_quant.add_tasks()
    add_task_dir(toy_task_dir)        # the toy task, found the same way
    res = lm_eval.simple_evaluate(
        model="hf-quant", model_args=f"pretrained={tiny_llama},method=rtn,bits=4,group_size=128,cache=false",
        tasks=["lmq_toy_mc"], limit=2)
    assert 0.0 <= res["results"]["lmq_toy_mc"]["acc,none"] <= 1.0
    from lm_eval.tasks import TaskManager

    assert "wikitext2_gptq" in TaskManager().all_tasks

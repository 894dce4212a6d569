"""Beyond accuracy (issue 13): flips, choice KL, ECE/Brier, McNemar, paired bootstrap, token-level
KL — each against a hand-computed value or an independent reference (scipy), then end to end on
fixture runs written in lm-eval 0.4.13's results + samples layout."""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from lm_eval_quant.report import make_report
from lm_eval_quant.report import stats as S
from lm_eval_quant.report.samples import read_mc_samples, samples_path
from lm_eval_quant.report.tokkl import summarize

scipy = pytest.importorskip("scipy")
from scipy import special, stats as sps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------- statistics


def test_flips_small_table():
    # item:          0  1  2  3  4  5  6  7
    gold = np.array([0, 1, 1, 0, 2, 1, 2, 1])
    pred_fp = np.array([0, 1, 2, 0, 1, 0, 2, 1])
    pred_q = np.array([0, 1, 1, 0, 2, 0, 2, 0])
    f = S.flip_stats(pred_fp == gold, pred_q == gold, pred_fp, pred_q)
    # changed: items 2, 4, 7 -> 3/8; right->wrong: item 7; wrong->right: items 2, 4
    assert f == {"n": 8, "flips": 0.375, "agreement": 0.625, "right_to_wrong": 0.125,
                 "wrong_to_right": 0.25}
    # a flip between two wrong choices counts in flips only
    g = S.flip_stats([0, 0], [0, 0], [1, 0], [2, 0])
    assert g["flips"] == 0.5 and g["right_to_wrong"] == 0 and g["wrong_to_right"] == 0


def test_choice_scores_acc_and_acc_norm():
    lls, lens = [-4.0, -6.0], [2, 4]
    assert S.argmax_first(S.choice_scores(lls)) == 0                   # acc: -4 > -6
    assert list(S.choice_scores(lls, lens)) == [-2.0, -1.5]            # acc_norm: per character
    assert S.argmax_first(S.choice_scores(lls, lens)) == 1
    assert S.argmax_first([-1.0, -1.0, -2.0]) == 0                     # ties: the first (np.argmax)


def test_kl_against_scipy():
    p_sc, q_sc = [-1.0, -2.0, -3.0], [-1.5, -1.0, -3.5]
    p = special.softmax(p_sc)
    q = special.softmax(q_sc)
    want = float(np.sum(special.rel_entr(p, q)))
    assert want == pytest.approx(sps.entropy(p, q))
    got = S.kl_rows([p_sc, [0.0, 0.0]], [q_sc, [0.0, 0.0]])
    assert got[0] == pytest.approx(want, abs=1e-12)
    assert got[1] == 0.0
    # direct formula, by hand: Σ p log(p/q)
    assert got[0] == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), abs=1e-12)


def test_ece_hand_binned():
    conf = [0.98, 0.97, 0.96, 0.62, 0.63, 0.41]
    correct = [1, 1, 0, 1, 0, 0]
    # 15 bins of width 1/15: bin 14 holds 0.96-0.98 (acc 2/3, conf 0.97), bin 9 holds 0.62/0.63
    # (acc 1/2, conf 0.625), bin 6 holds 0.41 (acc 0)
    want = 3 / 6 * abs(2 / 3 - 0.97) + 2 / 6 * abs(0.5 - 0.625) + 1 / 6 * 0.41
    assert S.ece(conf, correct) == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(0.2616666667, abs=1e-9)
    # edges: 1.0 lands in the last bin, 0.0 in the first; a perfectly calibrated bin gives 0
    assert S.ece([1.0, 1.0], [1, 1]) == 0.0
    assert S.ece([0.5, 0.5], [1, 0]) == pytest.approx(0.0)


def test_brier_hand():
    assert S.brier([[0.7, 0.2, 0.1], [0.5, 0.5]], [0, 1]) == pytest.approx((0.14 + 0.5) / 2)


@pytest.mark.parametrize("b, c", [(0, 0), (5, 5), (30, 12), (1, 9), (0, 7), (120, 95)])
def test_mcnemar_exact_against_scipy_binomtest(b, c):
    a = [1] * b + [0] * c + [1] * 10 + [0] * 4
    x = [0] * b + [1] * c + [1] * 10 + [0] * 4
    m = S.mcnemar_exact(a, x)
    assert (m["b"], m["c"]) == (b, c)
    want = 1.0 if b + c == 0 else sps.binomtest(min(b, c), b + c, 0.5).pvalue
    assert m["p"] == pytest.approx(want, rel=1e-9)


def test_paired_bootstrap_seeded_stable_and_sane():
    rng = np.random.default_rng(123)
    a = (rng.random(400) < 0.62).astype(float)
    b = np.where(rng.random(400) < 0.85, a, 1 - a)
    r1 = S.paired_bootstrap(a, b, n_resamples=10_000, seed=0)
    r2 = S.paired_bootstrap(a, b, n_resamples=10_000, seed=0)
    assert r1 == r2                                     # seeded: identical
    assert r1 != S.paired_bootstrap(a, b, n_resamples=10_000, seed=1)
    assert r1["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert r1["lo"] < r1["diff"] < r1["hi"]
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))   # normal approximation of the 95% CI
    assert (r1["hi"] - r1["lo"]) / 2 == pytest.approx(half, rel=0.1)
    # stratified: the statistic is the unweighted mean of per-stratum differences
    s = ["t1"] * 100 + ["t2"] * 300
    r3 = S.paired_bootstrap(a, b, strata=s, n_resamples=2000, seed=0)
    assert r3["diff"] == pytest.approx(((a[:100] - b[:100]).mean() + (a[100:] - b[100:]).mean()) / 2)


def test_percentile_is_numpy_linear():
    assert S.percentile(list(range(101)), 99) == 99.0
    assert S.percentile([0.0, 1.0], 99) == pytest.approx(0.99)


# ---------------------------------------------------------------------------------- token KL


def test_kl_from_topk_bound_and_exact_limit():
    torch = pytest.importorskip("torch")
    from lm_eval_quant.tokkl import kl_from_topk, topk_ref

    g = torch.Generator().manual_seed(0)
    V = 200
    lp = torch.log_softmax(torch.randn(6, V, generator=g) * 3, -1)
    lq = torch.log_softmax(lp + 0.3 * torch.randn(6, V, generator=g), -1)
    p, q = lp.exp().double().numpy(), lq.exp().double().numpy()
    exact = special.rel_entr(p, q).sum(-1)
    ids, v, tl = topk_ref(lp, V)                   # k = vocabulary: exact
    assert np.all(np.isneginf(tl))
    full = kl_from_topk(ids, v, lq, tl)
    np.testing.assert_allclose(full["kl"], exact, rtol=1e-4, atol=1e-6)
    assert np.all(full["tail_mass"] < 1e-5)
    ids, v, tl = topk_ref(lp, 8)                   # k = 8: a lower bound, gap = P_T·KL(tail)
    part = kl_from_topk(ids, v, lq, tl)
    np.testing.assert_allclose(kl_from_topk(ids, v, lq)["kl"], part["kl"], rtol=1e-3, atol=1e-6)
    assert np.all(part["kl"] <= exact + 1e-6)
    for t in range(6):
        tail = np.setdiff1d(np.arange(V), ids[t])
        pt, qt = p[t, tail].sum(), q[t, tail].sum()
        gap = pt * special.rel_entr(p[t, tail] / pt, q[t, tail] / qt).sum()
        assert exact[t] - part["kl"][t] == pytest.approx(gap, rel=1e-3, abs=1e-6)
        assert part["tail_mass"][t] == pytest.approx(pt, rel=1e-4)
    np.testing.assert_array_equal(part["same_top"], lp.argmax(-1).numpy() == lq.argmax(-1).numpy())


def test_tokkl_summary():
    s = summarize([0.0, 0.1, 0.2, 1.0], [True, True, False, True], [0.01, 0.03, 0.0, 0.0])
    assert s["kld_mean"] == pytest.approx(0.325) and s["same_top_pct"] == 75.0
    assert s["kld_p99"] == pytest.approx(np.percentile([0, 0.1, 0.2, 1.0], 99))
    assert s["tail_mass_mean"] == pytest.approx(0.01)


@pytest.fixture(scope="module")
def kl_model(tmp_path_factory):
    from lm_eval_quant.toy import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("kl_model"), arch="llama", hidden=32, layers=2,
                           heads=2, max_pos=64, train_steps=0, seed=5)


def _gptq_ppl():
    d = str(ROOT / "task_configs" / "perplexity")
    sys.path.insert(0, d)
    try:
        return importlib.import_module("gptq_ppl")
    finally:
        sys.path.remove(d)


def test_token_kl_capture_matches_direct_forward(kl_model, tmp_path):
    """fp HFLM stores top-k, a perturbed copy compares: the file's per-token KL equals a direct
    forward of both models (k = vocabulary: exact KL; k = 32: the merged-tail formula)."""
    torch = pytest.importorskip("torch")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lm_eval_quant.tokkl import install

    g = _gptq_ppl()
    fp = HFLM(pretrained=str(kl_model), device="cpu", batch_size=2)
    q = HFLM(pretrained=str(kl_model), device="cpu", batch_size=2)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in q.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    V = fp.model.config.vocab_size
    rng = np.random.default_rng(0)
    wins = [rng.integers(3, V, size=24).tolist() for _ in range(3)]

    def reqs():
        return [Instance("loglikelihood", {}, (g.TokenText("a", w[:1]), g.TokenText("b", w[1:])), 0,
                         ("wikitext2_gptq", i, 1)) for i, w in enumerate(wins)]

    with torch.no_grad():
        lps = {}
        for name, lm in (("fp", fp), ("q", q)):
            x = torch.tensor([w[:-1] for w in wins])
            lps[name] = torch.log_softmax(lm.model(x).logits.double(), -1)
    p, qq = lps["fp"].exp().numpy(), lps["q"].exp().numpy()
    exact = special.rel_entr(p, qq).sum(-1).reshape(-1)
    same = (lps["fp"].argmax(-1) == lps["q"].argmax(-1)).numpy().reshape(-1)
    for k in (V, 32):
        ref_dir, out_dir = tmp_path / f"ref{k}", tmp_path / f"out{k}"
        fp2 = HFLM(pretrained=str(kl_model), device="cpu", batch_size=2)
        q2 = HFLM(pretrained=str(kl_model), device="cpu", batch_size=2)
        q2.model.load_state_dict(q.model.state_dict())
        install(fp2, ref_dir, reference=True, k=k)
        install(q2, ref_dir, out_dir, reference=False, k=k)
        plain = [x[0] for x in q.loglikelihood(reqs())]
        assert [x[0] for x in q2.loglikelihood(reqs())] == pytest.approx(plain)  # scores untouched
        fp2.loglikelihood(reqs())
        assert (ref_dir / "wikitext2_gptq.topk.npz").is_file()
        assert not (out_dir / "tokkl_wikitext2_gptq.npz").exists()   # q ran before the ref existed
        q2._lmq_tokkl.refs.clear()
        q2.loglikelihood(reqs())
        z = np.load(out_dir / "tokkl_wikitext2_gptq.npz")
        assert z["kl"].shape == (3 * 23,)
        np.testing.assert_array_equal(z["same_top"], same)
        if k == V:
            np.testing.assert_allclose(z["kl"], exact, rtol=1e-4, atol=1e-6)
        else:
            # the merged-tail KL, computed here from the direct forward (a flat random model puts
            # most mass outside its top 32, so the bound is far below the exact KL here)
            P, Q = p.reshape(-1, V), qq.reshape(-1, V)
            top = np.argsort(-P, axis=1)[:, :32]
            want = []
            for t in range(P.shape[0]):
                tail = np.setdiff1d(np.arange(V), top[t])
                pt, qt = P[t, tail].sum(), Q[t, tail].sum()
                want.append(special.rel_entr(P[t, top[t]], Q[t, top[t]]).sum() + pt * math.log(pt / qt))
            np.testing.assert_allclose(z["kl"], want, rtol=1e-4, atol=1e-6)
            assert np.all(z["kl"] <= exact + 1e-6)
            np.testing.assert_allclose(z["tail_mass"], [P[t, np.setdiff1d(np.arange(V), top[t])].sum()
                                                        for t in range(P.shape[0])], rtol=1e-4)


def test_token_kl_rolling_windows(kl_model, tmp_path):
    torch = pytest.importorskip("torch")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lm_eval_quant.tokkl import install

    fp = HFLM(pretrained=str(kl_model), device="cpu", batch_size=1, max_length=16)
    q = HFLM(pretrained=str(kl_model), device="cpu", batch_size=1, max_length=16)
    with torch.no_grad():
        for p in q.model.parameters():
            p.mul_(1.1)
    install(fp, tmp_path / "ref", reference=True)
    install(q, tmp_path / "ref", tmp_path / "out")
    text = "Once upon a time there was a little fox who liked to run in the green forest all day."
    r = [Instance("loglikelihood_rolling", {}, (text,), 0, ("wikitext", 0, 1))]
    fp.loglikelihood_rolling(r)
    q.loglikelihood_rolling(r)
    z = np.load(tmp_path / "out" / "tokkl_wikitext.npz")
    assert z["kl"].size == len(fp.tok_encode(text))       # every token scored once
    assert np.all(z["kl"] >= 0) and z["kl"].mean() > 0


# ---------------------------------------------------------------------------------- end to end

TS = {"fp": "2026-11-30T10-00-00.000000", "q": "2026-11-30T11-00-00.000000",
      "q2": "2026-11-30T12-00-00.000000", "big": "2026-11-30T13-00-00.000000"}


def _quant(method, bits, params=1_000_000, gb=None):
    if method == "none":
        return {"quant_config": {"method": "none", "bits": 16, "group_size": 128, "format": "int",
                                 "sym": False, "options": {}},
                "params_quantized": 0, "params_total": params, "total_bits": params * 16,
                "bits_per_param": 16.0, "total_gb": gb if gb is not None else params * 2 / 1e9}
    bpw = bits + 32 / 128
    return {"quant_config": {"method": method, "bits": bits, "group_size": 128, "format": "int",
                             "sym": False, "options": {}},
            "params_quantized": params, "params_total": params, "bits_per_quantized_weight": bpw,
            "total_bits": params * bpw, "bits_per_param": bpw,
            "total_gb": gb if gb is not None else params * bpw / 8 / 1e9}


def write_run(out: Path, name: str, pretrained: str, quant: dict, task_lls: dict, ts: str,
              gold: dict, samples: bool = True, limit=None) -> Path:
    """A results file + samples files as lm-eval 0.4.13 writes them (lls as strings, target as
    a string index, arguments with the target delimiter in arg_1)."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    results, configs = {}, {}
    for task, lls in task_lls.items():
        accs = [float(int(np.argmax(l)) == g) for l, g in zip(lls, gold[task])]
        results[task] = {"alias": task, "acc,none": float(np.mean(accs)),
                         "acc_stderr,none": float(np.std(accs, ddof=1) / math.sqrt(len(accs)))}
        configs[task] = {"task": task, "output_type": "multiple_choice", "target_delimiter": " "}
        if samples:
            with open(d / f"samples_{task}_{ts}.jsonl", "w") as fh:
                for i, (l, g) in enumerate(zip(lls, gold[task])):
                    fh.write(json.dumps({
                        "doc_id": i, "doc": {"q": i}, "target": str(g),
                        "arguments": {f"gen_args_{k}": {"arg_0": f"Q{i}:", "arg_1": f" choice{k}"}
                                      for k in range(len(l))},
                        "resps": [[[str(x), "False"]] for x in l],
                        "filtered_resps": [[str(x), "False"] for x in l],
                        "filter": "none", "metrics": ["acc"], "doc_hash": f"h{i}",
                        "acc": float(int(np.argmax(l)) == g)}) + "\n")
    doc = {"results": results, "configs": configs, "group_subtasks": {t: [] for t in task_lls},
           "higher_is_better": {t: {"acc": True} for t in task_lls},
           "n-samples": {t: {"original": len(gold[t]), "effective": len(gold[t])} for t in task_lls},
           "config": {"model": "hf-quant", "model_args": f"pretrained={pretrained}",
                      "model_dtype": "torch.float32", "limit": limit, "quantization": quant},
           "model_name": pretrained}
    p = d / f"results_{ts}.json"
    p.write_text(json.dumps(doc))
    return p


def _lls_from_preds(preds, n_choices=3, margin=1.0, rng=None):
    out = []
    for k, p in enumerate(preds):
        base = [-5.0 - 0.1 * ((k + j) % 3) for j in range(n_choices)]
        base[p] = -5.0 + margin
        out.append(base)
    return out


@pytest.fixture()
def study(tmp_path):
    gold = {"mc_a": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0], "mc_b": [1, 0, 1, 0, 1, 0]}
    fp_pred = {"mc_a": [0, 1, 2, 0, 1, 2, 0, 1, 0, 1], "mc_b": [1, 0, 1, 0, 0, 1]}
    # the 4-bit run flips mc_a items 0 (right->wrong), 8 (wrong->right), 9 (wrong->wrong)
    q_pred = {"mc_a": [1, 1, 2, 0, 1, 2, 0, 1, 2, 2], "mc_b": [1, 0, 1, 0, 0, 1]}
    root = tmp_path / "runs"
    write_run(root, "fp", "/m/toy-1m", _quant("none", 16),
              {t: _lls_from_preds(v) for t, v in fp_pred.items()}, TS["fp"], gold)
    write_run(root, "q4", "/m/toy-1m", _quant("rtn", 4),
              {t: _lls_from_preds(v) for t, v in q_pred.items()}, TS["q"], gold)
    return root, gold, fp_pred, q_pred


def _rows(csv_path):
    return list(csv.DictReader(open(csv_path)))


def test_end_to_end_known_flips(study, tmp_path):
    root, gold, fp_pred, q_pred = study
    rep = make_report([root], tmp_path / "rep")
    rows = {r["method"]: r for r in _rows(rep.files["csv"])}
    q = rows["rtn"]
    assert float(q["mc_a:flips"]) == pytest.approx(0.3)
    assert float(q["mc_a:agreement"]) == pytest.approx(0.7)
    assert float(q["mc_a:right_to_wrong"]) == pytest.approx(0.1)
    assert float(q["mc_a:wrong_to_right"]) == pytest.approx(0.1)
    assert float(q["mc_b:flips"]) == 0.0 and float(q["mc_b:kl_mean"]) == pytest.approx(0.0, abs=1e-12)
    # McNemar on mc_a: b = 1 (only the fp right), c = 1 -> p = 1
    assert float(q["mc_a:mcnemar_p"]) == pytest.approx(sps.binomtest(1, 2, 0.5).pvalue)
    assert q["mc_a:fp_ref"] == "toy-1m float32"
    # KL mean of mc_a against scipy, item by item
    f = _lls_from_preds(fp_pred["mc_a"])
    g = _lls_from_preds(q_pred["mc_a"])
    want = np.mean([special.rel_entr(special.softmax(a), special.softmax(b)).sum() for a, b in zip(f, g)])
    assert float(q["mc_a:kl_mean"]) == pytest.approx(want, rel=1e-9)
    # ECE/Brier of the quantized run and their change vs fp, recomputed independently
    conf_q = [special.softmax(x).max() for x in g]
    corr_q = [float(p == t) for p, t in zip(q_pred["mc_a"], gold["mc_a"])]
    conf_f = [special.softmax(x).max() for x in f]
    corr_f = [float(p == t) for p, t in zip(fp_pred["mc_a"], gold["mc_a"])]
    assert float(q["mc_a:ece"]) == pytest.approx(S.ece(conf_q, corr_q))
    assert float(q["mc_a:ece_delta"]) == pytest.approx(S.ece(conf_q, corr_q) - S.ece(conf_f, corr_f))
    assert rows["none"]["mc_a:fp_ref"] == "(reference)" and rows["none"]["mc_a:flips"] == ""
    md = rep.files["markdown"].read_text()
    assert "## Beyond accuracy" in md and "toy-1m float32" in md and "flips.png" in md
    pts = _rows(rep.files["flips_csv"])
    assert {(p["task"], p["method"], float(p["flips"])) for p in pts} >= {("mc_a", "rtn", 0.3)}
    assert rep.files["flips_png"].stat().st_size > 1000


def test_compare_items_mcnemar_direction():
    from lm_eval_quant.report.beyond import Items, compare_items

    def items(pred, correct):
        n = len(pred)
        return Items(np.arange(n), [None] * n, [S.log_softmax(np.eye(2)[p]) for p in pred],
                     np.asarray(pred), np.asarray(correct, dtype=float), [0] * n)

    st = compare_items(items([0, 0, 0, 1], [1, 1, 1, 0]), items([1, 1, 0, 1], [0, 0, 1, 0]), n_resamples=200)
    assert (st["mcnemar_b"], st["mcnemar_c"]) == (2, 0)        # b: only fp right, c: only q right
    assert st["mcnemar_p"] == pytest.approx(sps.binomtest(0, 2, 0.5).pvalue)
    assert st["acc_diff"] == pytest.approx(-0.5) and st["flips"] == 0.5 and st["right_to_wrong"] == 0.5


def test_samples_file_structure_parsed(study):
    root, gold, fp_pred, _ = study
    res = next((root / "fp").glob("results_*.json"))
    sp = samples_path(res, "mc_a")
    s = read_mc_samples(sp, "mc_a")
    assert s.doc_ids == list(range(10)) and s.gold == gold["mc_a"]
    assert s.lengths[0] == [len("choice0")] * 3          # target delimiter stripped, like acc_norm
    assert s.metrics["acc"] == [float(p == t) for p, t in zip(fp_pred["mc_a"], gold["mc_a"])]


def test_real_lm_eval_samples_file_shape():
    """The exact line shape of a samples file written by lm-eval 0.4.13 (liar_binary, custom
    process_results): string log-likelihoods, string target."""
    line = {"doc_id": 0, "doc": {"label_binary": 1}, "target": "1",
            "arguments": {"gen_args_0": {"arg_0": "Answer:", "arg_1": " false"},
                          "gen_args_1": {"arg_0": "Answer:", "arg_1": " true"}},
            "resps": [[["-26.511043548583984", "False"]], [["-14.246402740478516", "False"]]],
            "filtered_resps": [["-26.511043548583984", "False"], ["-14.246402740478516", "False"]],
            "filter": "none", "metrics": ["acc", "macro_f1"], "doc_hash": "d7", "prompt_hash": "07",
            "target_hash": "6b", "acc": 1.0, "macro_f1": [1, 1]}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "samples_liar_binary_2026-12-02T15-01-15.704495.jsonl"
        p.write_text(json.dumps(line) + "\n")
        s = read_mc_samples(p, "liar_binary")
    assert s.lls == [[-26.511043548583984, -14.246402740478516]]
    assert s.gold == [1] and s.lengths == [[5, 4]] and s.metrics["acc"] == [1.0]
    assert s.metrics["macro_f1"] == [None]


def test_missing_fp_and_missing_samples_warn_not_crash(tmp_path, capsys):
    gold = {"mc_a": [0, 1, 0, 1]}
    root = tmp_path / "runs"
    write_run(root, "q4", "/m/toy-1m", _quant("rtn", 4), {"mc_a": _lls_from_preds([0, 1, 1, 1])},
              TS["q"], gold)
    write_run(root, "q3", "/m/toy-1m", _quant("rtn", 3), {"mc_a": _lls_from_preds([0, 0, 1, 1])},
              TS["q2"], gold, samples=False)
    from lm_eval_quant.report.cli import main

    assert main([str(root), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if ln.startswith("Note:")]
    assert any("no full-precision run" in n and "toy-1m__none-w16" in n for n in notes)
    assert any("toy-1m rtn 3-bit g128: no per-sample log for mc_a" in n for n in notes)
    rows = {r["bits"]: r for r in _rows(tmp_path / "rep" / "report.csv")}
    assert rows["4.0"]["mc_a:flips"] == "" and rows["4.0"]["mc_a:ece"] != ""
    assert rows["3.0"]["mc_a:ece"] == ""


def test_budget_answer_names_significance(tmp_path):
    """A big model at 4 bits vs a small one at 16 bits under the same budget: the answer gives
    McNemar's p (= scipy's binomial test on the discordant items) and the bootstrap CI."""
    n = 60
    gold = {"mc_a": [k % 3 for k in range(n)]}
    big = [g for g in gold["mc_a"]]                        # all right
    small = [g if k % 4 else (g + 1) % 3 for k, g in enumerate(gold["mc_a"])]  # 15 wrong
    root = tmp_path / "runs"
    write_run(root, "big4", "/m/big", _quant("rtn", 4, params=4_000_000), {"mc_a": _lls_from_preds(big)},
              TS["big"], gold)
    write_run(root, "small16", "/m/small", _quant("none", 16, params=1_000_000),
              {"mc_a": _lls_from_preds(small)}, TS["fp"], gold)
    rep = make_report([root], tmp_path / "rep", budget_gb=0.0025)
    assert rep.best.run.model == "big"
    want = sps.binomtest(0, 15, 0.5).pvalue
    assert f"McNemar exact p = {S.fmt_p(want)}" in rep.significance
    assert "significantly better" in rep.significance and "Runner-up: small" in rep.significance
    assert "95% CI [+0.1" in rep.significance
    assert "(15 items only the best got right, 0 only the runner-up)" in rep.significance
    assert rep.significance in rep.files["markdown"].read_text()


# ---------------------------------------------------------------------------------- sweep wiring


def test_sweep_defaults_log_samples_and_fp_first():
    from lm_eval_quant.sweep.spec import SweepSpec

    d = {"models": ["/m/a", "/m/b"], "methods": ["rtn", "none"], "bits": [4, 16], "group_sizes": [32],
         "tasks": ["x"]}
    spec = SweepSpec.from_dict(d)
    assert spec.harness["log_samples"] is True and spec.harness["token_kl"] is True
    cells = spec.cells(check_methods=False)
    # each model's unquantized cell runs before its quantized ones (they read its KL reference)
    assert [c.name for c in cells] == ["a__none-w16", "a__rtn-w4-g32-int", "b__none-w16", "b__rtn-w4-g32-int"]
    # turning the logs off does not change what a cell computes: same keys (finished cells stay)
    off = SweepSpec.from_dict(dict(d, harness={"log_samples": False, "token_kl": False}))
    assert [c.key for c in off.cells(check_methods=False)] == [c.key for c in cells]


def test_sweep_cli_no_log_samples_flag(tmp_path):
    from lm_eval_quant.sweep.cli import build_parser, spec_from_args

    a = build_parser().parse_args(["--models", "/m/a", "--tasks", "x", "--no-log-samples", "--no-token-kl"])
    spec = spec_from_args(a)
    assert spec.harness["log_samples"] is False and spec.harness["token_kl"] is False
    b = build_parser().parse_args(["--models", "/m/a", "--tasks", "x"])
    assert spec_from_args(b).harness["log_samples"] is True


@pytest.mark.slow
def test_sweep_end_to_end_flips_and_token_kl(tmp_path, monkeypatch):
    """A real sweep (toy model; a multiple-choice task and wikitext2_gptq on toy text): the fp cell
    stores the top-k reference, the 2-bit cell writes its token KL, the report shows both."""
    import test_sweep as TS_
    from lm_eval_quant.sweep import run_sweep
    from lm_eval_quant.toy import make_corpus, make_tiny_model

    for k, v in TS_.env().items():
        if k.startswith(("HF_", "OMP_", "MKL_", "TOKENIZERS_", "PYTHONPATH")):
            monkeypatch.setenv(k, v)
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    rows = []
    for i, para in enumerate(make_corpus(3000, seed=11).split("\n\n")):
        rows += ["", f" = Story {i} = \n", "", " " + para + " \n"]
    (data / "wikitext2" / "wikitext-2-raw-v1.test.rows.json").write_text(json.dumps(rows))
    monkeypatch.setenv("LMQ_DATA_DIR", str(data))
    model = make_tiny_model(tmp_path / "tiny-a", hidden=32, layers=1, heads=2, intermediate=64,
                            train_steps=30, seed=0)
    tasks = TS_.write_task(tmp_path / "tasks")
    spec = {"name": "b", "models": [{"pretrained": str(model), "name": "tiny-a"}],
            "methods": ["rtn"], "bits": [2, 16], "group_sizes": [16],
            "tasks": [TS_.TASK, "wikitext2_gptq"], "model_args": {"dtype": "float32"},
            "harness": {"limit": 12, "batch_size": 2, "device": "cpu", "include_defaults": False,
                        "include_path": [str(tasks)], "metadata": {"ppl_seqlen": 16}}}
    res = run_sweep(spec, tmp_path / "out", progress=False)
    assert res.ok, res.table()
    assert [c.name for c in res.cells][0] == "tiny-a__none-w16"
    assert (tmp_path / "out" / "kl_ref" / "tiny-a" / "wikitext2_gptq.topk.npz").is_file()
    q = tmp_path / "out" / "cells" / "tiny-a__rtn-w2-g16-int"
    assert len(list(q.glob("tokkl_wikitext2_gptq_*.npz"))) == 1
    assert len(list(q.glob(f"samples_{TS_.TASK}_*.jsonl"))) == 1
    rep = make_report([tmp_path / "out"], tmp_path / "rep")
    rows = {r["method"]: r for r in _rows(rep.files["csv"])}
    r2 = rows["rtn"]
    assert r2[f"{TS_.TASK}:fp_ref"] == "tiny-a float32"
    assert 0.0 <= float(r2[f"{TS_.TASK}:flips"]) <= 1.0 and r2[f"{TS_.TASK}:mcnemar_p"] != ""
    assert float(r2["wikitext2_gptq:kld_mean"]) > 0 and 0 <= float(r2["wikitext2_gptq:same_top_pct"]) <= 100
    md = rep.files["markdown"].read_text()
    assert "KLD mean" in md and "same top token %" in md


def test_hf_quant_kl_ref_needs_kl_out_for_quantized(kl_model, tmp_path):
    """One line, before any weights are read."""
    import lm_eval_quant
    from lm_eval_quant.errors import QuantArgError

    lm_eval_quant.register()
    from lm_eval_quant.models.hf_quant import HFQuantLM

    with pytest.raises(QuantArgError, match=r"kl_ref=DIR on a quantized model also needs kl_out=DIR") as e:
        HFQuantLM(pretrained=str(kl_model), method="rtn", bits=4, group_size=-1,
                  kl_ref=str(tmp_path / "ref"), device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(QuantArgError, match=r"kl_topk=0 must be a positive integer"):
        HFQuantLM(pretrained=str(kl_model), method="none", kl_ref=str(tmp_path / "ref"), kl_topk=0,
                  device="cpu")


def test_tasks_filter_limits_beyond(study, tmp_path):
    root, *_ = study
    rep = make_report([root], tmp_path / "rep", tasks=["mc_b"])
    assert rep.beyond.mc_tasks == ["mc_b"]
    assert not any(k.startswith("mc_a:") for k in _rows(rep.files["csv"])[0])


def test_cli_no_beyond_and_bad_bootstrap(study, tmp_path, capsys):
    from lm_eval_quant.report.cli import main

    root, *_ = study
    assert main([str(root), "--out", str(tmp_path / "a"), "--no-beyond", "-q"]) == 0
    assert "mc_a:flips" not in (tmp_path / "a" / "report.csv").read_text()
    assert not (tmp_path / "a" / "flips.png").exists()
    assert main([str(root), "--out", str(tmp_path / "b"), "--bootstrap", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lm-eval-quant: error: report: --bootstrap must be an integer >= 100 (default 10000), got 5"]

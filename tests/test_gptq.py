"""GPTQ: the solver on hand-checkable cases, every format, act_order/static_groups, dead inputs,
damping retries, determinism, and perplexity on trained models (toy fixture, stories260K)."""

from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval_quant.errors import QuantArgError  # noqa: E402
from lm_eval_quant.formats import QParams, make_format, quantize_weight  # noqa: E402
from lm_eval_quant.methods import build_config, get_method  # noqa: E402
from lm_eval_quant.methods.base import QuantContext  # noqa: E402
from lm_eval_quant.methods.gptq import GPTQSolver  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"

FORMATS = [("int", 2, False), ("int", 3, False), ("int", 4, False), ("int", 8, False), ("int", 3, True),
           ("int", 4, True), ("fp", 4, True), ("fp:e3m2", 6, True), ("nf", 3, True), ("nf", 4, True),
           ("dynamic", 4, True)]


def solve(W, H=None, X=None, fmt=None, gs=-1, **kw):
    s = GPTQSolver(W)
    if X is not None:
        s.add_batch(X)
    else:
        s.H = H.clone().float()
        s.nsamples = 1
    return s.quantize(fmt, gs, **kw)


def correlated(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) * 0.4 + torch.eye(d)
    scale = torch.rand(d, generator=g) * 2 + 0.1
    return (torch.randn(n, d, generator=g) @ A) * scale


def out_err(W, Wh, X):
    return float(((X.double() @ (W - Wh).double().t()) ** 2).sum())


# ------------------------------------------------------------------------------- hand-checked
@pytest.mark.parametrize("spec,bits,sym", FORMATS)
@pytest.mark.parametrize("gs", [-1, 16, 64])
def test_identity_hessian_equals_rtn(spec, bits, sym, gs):
    W = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits))
    fmt = make_format(spec, bits, sym)
    r = solve(W, H=2 * torch.eye(128), fmt=fmt, gs=gs, block_size=32)
    assert torch.equal(r["w_hat"], quantize_weight(W, fmt, gs).w_hat)
    # act_order on an identity Hessian: the permutation is the identity, the result unchanged
    r2 = solve(W, H=2 * torch.eye(128), fmt=fmt, gs=gs, act_order=True, static_groups=True)
    assert torch.equal(r2["w_hat"], r["w_hat"])


def test_two_column_case_by_hand():
    """W=[0.6, 0.18, 1.0], H couples columns 0 and 1 (H⁻¹[0,1]/H⁻¹[0,0] = -1/2), 2-bit asym per row.

    Grid: scale s = fp16(1/3), levels {0, s, 2s, 3s}.  Column 0: 0.6 -> 2s, error 0.6-2s.
    OBS update: w1 -= (w0-q0)·H⁻¹[0,1]/H⁻¹[0,0]  ->  0.18 + (0.6-2s)/2 = 0.1467 -> rounds to 0 (RTN: s).
    """
    W = torch.tensor([[0.6, 0.18, 1.0]])
    H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    fmt = make_format("int", 2, False)
    s = float(torch.tensor(1 / 3).half())
    r = solve(W, H=H, fmt=fmt, damp=0.0)
    assert r["w_hat"].tolist() == [[2 * s, 0.0, 3 * s]]
    assert quantize_weight(W, fmt, -1).w_hat.tolist() == [[2 * s, s, 3 * s]]
    # the GPTQ objective prefers it: (W-Ŵ) H (W-Ŵ)ᵀ
    d_g = W - r["w_hat"]
    d_r = W - quantize_weight(W, fmt, -1).w_hat
    assert float(d_g @ H @ d_g.t()) < float(d_r @ H @ d_r.t())


def _sink_data(seed, n=2048, d=128, nsink=16):
    """Ordinary correlated tokens, and `nsink` "attention-sink" tokens whose input is massive in two
    channels (as a real LLM's first position feeds its down_proj: ~3000× the typical activation)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) * 0.3 + torch.eye(d)
    X = torch.randn(n, d, generator=g) @ A
    S = torch.randn(nsink, d, generator=g) * 20
    S[:, :2] += 3000.0
    return X, S


def test_massive_activation_tokens_do_not_dominate_the_hessian():
    """The real-model failure, in miniature: with a plain H the 16 sink tokens are ~90% of trace(H),
    damp·mean(diag H) drowns the ordinary tokens' statistics, and GPTQ's output error on held-out
    ordinary tokens is 4.1× RTN's (measured).  With token_cap=100 every ordinary token
    counts as in the reference and each sink token as at most token_cap × the median: GPTQ is back
    below RTN on ordinary tokens and no worse on the sink tokens."""
    from lm_eval_quant.methods.gptq import GPTQ

    assert GPTQ.OPTIONS["token_cap"].default == 0.0  # the reference's plain Hessian stays the default
    cap = 100.0
    fmt = make_format("int", 4, False)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    Xc, Sc = _sink_data(0)
    Xh, Sh = _sink_data(1)
    rtn = quantize_weight(W, fmt, 32).w_hat

    def held_out(token_cap):
        s = GPTQSolver(W, token_cap=token_cap)
        s.add_batch(torch.cat([Sc, Xc]))
        wh = s.quantize(fmt, 32)["w_hat"]
        return out_err(W, wh, Xh) / out_err(W, rtn, Xh), out_err(W, wh, Sh) / out_err(W, rtn, Sh), s.capped

    plain_ord, plain_sink, n0 = held_out(0.0)
    ord_, sink, n = held_out(cap)
    assert n0 == 0 and n == 16  # exactly the sink tokens are capped
    assert plain_ord > 3.0  # the reference Hessian: 4.1x RTN on ordinary tokens
    assert ord_ < 0.7 and sink < 0.6 and sink < plain_sink * 1.1  # measured 0.58 and 0.46 (plain 0.46)


def test_token_weights_by_hand():
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0], [30.0, 40.0]])  # ms: 1, 1, 2, 1250; median 1
    w = GPTQSolver.token_weights(x, 10.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 1.0, 10.0 / 1250.0]))
    s = GPTQSolver(torch.zeros(3, 2), token_cap=10.0)
    s.add_batch(x)
    xw = x * w.sqrt()[:, None]
    assert torch.allclose(s.H, 2 * xw.t() @ xw / 4) and s.capped == 1


def test_hessian_running_mean_matches_batch():
    X = correlated(300, 16)
    s = GPTQSolver(torch.zeros(4, 16))
    for chunk in (X[:7], X[7:100], X[100:].reshape(20, 10, 16)):
        s.add_batch(chunk)
    torch.testing.assert_close(s.H, 2 * X.t() @ X / 300, rtol=1e-4, atol=1e-4)
    assert s.nsamples == 300


# ---------------------------------------------------------------------------- error reduction
@pytest.mark.parametrize("spec,bits,sym", [("int", 2, False), ("int", 3, False), ("int", 4, False), ("int", 4, True),
                                           ("fp", 4, True), ("nf", 3, True), ("dynamic", 4, True)])
@pytest.mark.parametrize("gs", [-1, 32])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_output_error_lower_than_rtn(spec, bits, sym, gs, act_order, static):
    X = correlated()
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    fmt = make_format(spec, bits, sym)
    r = solve(W, X=X, fmt=fmt, gs=gs, act_order=act_order, static_groups=static, keep_qstate=True)
    e_gptq, e_rtn = out_err(W, r["w_hat"], X), out_err(W, quantize_weight(W, fmt, gs).w_hat, X)
    # measured ratios 0.31-0.59 (2-bit groups of 32 without act_order: 0.87)
    limit = 0.92 if (bits == 2 and not act_order) else 0.7
    assert e_gptq < limit * e_rtn, (e_gptq, e_rtn)
    # every weight is on the format's grid of its group: a k-bit code dequantized with its group's
    # scale (and zero point), exactly
    q = r["qstate"]
    g = q["g_idx"].long()
    assert int(q["codes"].max()) < 2 ** bits and g.shape == (W.shape[1],)
    qp = QParams(q["scale"][:, g], None if q["zero"] is None else q["zero"][:, g])
    assert torch.equal(fmt.dequantize(q["codes"], qp), r["w_hat"].float())


@pytest.mark.parametrize("gs", [16, 32, 128])
def test_block_size_does_not_change_result(gs):
    X = correlated()
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    fmt = make_format("int", 3, False)
    a = solve(W, X=X, fmt=fmt, gs=gs, block_size=128)["w_hat"]
    b = solve(W, X=X, fmt=fmt, gs=gs, block_size=48)["w_hat"]
    assert (a != b).float().mean() < 0.01  # identical up to float rounding of the lazy update


# ------------------------------------------------------------------------- qstate / g_idx
@pytest.mark.parametrize("spec,bits,sym", [("int", 4, False), ("int", 3, True), ("nf", 4, True), ("fp", 4, True)])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True), (False, True)])
def test_qstate_reproduces_weights_and_gidx_consistent(spec, bits, sym, act_order, static):
    X = correlated()
    W = torch.randn(20, 128, generator=torch.Generator().manual_seed(3))
    fmt = make_format(spec, bits, sym)
    gs = 32
    r = solve(W, X=X, fmt=fmt, gs=gs, act_order=act_order, static_groups=static, keep_qstate=True)
    qs = r["qstate"]
    g = qs["g_idx"].long()
    assert g.shape == (128,) and g.min() == 0 and g.max() == 128 // gs - 1
    assert torch.bincount(g).tolist() == [gs] * (128 // gs)  # every group has gs columns
    if act_order and not static:
        perm = qs["perm"]
        assert torch.equal(g[perm], torch.arange(128) // gs)  # groups follow the permuted order
        assert torch.equal(perm, torch.argsort(torch.diag(2 * X.t() @ X / len(X)), descending=True, stable=True))
    else:
        assert torch.equal(g, torch.arange(128) // gs)
    scale = qs["scale"][:, g]
    codes = qs["codes"]
    if fmt.kind == "int":
        w_rec = (codes.float() - qs["zero"][:, g]) * scale
    else:
        w_rec = fmt.grid[codes.long()] * scale
    assert torch.equal(w_rec, r["w_hat"])


# ------------------------------------------------------------------ dead inputs, damping
def test_dead_inputs_zeroed_and_finite():
    X = correlated(1024, 64)
    X[:, [3, 17]] = 0
    W = torch.randn(8, 64)
    fmt = make_format("int", 4, False)
    r = solve(W, X=X, fmt=fmt, gs=16, act_order=True)
    assert r["dead"] == 2 and torch.isfinite(r["w_hat"]).all()
    assert (r["w_hat"][:, [3, 17]] == 0).all()


def test_cholesky_failure_retried_with_more_damping():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1: not positive definite
    W = torch.tensor([[0.3, -0.7], [0.1, 0.2]])
    r = solve(W, H=H, fmt=make_format("int", 4, False), damp=0.01)
    assert r["retries"] >= 2 and r["damp"] >= 1.0 and torch.isfinite(r["w_hat"]).all()


# ------------------------------------------------------------------- whole-model behaviour
@pytest.fixture(scope="module")
def trained(trained_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = trained_llama
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return model, tok


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from lm_eval_quant import toy

    p = tmp_path_factory.mktemp("calib") / "stories.txt"
    p.write_text(toy.make_corpus(60_000, seed=7))
    return str(p)


def quantized(model, tok, **kw):
    m = copy.deepcopy(model)
    cfg = build_config(**kw)
    rep = get_method(cfg.method).quantize(m, cfg, QuantContext(tokenizer=tok, progress=False))
    return m, rep


def ppl(model, tok, text=None):
    from lm_eval_quant import toy
    from lm_eval_quant.ppl import perplexity

    ids = torch.tensor(tok(text or toy.heldout_text(16_000))["input_ids"])
    return perplexity(model, ids, 128, batch_size=16)


def test_method_validation_one_line():
    with pytest.raises(QuantArgError, match="damp"):
        build_config(method="gptq", bits=4, damp=-1)
    with pytest.raises(QuantArgError, match="nsamples"):
        build_config(method="gptq", bits=4, nsamples=0)
    with pytest.raises(QuantArgError, match="unknown calib set"):
        build_config(method="gptq", bits=4, calib="c5")
    with pytest.raises(QuantArgError, match="block_size"):
        build_config(method="gptq", bits=4, block_size=0)


def test_determinism_and_report(trained, calib_file):
    model, tok = trained
    kw = dict(method="gptq", bits=3, group_size=32, calib=calib_file, nsamples=16, seqlen=128, act_order=True)
    m1, rep = quantized(model, tok, **kw)
    m2, _ = quantized(model, tok, **kw)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    names = [n for n, _ in __import__("lm_eval_quant.methods.base", fromlist=["x"]).quantizable_linears(model)]
    assert sorted(rep.quantized) == sorted(names) and len(names) == 14
    assert sorted(rep.modified) == sorted(n + ".weight" for n in names)
    base = model.state_dict()
    changed = {k for k in sd1 if not torch.equal(sd1[k], base[k])}
    assert changed == set(rep.modified)  # exactly the reported parameters changed
    cal = rep.extra["calibration"]
    assert cal["source"] == "local" and cal["nsamples"] == 16 and cal["seqlen"] == 128
    assert rep.extra["damp_retries"] == {}


def test_forward_batch_does_not_change_the_result(trained, calib_file):
    """forward_batch only splits the layer forwards: each linear's inputs are gathered back into the
    whole calib batch before the Hessian update, so the quantized weights are the same bits."""
    model, tok = trained
    kw = dict(method="gptq", bits=3, group_size=32, calib=calib_file, nsamples=10, seqlen=64, calib_batch=4)
    ref, _ = quantized(model, tok, forward_batch=4, **kw)  # one forward per calib batch (old behaviour)
    for fb in (1, 3):
        m, _ = quantized(model, tok, forward_batch=fb, **kw)
        sd, sdr = m.state_dict(), ref.state_dict()
        assert all(torch.equal(sd[k], sdr[k]) for k in sd), fb
    m, _ = quantized(model, tok, forward_batch=1, true_sequential=False, **kw)
    r2, _ = quantized(model, tok, forward_batch=4, true_sequential=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), r2.state_dict().values()))
    with pytest.raises(QuantArgError, match="forward_batch"):
        build_config(method="gptq", bits=4, forward_batch=-1)


def test_linears_fed_one_tensor_share_one_hessian(trained, calib_file, monkeypatch):
    """q/k/v (and gate/up) get the very same input tensor: its Hessian is accumulated once and copied,
    which gives the same bits as one accumulation per linear, with 4 instead of 7 updates per layer
    and batch, in both the whole-batch and the chunked (forward_batch) forwards."""
    import lm_eval_quant.methods.gptq as gq

    model, tok = trained
    kw = dict(method="gptq", bits=3, group_size=32, calib=calib_file, nsamples=8, seqlen=64, calib_batch=4)
    calls = {"n": 0}
    real_add = GPTQSolver.add_batch

    def counting(self, x):
        calls["n"] += 1
        return real_add(self, x)

    monkeypatch.setattr(GPTQSolver, "add_batch", counting)
    runs = {}
    for fb in (4, 1):
        calls["n"] = 0
        shared, _ = quantized(model, tok, forward_batch=fb, **kw)
        n_shared = calls["n"]
        with monkeypatch.context() as mp:  # every linear accumulates its own H (the old way)
            mp.setattr(gq._BatchGather, "_add", lambda self, name, x, lead: self.solvers[name].add_batch(x))
            calls["n"] = 0
            own, _ = quantized(model, tok, forward_batch=fb, **kw)
            n_own = calls["n"]
        sa, so = shared.state_dict(), own.state_dict()
        assert all(torch.equal(sa[k], so[k]) for k in sa), fb
        layers, batches = 2, 2
        assert (n_shared, n_own) == (4 * layers * batches, 7 * layers * batches), fb
        runs[fb] = sa
    assert all(torch.equal(runs[4][k], runs[1][k]) for k in runs[4])


def test_forced_cholesky_failure_in_model_warns_and_reports(trained, calib_file, monkeypatch):
    model, tok = trained
    real = torch.linalg.cholesky_ex
    state = {"n": 0}

    def flaky(A, *a, **k):
        state["n"] += 1
        L, info = real(A, *a, **k)
        if state["n"] == 1:  # the very first factorisation fails
            return L, torch.ones_like(info)
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m, rep = quantized(model, tok, method="gptq", bits=4, group_size=32, calib=calib_file, nsamples=8, seqlen=64)
    retried = rep.extra["damp_retries"]
    assert len(retried) == 1 and math.isclose(list(retried.values())[0], 0.1)
    assert any("Cholesky failed" in str(x.message) for x in w)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_true_sequential_off_also_works(trained, calib_file):
    model, tok = trained
    m, rep = quantized(model, tok, method="gptq", bits=4, group_size=-1, calib=calib_file, nsamples=8, seqlen=64,
                       true_sequential=False)
    assert len(rep.quantized) == 14 and rep.extra["true_sequential"] is False


def _ppl_ladder(model, tok, calib_file, gs, skip="lm_head", text=None):
    fp = ppl(model, tok, text)
    res = {"fp": fp}
    for bits in (3, 4):
        for meth in ("rtn", "gptq"):
            kw = dict(calib=calib_file, nsamples=16, seqlen=256) if meth == "gptq" else {}
            m, _ = quantized(model, tok, method=meth, bits=bits, group_size=gs, skip=skip, **kw)
            res[f"{meth}{bits}"] = ppl(m, tok, text)
    return res


@pytest.mark.parametrize("gs", [-1, 32])
def test_trained_toy_perplexity(trained, calib_file, gs):
    model, tok = trained
    r = _ppl_ladder(model, tok, calib_file, gs)
    # measured: fp 2.0306; gs -1: rtn3 2.0459 gptq3 2.0361, rtn4 2.0352 gptq4 2.0330;
    # gs 32: rtn3 2.0402 gptq3 2.0384, rtn4 2.0340 gptq4 2.0315
    assert r["gptq3"] < r["rtn3"], r
    assert r["gptq4"] < r["fp"] * 1.02, r
    assert r["gptq4"] < r["rtn4"], r


@pytest.mark.parametrize("gs", [-1, 32])
def test_sensitive_toy_perplexity(sensitive_llama, calib_file, gs):
    """trained_llama with 4 outlier hidden channels folded in (conftest.sensitive_llama): same fp
    function, but 3-bit RTN now costs ~+5% perplexity, as outlier channels make real LLMs sensitive."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sensitive_llama))
    model = AutoModelForCausalLM.from_pretrained(str(sensitive_llama)).eval()
    r = _ppl_ladder(model, tok, calib_file, gs)
    # measured 2026-11-30: fp 2.0401; gs -1: rtn3 2.1405 gptq3 2.0819, rtn4 2.0976 gptq4 2.0658;
    # gs 32: rtn3 2.1352 gptq3 2.0812, rtn4 2.0861 gptq4 2.0673
    assert r["rtn3"] > r["fp"] * 1.03, r  # the fixture really is sensitive
    assert r["gptq3"] < 0.985 * r["rtn3"], r
    assert r["gptq4"] < r["rtn4"], r
    assert r["gptq4"] < r["fp"] * 1.02, r


@pytest.mark.slow  # issue 10: real model (stories260K from ../shared); the toy fixtures cover this fast
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
@pytest.mark.parametrize("gs", [-1, 32])
def test_stories260k_perplexity(calib_file, gs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    # down_proj has in_features=172: groups of 32 do not divide it, keep it full precision there
    skip = "lm_head" if gs == -1 else "lm_head|*down_proj"
    r = _ppl_ladder(model, tok, calib_file, gs, skip=skip)
    # measured (toy-story text, 32x256 calibration): fp 3.77; per-channel rtn3 7.59 gptq3 5.22,
    # rtn4 4.11 gptq4 3.95; groups of 32: rtn3 5.02 gptq3 4.38, rtn4 4.02 gptq4 3.86
    assert r["gptq3"] < 0.95 * r["rtn3"], r
    assert r["gptq4"] < r["rtn4"], r
    assert r["gptq4"] < r["fp"] * (1.08 if gs == -1 else 1.06), r

"""Ragged groups: a group size that does not divide a layer's input width gives each row a shorter
last group (the GPTQ reference's ``g_idx = i // g``), for RTN, GPTQ (incl. act_order/static_groups),
AWQ, the bit accounting (the real number of groups) and the GPTQ-format export."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from lm_eval_quant.accounting import account  # noqa: E402
from lm_eval_quant.errors import QuantArgError  # noqa: E402
from lm_eval_quant.export import recover_qstate  # noqa: E402
from lm_eval_quant.formats import fake_quantize_, make_format, n_groups, quantize_weight  # noqa: E402
from lm_eval_quant.methods import awq, build_config, get_method  # noqa: E402
from lm_eval_quant.methods.base import QuantContext, check_group_size  # noqa: E402
from lm_eval_quant.methods.gptq import GPTQSolver  # noqa: E402

FMTS = [("int", 4, False), ("int", 3, True), ("nf", 4, True), ("fp", 4, True)]


def _per_slice(W, fmt, g):
    """The written-down definition: every slice of g columns (the last one shorter) is its own block."""
    return torch.cat([quantize_weight(W[:, i:i + g], fmt, -1).w_hat for i in range(0, W.shape[1], g)], 1)


@pytest.mark.parametrize("spec,bits,sym", FMTS)
def test_rtn_ragged_groups_equal_per_slice_quantization(spec, bits, sym):
    W = torch.randn(12, 100, generator=torch.Generator().manual_seed(1))
    fmt = make_format(spec, bits, sym)
    q = quantize_weight(W, fmt, 32)  # groups of 32, 32, 32, 4
    assert q.scale.shape == (12, 4) and q.codes.shape == (12, 100)
    ref = _per_slice(W, fmt, 32)
    assert torch.equal(q.w_hat, ref)
    assert torch.equal(fake_quantize_(W.clone(), fmt, 32), ref)
    assert torch.equal(fmt.dequantize(q.codes[:, 96:], type(fmt.fit(W))(q.scale[:, 3:4],
                       None if q.zero is None else q.zero[:, 3:4])), ref[:, 96:])


def test_group_counts_and_validation():
    assert n_groups(576, 128) == 5 and n_groups(1536, 128) == 12 and n_groups(576, -1) == 1
    assert n_groups(100, 1000) == 1  # a group wider than the row is the whole row
    check_group_size([], 48)  # any positive size is valid now
    for bad in (0, -2):
        with pytest.raises(QuantArgError, match="group_size"):
            check_group_size([], bad)


def test_accounting_counts_the_real_number_of_groups():
    lin = torch.nn.Linear(100, 8, bias=False)
    model = torch.nn.Sequential(lin)
    cfg = build_config(method="rtn", bits=4, group_size=32, sym=False)
    acc = account(model, cfg, quantized=["0"])
    # 8 rows × 4 groups (32+32+32+4) × (fp16 scale + 4-bit zero) + 800 weights × 4 bits
    want = 800 * 4 + 8 * 4 * 20
    assert acc["bits_per_quantized_weight"] == pytest.approx(want / 800)
    assert acc["bits_per_quantized_weight"] == pytest.approx(4 + 20 * 4 / 100)  # 4.8, not 4 + 20/32


def _correlated(n=1024, d=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) * 0.4 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ A) * (torch.rand(d, generator=g) * 2 + 0.1)


@pytest.mark.parametrize("spec,bits,sym", FMTS)
def test_gptq_identity_hessian_equals_ragged_rtn(spec, bits, sym):
    W = torch.randn(16, 100, generator=torch.Generator().manual_seed(2))
    fmt = make_format(spec, bits, sym)
    for bs in (128, 32, 20):
        s = GPTQSolver(W)
        s.H, s.nsamples = 2 * torch.eye(100), 1
        r = s.quantize(fmt, 32, block_size=bs, keep_qstate=True)
        assert torch.equal(r["w_hat"], quantize_weight(W, fmt, 32).w_hat)
        assert r["qstate"]["scale"].shape == (16, 4)
        assert r["qstate"]["g_idx"].tolist() == [i // 32 for i in range(100)]


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_ragged_beats_rtn_and_qstate_reproduces_weights(act_order, static):
    X = _correlated()
    W = torch.randn(24, 100, generator=torch.Generator().manual_seed(3))
    fmt = make_format("int", 3, False)
    s = GPTQSolver(W)
    s.add_batch(X)
    r = s.quantize(fmt, 32, act_order=act_order, static_groups=static, keep_qstate=True)
    err = lambda Wh: float(((X.double() @ (W - Wh).double().t()) ** 2).sum())  # noqa: E731
    assert err(r["w_hat"]) < 0.7 * err(quantize_weight(W, fmt, 32).w_hat)
    qs = r["qstate"]
    gi = qs["g_idx"].long()
    assert sorted(torch.bincount(gi).tolist()) == [4, 32, 32, 32]
    deq = (qs["codes"].float() - qs["zero"][:, gi]) * qs["scale"][:, gi]
    assert torch.equal(deq, r["w_hat"])


def test_awq_math_on_ragged_groups():
    W = torch.randn(10, 100, generator=torch.Generator().manual_seed(4))
    fmt = make_format("int", 3, False)
    assert torch.equal(awq.fake_quant(W, fmt, 32), quantize_weight(W, fmt, 32).w_hat)
    X = _correlated(512)
    H = X.t() @ X
    ratios, errs = awq.search_clip(W, H, fmt, 32, clip_grid=5, return_errors=True)
    assert ratios.shape == (10, 4, 1) and errs.shape == (5, 10, 4)
    # the short last group's error is its own (w-ŵ) H_gg (w-ŵ)ᵀ over its 4 columns only
    Wt, Ht = W[:, 96:], H[96:, 96:]
    for k, r in enumerate(torch.linspace(1.0, 0.5, 5)):
        lim = r * Wt.abs().amax(1, keepdim=True)
        wc = torch.maximum(torch.minimum(Wt, lim), -lim)
        e = quantize_weight(wc, fmt, -1).w_hat - Wt
        assert torch.allclose(errs[k, :, 3], ((e @ Ht) * e).sum(1), rtol=1e-4, atol=1e-4)
    clipped = awq.apply_clip(W, ratios, 32)
    assert clipped.shape == W.shape and bool((clipped.abs() <= W.abs() + 1e-7).all())


def test_recover_qstate_ragged_round_trip():
    W = torch.randn(8, 96, generator=torch.Generator().manual_seed(5))
    w_hat = quantize_weight(W, make_format("int", 4, False), 64).w_hat  # groups of 64 and 32
    qs = recover_qstate(w_hat, 4, 64, False)
    assert qs["scale"].shape == (8, 2)
    gi = qs["g_idx"].long()
    assert torch.equal((qs["codes"].float() - qs["zero"][:, gi]) * qs["scale"][:, gi], w_hat)


@pytest.fixture(scope="module")
def ragged_llama(tmp_path_factory):
    """hidden 96, intermediate 160: group_size=64 divides neither (96 = 64+32, 160 = 64+64+32)."""
    from lm_eval_quant.toy import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("rag") / "llama", arch="llama", hidden=96, layers=2,
                           heads=4, intermediate=160, train_steps=0, seed=0)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from lm_eval_quant.toy import make_corpus

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(make_corpus(20_000, seed=3))
    return p


@pytest.mark.parametrize("method,opts", [
    ("rtn", {}),
    ("gptq", {"act_order": False}),
    ("gptq", {"act_order": True}),
    ("gptq", {"act_order": True, "static_groups": True}),
    ("awq", {}),
])
def test_methods_run_end_to_end_on_ragged_widths(ragged_llama, calib_file, method, opts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(ragged_llama, dtype=torch.float32)
    w0 = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    extra = {} if method == "rtn" else dict(calib=str(calib_file), nsamples=4, seqlen=32)
    if method == "gptq":
        extra["keep_qstate"] = True
    cfg = build_config(method=method, bits=4, group_size=64, sym=False, **extra, **opts)
    rep = get_method(method).quantize(m, cfg, QuantContext(tokenizer=AutoTokenizer.from_pretrained(ragged_llama),
                                                           progress=False))
    assert len(rep.quantized) == 14
    # every row of down_proj (in 160: groups of 64, 64, 32) holds at most 16 distinct values per group
    w = m.model.layers[0].mlp.down_proj.weight.detach()
    assert not torch.equal(w, w0)
    name = "model.layers.0.mlp.down_proj"
    gi = rep.extra["qstate"][name]["g_idx"].long() if method == "gptq" else torch.arange(160) // 64
    assert sorted(torch.bincount(gi).tolist()) == [32, 64, 64]
    for g in range(3):
        assert max(len(torch.unique(row)) for row in w[:, gi == g]) <= 16
    acc = account(m, cfg, rep.quantized)
    shapes = [tuple(dict(m.named_modules())[n].weight.shape) for n in rep.quantized]  # (out, in)
    assert {i for _, i in shapes} == {96, 160}
    n = sum(o * i for o, i in shapes)
    bits = n * 4 + sum(o * -(-i // 64) for o, i in shapes) * 20  # a short group still stores scale + 4-bit zero
    assert acc["bits_per_quantized_weight"] == pytest.approx(bits / n)

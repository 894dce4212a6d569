"""FP8, OCP MX (MXFP8/6/4, MXINT8) and NVFP4 formats (formats/mx.py): hand-worked spec cases,
torch's own float8 casts, and torchao's MX / NVFP4 reference (bit for bit), plus bit accounting and
the one-line errors for lying arguments."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.formats import fake_quantize_, make_format, quantize_weight
from lm_eval_quant.formats.mx import (
    ELEMS,
    e8m0_scale,
    elem_values,
    encode_elem,
    make_block_format,
    round_elem,
)
from lm_eval_quant.methods import build_config


def _r(vals, elem):
    return round_elem(torch.tensor(vals, dtype=torch.float32), ELEMS[elem]).tolist()


# ------------------------------------------------------------------------ element types, by hand
def test_e2m1_spec_values_ties_and_saturation():
    # grid {0, .5, 1, 1.5, 2, 3, 4, 6}; ties go to the even code (mantissa bit 0)
    assert elem_values("e2m1")[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    got = _r([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 7.0, 1e9, float("inf"), -0.3, -5.0], "e2m1")
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -0.5, -4.0]
    # just off a tie rounds to the nearer value
    assert _r([0.2500001, 2.4999, 4.99], "e2m1") == [0.5, 2.0, 4.0]


def test_e4m3_max_subnormal_and_ties():
    s = 2.0**-9  # smallest subnormal
    got = _r([448.0, 464.0, 470.0, 1e6, s, s / 2, 0.75 * s, 1.5 * s, 2.5 * s, 1.0625, 1.1875], "e4m3")
    # 464 is the tie between 448 and the (NaN) 480: saturates to 448; s/2 ties to 0 (even);
    # 1.5s ties between s (odd) and 2s (even); 2.5s between 2s (even) and 3s; 1 + 1/16 between
    # 1 and 1.125 → 1; 1.1875 between 1.125 (odd) and 1.25 (even) → 1.25
    assert got == [448.0, 448.0, 448.0, 448.0, s, 0.0, s, 2 * s, 2 * s, 1.0, 1.25]
    assert ELEMS["e4m3"].max == 448.0


def test_e5m2_e3m2_e2m3_extremes():
    assert _r([57344.0, 61440.0, 2.0**-16, 2.0**-17, 3 * 2.0**-17], "e5m2") == [57344.0, 57344.0, 2.0**-16, 0.0, 2.0**-15]
    assert _r([28.0, 30.0, 0.0625, 0.03125, 0.09375], "e3m2") == [28.0, 28.0, 0.0625, 0.0, 0.125]
    assert _r([7.5, 7.75, 0.125, 0.0625, 0.1875], "e2m3") == [7.5, 7.5, 0.125, 0.0, 0.25]
    # largest values of each table (code 0x7F etc.), read from the decoded tables
    for name, mx in (("e5m2", 57344.0), ("e3m2", 28.0), ("e2m3", 7.5), ("e2m1", 6.0)):
        v = elem_values(name)
        assert float(v[~v.isnan()].max()) == mx


def test_int8_mx_element():
    # MXINT8: k/64, symmetric saturation at 127/64; ties to even
    assert _r([2.0, -2.0, 1 / 128, 3 / 128, 100 / 64 + 1 / 128], "int8") == [127 / 64, -127 / 64, 0.0, 2 / 64, 100 / 64]


@pytest.mark.parametrize("name,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_tables_and_rounding_match_torch_casts(name, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(dtype).float()
    mine = elem_values(name)
    finite = torch.isfinite(ref)
    assert torch.equal(mine[finite], ref[finite])
    assert torch.isnan(mine[~finite]).all()
    # rounding of random values within range equals torch's RNE cast, and so do the codes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.logspace(-6, math.log10(ELEMS[name].max / 4), 20000)
    rq = round_elem(x, ELEMS[name])
    assert torch.equal(rq, x.to(dtype).float())
    assert torch.equal(encode_elem(rq, ELEMS[name]), x.to(dtype).view(torch.uint8))


@pytest.mark.parametrize("name", ["e3m2", "e2m3", "e2m1", "int8"])
def test_codes_round_trip(name):
    el = ELEMS[name]
    x = torch.linspace(-1.2 * el.max, 1.2 * el.max, 5001)
    q = round_elem(x, el)
    codes = encode_elem(q, el)
    assert torch.equal(elem_values(name)[codes.long()], q)
    # every value of the table is a fixed point of the rounding
    v = elem_values(name)
    v = v[~v.isnan()]
    if name == "int8":  # code 0x80 (−2) is never produced: symmetric saturation at ±127/64
        assert v.min().item() == -2.0 and round_elem(torch.tensor([-2.0]), el).item() == -127 / 64
        v = v[v > -2.0]
    assert torch.equal(round_elem(v, el), v)


# ------------------------------------------------------------------------- scales, by hand
def test_e8m0_scale_hand_cases():
    e2m1 = ELEMS["e2m1"]
    # absmax 6 → 2^(2−2) = 1; 7 → 1 as well (7 then saturates to 6, the spec's known clamp);
    # 8 → 2; 0.1 → 2^(−4−2)
    s = e8m0_scale(torch.tensor([6.0, 7.0, 8.0, 0.1, 0.0, 1e-40]), e2m1)
    assert s.tolist()[:4] == [1.0, 1.0, 2.0, 2.0**-6]
    assert s[4].item() == 2.0**-127  # zero block: the smallest E8M0 value; elements are 0 anyway
    fmt = make_format("mxfp4", 4)
    w = torch.tensor([[7.0] + [0.1] * 31])
    qp = fmt.fit(w)
    assert qp.scale.item() == 1.0
    out = fmt.fake(w, qp)
    assert out[0, 0].item() == 6.0 and out[0, 1].item() == 0.0  # 0.1 rounds to 0 on the 0.5 step
    # mxfp8 e4m3 scale: 2^(floor(log2 amax) − 8)
    f8 = make_format("mxfp8", 8)
    assert f8.fit(torch.tensor([[300.0] * 32])).scale.item() == 2.0 ** (8 - 8)
    assert f8.fake(torch.tensor([[300.0] * 32]), f8.fit(torch.tensor([[300.0] * 32])))[0, 0].item() == 288.0


def test_nvfp4_hand_case():
    fmt = make_format("nvfp4", 4)
    w = torch.zeros(1, 2, 16)
    w[0, 0, 0] = 6.0 * 448.0  # tensor absmax → t = 1
    w[0, 0, 1] = 1000.0
    w[0, 1, 0] = 3.0  # block 2: scale e4m3(3/6) = 0.5
    w[0, 1, 1] = 1.1  # 1.1 / 0.5 = 2.2 → 2 → 1.0
    qp = fmt.fit(w)
    assert qp.scale.flatten().tolist() == [448.0, 0.5]
    out = fmt.fake(w, qp)
    assert out[0, 0, 0].item() == 6 * 448.0
    assert out[0, 0, 1].item() == 2 * 448.0  # 1000/448 = 2.23 → 2
    assert out[0, 1, :2].tolist() == [3.0, 1.0]


# --------------------------------------------------------------------------- torchao, bit for bit
def _torchao():
    pytest.importorskip("torchao")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats import nvfp4_tensor
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    return to_mx, to_dtype, nvfp4_tensor


def _weights(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)[None, :]
    x[0, :32] = 0  # an all-zero block
    x[1, 5] = 1e5  # an outlier
    return x


@pytest.mark.parametrize(
    "name,elem",
    [("mxfp8:e4m3", torch.float8_e4m3fn), ("mxfp8:e5m2", torch.float8_e5m2), ("mxfp6:e2m3", "fp6_e2m3"),
     ("mxfp6:e3m2", "fp6_e3m2"), ("mxfp4", "fp4")],
)
def test_mx_bit_exact_vs_torchao(name, elem):
    to_mx, to_dtype, _ = _torchao()
    if elem == "fp4":
        elem = torch.float4_e2m1fn_x2
    x = _weights()
    scale, data = to_mx(x, elem, 32)
    ref = to_dtype(data, scale, elem, 32, torch.float32)
    fmt = make_block_format(name)
    res = quantize_weight(x, fmt, 32)
    assert torch.equal(res.scale, scale.float().reshape(64, 8))
    assert torch.equal(res.w_hat, ref)
    W = x.clone()
    assert torch.equal(fake_quantize_(W, fmt, 32), ref)  # the in-place RTN path too


def test_nvfp4_bit_exact_vs_torchao():
    _, _, nv = _torchao()
    x = _weights()
    t = nv.per_tensor_amax_to_scale(x.abs().max())
    bs, data = nv.nvfp4_quantize(x, 16, t)
    vals = nv.f4_unpacked_to_f32(nv.unpack_uint4(data)).reshape(64, 16, 16)
    ref = (vals * (bs.float().reshape(64, 16, 1) * t)).reshape(64, 256)
    fmt = make_format("nvfp4", 4)
    res = quantize_weight(x, fmt, 16)
    assert torch.equal(res.w_hat, ref)
    assert torch.equal(res.scale, bs.float().reshape(64, 16) * t)
    assert torch.equal(fake_quantize_(x.clone(), fmt, 16), ref)


def test_fp8_per_channel_and_group():
    x = _weights()
    for name, dt in (("fp8:e4m3", torch.float8_e4m3fn), ("fp8:e5m2", torch.float8_e5m2)):
        fmt = make_format(name, 8)
        mx = fmt.elem.max
        s = x.abs().amax(dim=1, keepdim=True) / mx
        s = torch.where(s > 0, s, torch.ones_like(s))
        ref = (x / s).to(dt).float() * s  # torch's RNE cast; in range by construction
        assert torch.equal(quantize_weight(x, fmt, -1).w_hat, ref)
        assert torch.equal(fake_quantize_(x.clone(), fmt, -1), ref)


# ----------------------------------------------------------------------------- bits and errors
def test_bits_per_weight_and_accounting(tiny_llama):
    from transformers import AutoModelForCausalLM

    from lm_eval_quant.accounting import account
    from lm_eval_quant.methods import QuantContext, get_method

    assert make_format("mxfp4", 4).bits_per_weight(32) == 4.25
    assert make_format("mxfp6", 6).bits_per_weight(32) == 6.25
    assert make_format("mxfp8", 8).bits_per_weight(32) == 8.25
    assert make_format("mxint8", 8).bits_per_weight(32) == 8.25
    assert make_format("nvfp4", 4).bits_per_weight(16) == 4.5
    for fmt_name, per_weight, per_tensor in (("mxfp4", 4.25, 0), ("nvfp4", 4.5, 32)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        cfg = build_config(method="rtn", format=fmt_name)
        rep = get_method("rtn").quantize(model, cfg, QuantContext(progress=False))
        acc = account(model, cfg, rep.quantized)
        n = acc["params_quantized"]
        expect = (n * per_weight + per_tensor * len(rep.quantized)) / n
        assert acc["bits_per_quantized_weight"] == pytest.approx(expect, rel=1e-12)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = build_config(method="rtn", format="fp8")
    rep = get_method("rtn").quantize(model, cfg, QuantContext(progress=False))
    mods = dict(model.named_modules())
    n = sum(mods[q].weight.numel() for q in rep.quantized)
    bits = sum(mods[q].weight.numel() * 8 + mods[q].weight.shape[0] * 32 for q in rep.quantized)
    assert account(model, cfg, rep.quantized)["bits_per_quantized_weight"] == pytest.approx(bits / n)


def test_defaults_from_the_format():
    c = build_config(method="rtn", format="mxfp8")
    assert (c.format, c.bits, c.group_size, c.sym) == ("mxfp8:e4m3", 8, 32, True)
    c = build_config(method="gptq", format="mxfp4", group_size="32")
    assert (c.format, c.bits, c.group_size) == ("mxfp4", 4, 32)
    c = build_config(method="rtn", format="nvfp4")
    assert (c.bits, c.group_size) == (4, 16)
    c = build_config(method="rtn", format="fp8:e5m2")
    assert (c.bits, c.group_size) == (8, -1)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(format="mxfp4", group_size=64), "group_size=32"),
        (dict(format="mxfp8", group_size=128), "group_size=32"),
        (dict(format="nvfp4", group_size=32), "group_size=16"),
        (dict(format="nvfp4", sym="true"), "drop sym"),
        (dict(format="mxfp4", sym="false"), "drop sym"),
        (dict(format="mxfp4", bits=3), "bits=4"),
        (dict(format="mxfp6:e4m3"), "mxfp6:e2m3"),
        (dict(format="nvfp4", method="gptq"), "method=rtn or awq"),
        (dict(format="nvfp4", method="bnb"), "nf4 or fp4"),
    ],
)
def test_lying_arguments_are_one_line(kw, needle):
    with pytest.raises(QuantArgError) as e:
        build_config(**kw)
    assert "\n" not in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("name", list(ELEMS))
def test_fast_rounding_equals_the_reference(name):
    """round_elem (native fp8 casts / float32 bit rounding) == round_elem_reference (frexp
    arithmetic) on every exact midpoint of the grid (the ties), the grid itself, ±inf, the
    saturation range and 200k log-uniform values."""
    from lm_eval_quant.formats.mx import round_elem_reference

    el = ELEMS[name]
    v = elem_values(name)
    v = v[~v.isnan()].unique()
    mids = (v[1:] + v[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(200_000, generator=g) * torch.logspace(-8, 6, 200_000)
    x = torch.cat([v, mids, torch.nextafter(mids, torch.full_like(mids, float("inf"))), rnd,
                   torch.tensor([float("inf"), -float("inf"), 1.01 * el.max, -3 * el.max])])
    a, b = round_elem(x, el), round_elem_reference(x, el)
    assert torch.equal(a, b)
    assert torch.equal(torch.signbit(a[a == 0]), torch.signbit(b[b == 0]))


@pytest.mark.parametrize("method,fmt_name", [("gptq", "mxfp4"), ("awq", "nvfp4"), ("awq", "mxfp6"), ("rtn", "fp8")])
def test_weight_methods_take_the_block_formats(tiny_llama, tmp_path, method, fmt_name):
    """Every quantized matrix ends on the format's grid: re-quantizing it changes nothing (MX,
    fp8). NVFP4's two-level scale is not idempotent (the tensor absmax moves), so there each block
    of 16 must be e2m1 values times its own unit max|block| / 6 (the E4M3-rounded block scale puts
    the block maximum within ±1/16 of 6 units, which rounds to 6)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_quant.methods import QuantContext, get_method
    from lm_eval_quant.methods.base import weight_matrix
    from lm_eval_quant.toy import make_corpus

    calib = tmp_path / "c.txt"
    calib.write_text(make_corpus(20_000, seed=3))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    opts = {} if method == "rtn" else dict(calib=str(calib), nsamples=4, seqlen=64)
    if method == "awq":
        opts.update(n_grid=4, clip_grid=4)
    cfg = build_config(method=method, format=fmt_name, **opts)
    rep = get_method(method).quantize(model, cfg, QuantContext(tokenizer=tok, progress=False))
    fmt = make_format(cfg.format, cfg.bits)
    mods = dict(model.named_modules())
    assert len(rep.quantized) == 14
    for n in rep.quantized:
        W = weight_matrix(mods[n]).detach()
        if fmt_name == "nvfp4":
            B = W.reshape(W.shape[0], -1, 16)
            unit = B.abs().amax(-1, keepdim=True) / 6
            r = B / torch.where(unit > 0, unit, torch.ones_like(unit))
            assert torch.allclose(r, round_elem(r, ELEMS["e2m1"]), rtol=0, atol=1e-4), n
        else:
            assert torch.equal(quantize_weight(W, fmt, cfg.group_size).w_hat, W), n

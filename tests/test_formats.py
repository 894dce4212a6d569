"""Number formats: exact grids (NF4 = bitsandbytes' table, int 2^k levels, fp ExMy by definition,
dynamic exponent = bitsandbytes' dynamic map) and round-trip error bounds."""

from __future__ import annotations

import itertools

import pytest
import torch

from lm_eval_quant.formats import (
    canonical_format,
    dynamic_grid,
    fp_grid,
    make_format,
    nf_grid,
    quantize_weight,
)

# bitsandbytes' NF4 table (bitsandbytes.functional.get_4bit_type("nf4")), written down.
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_equals_bitsandbytes_table_exactly():
    assert torch.equal(nf_grid(4), torch.tensor(NF4, dtype=torch.float32))


def test_nf4_equals_installed_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(nf_grid(4), F.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("k", range(2, 9))
def test_nf_grid_shape(k):
    g = nf_grid(k)
    assert len(g) == 2**k and len(torch.unique(g)) == 2**k
    assert g[0] == -1 and g[-1] == 1 and (g == 0).sum() == 1
    assert (g > 0).sum() == 2 ** (k - 1) and (g < 0).sum() == 2 ** (k - 1) - 1
    assert torch.all(g[1:] > g[:-1])


def test_fp_e2m1_magnitudes():
    g = fp_grid(2, 1) * 6
    mags = sorted(set(g.abs().tolist()))
    assert mags == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert len(g) == 15  # 16 codes, +0 and -0 share a value


@pytest.mark.parametrize("e,m,maxval,minsub", [(4, 3, 480.0, 2.0**-9), (3, 2, 28.0, 2.0**-4), (2, 0, 4.0, None), (5, 2, 114688.0, 2.0**-16)])
def test_fp_definition(e, m, maxval, minsub):
    """Largest magnitude (no inf/NaN codes) and smallest subnormal follow ExMy's definition."""
    bias = 2 ** (e - 1) - 1
    g = fp_grid(e, m).double()
    assert g.abs().max() == 1
    pos = g[g > 0] * maxval
    assert pos.max().item() == pytest.approx(maxval)
    if m > 0:
        assert pos.min().item() == pytest.approx(minsub)
        assert minsub == 2.0 ** (1 - bias - m)
    assert len(g) == 2 ** (1 + e + m) - 1


def test_dynamic_grid_matches_bitsandbytes_dynamic_map():
    F = pytest.importorskip("bitsandbytes.functional")
    ref = F.create_dynamic_map(signed=True).float().sort().values
    assert torch.allclose(dynamic_grid(8), ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("k", range(2, 9))
def test_dynamic_grid_structure(k):
    g = dynamic_grid(k)
    assert len(g) == 2**k
    assert g.max() == 1 and (g == 0).sum() == 1
    # the smallest non-zero magnitude is 10^-(k-2) times the midpoint of [0.1, 1]
    nz = g[g != 0].abs().min().item()
    assert nz == pytest.approx(10.0 ** (-(k - 2)) * 0.55, rel=1e-6)


def test_int_asym_hand_computed():
    fmt = make_format("int", 2, False)
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]])
    qp = fmt.fit(w)
    assert qp.scale.item() == 1.0 and qp.zero.item() == 1.0  # scale=(2-(-1))/3, zero=round(1/1)
    codes = fmt.quantize(w, qp)
    assert codes.tolist() == [[0, 1, 1, 1, 2, 3]]  # round half to even: -0.5→0, 0.5→0
    assert fmt.dequantize(codes, qp).tolist() == [[-1.0, 0.0, 0.0, 0.0, 1.0, 2.0]]


def test_int_sym_gptq_convention():
    fmt = make_format("int", 4, True)
    w = torch.tensor([[-3.0, 1.5, 0.0]])
    qp = fmt.fit(w)
    assert qp.zero.item() == 8.0
    assert qp.scale.item() == pytest.approx(0.4, rel=1e-3)  # 2*3/15, rounded to fp16
    codes = fmt.quantize(w, qp)
    assert codes.tolist() == [[0, 12, 8]]


def test_int_range_contains_zero():
    fmt = make_format("int", 3, False)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # all positive: min forced to 0
    qp = fmt.fit(w)
    assert qp.zero.item() == 0.0
    assert fmt.fake(w, qp).max().item() == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("k", range(2, 9))
def test_int_grid_has_2k_equally_spaced_levels(k):
    fmt = make_format("int", k, False)
    w = torch.linspace(-1, 3, 4096)[None]
    qp = fmt.fit(w)
    codes = fmt.quantize(w, qp)
    assert torch.equal(torch.unique(codes), torch.arange(2**k, dtype=torch.uint8))
    levels = torch.unique(fmt.dequantize(codes, qp))
    assert len(levels) == 2**k
    d = levels[1:] - levels[:-1]
    assert torch.allclose(d, d[0].expand_as(d), rtol=1e-5)


@pytest.mark.parametrize("spec,k,sym", [("int", 4, False), ("int", 3, True), ("int", 8, False), ("fp", 4, True), ("nf", 4, True), ("dynamic", 4, True), ("nf", 2, True), ("fp:e3m2", 6, True)])
def test_roundtrip_error_bound(spec, k, sym):
    torch.manual_seed(0)
    fmt = make_format(spec, k, sym)
    W = torch.randn(32, 256) * torch.rand(32, 1)
    res = quantize_weight(W, fmt, 64)
    blocks = W.reshape(32, 4, 64)
    err = (res.w_hat.reshape(32, 4, 64) - blocks).abs()
    if fmt.kind == "int":
        # half a step, plus what the fp16 rounding of the scale can push the block's extremes
        # past the last level (GPTQ's symmetric convention reaches exactly half a step too)
        bound = res.scale[..., None] * (0.5 + 2**-10 * 2**k)
    else:
        g = fmt.grid
        half_gap = ((g[1:] - g[:-1]).max() / 2).item()
        bound = res.scale[..., None] * half_gap * (1 + 1e-4) + 1e-3 * res.scale[..., None]
    assert torch.all(err <= bound)
    # re-quantizing the quantized weights is the identity for grids symmetric about 0 (nf, fp):
    # the absmax lands on ±1 exactly. Not for int (the re-fitted fp16 scale of the new range
    # differs) nor dynamic (bitsandbytes' map has +1 but no -1, so a block's absmax moves).
    if fmt.kind == "int" or fmt.grid.min() != -1:
        return
    again = quantize_weight(res.w_hat, fmt, 64)
    assert torch.allclose(again.w_hat, res.w_hat, atol=1e-6)


def test_error_shrinks_with_bits():
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    for spec in ("int", "nf", "dynamic"):
        errs = [((quantize_weight(W, make_format(spec, k), 128).w_hat - W) ** 2).mean().item() for k in range(2, 9)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (spec, errs)


def test_quantize_weight_is_vectorised_blockwise():
    """Equals a per-row, per-group loop reference."""
    torch.manual_seed(1)
    W = torch.randn(8, 96)
    for fmt in (make_format("int", 3, False), make_format("nf", 3), make_format("fp", 5)):
        res = quantize_weight(W, fmt, 32)
        ref = torch.empty_like(W)
        for r, g in itertools.product(range(8), range(3)):
            blk = W[r, g * 32:(g + 1) * 32][None]
            ref[r, g * 32:(g + 1) * 32] = fmt.fake(blk, fmt.fit(blk))[0]
        assert torch.equal(res.w_hat, ref)
        per_channel = quantize_weight(W, fmt, -1)
        assert per_channel.scale.shape == (8, 1)


def test_scales_are_fp16_representable():
    torch.manual_seed(2)
    W = torch.randn(16, 64) * 1e-3
    res = quantize_weight(W, make_format("int", 4), 32)
    assert torch.equal(res.scale, res.scale.half().float())


def test_group_size_need_not_divide_but_must_be_positive():
    W = torch.randn(4, 96)
    q = quantize_weight(W, make_format("int", 4), 64)  # groups of 64 and 32 (the GPTQ reference's ragged tail)
    assert q.scale.shape == (4, 2)
    assert torch.equal(q.w_hat[:, 64:], quantize_weight(W[:, 64:], make_format("int", 4), -1).w_hat)
    with pytest.raises(ValueError, match="positive integer"):
        quantize_weight(W, make_format("int", 4), 0)


@pytest.mark.parametrize("spec,bits,msg", [
    ("int", 9, "2-8 bits"), ("int", 1, "2-8 bits"), ("fp", 2, "3-8 bits"), ("float", 4, "unknown format"),
    ("fp:e3m2", 4, "bits=4"), ("fp:x", 4, "bad fp format"), ("nf:2", 4, "no ':'"), ("int", 1.5, "integer"),
])
def test_bad_format_specs(spec, bits, msg):
    with pytest.raises(ValueError, match=msg):
        canonical_format(spec, bits)


def test_canonical_names():
    assert canonical_format("fp", 4) == "fp:e2m1"
    assert canonical_format("fp", 8) == "fp:e4m3"
    assert canonical_format("FP:E3M2", 6) == "fp:e3m2"
    # asym: fp16 scale + the zero point at k bits (an integer code in [0, 2^k))
    assert make_format("int", 4, False).stat_bits == 16 + 4
    assert make_format("int", 3, False).stat_bits == 16 + 3
    assert make_format("int", 4, True).stat_bits == 16
    assert make_format("int", 4, False).bits_per_weight(128) == 4 + 20 / 128 == 4.15625


@pytest.mark.parametrize("spec,bits,sym", [("int", 4, False), ("int", 3, True), ("int", 8, False),
                                           ("nf", 4, True), ("fp", 4, True), ("dynamic", 5, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, -1])
def test_fake_quantize_in_place_is_bit_identical(spec, bits, sym, dtype, group):
    from lm_eval_quant.formats import fake_quantize_

    g = torch.Generator().manual_seed(7)
    W = (torch.randn(48, 96, generator=g) * 0.05).to(dtype)
    W[3] = 0.0  # a dead row: scale fallback
    fmt = make_format(spec, bits, sym)
    ref = quantize_weight(W, fmt, group).w_hat
    ptr = W.data_ptr()
    out = fake_quantize_(W, fmt, group)
    assert out is W and W.data_ptr() == ptr  # really in place
    assert W.dtype == dtype
    assert torch.equal(W, ref)
    # a transposed (non-contiguous) view, as Conv1D weights are seen: written back through the view
    base = (torch.randn(96, 48, generator=g) * 0.05).to(dtype)
    view = base.t()
    ref_t = quantize_weight(view.contiguous(), fmt, group).w_hat
    fake_quantize_(view, fmt, group)
    assert torch.equal(base.t(), ref_t)

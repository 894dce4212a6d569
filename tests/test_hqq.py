"""HQQ (methods/hqq.py): agreement with the maintained `hqq` package (codes, scales, zeros), the
proximal step by hand, the method inside hf-quant (accounting, one-line errors)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.methods import QuantContext, build_config, get_method
from lm_eval_quant.methods.hqq import hqq_fit, hqq_quantize_matrix, shrink_lp


def _hqq_pkg():
    pytest.importorskip("hqq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from hqq.core import optimize
        from hqq.core.quantize import Quantizer
    return Quantizer, optimize


def _weights(seed, rows=96, cols=256):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * (1 + 5 * (torch.rand(rows, 1, generator=g) > 0.9))
    W[0, :32] = 0.3  # a constant block
    return W


def test_shrink_by_hand():
    x = torch.tensor([1.0, -1.0, 0.01, 0.0, 2.0])
    out = shrink_lp(x, 10.0, 0.7)
    # sign(x)·max(|x| − |x|^(p−1)/β, 0): 1 − 0.1 = 0.9; 0.01 − 0.1·0.01^−0.3 < 0 → 0; 2 − 0.1·2^−0.3
    assert out.tolist() == pytest.approx([0.9, -0.9, 0.0, 0.0, 2 - 0.1 * 2**-0.3], abs=1e-6)
    assert shrink_lp(x, 10.0, 1.0).tolist() == pytest.approx([0.9, -0.9, 0.0, 0.0, 1.9], abs=1e-6)


@pytest.mark.parametrize("seed,bits,g", [(0, 4, 64), (1, 3, 64), (2, 2, 32), (3, 4, 128), (4, 8, 64)])
def test_agrees_with_the_hqq_package(seed, bits, g):
    Quantizer, _ = _hqq_pkg()
    W = _weights(seed)
    Wq, meta = Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=g, optimize=True, round_zero=False,
                                  axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
    ref = Quantizer.dequantize(Wq, meta).reshape(W.shape)
    codes, scale, zero = hqq_fit(W.reshape(96, 256 // g, g), bits)
    assert torch.equal(codes.reshape(-1, g), Wq.float())  # every code
    assert torch.equal(scale.reshape(-1, 1), meta["scale"])  # package's scale is our s
    assert torch.allclose(zero.reshape(-1, 1), meta["zero"], rtol=0, atol=2e-6)
    assert torch.allclose((scale * (codes - zero)).reshape(W.shape), ref, rtol=0, atol=1e-5)


def test_package_beta_is_constant():
    """The package's optimizer gives a constant-β result whatever κ: our default κ = 1 equals it;
    κ = 1.01 (the paper's schedule) does not (on this matrix)."""
    _, opt = _hqq_pkg()
    W = _weights(0).reshape(-1, 64)
    maxq = 15
    inv = (maxq / (W.amax(1, keepdim=True) - W.amin(1, keepdim=True))).clamp(max=2e4)
    z = -W.amin(1, keepdim=True) * inv
    _, _, zk = opt.optimize_weights_proximal_legacy(W, inv.clone(), z.clone(), [0, maxq], axis=1, device="cpu",
                                                    opt_params={"lp_norm": 0.7, "beta": 10.0, "kappa": 1.5, "iters": 20})
    _, _, z1 = hqq_fit(W, 4, kappa=1.0)
    _, _, zp = hqq_fit(W, 4, kappa=1.01)
    assert torch.allclose(z1, zk, rtol=0, atol=2e-6)
    assert (zp - zk).abs().max() > 1e-2


def test_better_than_minmax_rtn_in_mean_abs_error():
    from lm_eval_quant.formats import make_format, quantize_weight

    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(5))
    for bits in (3, 4):
        rtn = quantize_weight(W, make_format("int", bits, False), 64).w_hat
        hq = hqq_quantize_matrix(W, bits, 64)
        assert (hq - W).abs().mean() < 0.97 * (rtn - W).abs().mean()
        # the statistics it keeps are fp16: ŵ = fp16(s)·(q − fp16(z)) exactly
        codes, s, z = hqq_fit(W.reshape(256, 8, 64), bits)
        s16 = s.to(torch.float16).float()
        z16 = z.to(torch.float16).float()
        assert torch.equal(hq, (s16 * (codes - z16)).reshape(256, 512))


def test_method_in_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    from lm_eval_quant.accounting import account

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    W0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    cfg = build_config(method="hqq", bits=4, group_size=64)
    rep = get_method("hqq").quantize(model, cfg, QuantContext(progress=False))
    assert len(rep.quantized) == 14
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, hqq_quantize_matrix(W0, 4, 64))
    # fp16 scale + fp16 zero per block of 64: HQQ's zero is a real number, not a k-bit code
    assert get_method("hqq").accounting(model, cfg, rep)["bits_per_quantized_weight"] == 4 + 32 / 64
    assert account(model, cfg, rep.quantized)["bits_per_quantized_weight"] == 4 + (16 + 4) / 64  # int asym


@pytest.mark.parametrize("kw,needle", [
    (dict(format="nf"), "use format=int"),
    (dict(sym="true"), "drop sym"),
    (dict(iters="0"), "iters=0"),
    (dict(lp_norm="1.5"), "lp_norm=1.5"),
    (dict(kappa="0.9"), "kappa=0.9"),
])
def test_bad_hqq_arguments(kw, needle):
    with pytest.raises(QuantArgError) as e:
        build_config(method="hqq", bits=4, group_size=64, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)

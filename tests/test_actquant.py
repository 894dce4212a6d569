"""Activation fake-quantization (act_bits / act_format / act_group_size): the quantizers by hand,
the hooks inside hf-quant, the scheme label in the results, and the one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lm_eval_quant
from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.formats import make_format
from lm_eval_quant.formats.act import ActSpec, fake_quant_act
from lm_eval_quant.methods import build_config
from lm_eval_quant.methods.actquant import parse_act_args, scheme_label


# ------------------------------------------------------------------------------- quantizers
def test_int_per_token_by_hand():
    x = torch.tensor([[2.1, 7.0, -3.5, 0.0, 2.5], [2.0, -8.0, 1.0, 3.0, 0.0]])
    # 4 bits: levels −7..7, scale = max|x| / 7 per token (row): row 0 has scale 1 exactly, so
    # 2.1 → 2, −3.5 → −4 and 2.5 → 2 (ties to even)
    out = fake_quant_act(x, ActSpec(4, "int", -1))
    assert out[0].tolist() == [2.0, 7.0, -4.0, 0.0, 2.0]
    s = torch.tensor(8.0) / 7
    assert torch.equal(out[1], torch.round(x[1] / s) * s)
    assert out[1].tolist() == pytest.approx([2 * 8 / 7, -8.0, 1 * 8 / 7, 3 * 8 / 7, 0.0])
    # 8 bits per tensor: one scale 8/127 for everything
    out = fake_quant_act(x, ActSpec(8, "int", 0))
    s = torch.tensor(8.0) / 127
    assert torch.equal(out, torch.round(x / s) * s)
    # blocks of 5 = per token here; blocks of 1 are exact
    assert torch.equal(fake_quant_act(x, ActSpec(4, "int", 5)), fake_quant_act(x, ActSpec(4, "int", -1)))
    assert torch.equal(fake_quant_act(x, ActSpec(4, "int", 1)), x)


def test_dtype_and_shape_kept():
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    for spec in (ActSpec(8, "int", -1), ActSpec(8, "fp8:e4m3", -1), ActSpec(4, "mxfp4", 32), ActSpec(4, "nvfp4", 16)):
        y = fake_quant_act(x, spec)
        assert y.shape == x.shape and y.dtype == x.dtype


def test_fp8_per_token():
    x = torch.tensor([[448.0 * 2, 1.0, 3.3]])
    out = fake_quant_act(x, ActSpec(8, "fp8:e4m3", -1))
    s = 2.0  # 896 / 448
    assert out.tolist()[0] == [896.0, 1.0, 1.625 * s]  # 1/2 = 0.5 exact; 3.3/2 = 1.65 → 13/8 (step 1/8)


def test_block_formats_match_the_weight_formats():
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    for name, bits in (("mxfp4", 4), ("mxfp8:e4m3", 8), ("mxint8", 8), ("mxfp6:e2m3", 6)):
        fmt = make_format(name, bits)
        b = x.reshape(3, 7, 2, 32)
        ref = fmt.fake(b, fmt.fit(b)).reshape(x.shape)
        assert torch.equal(fake_quant_act(x, ActSpec(fmt.bits, name, 32)), ref)
    # NVFP4: one tensor scale for the whole activation of the call
    fmt = make_format("nvfp4", 4)
    b = x.reshape(1, -1, 4, 16)
    ref = fmt.fake(b, fmt.fit(b)).reshape(x.shape)
    assert torch.equal(fake_quant_act(x, ActSpec(4, "nvfp4", 16)), ref)


# ---------------------------------------------------------------------------- arguments
def test_parse_and_labels():
    assert parse_act_args() is None
    a = parse_act_args(act_bits="8")
    assert (a.bits, a.format, a.group_size) == (8, "int", -1)
    a = parse_act_args(act_format="fp8")
    assert (a.bits, a.format, a.group_size) == (8, "fp8:e4m3", -1)
    a = parse_act_args(act_format="mxfp4")
    assert (a.bits, a.group_size) == (4, 32)
    a = parse_act_args(act_format="nvfp4", act_group_size="16")
    assert (a.bits, a.group_size) == (4, 16)
    w4 = build_config(method="rtn", bits=4)
    w8 = build_config(method="rtn", bits=8, group_size=-1)
    assert scheme_label(w4, None) == "W4A16"
    assert scheme_label(w4, parse_act_args(act_bits=8)) == "W4A8"
    assert scheme_label(w8, parse_act_args(act_bits=8)) == "W8A8"
    assert scheme_label(build_config(method="rtn", format="fp8"), parse_act_args(act_format="fp8")) == "W8A8-fp8"
    assert scheme_label(build_config(method="rtn", format="mxfp4"), parse_act_args(act_format="mxfp4")) == "W4A4-mxfp4"
    assert scheme_label(build_config(method="none"), parse_act_args(act_bits=8)) == "W16A8"


@pytest.mark.parametrize("kw,needle", [
    (dict(act_bits="3"), "use act_bits=4, 6 or 8"),
    (dict(act_bits="16"), "use act_bits=4, 6 or 8"),
    (dict(act_format="int"), "use act_bits=4, 6 or 8"),
    (dict(act_format="mxfp4", act_bits="8"), "act_bits=4"),
    (dict(act_format="mxfp4", act_group_size="64"), "act_group_size=32"),
    (dict(act_format="nvfp4", act_group_size="32"), "act_group_size=16"),
    (dict(act_format="bf16"), "act_format=bf16 is not one of"),
    (dict(act_group_size="32"), "needs act_bits"),
    (dict(act_bits="8", act_group_size="-3"), "act_group_size=-3"),
    (dict(act_bits="8", method="bnb"), "drop the act_* arguments"),
    (dict(act_format="fp8", method="bnb"), "drop the act_* arguments"),
])
def test_bad_act_arguments_are_one_line(kw, needle):
    with pytest.raises(QuantArgError) as e:
        parse_act_args(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------- inside hf-quant
lm_eval = pytest.importorskip("lm_eval")


def _get_lm(**kw):
    lm_eval_quant.register()
    from lm_eval.api.registry import get_model

    return get_model("hf-quant")(device="cpu", **kw)


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits.float()


def test_hooks_quantize_every_linear_input(tiny_llama):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    lm = _get_lm(pretrained=str(tiny_llama), method="rtn", bits=8, group_size=-1, act_bits=8, cache=False)
    q = lm.get_model_info()["quantization"]
    assert q["scheme"] == "W8A8"
    assert q["activations"]["linears"] == 2 * 7 and q["activations"]["granularity"] == "per-token"
    assert q["quant_config"]["options"]["act_bits"] == 8
    # the hook sees exactly what a manual per-token int8 fake quant of the input gives
    seen = {}
    mod = lm.model.model.layers[0].mlp.down_proj
    h1 = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()), prepend=True)
    h2 = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o.clone()))
    _logits(lm, ids)
    h1.remove(), h2.remove()
    xq = fake_quant_act(seen["x"], ActSpec(8, "int", -1))
    assert not torch.equal(xq, seen["x"])
    assert torch.allclose(seen["y"], torch.nn.functional.linear(xq, mod.weight), rtol=0, atol=1e-5)
    # q/k/v (and gate/up) read one tensor: it is quantized once per forward, 4 calls per layer
    import lm_eval_quant.methods.actquant as aq

    calls = []
    orig = aq.fake_quant_act
    aq.fake_quant_act = lambda x, spec: calls.append(1) or orig(x, spec)
    try:
        again = _logits(lm, ids)
    finally:
        aq.fake_quant_act = orig
    assert len(calls) == 2 * 4
    hook = next(iter(lm.model.model.layers[0].self_attn.q_proj._forward_pre_hooks.values()))
    assert hook._last_in is None and hook._last_out is None  # released at the end of the forward
    assert torch.equal(again, _logits(lm, ids))
    # the same weights without activation quant give other logits; W16A8 changes the baseline
    lw = _get_lm(pretrained=str(tiny_llama), method="rtn", bits=8, group_size=-1, cache=False)
    assert lw.get_model_info()["quantization"]["scheme"] == "W8A16"
    a, b = _logits(lm, ids), _logits(lw, ids)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05 * b.abs().max().item())
    l16 = _get_lm(pretrained=str(tiny_llama), method="none", act_format="mxfp4")
    q16 = l16.get_model_info()["quantization"]
    assert q16["scheme"] == "W16A4-mxfp4" and q16["activations"]["linears"] == 14


def test_act_error_before_weights_load(tiny_llama, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the argument check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(QuantArgError, match="act_group_size=48 does not divide in_features=128"):
        _get_lm(pretrained=str(tiny_llama), method="rtn", act_bits=8, act_group_size=48)
    with pytest.raises(QuantArgError, match="act_bits=4, 6 or 8"):
        _get_lm(pretrained=str(tiny_llama), method="rtn", act_bits=3)
    with pytest.raises(QuantArgError, match="weight-only GPTQ checkpoint"):
        _get_lm(pretrained=str(tiny_llama), method="rtn", act_bits=8, save_quantized="/tmp/nowhere")


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    ("act_bits=3", "act_bits=3 is not supported"),
    ("format=mxfp4,group_size=64", "use group_size=32"),
    ("format=nvfp4,sym=true", "drop sym"),
    ("method=bnb,bits=4,format=nf4,act_format=fp8", "drop the act_* arguments"),
])
def test_stock_cli_bad_combinations_exit_2(tiny_llama, toy_task_dir, args, needle):
    code = (
        "import sys, lm_eval_quant; lm_eval_quant.register();"
        "from lm_eval.__main__ import cli_evaluate; sys.argv[0]='lm_eval'; cli_evaluate()"
    )
    env = dict(os.environ, LMQ_NO_AUTOREGISTER="1")
    p = subprocess.run(
        [sys.executable, "-c", code, "--model", "hf-quant", "--model_args", f"pretrained={tiny_llama},{args}",
         "--tasks", "lmq_toy_mc", "--include_path", str(toy_task_dir), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if "lm-eval-quant: error:" in ln]
    assert len(err) == 1 and needle in err[0]
    assert "Traceback" not in p.stderr


def test_sweep_accepts_activation_axes_and_new_methods():
    """act_* keys and smooth ride in a method entry's options; the new methods and formats are
    ordinary axis values (no new code path)."""
    from lm_eval_quant.sweep.spec import SweepSpec

    spec = SweepSpec.from_dict({
        "models": ["/m"], "tasks": ["wikitext2_gptq"], "bits": [4],
        "methods": [
            {"name": "rtn", "label": "rtn-w4a8", "group_sizes": [128], "options": {"act_bits": 8}},
            {"name": "rtn", "label": "rtn-mx", "formats": ["mxfp4"], "group_sizes": [32],
             "options": {"act_format": "mxfp4"}},
            {"name": "gptq", "label": "sq-gptq", "group_sizes": [-1], "options": {"smooth": 0.5, "act_bits": 4}},
            {"name": "smoothquant", "bits": [8], "group_sizes": [-1]},
            {"name": "hqq", "group_sizes": [64]},
        ],
    })
    cells = {c.method_label: c for c in spec.cells()}
    assert all(c.skip_reason is None for c in cells.values()), [c.skip_reason for c in cells.values()]
    assert cells["rtn-w4a8"].model_args["act_bits"] == 8
    assert cells["rtn-mx"].model_args["format"] == "mxfp4" and cells["rtn-mx"].model_args["act_format"] == "mxfp4"
    assert cells["sq-gptq"].model_args["smooth"] == 0.5
    assert cells["smoothquant"].model_args["method"] == "smoothquant"
    assert cells["hqq"].model_args["group_size"] == 64


def test_report_tells_weight_only_and_activation_rows_apart():
    from pathlib import Path

    from lm_eval_quant.report.collect import run_from_results

    def res(opts):
        return {"config": {"model_args": "pretrained=/m", "quantization": {
            "quant_config": {"method": "rtn", "bits": 4, "group_size": 128, "format": "int", "sym": False,
                             "options": opts},
            "params_total": 10, "params_quantized": 8, "bits_per_quantized_weight": 4.25, "total_bits": 98.0}}}

    a = run_from_results(res({}), Path("a.json"))
    b = run_from_results(res({"act_bits": 8, "act_format": "int", "act_group_size": -1}), Path("b.json"))
    assert a.key != b.key and b.options["act_bits"] == 8

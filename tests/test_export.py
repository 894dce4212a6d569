"""GPTQ-format export: packing layouts, exact recovery of the integer state, refusals, and the
round trip  quantize → export → reload through transformers + GPTQModel → same logits.

Tolerance of the round trip: our formats keep scales fp16-representable, so the checkpoint
decodes to exactly our fake-quantized weights; GPTQModel's plain torch kernel (backend="torch")
dequantizes in fp16, so logits agree to < 1e-3 of their max magnitude on these float32 models
(observed 1e-4..3e-4; 0 at 2 bits where every product is exact in fp16). The auto-selected
CPU kernel (TorchAtenLinear, bf16 activations) is checked at 2e-2.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from lm_eval_quant.errors import QuantArgError  # noqa: E402
from lm_eval_quant.export import (  # noqa: E402
    check_exportable,
    pack_cols,
    pack_rows,
    recover_qstate,
    save_quantized,
    unpack_cols,
    unpack_rows,
)
from lm_eval_quant.formats import make_format, quantize_weight  # noqa: E402
from lm_eval_quant.methods import build_config, get_method  # noqa: E402
from lm_eval_quant.methods.base import QuantContext  # noqa: E402


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _rtn(model, **kw):
    cfg = build_config(method="rtn", **kw)
    rep = get_method("rtn").quantize(model, cfg, QuantContext(progress=False))
    return cfg, rep


IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _gptq_reload(path, bits, backend="torch"):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    import gptqmodel.utils.torch as gtorch
    from transformers import AutoModelForCausalLM, GPTQConfig

    # GPTQModel runs a full gc.collect() after every load (seconds in a big pytest process);
    # it frees nothing we need, so skip it here to keep the suite fast.
    saved = getattr(gtorch, "timed_gc_collect", None)
    if saved is not None:
        gtorch.timed_gc_collect = lambda: 0
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map="cpu", quantization_config=GPTQConfig(bits=bits, backend=backend))
    finally:
        if saved is not None:
            gtorch.timed_gc_collect = saved


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------
# packing: hand-computed words and round trips
# ------------------------------------------------------------------------------------------------
def test_pack_4bit_hand_computed():
    codes = torch.zeros(32, 2, dtype=torch.int64)
    codes[:8, 0] = torch.arange(8)                 # word 0, column 0: 0x76543210
    codes[8:16, 1] = 15                            # word 1, column 1: all nibbles 0xF
    p = pack_rows(codes, 4)
    assert p.shape == (4, 2) and p.dtype == torch.int32
    assert p[0, 0].item() == 0x76543210
    assert p[1, 1].item() == -1                    # codes 8..15 all 0xF fill word 1 → 0xFFFFFFFF
    assert p[0, 1].item() == 0 and p[2:].abs().sum().item() == 0


def test_pack_2bit_and_8bit_hand_computed():
    c2 = torch.zeros(32, 1, dtype=torch.int64)
    c2[:3, 0] = torch.tensor([1, 2, 3])
    assert pack_rows(c2, 2)[0, 0].item() == 1 | 2 << 2 | 3 << 4  # 57
    c8 = torch.zeros(32, 1, dtype=torch.int64)
    c8[:4, 0] = torch.tensor([0x01, 0x80, 0xFF, 0x7F])
    assert pack_rows(c8, 8)[0, 0].item() == 0x7FFF8001


def test_pack_3bit_gptq_layout():
    """GPTQ's 3-bit layout: 32 codes in 3 words; codes 10 and 21 straddle word boundaries."""
    c = torch.zeros(32, 1, dtype=torch.int64)
    c[10, 0] = 0b111      # bits 30,31 of word 0 and bit 0 of word 1
    p = pack_rows(c, 3)
    assert p.shape == (3, 1)
    assert p[0, 0].item() == -(1 << 30)          # 0xC0000000 as int32
    assert p[1, 0].item() == 1 and p[2, 0].item() == 0
    c = torch.zeros(32, 1, dtype=torch.int64)
    c[21, 0] = 0b101      # bit 31 of word 1 (low bit 1) and bits 0,1 of word 2 (0b10)
    p = pack_rows(c, 3)
    assert p[1, 0].item() == -(1 << 31) and p[2, 0].item() == 0b10
    c = torch.zeros(32, 1, dtype=torch.int64)
    c[31, 0] = 0b011      # bits 29..31 of word 2
    assert pack_rows(c, 3)[2, 0].item() == 0b011 << 29


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (96, 64), generator=g)
    assert torch.equal(unpack_rows(pack_rows(v, bits), bits, 96), v)
    assert torch.equal(unpack_cols(pack_cols(v, bits), bits, 64), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_gptqmodel_reference(bits):
    """Our qweight/qzeros are bit-identical to GPTQModel's own (reference) packer."""
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_f, in_f, gs = 64, 64, 32
    g = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    scale = (torch.rand(out_f, in_f // gs, generator=g) * 0.01 + 0.001).half().float()
    zero = torch.randint(1, 2**bits, (out_f, in_f // gs), generator=g).float()
    gi = torch.arange(in_f) // gs
    W = (codes.float() - zero[:, gi]) * scale[:, gi]
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = W
    ql = TorchLinear(bits=bits, group_size=gs, desc_act=False, sym=False, in_features=in_f,
                     out_features=out_f, bias=False, pack_dtype=torch.int32, backend=None)
    ql.pack_original(lin, scale, zero, g_idx=gi.to(torch.int32))
    assert torch.equal(ql.qweight, pack_rows(codes.t().contiguous(), bits))
    assert torch.equal(ql.qzeros, pack_cols(zero.t().contiguous().long(), bits))


# ------------------------------------------------------------------------------------------------
# recovering codes / scales / zeros from fake-quantized weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym,gs", [(2, False, 16), (3, False, 32), (4, False, 32), (8, False, 64),
                                         (4, True, 32), (3, True, -1), (2, True, 16), (8, True, 32)])
def test_recover_rtn_exact(bits, sym, gs):
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(bits * 7 + gs))
    res = quantize_weight(W, make_format("int", bits, sym), gs)
    qs = recover_qstate(res.w_hat, bits, gs, sym)
    gi = qs["g_idx"].long()
    deq = (qs["codes"].float() - qs["zero"][:, gi]) * qs["scale"][:, gi]
    assert torch.equal(deq, res.w_hat)                                   # bit-exact
    assert torch.equal(qs["scale"], qs["scale"].half().float())         # fp16 scales
    assert int(qs["codes"].max()) < 2**bits
    if not sym:  # RTN asym codes span 0..maxq in every group → the method's own state comes back
        assert torch.equal(qs["codes"], res.codes)
        assert torch.equal(qs["zero"], res.zero)
        assert torch.equal(qs["scale"], res.scale)


def test_recover_partial_code_range():
    """GPTQ-like groups that use only part of the code range are still reproduced exactly."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(3, 10, (16, 64), generator=g).float()      # never hits 0 or 15
    codes[:, ::7] = 5
    scale = torch.full((16, 2), 0.0137).half().float()
    zero = torch.full((16, 2), 6.0)
    gi = torch.arange(64) // 32
    W = (codes - zero[:, gi]) * scale[:, gi]
    qs = recover_qstate(W, 4, 32, False)
    deq = (qs["codes"].float() - qs["zero"][:, qs["g_idx"].long()]) * qs["scale"][:, qs["g_idx"].long()]
    assert torch.equal(deq, W)
    assert torch.allclose(qs["scale"], scale)                         # the true step is found
    assert bool((qs["zero"] >= 1).all())                              # v1-compatible zero chosen


def test_recover_bf16_weights():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    res = quantize_weight(W, make_format("int", 4, False), 32)
    wb = res.w_hat.to(torch.bfloat16)
    qs = recover_qstate(wb, 4, 32, False)
    assert torch.equal(qs["codes"], res.codes)


def test_recover_refuses_off_grid_weights():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(QuantArgError, match="not on a 4-bit"):
        recover_qstate(W, 4, 32, False, name="layer.x")


def test_recover_refuses_wrong_group_size():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    w_hat = quantize_weight(W, make_format("int", 3, False), 16).w_hat
    with pytest.raises(QuantArgError, match="not on a 3-bit"):
        recover_qstate(w_hat, 3, 64, False)


# ------------------------------------------------------------------------------------------------
# refusals (one line)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(method="rtn", bits=4, format="nf"), "format=nf"),
    (dict(method="rtn", bits=4, format="fp"), "format=fp:e2m1"),
    (dict(method="rtn", bits=4, format="dynamic"), "format=dynamic"),
    (dict(method="rtn", bits=5), "bits=5"),
    (dict(method="rtn", bits=6), "bits=6"),
    (dict(method="none"), "nothing is quantized"),
])
def test_refusals_one_line(kw, msg):
    cfg = build_config(**kw)
    with pytest.raises(QuantArgError) as e:
        check_exportable(cfg)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_before_loading(tmp_path, capsys):
    from lm_eval_quant.export import main

    rc = main(["--model_args", "pretrained=/nonexistent/model,method=rtn,bits=4,format=nf", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("lm-eval-quant: error:") and "format=nf" in err and "\n" not in err
    rc = main(["--model_args", "pretrained=/nonexistent/model,method=bnb,bits=4", "--output", str(tmp_path / "o")])
    assert rc == 2
    assert not (tmp_path / "o").exists()


def test_act_order_without_qstate_refused(llama64_dir, calib_file, tmp_path):
    m = _load(llama64_dir)
    cfg = build_config(method="gptq", bits=4, group_size=32, act_order=True, keep_qstate=False,
                       calib=str(calib_file), nsamples=4, seqlen=32)
    from transformers import AutoTokenizer

    rep = get_method("gptq").quantize(m, cfg, QuantContext(tokenizer=AutoTokenizer.from_pretrained(llama64_dir),
                                                           progress=False))
    with pytest.raises(QuantArgError, match="keep_qstate=true"):
        save_quantized(m, cfg, tmp_path / "o", report=rep, progress=False)


# ------------------------------------------------------------------------------------------------
# round trips through transformers + GPTQModel
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym,gs", [(4, False, 32), (8, True, -1), (3, False, 32), (2, True, 32)])
def test_rtn_export_reload_logits(llama64_dir, tmp_path, bits, sym, gs):
    m = _load(llama64_dir)
    cfg, rep = _rtn(m, bits=bits, group_size=gs, sym=sym)
    ref = _logits(m)
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == gs
    assert qc["sym"] is sym and qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    q = _gptq_reload(out, bits)
    ql = q.model.layers[1].mlp.down_proj
    assert type(ql).__name__ == "TorchLinear"
    # the checkpoint decodes to exactly our fake-quantized weights (fp16 products are exact)
    deq = ql.dequantize_weight().t().float()
    assert torch.equal(deq, m.model.layers[1].mlp.down_proj.weight.half().float())
    assert _rel(_logits(q), ref) < 1e-3


def test_zero_point_zero_uses_gptq_v2(llama64_dir, tmp_path):
    """A group with only non-negative weights has zero point 0, which v1 (stores zero−1) cannot
    hold: auto writes gptq_v2 and GPTQModel reads it back exactly; forcing v1 is refused."""
    m = _load(llama64_dir)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[:, :32].abs_()
    cfg, rep = _rtn(m, bits=4, group_size=32)
    ref = _logits(m)
    with pytest.raises(QuantArgError, match="gptq_v2"):
        save_quantized(m, cfg, tmp_path / "v1", report=rep, checkpoint_format="gptq", progress=False)
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    q = _gptq_reload(out, 4)
    assert _rel(_logits(q), ref) < 1e-3


def test_auto_kernel_reload(llama64_dir, tmp_path):
    m = _load(llama64_dir)
    cfg, rep = _rtn(m, bits=4, group_size=32)
    ref = _logits(m)
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    from transformers import AutoModelForCausalLM

    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    assert _rel(_logits(q), ref) < 2e-2


@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_gptq_act_order_export_reload(llama64_dir, calib_file, tmp_path, bits, sym):
    """GPTQ with act_order: non-trivial g_idx, taken from the method's kept integer state."""
    from transformers import AutoTokenizer

    m = _load(llama64_dir)
    cfg = build_config(method="gptq", bits=bits, group_size=32, sym=sym, act_order=True, keep_qstate=True,
                       calib=str(calib_file), nsamples=4, seqlen=32)
    rep = get_method("gptq").quantize(m, cfg, QuantContext(tokenizer=AutoTokenizer.from_pretrained(llama64_dir),
                                                           progress=False))
    ref = _logits(m)
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["sym"] is sym
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        gi = f.get_tensor("model.layers.0.self_attn.q_proj.g_idx")
    assert not torch.equal(gi.long(), torch.arange(64) // 32)
    assert torch.equal(gi, rep.extra["qstate"]["model.layers.0.self_attn.q_proj"]["g_idx"])
    q = _gptq_reload(out, bits)
    deq = q.model.layers[0].self_attn.q_proj.dequantize_weight().t().float()
    assert torch.equal(deq, m.model.layers[0].self_attn.q_proj.weight.half().float())
    assert _rel(_logits(q), ref) < 1e-3


def test_awq_export_reload(llama64_dir, calib_file, tmp_path):
    """AWQ folds its scales into the norms (saved as ordinary tensors) and leaves the linears on
    the int grid: the checkpoint computes the same function."""
    from transformers import AutoTokenizer

    m = _load(llama64_dir)
    cfg = build_config(method="awq", bits=4, group_size=32, calib=str(calib_file), nsamples=4, seqlen=32)
    rep = get_method("awq").quantize(m, cfg, QuantContext(tokenizer=AutoTokenizer.from_pretrained(llama64_dir),
                                                           progress=False))
    assert any("layernorm" in n for n in rep.modified)
    ref = _logits(m)
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    q = _gptq_reload(out, 4)
    assert torch.equal(q.model.layers[0].input_layernorm.weight, m.model.layers[0].input_layernorm.weight)
    assert _rel(_logits(q), ref) < 1e-3


def _decode(out, name, bits):
    """Dequantize one layer of an exported checkpoint with our own unpacker → [in, out]."""
    from safetensors import safe_open

    fmt = json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qw, qz, sc, gi = (f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx"))
    codes = unpack_rows(qw, bits, gi.numel())
    zeros = unpack_cols(qz, bits, sc.shape[1]) + (1 if fmt == "gptq" else 0)
    return (codes.float() - zeros[gi.long()].float()) * sc[gi.long()].float()


def test_gptq_recovered_state_matches_kept_state(llama64_dir, calib_file, tmp_path):
    """Without act_order, the state recovered from ŵ decodes to the same weights as GPTQ's own
    kept state (codes/zeros may differ only where a group leaves the zero point free)."""
    from transformers import AutoTokenizer

    m = _load(llama64_dir)
    cfg = build_config(method="gptq", bits=4, group_size=32, keep_qstate=True, calib=str(calib_file),
                       nsamples=4, seqlen=32)
    rep = get_method("gptq").quantize(m, cfg, QuantContext(tokenizer=AutoTokenizer.from_pretrained(llama64_dir),
                                                           progress=False))
    kept = save_quantized(m, cfg, tmp_path / "kept", report=rep, progress=False)
    rep.extra.pop("qstate")
    rec = save_quantized(m, cfg, tmp_path / "rec", report=rep, progress=False)
    assert len(rep.quantized) == 14
    for name in rep.quantized:
        w = m.get_submodule(name).weight.data.t()
        assert torch.equal(_decode(kept, name, 4), w), name
        assert torch.equal(_decode(rec, name, 4), w), name


def test_gpt2_conv1d_export_decodes(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]; the export transposes them. (transformers 5.23 cannot
    load *any* GPTQ GPT-2 checkpoint on CPU: GPT2's _init_weights touches the quant linears, so
    the checkpoint is decoded with our own unpacker here.)"""
    from safetensors import safe_open

    from lm_eval_quant.toy import make_tiny_model

    d = make_tiny_model(tmp_path / "gpt2", arch="gpt2", hidden=64, layers=1, heads=4, train_steps=0, seed=1)
    m = _load(d)
    cfg, rep = _rtn(m, bits=4, group_size=32)
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    name = "transformer.h.0.attn.c_attn"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qw, qz, sc, gi = (f.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx"))
        keys = set(f.keys())
    assert f"{name}.weight" not in keys and f"{name}.bias" in keys
    # issue 15: the tied output head is the embedding, written once
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert qw.shape == (64 * 4 // 32, 192) and sc.shape == (2, 192)
    W = _decode(out, name, 4)                                           # [in, out]
    assert torch.equal(W, m.transformer.h[0].attn.c_attn.weight.data)   # Conv1D weight is [in, out]


def test_cli_export_end_to_end(llama64_dir, tmp_path, monkeypatch):
    from lm_eval_quant.export import main

    monkeypatch.setenv("LMQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["--model_args", f"pretrained={llama64_dir},method=rtn,bits=4,group_size=32,sym=true",
               "--output", str(out)])
    assert rc == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["sym"] is True and qc["meta"]["lm_eval_quant"]["quant_config"]["method"] == "rtn"
    # the reference: same RTN in memory
    m = _load(llama64_dir)
    _rtn(m, bits=4, group_size=32, sym=True)
    q = _gptq_reload(out, 4)
    assert _rel(_logits(q), _logits(m)) < 1e-3
    # a second export is a cache hit and writes the same tensors
    out2 = tmp_path / "out2"
    assert main(["--model_args", f"pretrained={llama64_dir},method=rtn,bits=4,group_size=32,sym=true",
                 "--output", str(out2)]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_quantized_model_arg(llama64_dir, tmp_path):
    """`save_quantized=PATH` in hf-quant's model_args writes the checkpoint during model creation."""
    import lm_eval_quant

    lm_eval_quant.register()
    from lm_eval_quant.models.hf_quant import HFQuantLM

    out = tmp_path / "saved"
    lm = HFQuantLM(pretrained=str(llama64_dir), device="cpu", batch_size=1, method="rtn", bits=8, group_size=64,
                   cache=False, save_quantized=str(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 8 and qc["group_size"] == 64
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(_decode(out, name, 8), lm.model.get_submodule(name).weight.data.t())
    assert (out / "tokenizer.json").exists()


def test_refuses_to_overwrite_foreign_folder(llama64_dir, tmp_path):
    m = _load(llama64_dir)
    cfg, rep = _rtn(m, bits=4, group_size=32)
    with pytest.raises(QuantArgError, match="not an earlier lm-eval-quant export"):
        save_quantized(m, cfg, llama64_dir, report=rep, progress=False)       # the source model itself
    assert (llama64_dir / "model.safetensors").exists()
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    save_quantized(m, cfg, out, report=rep, progress=False)                   # re-export: allowed


@pytest.mark.parametrize("bits,sym,gs", [(4, False, 32), (3, True, 32)])
def test_exported_bits_per_weight_equal_on_the_fly(llama64_dir, tmp_path, bits, sym, gs):
    """One definition (README "Bit accounting"): the same weights count the same bits/weight and
    the same total on the fly and once exported; the file's extra g_idx (and sym's constant
    qzeros) are reported as layout overhead."""
    from lm_eval_quant import prequant
    from lm_eval_quant.accounting import account

    m = _load(llama64_dir)
    cfg, rep = _rtn(m, bits=bits, group_size=gs, sym=sym)
    fly = account(m, cfg, rep.quantized)
    out = save_quantized(m, cfg, tmp_path / "q", report=rep, progress=False)
    q = _gptq_reload(out, bits)
    pre = prequant.account_prequantized(q)
    assert fly["bits_per_quantized_weight"] == bits + (16 + (0 if sym else bits)) / gs
    assert pre["bits_per_quantized_weight"] == pytest.approx(fly["bits_per_quantized_weight"], abs=1e-12)
    assert pre["params_quantized"] == fly["params_quantized"]
    assert pre["total_bits"] == fly["total_bits"]
    p = pre["prequantized"]
    g_idx_bits = p["quantized_tensor_bits"]["g_idx"]
    assert p["layout_overhead_bits"] == g_idx_bits + (p["quantized_tensor_bits"]["qzeros"] if sym else 0)
    assert p["file_bits_per_quantized_weight"] > pre["bits_per_quantized_weight"]

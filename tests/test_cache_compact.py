"""Issue 15 item 3: cache entries hold packed codes + scales (not the compute-dtype weights), the
hit path rebuilds bit-identical weights, and the cache has a size cap and a `cache` subcommand."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval_quant import cache as qc  # noqa: E402
from lm_eval_quant.methods import build_config, get_method  # noqa: E402
from lm_eval_quant.methods.base import QuantContext  # noqa: E402


def _load(d, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype)


IDS = torch.arange(3, 40).view(1, -1)


def _quant(llama64_dir, cache_dir, cfg, keep=True, storage_dtype=None, fail=False):
    """Quantize through the cache the way hf-quant does (keep_state_config + drop_qstate)."""
    from transformers import AutoTokenizer

    m = _load(llama64_dir)
    tok = AutoTokenizer.from_pretrained(llama64_dir)
    method = get_method(cfg.method)
    qcfg, forced = qc.keep_state_config(cfg, method) if keep else (cfg, False)

    def fn():
        if fail:
            pytest.fail("quantized again on a hit")
        return method.quantize(m, qcfg, QuantContext(tokenizer=tok, progress=False))

    rep, hit = qc.load_or_quantize(m, cfg, qc.model_identity(str(llama64_dir), cache_dir=cache_dir), fn,
                                   cache_dir=cache_dir, storage_dtype=storage_dtype, drop_qstate=forced,
                                   calib=qc.calibration_identity(cfg, tok))
    return m, rep, hit


def _entry_bytes(cache_dir):
    (e,) = list((cache_dir / "entries").iterdir())
    return (e / "tensors.safetensors").stat().st_size, json.loads((e / "manifest.json").read_text())


def _cfg(kind, calib_file):
    if kind == "rtn":
        return build_config(method="rtn", bits=4, group_size=32)
    if kind == "rtn3sym":
        return build_config(method="rtn", bits=3, group_size=32, sym=True)
    if kind == "gptq_act_order":
        return build_config(method="gptq", bits=4, group_size=32, act_order=True, calib=str(calib_file),
                            nsamples=4, seqlen=32)
    if kind == "awq":
        return build_config(method="awq", bits=4, group_size=32, calib=str(calib_file), nsamples=4, seqlen=32)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["rtn", "rtn3sym", "gptq_act_order", "awq"])
def test_entry_is_compact_and_hit_is_bit_identical(llama64_dir, calib_file, tmp_path, kind):
    cfg = _cfg(kind, calib_file)
    m1, rep1, hit1 = _quant(llama64_dir, tmp_path, cfg)
    assert hit1 is False and rep1.extra["cache"]["stored"] is True
    assert "qstate" not in rep1.extra  # kept for the cache only: the report is as without the cache
    size, man = _entry_bytes(tmp_path)
    layout = man["report"]["layout"]
    q = set(rep1.quantized)
    assert q and all(layout[n + ".weight"]["enc"] == "int" for n in q), \
        {n: layout[n + ".weight"]["enc"] for n in q}
    # the bound from the bit width: codes at `bits` per weight, a scale and a zero per group
    # (fp32 at most), g_idx, the non-quantized modified tensors as they are, a header
    n_q = sum(dict(m1.named_parameters())[n + ".weight"].numel() for n in q)
    rows_in = [dict(m1.named_parameters())[n + ".weight"].shape for n in q]
    groups = sum(o * -(-i // 32) for o, i in rows_in)
    others = sum(dict(m1.named_parameters())[n].numel() * 4 for n in rep1.modified if n[:-7] not in q)
    bound = n_q * cfg.bits / 8 + groups * 8 + sum(i * 4 for _, i in rows_in) + others + 64 * 1024
    assert size <= bound, (size, bound)
    old = sum(dict(m1.named_parameters())[n].numel() * 4 for n in rep1.modified)  # fp32 weights
    assert size < old / 3
    # hit: quantize is not called, weights and logits are bit-identical to the miss
    m2, rep2, hit2 = _quant(llama64_dir, tmp_path, cfg, fail=True)
    assert hit2 is True and rep2.modified == rep1.modified and "qstate" not in rep2.extra
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    for n in rep1.modified:
        assert qc._bits_equal(p1[n].detach(), p2[n].detach()), n
    with torch.no_grad():
        assert torch.equal(m1(IDS).logits, m2(IDS).logits)


def test_conv1d_entry_is_compact(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: packed in [out, in] order, rebuilt transposed."""
    from lm_eval_quant.toy import make_tiny_model

    d = make_tiny_model(tmp_path / "gpt2", arch="gpt2", hidden=64, layers=1, heads=4, train_steps=0, seed=1)
    cfg = build_config(method="rtn", bits=4, group_size=32)
    m1, rep1, _ = _quant(d, tmp_path / "c", cfg)
    _, man = _entry_bytes(tmp_path / "c")
    assert {man["report"]["layout"][n + ".weight"]["enc"] for n in rep1.quantized} == {"int"}
    assert any(man["report"]["layout"][n + ".weight"]["transposed"] for n in rep1.quantized)
    m2, rep2, hit = _quant(d, tmp_path / "c", cfg, fail=True)
    assert hit
    for n in rep1.modified:
        assert qc._bits_equal(m1.get_parameter(n).detach(), m2.get_parameter(n).detach()), n


def test_kept_qstate_comes_back_on_a_hit(llama64_dir, calib_file, tmp_path):
    """A caller that asks for keep_qstate gets the method's state back on a hit, codes included,
    from an entry written by a run that did not ask (the key ignores keep_qstate)."""
    cfg = _cfg("gptq_act_order", calib_file)
    _quant(llama64_dir, tmp_path, cfg)
    kcfg = build_config(method="gptq", bits=4, group_size=32, act_order=True, calib=str(calib_file),
                        nsamples=4, seqlen=32, keep_qstate=True)
    m_ref, rep_ref, _ = _quant(llama64_dir, tmp_path / "fresh", kcfg)
    m, rep, hit = _quant(llama64_dir, tmp_path, kcfg, fail=True)
    assert hit
    a, b = rep_ref.extra["qstate"], rep.extra["qstate"]
    assert a.keys() == b.keys()
    for lin in a:
        for k in ("codes", "scale", "zero", "g_idx"):
            assert a[lin][k].dtype == b[lin][k].dtype and torch.equal(a[lin][k], b[lin][k]), (lin, k)


def test_unquantized_tensors_at_storage_dtype(llama64_dir, tmp_path):
    """A tensor that is not stored as codes is kept at the checkpoint's dtype when that loses
    nothing (here: a modified norm weight that is fp16-exact), else at the compute dtype."""
    cfg = build_config(method="rtn", bits=4, group_size=32)
    m = _load(llama64_dir)

    def fn():
        rep = get_method("rtn").quantize(m, cfg, QuantContext(progress=False))
        with torch.no_grad():
            m.model.norm.weight.copy_(torch.linspace(0.5, 1.5, 64).half().float())
            m.model.layers[0].input_layernorm.weight.add_(1e-7)  # not fp16-exact
        rep.modified += ["model.norm.weight", "model.layers.0.input_layernorm.weight"]
        return rep

    ident = qc.model_identity(str(llama64_dir), cache_dir=tmp_path)
    qc.load_or_quantize(m, cfg, ident, fn, cache_dir=tmp_path, storage_dtype="float16")
    _, man = _entry_bytes(tmp_path)
    lay = man["report"]["layout"]
    assert lay["model.norm.weight"]["enc"] == "cast"
    assert man["stored"][lay["model.norm.weight"]["key"]]["dtype"] == "float16"
    assert lay["model.layers.0.input_layernorm.weight"]["enc"] == "dense"
    m2 = _load(llama64_dir)
    rep2, hit = qc.load_or_quantize(m2, cfg, ident, lambda: pytest.fail("again"), cache_dir=tmp_path,
                                    storage_dtype="float16")
    assert hit
    for n in rep2.modified:
        assert qc._bits_equal(dict(m.named_parameters())[n].detach(), dict(m2.named_parameters())[n].detach()), n


def test_corrupt_layout_is_discarded(llama64_dir, tmp_path):
    """A layout naming a tensor the file lacks (manifest re-checksummed) is corrupt: one warning,
    recomputed."""
    cfg = build_config(method="rtn", bits=4, group_size=32)
    _quant(llama64_dir, tmp_path, cfg)
    (e,) = list((tmp_path / "entries").iterdir())
    man = json.loads((e / "manifest.json").read_text())
    first = sorted(man["report"]["layout"])[0]
    man["report"]["layout"][first]["codes"] = "__int__.nope"
    man["manifest_checksum"] = qc.manifest_checksum(man)
    (e / "manifest.json").write_text(json.dumps(man))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert _quant(llama64_dir, tmp_path, cfg)[2] is False
    assert _quant(llama64_dir, tmp_path, cfg, fail=True)[2] is True


# ------------------------------------------------------------------------------------------------
# size cap and the `cache` subcommand
# ------------------------------------------------------------------------------------------------
def _fill(llama64_dir, cache_dir, n):
    keys = []
    for i in range(n):
        cfg = build_config(method="rtn", bits=[2, 3, 4, 8][i], group_size=32)
        _, rep, _ = _quant(llama64_dir, cache_dir, cfg)
        keys.append(rep.extra["cache"]["key"])
        # distinct, increasing last-use times
        os.utime(cache_dir / "entries" / keys[-1] / "manifest.json", (time.time() - 86400 * (10 - i),) * 2)
    return keys


def test_size_cap_evicts_least_recently_used(llama64_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(qc.MAX_GB_ENV, "0")  # no cap while filling
    keys = _fill(llama64_dir, tmp_path, 3)
    sizes = {e["key"]: e["size"] for e in qc.QuantCache(tmp_path).entries()}
    # a hit refreshes the first entry's last use: now the second is the oldest
    assert _quant(llama64_dir, tmp_path, build_config(method="rtn", bits=2, group_size=32), fail=True)[2]
    cap = sizes[keys[0]] + sizes[keys[2]] + 1 + max(sizes.values())  # room for two old ones + the new
    monkeypatch.setenv(qc.MAX_GB_ENV, str(cap / 1e9))
    capsys.readouterr()
    _, rep, _ = _quant(llama64_dir, tmp_path, build_config(method="rtn", bits=4, group_size=64))
    left = {e["key"] for e in qc.QuantCache(tmp_path).entries()}
    assert keys[1] not in left and {keys[0], keys[2], rep.extra["cache"]["key"]} <= left
    err = [ln for ln in capsys.readouterr().err.splitlines() if "least recently used" in ln]
    assert len(err) == 1 and qc.MAX_GB_ENV in err[0]


def test_max_cache_bytes_env(monkeypatch):
    monkeypatch.delenv(qc.MAX_GB_ENV, raising=False)
    assert qc.max_cache_bytes() == int(qc.DEFAULT_MAX_GB * 1e9)
    monkeypatch.setenv(qc.MAX_GB_ENV, "1.5")
    assert qc.max_cache_bytes() == 1_500_000_000
    monkeypatch.setenv(qc.MAX_GB_ENV, "none")
    assert qc.max_cache_bytes() is None


def test_cli_list_size_clean(llama64_dir, tmp_path, monkeypatch, capsys):
    from lm_eval_quant.cache_cli import main

    monkeypatch.setenv(qc.MAX_GB_ENV, "0")
    keys = _fill(llama64_dir, tmp_path, 3)
    sizes = {e["key"]: e["size"] for e in qc.QuantCache(tmp_path).entries()}
    assert main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for k in keys:
        assert k[:12] in out
    assert "rtn" in out and "w2" in out and "g32" in out and "last used" in out
    assert main(["size", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 entries" in out and str(sum(sizes.values())) in out
    # --older-than: entries last used 10 and 9 days ago go, the one of 8 days stays
    assert main(["clean", "--older-than", "8.5", "--cache-dir", str(tmp_path)]) == 0
    assert {e["key"] for e in qc.QuantCache(tmp_path).entries()} == {keys[2]}
    assert "removed 2" in capsys.readouterr().out
    keys = _fill(llama64_dir, tmp_path, 3)  # the 2 removed come back, all older than keys[2]'s new use
    # --max-size: least recently used first
    cap = (sizes[keys[2]] + 1) / 1e9
    assert main(["clean", "--max-size", f"{cap:.12f}", "--cache-dir", str(tmp_path)]) == 0
    assert {e["key"] for e in qc.QuantCache(tmp_path).entries()} == {keys[2]}
    assert main(["clean", "--cache-dir", str(tmp_path)]) == 0  # no criterion: everything
    assert qc.QuantCache(tmp_path).entries() == []


def test_cli_bad_arguments_one_line(tmp_path, capsys):
    from lm_eval_quant.cache_cli import main

    assert main(["clean", "--older-than", "-1", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm-eval-quant: error: cache:") and "\n" not in err
    assert main(["clean", "--max-size", "abc", "--cache-dir", str(tmp_path)]) == 2

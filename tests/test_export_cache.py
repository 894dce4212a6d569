"""Issue 15 item 4: the export reuses an evaluation's cache entry (the method is not run again),
writes a tied output head once, and keeps unquantized tensors at the checkpoint's dtype."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from lm_eval_quant.export_cli import main as export_main  # noqa: E402


@pytest.fixture(scope="module")
def tied_fp16_dir(tmp_path_factory, llama64_dir):
    """The toy model with tie_word_embeddings=true, saved in float16 (one embedding tensor)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tied") / "llama_tied_fp16"
    m = AutoModelForCausalLM.from_pretrained(llama64_dir, dtype=torch.float32)
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight
    m.half().save_pretrained(d)
    for f in os.listdir(llama64_dir):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(llama64_dir / f, d / f)
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    return d


def _tensors(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    assert ca == cb


def _args(model_dir, kind, calib_file):
    if kind == "rtn":
        return f"pretrained={model_dir},method=rtn,bits=4,group_size=32"
    if kind == "gptq_act_order":
        return (f"pretrained={model_dir},method=gptq,bits=4,group_size=32,act_order=true,calib={calib_file},"
                f"nsamples=4,seqlen=32")
    if kind == "awq":
        return f"pretrained={model_dir},method=awq,bits=4,group_size=32,calib={calib_file},nsamples=4,seqlen=32"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["rtn", "gptq_act_order", "awq"])
def test_export_after_eval_reuses_the_cache(llama64_dir, calib_file, tmp_path, monkeypatch, kind):
    import lm_eval_quant
    from lm_eval_quant.args import split_model_args
    from lm_eval_quant.methods import get_method

    lm_eval_quant.register()
    from lm_eval_quant.models.hf_quant import HFQuantLM

    cache = tmp_path / "cache"
    monkeypatch.setenv("LMQ_CACHE_DIR", str(cache))
    margs = _args(llama64_dir, kind, calib_file) + ",dtype=float32"
    # the fresh export: no cache, the method runs
    assert export_main(["--model_args", margs, "--output", str(tmp_path / "fresh"), "--no-cache"]) == 0
    # an evaluation with the cache on (as `lm_eval --model hf-quant` builds it)
    kw = dict(split_model_args(margs))
    HFQuantLM(device="cpu", batch_size=1, **kw)
    assert len(list((cache / "entries").iterdir())) == 1
    # the export hits the evaluation's entry: the method's quantize must not run
    cls = type(get_method(kw["method"]))
    monkeypatch.setattr(cls, "quantize", lambda *a, **k: pytest.fail("export re-ran the method"))
    assert export_main(["--model_args", margs, "--output", str(tmp_path / "reused")]) == 0
    _same_checkpoint(tmp_path / "fresh", tmp_path / "reused")


def test_tied_head_once_and_fp16_embeddings(tied_fp16_dir, tmp_path, monkeypatch):
    """fp16 source with a tied head, evaluated (quantized) in float32: the checkpoint stores the
    embedding once, at float16, and says dtype float16; it is smaller than the source."""
    from lm_eval_quant.export import save_quantized
    from lm_eval_quant.methods import build_config, get_method
    from lm_eval_quant.methods.base import QuantContext

    monkeypatch.setenv("LMQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "q"
    assert export_main(["--model_args", f"pretrained={tied_fp16_dir},method=rtn,bits=4,group_size=32,dtype=float32",
                        "--output", str(out)]) == 0
    t = _tensors(out)
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t
    for k, v in t.items():
        if v.is_floating_point() and not k.endswith(".scales"):
            assert v.dtype == torch.float16, (k, v.dtype)
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "float16" and conf["tie_word_embeddings"] is True
    src = (tied_fp16_dir / "model.safetensors").stat().st_size
    size = (out / "model.safetensors").stat().st_size
    assert size < src
    # the old layout (fp32 copies + a second head) would be larger than 2x the embedding alone
    emb = t["model.embed_tokens.weight"].numel()
    assert size < src - emb * 2 * 0.5
    # the same through the Python API on a model loaded in fp32 from the fp16 folder
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tied_fp16_dir, dtype=torch.float32)
    cfg = build_config(method="rtn", bits=4, group_size=32)
    rep = get_method("rtn").quantize(m, cfg, QuantContext(progress=False))
    o2 = save_quantized(m, cfg, tmp_path / "api", report=rep, progress=False)
    t2 = _tensors(o2)
    assert t2.keys() == t.keys() and t2["model.embed_tokens.weight"].dtype == torch.float16


def test_tied_head_reloads_tied(tied_fp16_dir, tmp_path, monkeypatch):
    """The head written once comes back tied to the embedding when the checkpoint is loaded."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM, GPTQConfig

    monkeypatch.setenv("LMQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "q"
    assert export_main(["--model_args", f"pretrained={tied_fp16_dir},method=rtn,bits=4,group_size=32,dtype=float32",
                        "--output", str(out)]) == 0
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu",
                                             quantization_config=GPTQConfig(bits=4, backend="torch"))
    assert torch.equal(q.lm_head.weight, q.model.embed_tokens.weight)
    assert torch.equal(q.model.embed_tokens.weight, _tensors(out)["model.embed_tokens.weight"])

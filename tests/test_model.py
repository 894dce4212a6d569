"""The hf-quant lm-eval model: argument handling (one-line errors before loading), the
end-to-end harness run, bit accounting in the results, and the full-precision baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lm_eval_quant
from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.methods import build_config

lm_eval = pytest.importorskip("lm_eval")


@pytest.mark.parametrize("args,msg", [
    (dict(method="rtm"), "unknown method 'rtm'"),
    (dict(bits="0"), "bits must be an integer from 2 to 8"),
    (dict(bits="1"), "bits must be an integer from 2 to 8"),
    (dict(bits="9"), "bits must be an integer from 2 to 8"),
    (dict(bits="1.5"), "bits must be an integer"),
    (dict(bits="four"), "bits must be an integer"),
    (dict(group_size="0"), "group_size must be -1"),
    (dict(group_size="-2"), "group_size must be -1"),
    (dict(group_size="abc"), "group_size must be an integer"),
    (dict(format="float"), "unknown format"),
    (dict(format="fp", bits="2"), "3-8 bits"),
    (dict(format="fp:e3m2", bits="4"), "bits=4"),
    (dict(sym="maybe"), "sym must be true or false"),
    (dict(method="none", bits="4"), "method=none keeps full precision"),
    (dict(method="rtn", damp="0.01"), "damp is an option of method=gptq"),
    (dict(method="rtn", foo="1"), "unknown argument foo"),
])
def test_bad_arguments_are_one_line(args, msg):
    with pytest.raises(QuantArgError) as e:
        build_config(**args)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_and_baseline():
    cfg = build_config()
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.format, cfg.sym) == ("rtn", 4, 128, "int", False)
    assert build_config(method="none").is_baseline
    assert build_config(method="rtn", bits=16).method == "none"
    assert build_config(format="fp", bits=8).format == "fp:e4m3"


_TM = {}


def _evaluate(model, model_args, task_dir, tasks=("lmq_toy_mc",), limit=None):
    lm_eval_quant.register()
    from lm_eval.tasks import TaskManager

    tm = _TM.get(str(task_dir)) or _TM.setdefault(str(task_dir), TaskManager(include_path=str(task_dir)))
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=tm,
                                   limit=limit, log_samples=True)


def test_bad_group_size_is_one_line_before_loading(tiny_llama, monkeypatch, toy_task_dir):
    """group_size=0 is refused in one line and no weights are read (a size that does not divide a
    width is valid: that layer's last group is shorter, see test_ragged.py)."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the argument check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    lm_eval_quant.register()
    from lm_eval.api.registry import get_model

    for bad in (0, -3):
        with pytest.raises(QuantArgError, match=r"group_size must be -1"):
            get_model("hf-quant")(pretrained=str(tiny_llama), method="rtn", bits=4, group_size=bad, device="cpu")


def test_missing_local_model_is_one_line(tmp_path):
    lm_eval_quant.register()
    from lm_eval.api.registry import get_model

    with pytest.raises(QuantArgError, match="does not exist"):
        get_model("hf-quant")(pretrained=str(tmp_path / "nope"), device="cpu")


def test_end_to_end_llama_accounting(tiny_llama, toy_task_dir):
    r = _evaluate("hf-quant", f"pretrained={tiny_llama},method=rtn,bits=4,group_size=128,device=cpu,cache=false", toy_task_dir)
    acc, n = r["results"]["lmq_toy_mc"]["acc,none"], r["n-samples"]["lmq_toy_mc"]["effective"]
    assert n == 24 and 0.0 <= acc <= 1.0 and acc * n == pytest.approx(round(acc * n))  # k of the 24 items right
    q = r["config"]["quantization"]
    assert q["quant_config"]["method"] == "rtn" and q["quant_config"]["bits"] == 4
    assert q["bits_per_quantized_weight"] == 4.15625  # 4 + (16-bit scale + 4-bit zero) / 128
    # hand count: 2 layers × (4 attn 128×128 + 3 mlp 128×256) linears quantized
    n_q = 2 * (4 * 128 * 128 + 3 * 128 * 256)
    assert q["params_quantized"] == n_q
    unq = q["params_total"] - n_q
    assert q["total_bits"] == n_q * 4.15625 + unq * 32  # the rest is float32
    assert q["total_bytes"] == q["total_bits"] / 8
    assert q["lm_eval_quant_version"] == lm_eval_quant.__version__
    json.dumps(r["config"], default=str)  # serialisable as lm-eval writes it


def test_end_to_end_gpt2_sym(tiny_gpt2, toy_task_dir):
    r = _evaluate("hf-quant", f"pretrained={tiny_gpt2},method=rtn,bits=3,group_size=32,sym=true,device=cpu,cache=false", toy_task_dir)
    q = r["config"]["quantization"]
    assert q["bits_per_quantized_weight"] == 3 + 16 / 32
    assert q["layers_quantized"] == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block


def test_baseline_equals_plain_hf(tiny_llama, toy_task_dir):
    """method=none goes through the same code path and gives exactly plain `hf`'s numbers."""
    a = _evaluate("hf-quant", f"pretrained={tiny_llama},method=none,device=cpu", toy_task_dir)
    b = _evaluate("hf", f"pretrained={tiny_llama},device=cpu", toy_task_dir)
    la = [s["resps"] for s in a["samples"]["lmq_toy_mc"]]
    lb = [s["resps"] for s in b["samples"]["lmq_toy_mc"]]
    assert la == lb
    q = a["config"]["quantization"]
    assert q["params_quantized"] == 0 and q["bits_per_param"] == 32


def test_quantized_differs_from_baseline(tiny_llama, toy_task_dir):
    a = _evaluate("hf-quant", f"pretrained={tiny_llama},method=rtn,bits=2,group_size=-1,device=cpu,cache=false", toy_task_dir)
    b = _evaluate("hf-quant", f"pretrained={tiny_llama},method=none,device=cpu", toy_task_dir)
    la = [s["resps"] for s in a["samples"]["lmq_toy_mc"]]
    lb = [s["resps"] for s in b["samples"]["lmq_toy_mc"]]
    assert la != lb
    # per-channel: one fp16 scale + 2-bit zero per output row of each linear
    rows = 4 * 128 + 2 * 256 + 128
    n = 4 * 128 * 128 + 3 * 128 * 256
    assert a["config"]["quantization"]["bits_per_quantized_weight"] == pytest.approx(2 + 18 * rows / n)


@pytest.mark.slow
def test_stock_cli_bad_argument_is_one_line(tiny_llama, toy_task_dir):
    """Through the stock `lm_eval` program: one line on stderr, exit 2, no traceback."""
    code = (
        "import sys, lm_eval_quant; lm_eval_quant.register();"
        "from lm_eval.__main__ import cli_evaluate; sys.argv[0]='lm_eval'; cli_evaluate()"
    )
    env = dict(os.environ, LMQ_NO_AUTOREGISTER="1")
    p = subprocess.run(
        [sys.executable, "-c", code, "--model", "hf-quant", "--model_args",
         f"pretrained={tiny_llama},bits=9", "--tasks", "lmq_toy_mc", "--include_path", str(toy_task_dir), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "lm-eval-quant: error: hf-quant: bits must be an integer from 2 to 8" in p.stderr
    assert "Traceback" not in p.stderr

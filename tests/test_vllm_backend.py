"""`hf-quant-vllm` / sweep `backend: vllm`: quantize → GPTQ export → lm-eval's vllm model.

vLLM cannot run on these CPUs, so the vLLM call (``hf_quant_vllm.make_vllm_lm``) is replaced at
its boundary by a stand-in that records the arguments it gets and scores the requests with
lm-eval's HF model on the exported checkpoint (transformers + GPTQModel). Checked: the argument
plumbing (vLLM options passed through unchanged, the export as ``pretrained``, float16 for a
float32 export), the results file carrying our quantization config and accounting, the same
answers as ``hf-quant`` on the fake-quantized model, and the one-line refusals before loading.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import lm_eval_quant  # noqa: E402
from lm_eval_quant.errors import QuantArgError  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")


def _no_load(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the argument check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_missing_vllm_is_one_line_before_loading(tiny_llama, monkeypatch):
    from lm_eval_quant.models import hf_quant_vllm

    if hf_quant_vllm.vllm_available():
        pytest.skip("vLLM is installed here")
    _no_load(monkeypatch)
    lm_eval_quant.register()
    from lm_eval.api.registry import get_model

    with pytest.raises(QuantArgError) as e:
        get_model("hf-quant-vllm")(pretrained=str(tiny_llama), method="rtn", bits=4, group_size=32)
    assert "vLLM is not installed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,msg", [
    (dict(method="rtn", bits=4, format="nf"), "format=nf cannot be written as a GPTQ checkpoint"),
    (dict(method="rtn", bits=5), "bits=5 has no GPTQ checkpoint layout"),
    (dict(method="bnb", bits=4), "method=bnb is not exportable"),
    (dict(method="rtn", bits=4, execution="real"), "execution= does not apply"),
])
def test_unexportable_configs_refused_before_loading(tiny_llama, monkeypatch, kw, msg):
    _no_load(monkeypatch)
    lm_eval_quant.register()
    from lm_eval.api.registry import get_model

    with pytest.raises(QuantArgError) as e:
        get_model("hf-quant-vllm")(pretrained=str(tiny_llama), **kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


class _StandIn:
    """Replaces lm-eval's vllm LM: records its kwargs, scores with HFLM on the export."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        from lm_eval.models.huggingface import HFLM

        type(self).calls.append(dict(kwargs))
        self.hf = HFLM(pretrained=kwargs["pretrained"], device="cpu", dtype="float32", batch_size=1)

    def __getattr__(self, k):
        return getattr(self.hf, k)


def test_vllm_cell_plumbing_with_stand_in(tiny_llama, toy_task_dir, tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from lm_eval.tasks import TaskManager

    from lm_eval_quant.models import hf_quant_vllm

    monkeypatch.setattr(hf_quant_vllm, "require_vllm", lambda: None)
    monkeypatch.setattr(hf_quant_vllm, "make_vllm_lm", lambda **kw: _StandIn(**kw))
    monkeypatch.setenv("LMQ_CACHE_DIR", str(tmp_path / "cache"))
    _StandIn.calls.clear()
    lm_eval_quant.register()
    tm = TaskManager(include_path=str(toy_task_dir))
    quant = f"pretrained={tiny_llama},method=rtn,bits=4,group_size=32"
    r = lm_eval.simple_evaluate(
        model="hf-quant-vllm",
        model_args=quant + f",tensor_parallel_size=2,gpu_memory_utilization=0.5,max_model_len=256,export_dir={tmp_path / 'exp'}",
        tasks=["lmq_toy_mc"], task_manager=tm, log_samples=True)
    assert len(_StandIn.calls) == 1
    call = _StandIn.calls[0]
    assert call["tensor_parallel_size"] == 2 and call["gpu_memory_utilization"] == 0.5 and call["max_model_len"] == 256
    assert call["dtype"] == "float16"  # float32 toy export: vLLM's GPTQ kernels take fp16/bf16
    exp = tmp_path / "exp"
    assert call["pretrained"] == str(exp)
    qc = json.loads((exp / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 32)
    q = r["config"]["quantization"]
    assert q["quant_config"]["method"] == "rtn" and q["quant_config"]["bits"] == 4
    assert q["bits_per_quantized_weight"] == 4 + (16 + 4) / 32
    ex = q["execution"]
    assert ex["backend"] == "vllm" and ex["export_dir"] == str(exp) and ex["loglikelihood_requests"] > 0
    assert ex["vllm_model_args"]["tensor_parallel_size"] == "2"
    json.dumps(r["config"], default=str)
    assert r["config"]["model_num_parameters"] > 0  # the inner model's own info is kept
    # same answers as hf-quant on the fake-quantized weights (export decodes to them exactly;
    # the reload's auto CPU kernel multiplies in bf16: 2e-2)
    f = lm_eval.simple_evaluate(model="hf-quant", model_args=quant + ",device=cpu", tasks=["lmq_toy_mc"],
                                task_manager=tm, log_samples=True)
    lv = [float(x[0][0]) for s in r["samples"]["lmq_toy_mc"] for x in s["resps"]]
    lf = [float(x[0][0]) for s in f["samples"]["lmq_toy_mc"] for x in s["resps"]]
    assert len(lv) == len(lf) > 0
    scale = max(abs(v) for v in lf)
    assert max(abs(a - b) for a, b in zip(lv, lf)) < 2e-2 * scale


def test_sweep_backend_vllm_spec():
    from lm_eval_quant.sweep.spec import SweepSpec

    spec = SweepSpec.from_dict({"models": ["m"], "tasks": ["t"], "methods": ["gptq"], "bits": [4],
                                "backend": "vllm", "model_args": {"tensor_parallel_size": 2}})
    cells = [c for c in spec.cells(check_methods=False) if not c.skip_reason]
    assert cells and all(c.lm_eval_model == "hf-quant-vllm" for c in cells)
    assert "tensor_parallel_size=2" in cells[0].model_args_string()
    assert SweepSpec.from_dict({"models": ["m"], "tasks": ["t"], "backend": "hf"}).lm_eval_model == "hf-quant"
    with pytest.raises(QuantArgError, match="backend='sglang' is not one of hf, vllm"):
        SweepSpec.from_dict({"models": ["m"], "tasks": ["t"], "backend": "sglang"})

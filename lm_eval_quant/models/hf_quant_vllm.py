"""`hf-quant-vllm`: quantize on the fly, export a GPTQ checkpoint, evaluate it with lm-eval's `vllm`.

    lm_eval --model hf-quant-vllm --model_args \
        pretrained=Qwen/Qwen2.5-7B,method=gptq,bits=4,group_size=128,tensor_parallel_size=1,gpu_memory_utilization=0.85,max_model_len=4096

    # a sweep:  backend: vllm   (every cell runs on this model; vLLM options go in model_args)

Steps: (1) our arguments (method, bits, group_size, format, sym, skip, the method's options, cache,
cache_dir) are checked, then vLLM is looked for -- both before anything is loaded, each failure one
line; (2) the model is loaded with transformers on the host and quantized through the quantized-
weights cache (layer-wise methods use the GPU one layer at a time); (3) it is written as a GPTQ
checkpoint (:func:`lm_eval_quant.export.save_quantized`; int formats at 2/3/4/8 bits) into
``export_dir`` (or ``save_quantized``; default: a new temporary folder), the host model is freed; (4) lm-eval's own
``vllm`` model is built on the export with the vLLM arguments passed through unchanged
(``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``, ``data_parallel_size``,
``max_num_seqs``, ``enforce_eager``, ``batch_size``, ``max_gen_toks``, ...) and every request is
delegated to it. ``get_model_info()`` adds our quantization config and bit accounting (as
``hf-quant`` does) plus ``execution`` = {backend vllm, export_dir, export/quantize seconds,
loglikelihood throughput}, so the results JSON carries them.

vLLM's GPTQ kernels run float16/bfloat16 activations only: a float32 export is served with
``dtype=float16`` unless ``dtype`` is given. The vLLM call is the single function
:func:`make_vllm_lm` (tests replace it; CI machines have no vLLM).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from .. import __version__
from ..errors import QuantArgError

log = logging.getLogger("lm_eval_quant")
_P = "hf-quant-vllm"
# quantization/loading keys we consume; everything else goes to lm-eval's vllm model
_OURS = ("export_dir", "checkpoint_format", "quant_device")  # cache/cache_dir: the argument layer
_HF_LOAD = ("revision", "trust_remote_code", "dtype")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise QuantArgError(
            f"{_P}: vLLM is not installed in this environment; install it on a CUDA machine "
            f"(pip install 'lm-eval-quant[vllm]') or evaluate with --model hf-quant (sweep backend: hf)"
        )


def make_vllm_lm(**kwargs):
    """The boundary: lm-eval's ``vllm`` LM on the export (tests replace this function)."""
    from lm_eval.api.registry import get_model

    return get_model("vllm")(**kwargs)


class HFQuantVLLM(LM):
    """See the module docstring."""

    def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        try:
            self._setup(pretrained, **kwargs)
        except QuantArgError as e:
            from .hf_quant import _running_cli

            if _running_cli():
                print(f"lm-eval-quant: error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            raise

    def _setup(self, pretrained, **kwargs) -> None:
        import torch

        from ..export import check_exportable, save_quantized
        from ..export_cli import _quantize
        from ..args import resolve

        if not pretrained:
            raise QuantArgError(f"{_P}: pretrained=PATH_OR_HUB_ID is required")
        kwargs.pop("device", None)  # vLLM places the model itself
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in _OURS}
        r = resolve(dict(kwargs), where="hf-quant-vllm", known_rest=None, for_export=True)
        for k in ("execution", "kernel"):
            if getattr(r.wrapper, k, None) not in (None, "", "fake"):
                raise QuantArgError(f"{_P}: {k}= does not apply; vLLM runs the export with its own kernels")
        if r.wrapper.save_quantized and not ours.get("export_dir"):
            ours["export_dir"] = r.wrapper.save_quantized  # the export is what vLLM evaluates
        cfg, method, rest = r.cfg, r.method, dict(r.rest)
        check_exportable(cfg)
        require_vllm()
        self._cfg = cfg
        load = {k: rest.pop(k) for k in list(rest) if k in _HF_LOAD}
        vllm_args = dict(rest)  # passed through unchanged
        export_dir = (Path(ours["export_dir"]) if ours.get("export_dir")
                      else Path(tempfile.mkdtemp(prefix="lmq-vllm-export-")) / "model")
        t0 = time.perf_counter()
        args = {"pretrained": pretrained, **{k: v for k, v in load.items() if v is not None}}
        qdev = ours.get("quant_device") or ("cuda" if torch.cuda.is_available() else "cpu")
        ns = SimpleNamespace(device=qdev, no_cache=False)
        model, tok, report = _quantize(dict(args), cfg, method, ns, r.wrapper)
        t_q = time.perf_counter() - t0
        self._accounting = method.accounting(model, cfg, report)
        dtype = next(model.parameters()).dtype
        save_quantized(model, cfg, export_dir, report=report, tokenizer=tok,
                       checkpoint_format=str(ours.get("checkpoint_format") or "auto"), source=pretrained)
        t_e = time.perf_counter() - t0 - t_q
        del model, report
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        vllm_args["pretrained"] = str(export_dir)
        if "dtype" not in vllm_args:
            vllm_args["dtype"] = "float16" if dtype == torch.float32 else str(dtype).replace("torch.", "")
        if load.get("trust_remote_code") is not None:
            vllm_args.setdefault("trust_remote_code", load["trust_remote_code"])
        self._vllm_args = dict(vllm_args)
        self._exec = {"execution": "real", "backend": "vllm", "kernel": "vllm", "export_dir": str(export_dir),
                      "quantize_seconds": round(t_q, 3), "export_seconds": round(t_e, 3),
                      "vllm_model_args": {k: str(v) for k, v in sorted(vllm_args.items())}}
        self._ll = {"requests": 0, "seconds": 0.0}
        self._inner = make_vllm_lm(**vllm_args)

    # -- delegation -----------------------------------------------------------------------------
    def __getattr__(self, name):  # anything else lm-eval asks of its vllm model (tokenizer, ...)
        inner = self.__dict__.get("_inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def loglikelihood(self, requests, *a, **k):
        t0 = time.perf_counter()
        try:
            return self._inner.loglikelihood(requests, *a, **k)
        finally:
            self._ll["seconds"] += time.perf_counter() - t0
            self._ll["requests"] += len(requests)

    def loglikelihood_rolling(self, requests, *a, **k):
        return self._inner.loglikelihood_rolling(requests, *a, **k)

    def generate_until(self, requests, *a, **k):
        return self._inner.generate_until(requests, *a, **k)

    def apply_chat_template(self, *a, **k):
        return self._inner.apply_chat_template(*a, **k)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self._inner, "tokenizer_name", "")

    def chat_template(self, *a, **k):
        return self._inner.chat_template(*a, **k)

    @property
    def rank(self):
        return getattr(self._inner, "rank", 0)

    @property
    def world_size(self):
        return getattr(self._inner, "world_size", 1)

    def get_model_info(self) -> dict:
        info = {}
        inner = getattr(self._inner, "get_model_info", None)
        if callable(inner):
            try:
                info.update(inner())
            except Exception as e:  # noqa: BLE001  (lm-eval's own model info is optional)
                log.debug("vllm get_model_info failed: %s: %s", type(e).__name__, e)
        q = dict(self._accounting)
        ex = dict(self._exec)
        ex["loglikelihood_requests"] = self._ll["requests"]
        ex["loglikelihood_seconds"] = round(self._ll["seconds"], 3)
        q["execution"] = ex
        q.setdefault("lm_eval_quant_version", __version__)
        info["quantization"] = json.loads(json.dumps(q, default=str))
        return info


if "hf-quant-vllm" not in model_registry:
    model_registry.register("hf-quant-vllm")(HFQuantVLLM)

__all__ = ["HFQuantVLLM", "make_vllm_lm", "require_vllm", "vllm_available"]

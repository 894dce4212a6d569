"""`hf-quant`: lm-eval's HFLM with the model quantized on the fly.

    lm_eval --model hf-quant \
        --model_args pretrained=Qwen/Qwen2.5-7B,method=gptq,bits=3,group_size=128 --tasks piqa

Our arguments (method, bits, group_size, format, sym, skip, the method's options, cache,
cache_dir, save_quantized) are taken out; every other argument goes to HFLM unchanged, so
whatever works with `--model hf` works here. The quantization runs inside HFLM's
`_create_model` hook right after the weights are loaded (on CPU unless a device map says
otherwise; methods move one layer at a time to the compute device), and the bit accounting is
added to `get_model_info()`, which lm-eval merges into `results["config"]`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from .. import __version__, prequant
from ..errors import QuantArgError
from ..methods import CORE_KEYS, QuantContext, QuantReport, build_config, get_method
from ..methods.base import check_group_size, quantizable_linears

log = logging.getLogger("lm_eval_quant")

WRAPPER_KEYS = ("cache", "cache_dir", "save_quantized")


def split_model_args(kwargs: dict) -> tuple[dict, dict, dict]:
    """(core quant args, wrapper args, the rest for HFLM). Method options are pulled from the
    rest once the method is known."""
    core = {k: kwargs.pop(k) for k in list(kwargs) if k in CORE_KEYS}
    wrap = {k: kwargs.pop(k) for k in list(kwargs) if k in WRAPPER_KEYS}
    return core, wrap, kwargs


def _hflm_params() -> set[str]:
    import inspect

    names = set(inspect.signature(HFLM.__init__).parameters) | set(
        inspect.signature(HFLM._create_model).parameters
    )
    return names - {"self", "kwargs"}


def config_from_model_args(kwargs: dict) -> tuple[Any, dict, dict]:
    """Pop our arguments out of `kwargs` (modified in place) and return (QuantConfig, wrapper
    args, method). Raises QuantArgError (one line) on any bad argument."""
    core, wrap, rest = split_model_args(kwargs)
    # lm-eval's argument parser turns the string "none" into None: a key given as none means none
    if "method" in core and core["method"] is None:
        core["method"] = "none"
    if "skip" in core and core["skip"] is None:
        core["skip"] = "none"
    method = get_method(core.get("method", "rtn") or "rtn")
    opts = {k: rest.pop(k) for k in list(rest) if k in method.OPTIONS}
    # anything that is neither HFLM's nor ours, but is some other method's option: say so now
    from ..methods import all_option_names

    owners = all_option_names()
    hf = _hflm_params()
    for k in list(rest):
        if k in owners and k not in hf:
            opts[k] = rest.pop(k)  # build_config reports "x is an option of method=y"
    if wrap.get("save_quantized") and "keep_qstate" in method.OPTIONS:
        opts.setdefault("keep_qstate", "true")  # export writes the exact integer state
    cfg = build_config(**core, **opts)
    return cfg, wrap, get_method(cfg.method)


def _precheck_shapes(pretrained: str, cfg, trust_remote_code: bool, revision: str | None) -> None:
    """Check group_size against the real linear widths on a weightless (meta) copy of the
    model, before any weights are read. Silently skipped if the architecture can't be built."""
    if cfg.is_baseline or cfg.group_size == -1 or cfg.method == "bnb":
        return
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code, revision=revision)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
    except Exception as e:  # pragma: no cover - exotic models: checked after loading instead
        log.debug("shape pre-check skipped: %s", e)
        return
    check_group_size(quantizable_linears(meta, cfg.skip), cfg.group_size)


def checkpoint_dtype(model) -> str | None:
    """The dtype the checkpoint stores its weights in (its config.json ``dtype``/``torch_dtype``),
    read from the file when the model came from a local folder, as transformers may rewrite the
    in-memory config with the dtype it loaded in. None when unknown."""
    from ..accounting import as_dtype

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and os.path.isfile(os.path.join(str(path), "config.json")):
        try:
            with open(os.path.join(str(path), "config.json"), encoding="utf-8") as fh:
                conf = json.load(fh)
            d = as_dtype(conf.get("dtype") or conf.get("torch_dtype"))
            return None if d is None else str(d).replace("torch.", "")
        except (OSError, ValueError):
            return None
    return None


_CPU_HALF_WARNED = False


def cpu_half_hint(model, device) -> str | None:
    """The CPU speed hint, or None: float16 weights evaluated on a CPU run much slower than
    float32 (measured 1.8x on SmolLM2-135M with torch 2.x; CPUs have no fast fp16 matmul)."""
    try:
        p = next(model.parameters())
    except (StopIteration, AttributeError, TypeError):
        return None
    if torch.device(device).type != "cpu" or p.device.type != "cpu" or p.dtype != torch.float16:
        return None
    return ("hf-quant: the model is evaluated in float16 on the CPU, which is slow there (about "
            "1.8x slower than float32); add dtype=float32 (or dtype=bfloat16) to --model_args")


def warn_cpu_half_once(model, device) -> bool:
    """Log :func:`cpu_half_hint` once per process; True when it was logged now."""
    global _CPU_HALF_WARNED
    msg = cpu_half_hint(model, device)
    if msg is None or _CPU_HALF_WARNED:
        return False
    _CPU_HALF_WARNED = True
    log.warning(msg)
    return True


class HFQuantLM(HFLM):
    """HFLM whose model is quantized on the fly. See the module docstring."""

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        try:
            self._lmq_init(pretrained, **kwargs)
        except QuantArgError as e:
            if _running_cli():
                # the stock `lm_eval` CLI would print a long traceback: one line instead
                print(f"lm-eval-quant: error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            raise

    def _lmq_init(self, pretrained: Any = None, **kwargs: Any) -> None:
        if pretrained is None:
            raise QuantArgError("hf-quant: pretrained=PATH_OR_HUB_ID is required")
        if isinstance(pretrained, str):
            if pretrained.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(pretrained)):
                raise QuantArgError(f"hf-quant: pretrained={pretrained} does not exist")
            # a pre-quantized checkpoint (GPTQ/AWQ/bnb/compressed-tensors) is evaluated as it is:
            # method defaults to none, and asking for another method is one clear line
            # (lm-eval parses method=none as None)
            asked = (kwargs["method"] or "none") if "method" in kwargs else None
            qc = prequant.check_prequantized(
                pretrained,
                asked,
                revision=kwargs.get("revision"),
                subfolder=kwargs.get("subfolder") or "",
                trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            )
            if qc and asked is None:
                kwargs["method"] = "none"
        cfg, wrap, method = config_from_model_args(kwargs)
        self._lmq_cfg = cfg
        self._lmq_method = method
        self._lmq_wrap = wrap
        self._lmq_report: QuantReport | None = None
        self._lmq_accounting: dict | None = None
        self._lmq_timing: dict = {}
        if wrap.get("save_quantized"):
            from ..export import check_exportable

            check_exportable(cfg)  # before any weights are read
        if isinstance(pretrained, str):
            _precheck_shapes(
                pretrained,
                cfg,
                bool(kwargs.get("trust_remote_code", False)),
                kwargs.get("revision", "main"),
            )
        if not kwargs.get("device") and not torch.cuda.is_available():
            # lm_eval.simple_evaluate passes device=None, which HFLM turns into CUDA: on a machine
            # without it, the CPU (what the lm_eval CLI user gets with --device cpu)
            kwargs["device"] = "cpu"
        self._lmq_device_arg = kwargs.get("device", "cuda")
        super().__init__(pretrained=pretrained, **kwargs)
        if not isinstance(pretrained, str):  # a model object: quantize it here
            self._lmq_apply(self._model, model_id=None)

    # -- HFLM hook --------------------------------------------------------------------------
    def _create_model(self, pretrained: str, *args: Any, **kwargs: Any) -> None:
        extra = self._lmq_method.load_kwargs(self._lmq_cfg)  # (pre-quantized: checked in _lmq_init)
        for k, v in extra.items():
            if k == "quantization_config" and kwargs.get("quantization_config") is not None:
                raise QuantArgError(
                    f"hf-quant: {pretrained} is already quantized; method={self._lmq_cfg.method} "
                    f"cannot quantize it again (use method=none)"
                )
            kwargs[k] = v
        t0 = time.perf_counter()
        super()._create_model(pretrained, *args, **kwargs)
        self._lmq_timing["load_s"] = time.perf_counter() - t0
        self._lmq_apply(self._model, model_id=pretrained, revision=kwargs.get("revision"))

    # -- quantization -----------------------------------------------------------------------
    def _compute_device(self) -> torch.device:
        dev = getattr(self, "_device", None)
        if dev is None:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(dev)

    def _lmq_apply(self, model, model_id: str | None, revision: str | None = None) -> None:
        cfg, method = self._lmq_cfg, self._lmq_method
        warn_cpu_half_once(model, self._compute_device())
        ctx = QuantContext(
            tokenizer=getattr(self, "tokenizer", None),
            device=self._compute_device(),
            seed=0,
            progress=True,
            model_id=model_id,
        )
        t0 = time.perf_counter()
        if cfg.is_baseline or cfg.method == "bnb":
            report = method.quantize(model, cfg, ctx)
        else:
            check_group_size(quantizable_linears(model, cfg.skip), cfg.group_size)
            report = self._lmq_quantize_cached(model, cfg, method, ctx, model_id, revision)
        self._lmq_timing["quantize_s"] = time.perf_counter() - t0
        self._lmq_report = report
        self._lmq_accounting = None
        if cfg.is_baseline:
            self._lmq_accounting = prequant.account_prequantized(model, cfg)
        if self._lmq_accounting is None:
            if cfg.method == "bnb":
                self._lmq_accounting = method.accounting(model, cfg, report)
            else:
                self._lmq_accounting = method.accounting(
                    model, cfg, report, storage_dtype=checkpoint_dtype(model))
        save = self._lmq_wrap.get("save_quantized")
        if save:
            from ..export import save_quantized

            save_quantized(model, cfg, save, report=report, tokenizer=ctx.tokenizer, source=model_id)

    def _lmq_quantize_cached(self, model, cfg, method, ctx, model_id, revision) -> QuantReport:
        """Quantize through the quantized-weights cache (cache=false turns it off)."""
        from .. import cache as cache_mod
        from ..methods.base import parse_bool

        enabled = parse_bool("cache", self._lmq_wrap.get("cache", True))
        cache_dir = self._lmq_wrap.get("cache_dir")
        if not enabled:
            return method.quantize(model, cfg, ctx)
        identity = cache_mod.model_identity(model_id, revision, model=model, cache_dir=cache_dir)
        calib = cache_mod.calibration_identity(cfg, ctx.tokenizer)
        report, _hit = cache_mod.load_or_quantize(
            model, cfg, identity, lambda: method.quantize(model, cfg, ctx),
            cache_dir=cache_dir, enabled=True, calib=calib,
        )
        return report

    # -- reporting ----------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["quantization"] = self.quantization_info()
        return info

    def quantization_info(self) -> dict:
        acc = dict(self._lmq_accounting or {})
        if self._lmq_report is not None:
            acc["quantize_seconds"] = round(self._lmq_timing.get("quantize_s", 0.0), 3)
            extra = {k: v for k, v in self._lmq_report.extra.items() if k not in ("qstate", "extra_bits")}
            if extra:
                acc["method_report"] = json.loads(json.dumps(extra, default=str))
        acc.setdefault("lm_eval_quant_version", __version__)
        return acc


def _running_cli() -> bool:
    """True inside the `lm_eval` / `lm-eval-quant` command-line programs (not a library call)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    prog = os.path.basename(argv0)
    if prog == "__main__.py":  # python -m lm_eval / python -m lm_eval_quant.cli
        return os.path.basename(os.path.dirname(argv0)) in ("lm_eval", "lm_eval_quant")
    return prog in ("lm_eval", "lm-eval", "lm-eval-quant")


# Registered once, after lm-eval's built-ins (the caller imported lm_eval.models first). Guarded:
# the entry point, the .pth hook and the console script can all reach this module in one process.
if "hf-quant" not in model_registry:
    model_registry.register("hf-quant")(HFQuantLM)

__all__ = ["HFQuantLM", "config_from_model_args"]

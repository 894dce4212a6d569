"""`hf-quant`: lm-eval's HFLM with the model quantized on the fly.

    lm_eval --model hf-quant \
        --model_args pretrained=Qwen/Qwen2.5-7B,method=gptq,bits=3,group_size=128 --tasks piqa

Our arguments (method, bits, group_size, format, sym, skip, the method's options, cache,
cache_dir, save_quantized, kl_ref, kl_out, kl_topk, and the activation arguments act_bits, act_format,
act_group_size and smooth) are taken out; every other argument goes to HFLM unchanged, so
whatever works with `--model hf` works here. The quantization runs inside HFLM's
`_create_model` hook right after the weights are loaded (on CPU unless a device map says
otherwise; methods move one layer at a time to the compute device), and the bit accounting is
added to `get_model_info()`, which lm-eval merges into `results["config"]`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from .. import __version__, prequant
from ..accounting import checkpoint_dtype  # noqa: F401  (re-exported: hf_quant.checkpoint_dtype)
from ..errors import QuantArgError
from ..args import CORE_KEYS, WRAPPER_KEYS, argv_model_args, resolve, split_model_args, unknown_key_error
from ..methods import QuantContext, QuantReport
from ..methods.actquant import (  # issue 12
    act_info,
    check_act_shapes,
    install_act_quant,
    parse_act_args,
    pop_act_args,
    scheme_label,
)
from ..methods.base import check_group_size, quantizable_linears

log = logging.getLogger("lm_eval_quant")

# keyword arguments from_pretrained takes besides HFLM's own (HFLM passes unknown keys through);
# a key that is none of these, not ours and not a model-config attribute is a typo: one line.
FROM_PRETRAINED_KEYS = (
    "attn_implementation", "device_map", "low_cpu_mem_usage", "max_memory", "offload_state_dict",
    "use_safetensors", "variant", "token", "local_files_only", "torch_dtype", "key_mapping",
    "load_in_4bit", "load_in_8bit", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "output_loading_info", "force_download", "proxies", "experts_implementation",
)
_DTYPE_WORDS = ("auto", "float32", "float16", "bfloat16", "float64", "half", "float", "double")


def _probe_device(device) -> str:
    """issue 14: the device whose peak memory is measured (cuda when HFLM will use it)."""
    d = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return d if d.startswith("cuda") and torch.cuda.is_available() else "cpu"


def _hflm_params() -> set[str]:
    import inspect

    names = set(inspect.signature(HFLM.__init__).parameters) | set(
        inspect.signature(HFLM._create_model).parameters
    )
    return names - {"self", "kwargs", "args"}


def known_keys() -> set[str]:
    """Every non-quantization key hf-quant accepts without looking at the model's config."""
    return _hflm_params() | set(FROM_PRETRAINED_KEYS)


def config_from_model_args(kwargs: dict) -> tuple[Any, dict, Any]:
    """Pop our arguments out of `kwargs` (modified in place) and return (QuantConfig, wrapper
    args as a dict, method). Raises QuantArgError (one line) on any bad argument. Keys that are
    not ours are left in `kwargs` for HFLM (checked against it by :func:`check_rest_keys`)."""
    r = resolve(kwargs, where="hf-quant", known_rest=None, passthrough=known_keys())
    for k in list(kwargs):
        if k not in r.rest:
            kwargs.pop(k)
    wrap = {k: getattr(r.wrapper, k) for k in WRAPPER_KEYS if getattr(r.wrapper, k) is not None}
    return r.cfg, wrap, r.method


def check_rest_keys(rest: dict, model_config: Any = None) -> None:
    """One line for a key that neither HFLM, from_pretrained nor the model's config takes."""
    known = known_keys()
    for k, v in rest.items():
        if k in known or (model_config is not None and hasattr(model_config, k)):
            continue
        raise unknown_key_error("hf-quant", k, v, known | set(CORE_KEYS) | set(WRAPPER_KEYS))


def _local_path(p: Any) -> bool:
    return isinstance(p, str) and (p.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(p)))


def check_paths_and_dtype(pretrained: Any, kwargs: dict) -> None:
    """Cheap checks of what HFLM would otherwise turn into a traceback mid-load."""
    if isinstance(pretrained, str):
        if not pretrained.strip():
            raise QuantArgError("hf-quant: pretrained= is empty; give a model folder or a hub id")
        if _local_path(pretrained):
            root = os.path.expanduser(pretrained)
            if not os.path.exists(root):
                raise QuantArgError(f"hf-quant: pretrained={pretrained} does not exist")
            if not os.path.isdir(root):
                raise QuantArgError(f"hf-quant: pretrained={pretrained} is a file; give the model's folder")
            d = os.path.join(root, str(kwargs.get("subfolder") or ""))
            if not os.path.isdir(d):
                raise QuantArgError(f"hf-quant: subfolder={kwargs.get('subfolder')} does not exist in {pretrained}")
            if not kwargs.get("gguf_file"):
                conf = os.path.join(d, "config.json")
                if not os.path.isfile(conf) and re.search(r"\.tmp-\d+$", os.path.basename(os.path.normpath(root))):
                    raise QuantArgError(f"hf-quant: {pretrained} is the temp folder of an export that did not finish (no config.json); "
                                        f"it holds no usable checkpoint (the next export next to it removes it)")
                if not os.path.isfile(conf):
                    raise QuantArgError(f"hf-quant: {d} has no config.json; is pretrained= a Hugging Face model folder?")
                try:
                    with open(conf, encoding="utf-8") as f:
                        c = json.load(f)
                except (ValueError, UnicodeDecodeError) as e:
                    raise QuantArgError(f"hf-quant: {conf} is not valid JSON ({' '.join(str(e).split())[:120]})") from None
                if not isinstance(c, dict):
                    raise QuantArgError(f"hf-quant: {conf} must hold a JSON object, got {type(c).__name__}")
    for key in ("tokenizer", "peft", "delta"):
        v = kwargs.get(key)
        if isinstance(v, str) and v.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(v)):
            raise QuantArgError(f"hf-quant: {key}={v} does not exist")
    for key in ("dtype", "torch_dtype", "softmax_dtype", "mixed_precision_dtype"):
        v = kwargs.get(key)
        if v is None or isinstance(v, torch.dtype):
            continue
        name = str(v).strip().replace("torch.", "")
        if name not in _DTYPE_WORDS and not isinstance(getattr(torch, name, None), torch.dtype):
            raise QuantArgError(f"hf-quant: {key}={v} is not a torch dtype; use auto, float32, bfloat16 or float16")


def _meta_model(pretrained: str, kwargs: dict):
    """(config, weightless meta copy of the model) or (config or None, None) when it cannot be built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = bool(kwargs.get("trust_remote_code", False))
    try:
        conf = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust, revision=kwargs.get("revision", "main"),
                                          subfolder=kwargs.get("subfolder") or "")
    except Exception as e:  # noqa: BLE001  (hub id offline, exotic config: checked after loading instead)
        log.debug("config pre-load skipped: %s", e)
        return None, None
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001
        log.debug("shape pre-check skipped: %s", e)
        return conf, None
    return conf, meta


def warn_unmatched_skip(model, cfg) -> None:
    """One warning line for each skip= pattern that matches no module (a typo quantizes silently)."""
    from ..methods.base import DEFAULT_SKIP, matches

    names = [n for n, _ in model.named_modules() if n]
    for pat in cfg.skip:
        if pat in DEFAULT_SKIP and tuple(cfg.skip) == DEFAULT_SKIP:
            continue  # the default: models without an lm_head module are fine
        if not any(matches(n, (pat,)) for n in names):
            msg = f"hf-quant: warning: skip pattern {pat!r} matches no module of the model; nothing is skipped for it"
            print(msg, file=sys.stderr)
            log.warning(msg)


def pop_act_smooth_args(kwargs: dict) -> tuple[dict, Any]:
    """issue 12: (act_* args, smooth) taken out of `kwargs`; `method=smoothquant` gets the paper's
    recipe where a key is unset: W8A8, int8 symmetric per-channel weights, per-token activations."""
    act_args = pop_act_args(kwargs)
    smooth = kwargs.pop("smooth", None)
    if str(kwargs.get("method") or "").strip().lower() == "smoothquant":
        kwargs.setdefault("bits", 8)
        kwargs.setdefault("group_size", -1)
        kwargs.setdefault("sym", True)
        if not act_args:
            act_args = {"act_bits": kwargs["bits"]}
    return act_args, smooth


def pop_kl_args(kwargs: dict) -> tuple[Any, Any, int | None]:
    """(kl_ref, kl_out, kl_topk) taken out of `kwargs`: token-level KL on perplexity tasks
    (:mod:`lm_eval_quant.tokkl`); the environment's LMQ_KL_REF / LMQ_KL_OUT fill them in."""
    kl_ref = kwargs.pop("kl_ref", None) or os.environ.get("LMQ_KL_REF") or None
    kl_out = kwargs.pop("kl_out", None) or os.environ.get("LMQ_KL_OUT") or None
    kl_topk = kwargs.pop("kl_topk", None)
    if kl_topk is not None:
        try:
            kl_topk = int(kl_topk)
            if kl_topk < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise QuantArgError(
                f"hf-quant: kl_topk={kl_topk} must be a positive integer (fp log-probs stored per "
                "token for token-level KL; default 32)") from None
    return kl_ref, kl_out, kl_topk


def preflight(pretrained: Any, kwargs: dict, warn: bool = True) -> tuple[Any, dict, Any]:
    """Everything checked before any weights are read; pops our keys out of `kwargs` (the rest is
    HFLM's) and returns (QuantConfig, wrapper args, method). Raises QuantArgError (one line)."""
    if pretrained is None:
        raise QuantArgError("hf-quant: pretrained=PATH_OR_HUB_ID is required")
    check_paths_and_dtype(pretrained, kwargs)
    if isinstance(pretrained, str):
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
    from ..execution import check_real_shapes, plan_execution  # issue 14

    plan = plan_execution(cfg, wrap.get("execution"), wrap.get("kernel"))
    if wrap.get("save_quantized"):
        from ..export import check_exportable, check_output

        check_exportable(cfg)  # before any weights are read
        check_output(wrap["save_quantized"])
    conf = meta = None
    if isinstance(pretrained, str):
        conf, meta = _meta_model(pretrained, kwargs)
    check_rest_keys(kwargs, conf)
    if meta is not None:
        dev = kwargs.get("device") or "cpu"
        method.check_shapes(meta, cfg, dev if str(dev).startswith(("cpu", "cuda", "mps", "xpu")) else "cpu")
        if wrap.get("save_quantized"):
            from ..export import check_export_shapes

            check_export_shapes(meta, cfg)
        if plan.real:  # issue 14: packed-layout limits, before any weights are read
            check_real_shapes(quantizable_linears(meta, cfg.skip), cfg, plan)
        if warn and not cfg.is_baseline:
            warn_unmatched_skip(meta, cfg)
    wrap["_plan"] = plan
    return cfg, wrap, method


def precheck_command_line(argv: list[str]) -> None:
    """For `lm-eval-quant --model hf-quant --model_args ...`: run :func:`preflight` on the command
    line before lm-eval builds its task index (seconds), so a bad argument is said at once."""
    model = raw = device = None
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--model":
            model = nxt
        elif a.startswith("--model="):
            model = a.split("=", 1)[1]
        elif a == "--device":
            device = nxt
    if model != "hf-quant":
        return
    raw = argv_model_args(argv)
    if raw is None or raw.lstrip().startswith("{"):
        return
    kwargs = split_model_args(raw, where="hf-quant", typed=True)
    if device and "device" not in kwargs:
        kwargs["device"] = device
    pop_kl_args(kwargs)
    act_args, _ = pop_act_smooth_args(kwargs)
    cfg, _, _ = preflight(kwargs.pop("pretrained", None), kwargs, warn=False)
    parse_act_args(**act_args, method=cfg.method)


def _precheck_act_shapes(pretrained: str, cfg, act, trust_remote_code: bool, revision: str | None) -> None:
    """issue 12: the activation block must divide the linears' input widths (meta model, no weights)."""
    if act.group_size in (-1, 0):
        return
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code, revision=revision)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
    except Exception as e:  # pragma: no cover - checked after loading instead
        log.debug("activation shape pre-check skipped: %s", e)
        return
    check_act_shapes(quantizable_linears(meta, cfg.skip), act)


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
            if _running_cli() or "hf-quant" in sys.argv:
                # lm-eval's own parser keeps the last of two equal keys silently: look at the
                # command line it parsed (a JSON model_args is left to lm-eval)
                raw = argv_model_args(sys.argv)
                if raw and not raw.lstrip().startswith("{"):
                    split_model_args(raw, where="hf-quant")
            self._lmq_init(pretrained, **kwargs)
        except QuantArgError as e:
            if _running_cli():
                # the stock `lm_eval` CLI would print a long traceback: one line instead
                print(f"lm-eval-quant: error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            raise

    def _lmq_init(self, pretrained: Any = None, **kwargs: Any) -> None:
        kl_ref, kl_out, kl_topk = pop_kl_args(kwargs)
        # ---- issue 12: weight-activation quantization (act_bits, act_format, act_group_size) ----
        act_args, smooth = pop_act_smooth_args(kwargs)
        cfg, wrap, method = preflight(pretrained, kwargs)
        if kl_ref is not None and not cfg.is_baseline and kl_out is None:
            raise QuantArgError(
                "hf-quant: kl_ref=DIR on a quantized model also needs kl_out=DIR (where "
                "tokkl_<task>.npz goes: the folder of this run's results, for the report)")
        if smooth is not None:
            from ..methods.smoothquant import with_smoothing

            cfg, method = with_smoothing(cfg, method, smooth)
        self._lmq_act = parse_act_args(**act_args, method=cfg.method)
        if self._lmq_act is not None and wrap.get("save_quantized"):
            raise QuantArgError(
                "hf-quant: save_quantized writes a weight-only GPTQ checkpoint, which cannot hold the "
                "activation quantization (act_bits/act_format); drop one of them"
            )
        if self._lmq_act is not None and isinstance(pretrained, str):
            _precheck_act_shapes(pretrained, cfg, self._lmq_act, bool(kwargs.get("trust_remote_code", False)),
                                 kwargs.get("revision", "main"))
        self._lmq_act_linears = 0
        # ---- end issue 12 ----
        self._lmq_cfg = cfg
        self._lmq_method = method
        self._lmq_wrap = wrap
        self._lmq_report: QuantReport | None = None
        self._lmq_accounting: dict | None = None
        self._lmq_timing: dict = {}
        # issue 14: execution=fake|real|auto, kernel=...; memory probe from before the weights load
        from ..execution import MemoryProbe

        self._lmq_plan = wrap.pop("_plan")
        self._lmq_exec_info: dict = {}
        self._lmq_ll = {"tokens": 0, "seconds": 0.0, "requests": 0}
        self._lmq_probe = MemoryProbe(_probe_device(kwargs.get("device"))).start()
        if self._lmq_plan.real and self._lmq_plan.backend in ("gptq", "bnb") and (
                kwargs.get("parallelize") or kwargs.get("device_map") not in (None, "", "cpu")):
            raise QuantArgError("hf-quant: execution=real places the packed model on one device; drop "
                                "parallelize/device_map (or use execution=fake)")
        if not kwargs.get("device") and not torch.cuda.is_available():
            # lm_eval.simple_evaluate passes device=None, which HFLM turns into CUDA: on a machine
            # without it, the CPU (what the lm_eval CLI user gets with --device cpu)
            kwargs["device"] = "cpu"
        self._lmq_device_arg = kwargs.get("device", "cuda")
        super().__init__(pretrained=pretrained, **kwargs)
        if not isinstance(pretrained, str):  # a model object: quantize it here
            if not cfg.is_baseline:
                warn_unmatched_skip(self._model, cfg)
            self._lmq_apply(self._model, model_id=None)
        if kl_ref is not None:  # token-level KL on perplexity tasks (lm_eval_quant.tokkl)
            from .. import tokkl

            tokkl.install(self, kl_ref, kl_out, reference=cfg.is_baseline, k=kl_topk or tokkl.TOPK,
                          model_id=str(pretrained) if isinstance(pretrained, str) else "")

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
        if self._lmq_plan.real and self._lmq_plan.backend in ("gptq", "bnb") and kwargs.get("device_map") is None:
            # issue 14: load on the host; only packed layers go to the compute device (make_real)
            kwargs["device_map"] = "cpu"
        # what is loaded besides `pretrained` (part of the cache key)
        self._lmq_load = {k: kwargs.get(k) for k in ("subfolder", "peft", "delta", "gguf_file") if kwargs.get(k)}
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
        if cfg.is_baseline or method.quantizes_at_load:
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
            if method.quantizes_at_load:  # bnb: counted from its own quantization state
                self._lmq_accounting = method.accounting(model, cfg, report)
            else:
                self._lmq_accounting = method.accounting(
                    model, cfg, report, storage_dtype=checkpoint_dtype(model))
        self._lmq_install_act(model, report)  # issue 12
        save = self._lmq_wrap.get("save_quantized")
        if save:
            from ..export import save_quantized

            save_quantized(model, cfg, save, report=report, tokenizer=ctx.tokenizer, source=model_id)
        if self._lmq_plan.real and self._lmq_plan.backend in ("gptq", "bnb"):  # issue 14
            from ..execution import make_real

            t1 = time.perf_counter()
            self._lmq_exec_info = make_real(model, cfg, report, self._lmq_plan, device=ctx.device, progress=True)
            self._lmq_timing["pack_s"] = time.perf_counter() - t1

    def _lmq_quantize_cached(self, model, cfg, method, ctx, model_id, revision) -> QuantReport:
        """Quantize through the quantized-weights cache (cache=false turns it off)."""
        from .. import cache as cache_mod

        enabled = bool(self._lmq_wrap.get("cache", True))
        cache_dir = self._lmq_wrap.get("cache_dir")
        if not enabled:
            return method.quantize(model, cfg, ctx)
        load = getattr(self, "_lmq_load", {}) if model_id is not None else {}
        identity = cache_mod.model_identity(model_id, revision, model=model, cache_dir=cache_dir, **load)
        calib = cache_mod.calibration_identity(cfg, ctx.tokenizer)
        qcfg, forced = cache_mod.keep_state_config(cfg, method)  # codes for the entry and for export
        report, _hit = cache_mod.load_or_quantize(
            model, cfg, identity, lambda: method.quantize(model, qcfg, ctx),
            cache_dir=cache_dir, enabled=True, calib=calib, storage_dtype=checkpoint_dtype(model),
            drop_qstate=forced,
        )
        return report

    # -- issue 12: activation fake-quant ------------------------------------------------------
    def _lmq_install_act(self, model, report) -> None:
        act = getattr(self, "_lmq_act", None)
        if act is None:
            return
        cfg = self._lmq_cfg
        names = list(report.quantized) if not cfg.is_baseline else [n for n, _ in quantizable_linears(model, cfg.skip)]
        mods = dict(model.named_modules())
        check_act_shapes([(n, mods[n]) for n in names], act)
        install_act_quant(model, names, act)
        self._lmq_act_linears = len(names)

    def _lmq_act_info(self, acc: dict) -> None:
        act = getattr(self, "_lmq_act", None)
        acc["scheme"] = scheme_label(self._lmq_cfg, act)
        acc["activations"] = act_info(act, getattr(self, "_lmq_act_linears", 0))
        if act is not None and isinstance(acc.get("quant_config"), dict):
            # in the options too, so reports and caches of results tell W4A16 and W4A8 rows apart
            qc = dict(acc["quant_config"])
            qc["options"] = {**(qc.get("options") or {}), "act_bits": act.bits, "act_format": act.format,
                             "act_group_size": act.group_size}
            acc["quant_config"] = qc

    # -- reporting ----------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["quantization"] = self.quantization_info()
        return info

    # issue 14: loglikelihood throughput of the run (tokens scored per second)
    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            self._lmq_ll["seconds"] += time.perf_counter() - t0
            self._lmq_ll["requests"] += len(requests)
            self._lmq_ll["tokens"] += sum(len(r[1]) + len(r[2]) for r in requests)

    def execution_info(self) -> dict:
        """issue 14: execution, kernel, measured resident bytes, peak memory, loglikelihood tokens/s."""
        from ..execution import resident_bytes

        plan = self._lmq_plan
        out: dict = {"execution": plan.execution, "execution_requested": plan.requested, "kernel": plan.kernel}
        if plan.fallback:
            out["execution_fallback"] = plan.fallback
        out.update(self._lmq_exec_info)
        model = getattr(self, "_model", None)
        if model is not None:
            out["resident"] = resident_bytes(model)
        out.update(self._lmq_probe.peak())
        ll = self._lmq_ll
        out["loglikelihood_tokens"] = int(ll["tokens"])
        out["loglikelihood_seconds"] = round(ll["seconds"], 3)
        out["loglikelihood_tokens_per_s"] = round(ll["tokens"] / ll["seconds"], 2) if ll["seconds"] > 0 else None
        return out

    def quantization_info(self) -> dict:
        acc = dict(self._lmq_accounting or {})
        if getattr(self, "_lmq_plan", None) is not None:  # issue 14
            acc["execution"] = self.execution_info()
        if self._lmq_report is not None:
            acc["quantize_seconds"] = round(self._lmq_timing.get("quantize_s", 0.0), 3)
            extra = {k: v for k, v in self._lmq_report.extra.items() if k not in ("qstate", "extra_bits")}
            if extra:
                acc["method_report"] = json.loads(json.dumps(extra, default=str))
        acc.setdefault("lm_eval_quant_version", __version__)
        self._lmq_act_info(acc)  # issue 12
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

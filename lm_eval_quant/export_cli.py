"""`lm-eval-quant export`: load a model, quantize it (through the quantized-weights cache, so an
evaluation's entry with the same model_args is reused instead of re-running GPTQ/AWQ) and write a
GPTQ-format checkpoint with :func:`lm_eval_quant.export.save_quantized`.

    lm-eval-quant export --model_args pretrained=DIR,method=gptq,bits=4,group_size=128 --output OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .accounting import checkpoint_dtype
from .errors import QuantArgError
from .export import (EXPORT_KEYS, _PREFIX, _PROG, check_export_shapes, check_exportable, check_output,
                     save_quantized)


def main(argv: list[str] | None = None) -> int:
    """`lm-eval-quant export --model_args pretrained=…,method=…,bits=… --output DIR`."""
    ap = argparse.ArgumentParser(prog=_PROG, description="Quantize a model and write a GPTQ-format checkpoint.")
    ap.add_argument("--model_args", "--model-args", dest="model_args", required=True,
                    help="pretrained=…,method=rtn|gptq|awq,bits=2|3|4|8,group_size=…,sym=… (+ method options)")
    ap.add_argument("--output", "-o", required=True, help="output folder (created)")
    ap.add_argument("--checkpoint_format", "--checkpoint-format", default="auto", choices=("auto", "gptq", "gptq_v2"))
    ap.add_argument("--device", default=None, help="device for the model and the quantization (default cpu)")
    ap.add_argument("--no-cache", action="store_true", help="do not use the quantized-weights cache")
    ns = ap.parse_args(argv)
    try:
        from .args import resolve, split_model_args

        raw = split_model_args(ns.model_args, where=_PREFIX)
        if not str(raw.get("pretrained") or "").strip():
            raise QuantArgError(f"{_PREFIX}: --model_args needs pretrained=<model id or folder>")
        if "method" not in raw:
            raise QuantArgError(f"{_PREFIX}: --model_args needs method=rtn, gptq or awq")
        raw.pop("save_quantized", None)
        r = resolve(raw, where=_PREFIX, known_rest=EXPORT_KEYS, for_export=True)
        cfg, method, args = r.cfg, r.method, dict(r.rest)
        check_exportable(cfg)
        out = Path(ns.output)
        check_output(out)
        from .models.hf_quant import check_paths_and_dtype, _meta_model

        check_paths_and_dtype(args["pretrained"], args)
        _conf, meta = _meta_model(args["pretrained"], args)
        if meta is not None:  # the GPTQ layout fits every layer: said before the weights load
            check_export_shapes(meta, cfg)
            method.check_shapes(meta, cfg, ns.device or "cpu")
        model, tok, report = _quantize(args, cfg, method, ns, r.wrapper)
        save_quantized(model, cfg, out, report=report, tokenizer=tok, checkpoint_format=ns.checkpoint_format,
                       source=args.get("pretrained"), storage_dtype=checkpoint_dtype(model))
    except QuantArgError as e:
        print(f"lm-eval-quant: error: {e}", file=sys.stderr)
        return 2
    print(f"{_PROG}: wrote {cfg.method} {cfg.bits}-bit g{cfg.group_size} GPTQ checkpoint to {out}")
    return 0


def _quantize(args: dict, cfg, method, ns, wrapper):
    """Load the model (transformers), quantize it (through the cache), return (model, tok, report)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import cache as qcache
    from .methods.base import QuantContext

    pretrained = args.pop("pretrained")
    revision = args.pop("revision", None)
    from .args import parse_bool

    dtype_s = args.pop("dtype", args.pop("torch_dtype", "auto"))
    cache_on = wrapper.cache and not ns.no_cache
    cache_dir = wrapper.cache_dir
    trust = parse_bool("trust_remote_code", args.pop("trust_remote_code", False))
    for k in ("batch_size", "max_length", "device", "parallelize"):
        args.pop(k, None)
    dtype = dtype_s if dtype_s == "auto" else getattr(torch, str(dtype_s).replace("torch.", ""), None)
    if dtype is None:
        raise QuantArgError(f"{_PREFIX}: unknown dtype {dtype_s!r}")
    kw = dict(revision=revision, dtype=dtype, trust_remote_code=trust)
    tok = AutoTokenizer.from_pretrained(pretrained, revision=revision, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(pretrained, **kw)
    model.eval()
    device = ns.device or "cpu"
    model.to(device)
    ctx = QuantContext(tokenizer=tok, device=device, seed=0, progress=True, model_id=pretrained)
    ident = qcache.model_identity(pretrained, revision, model, cache_dir=cache_dir)
    # the key ignores keep_qstate, so an entry of an evaluation with the same model_args (and
    # dtype) is reused here: its packed codes are the method's integer state
    qcfg, forced = qcache.keep_state_config(cfg, method)
    report, _hit = qcache.load_or_quantize(
        model, cfg, ident, lambda: method.quantize(model, qcfg, ctx),
        cache_dir=cache_dir, enabled=cache_on, calib=qcache.calibration_identity(cfg, tok),
        storage_dtype=checkpoint_dtype(model), drop_qstate=forced)
    model.to("cpu")
    return model, tok, report


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

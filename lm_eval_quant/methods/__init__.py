"""Quantization methods, looked up by name. One file per algorithm behind `base.Method`.

    method = get_method("gptq")
    cfg = build_config(method="gptq", bits="3", group_size="128", damp="0.01")
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import QuantArgError
from ..formats.mx import canonical_block_format, check_block_args, is_block_kind  # issue 12
from ..formats.mx import format_bits as block_format_bits
from .base import (
    MAX_BITS,
    MIN_BITS,
    Method,
    QuantConfig,
    QuantContext,
    QuantReport,
    parse_bool,
    parse_int,
    parse_option,
    parse_skip,
    quantizable_linears,
)

# name -> "module:Class"; imported lazily so a method's optional dependencies cost nothing
# until it is used.
METHODS: dict[str, str] = {
    "none": "lm_eval_quant.methods.none:NoQuant",
    "rtn": "lm_eval_quant.methods.rtn:RTN",
    "gptq": "lm_eval_quant.methods.gptq:GPTQ",
    "awq": "lm_eval_quant.methods.awq:AWQ",
    "bnb": "lm_eval_quant.methods.bnb:BNB",
    "smoothquant": "lm_eval_quant.methods.smoothquant:SmoothQuant",  # issue 12
    "hqq": "lm_eval_quant.methods.hqq:HQQ",  # issue 12
}

_INSTANCES: dict[str, Method] = {}


def available_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    key = str(name).strip().lower()
    if key not in METHODS:
        raise QuantArgError(
            f"hf-quant: unknown method {name!r}; choose one of {', '.join(METHODS)}"
        )
    if key not in _INSTANCES:
        mod_name, cls_name = METHODS[key].split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise QuantArgError(f"hf-quant: method {key} is unavailable: {e}") from None
        _INSTANCES[key] = getattr(mod, cls_name)()
    return _INSTANCES[key]


def all_option_names() -> dict[str, str]:
    """option name -> the method that declares it (for 'damp is a gptq option' errors)."""
    owners: dict[str, str] = {}
    for name in METHODS:
        try:
            m = get_method(name)
        except QuantArgError:
            continue
        for opt in m.OPTIONS:
            owners.setdefault(opt, name)
    return owners


CORE_KEYS = ("method", "bits", "group_size", "format", "sym", "skip")


def _block_name(format: Any, bits: int | None) -> str:
    """Canonical block-format name, or the one-line error (issue 12)."""
    try:
        return canonical_block_format(str(format), bits)
    except ValueError as e:
        raise QuantArgError(f"hf-quant: {e}") from None


def build_config(
    method: Any = None,
    bits: Any = None,
    group_size: Any = None,
    format: Any = None,
    sym: Any = None,
    skip: Any = None,
    **options: Any,
) -> QuantConfig:
    """Parse and validate user arguments (strings from model_args, or typed values) into a
    QuantConfig. Every problem is a QuantArgError with one line, raised before any model work.

    Defaults: method rtn, bits 4, group_size 128, format int (the method's default), asymmetric.
    `method=none` or `bits=16` is the full-precision baseline through the same code path.
    """
    mname = "rtn" if method is None else str(method).strip().lower()
    m = get_method(mname)
    # issue 12: fp8 / MX / NVFP4 block formats fix their element width and block length
    block_fmt = format is not None and mname not in ("none", "bnb") and is_block_kind(str(format))
    if bits is None:
        nbits = 16 if mname == "none" else (block_format_bits(_block_name(format, None)) if block_fmt else 4)
    else:
        nbits = parse_int("bits", bits)
    if mname == "none" and nbits != 16:
        raise QuantArgError(
            f"hf-quant: method=none keeps full precision, so bits={nbits} makes no sense; "
            f"choose a method (rtn, gptq, awq, bnb) or drop bits"
        )
    if nbits != 16 and not MIN_BITS <= nbits <= MAX_BITS:
        raise QuantArgError(
            f"hf-quant: bits must be an integer from {MIN_BITS} to {MAX_BITS} (or 16 for full "
            f"precision), got bits={bits}"
        )
    gs = 128 if group_size is None else parse_int("group_size", group_size)
    if block_fmt and nbits != 16:  # issue 12: the block is the format's (MX 32, NVFP4 16, fp8 any)
        gs = check_block_args(
            _block_name(format, nbits), None if group_size is None else gs, sym is not None, mname
        )
    if gs != -1 and gs <= 0:
        raise QuantArgError(
            f"hf-quant: group_size must be -1 (per output channel) or a positive integer, got {group_size}"
        )
    fmt = m.default_format if format is None else str(format).strip().lower()
    sy = False if sym is None else parse_bool("sym", sym)
    sk = parse_skip(skip)

    opts: dict[str, Any] = {}
    owners = None
    for k, v in options.items():
        if k in m.OPTIONS:
            opts[k] = parse_option(mname, k, m.OPTIONS[k][0], v)
        else:
            owners = owners or all_option_names()
            if k in owners:
                raise QuantArgError(
                    f"hf-quant: {k} is an option of method={owners[k]}, not of method={mname}"
                )
            raise QuantArgError(f"hf-quant: unknown argument {k}={v!r} for method={mname}")
    for k, (_, default) in m.OPTIONS.items():
        opts.setdefault(k, default)

    if nbits == 16 or mname == "none":
        return QuantConfig(method="none", bits=16, group_size=gs, format="none", sym=False, skip=sk)
    if block_fmt:
        sy = True  # issue 12: block formats are symmetric (sign-magnitude) by construction
    cfg = QuantConfig(method=mname, bits=nbits, group_size=gs, format=fmt, sym=sy, skip=sk, options=opts)
    cfg.format = m.check_format(cfg)
    m.validate(cfg)
    return cfg


__all__ = [
    "METHODS",
    "Method",
    "QuantConfig",
    "QuantContext",
    "QuantReport",
    "available_methods",
    "build_config",
    "get_method",
    "quantizable_linears",
    "CORE_KEYS",
]

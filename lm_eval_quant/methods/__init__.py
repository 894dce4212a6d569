"""Quantization methods, looked up by name. One file per algorithm behind `base.Method`.

    method = get_method("gptq")
    cfg = build_config(method="gptq", bits="3", group_size="128", damp="0.01")
"""

from __future__ import annotations

import importlib

from ..errors import QuantArgError
from .base import Method, QuantConfig, QuantContext, QuantReport, quantizable_linears

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


# the argument layer owns the vocabulary and the parser; re-exported here for old callers
from ..args import CORE_KEYS, build_config  # noqa: E402


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

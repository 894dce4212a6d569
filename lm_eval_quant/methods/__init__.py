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
# name -> Method subclass (or instance), added in-process (register_method) or by a third-party
# package's ``lm_eval_quant.methods`` entry point (docs/EXTENDING.md)
_REGISTERED: dict[str, object] = {}


def _check_method(obj) -> str | None:
    ok = isinstance(obj, Method) or (isinstance(obj, type) and issubclass(obj, Method))
    return None if ok else "its entry point is not a lm_eval_quant.methods.base.Method subclass"


def method_plugins() -> dict[str, object]:
    """Every added method: the registered ones and the entry points (read once, lazily)."""
    from .._plugins import METHODS_GROUP, load_group

    return {**load_group(METHODS_GROUP, taken=METHODS, check=_check_method), **_REGISTERED}


def register_method(name: str, method: type[Method] | Method) -> None:
    """Add a method in-process (a Method subclass or instance) under ``name``."""
    key = str(name).strip().lower()
    if key in METHODS or not key:
        raise ValueError(f"method name {key!r} is built in or empty")
    if _check_method(method):
        raise ValueError(f"method {key}: {_check_method(method)}")
    _REGISTERED[key] = method
    _INSTANCES.pop(key, None)


def available_methods() -> list[str]:
    return list(METHODS) + [n for n in method_plugins() if n not in METHODS]


def get_method(name: str) -> Method:
    key = str(name).strip().lower()
    if key in _INSTANCES:
        return _INSTANCES[key]
    if key in METHODS:
        mod_name, cls_name = METHODS[key].split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise QuantArgError(f"hf-quant: method {key} is unavailable: {e}") from None
        _INSTANCES[key] = getattr(mod, cls_name)()
        return _INSTANCES[key]
    added = method_plugins().get(key)
    if added is None:
        raise QuantArgError(
            f"hf-quant: unknown method {name!r}; choose one of {', '.join(available_methods())}"
        )
    try:
        _INSTANCES[key] = added if isinstance(added, Method) else added()
    except Exception as e:  # noqa: BLE001  (third-party code: one line)
        raise QuantArgError(f"hf-quant: method {key} (a plug-in) could not be created: {type(e).__name__}: {e}") from None
    return _INSTANCES[key]


def all_option_names() -> dict[str, str]:
    """option name -> the method that declares it (for 'damp is a gptq option' errors)."""
    owners: dict[str, str] = {}
    for name in available_methods():
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
    "method_plugins",
    "register_method",
    "quantizable_linears",
    "CORE_KEYS",
]

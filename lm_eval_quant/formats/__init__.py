"""Number formats: pure tensor functions that build k-bit code grids and quantize blocks.

    fmt = make_format("int", bits=4, sym=False)      # GPTQ's default: asymmetric int
    fmt = make_format("fp", bits=4)                    # e2m1 by default; "fp:e3m2" explicit
    fmt = make_format("nf", bits=4)                    # bitsandbytes' NF4 values at 4 bits
    fmt = make_format("dynamic", bits=4)               # dynamic exponent (2212.09720)
    res = quantize_weight(W, fmt, group_size=128)      # res.w_hat, res.codes, res.scale, res.zero
    fake_quantize_(W, fmt, group_size=128)             # same w_hat, in place, no codes (RTN)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from .base import (Format, QParams, QuantizedWeight, block_length, fake_quantize_, from_blocks, n_groups,
                   quantize_weight, to_blocks)
from .grids import FP_DEFAULT_SPLIT, dynamic_grid, fp_grid, nf_grid, parse_fp_spec
from .mx import BLOCK_KINDS, canonical_block_format, is_block_kind, make_block_format  # issue 12

FORMAT_KINDS = ("int", "fp", "nf", "dynamic")
MIN_BITS = {"int": 2, "fp": 3, "nf": 2, "dynamic": 2}
MAX_BITS = 8

# kind -> factory(bits, sym) -> Format, added in-process (register_format) or by a third-party
# package's ``lm_eval_quant.formats`` entry point (docs/EXTENDING.md). A factory may carry
# ``min_bits`` / ``max_bits`` attributes (default 2 and 8).
_REGISTERED: dict[str, Callable[[int, bool], Format]] = {}


def _check_factory(obj) -> str | None:
    return None if callable(obj) else "its entry point is not a callable factory(bits, sym) -> Format"


def format_plugins() -> dict[str, Callable[[int, bool], Format]]:
    """Every added format kind: the registered ones and the entry points (read once, lazily)."""
    from .._plugins import FORMATS_GROUP, load_group

    taken = set(FORMAT_KINDS) | set(BLOCK_KINDS)
    return {**load_group(FORMATS_GROUP, taken=taken, check=_check_factory), **_REGISTERED}


def register_format(kind: str, factory: Callable[[int, bool], Format]) -> None:
    """Add a format kind in-process: ``factory(bits, sym)`` returns a :class:`Format`."""
    kind = str(kind).strip().lower()
    if kind in FORMAT_KINDS or is_block_kind(kind) or ":" in kind or not kind:
        raise ValueError(f"format kind {kind!r} is built in or not a plain name")
    if not callable(factory):
        raise ValueError(f"format {kind}: the factory must be callable as factory(bits, sym)")
    _REGISTERED[kind] = factory
    make_format.cache_clear()


def _canonical_plugin(kind: str, detail: str, bits: int, factory) -> str:
    lo, hi = getattr(factory, "min_bits", 2), getattr(factory, "max_bits", MAX_BITS)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an integer, got {bits!r}")
    if not lo <= bits <= hi:
        raise ValueError(f"format {kind} supports {lo}-{hi} bits, got bits={bits}")
    if detail:
        raise ValueError(f"format {kind} takes no ':' parameter, got {kind}:{detail!r}")
    return kind


def canonical_format(spec: str, bits: int) -> str:
    """Validate a format spec for a width and return its canonical name (e.g. 'fp' → 'fp:e2m1').

    Raises ValueError with a one-line reason.
    """
    spec = str(spec).strip().lower()
    if is_block_kind(spec):  # issue 12: fp8 / MX / NVFP4 scaled block formats (formats/mx.py)
        return canonical_block_format(spec, bits)
    kind, _, detail = spec.partition(":")
    if kind not in FORMAT_KINDS:
        plugins = format_plugins()
        if kind in plugins:
            return _canonical_plugin(kind, detail, bits, plugins[kind])
        raise ValueError(
            f"unknown format {spec!r}; choose one of int, fp, fp:eXmY, nf, dynamic, "
            f"{', '.join(list(BLOCK_KINDS) + sorted(plugins))}"
        )
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an integer, got {bits!r}")
    if not MIN_BITS[kind] <= bits <= MAX_BITS:
        raise ValueError(f"format {kind} supports {MIN_BITS[kind]}-{MAX_BITS} bits, got bits={bits}")
    if kind == "fp":
        if detail:
            try:
                e, m = parse_fp_spec(detail)
            except ValueError:
                raise ValueError(f"bad fp format {spec!r}; write fp:eXmY, e.g. fp:e3m2") from None
            if e < 1 or 1 + e + m != bits:
                raise ValueError(
                    f"format {spec} has 1+{e}+{m}={1 + e + m} bits (sign+exponent+mantissa) "
                    f"but bits={bits}"
                )
        else:
            e, m = FP_DEFAULT_SPLIT[bits]
        return f"fp:e{e}m{m}"
    if detail:
        raise ValueError(f"format {kind} takes no ':' parameter, got {spec!r}")
    return kind


@lru_cache(maxsize=None)
def make_format(spec: str = "int", bits: int = 4, sym: bool = False) -> Format:
    """Build a Format. `sym` applies to int; fp, nf and dynamic are symmetric by construction."""
    name = canonical_format(spec, bits)
    if is_block_kind(name):  # issue 12
        return make_block_format(name, bits)
    if name == "int":
        return Format("int", bits, sym)
    if name == "nf":
        return Format("nf", bits, True, nf_grid(bits))
    if name == "dynamic":
        return Format("dynamic", bits, True, dynamic_grid(bits))
    if name not in FORMAT_KINDS and ":" not in name:  # an added kind (register_format / entry point)
        fmt = format_plugins()[name](bits, sym)
        if not isinstance(fmt, Format):
            raise ValueError(f"format {name}: its factory returned {type(fmt).__name__}, not a Format")
        return fmt
    e, m = parse_fp_spec(name.split(":", 1)[1])
    return Format(name, bits, True, fp_grid(e, m))


__all__ = [
    "Format",
    "QParams",
    "QuantizedWeight",
    "make_format",
    "canonical_format",
    "quantize_weight",
    "block_length",
    "from_blocks",
    "n_groups",
    "to_blocks",
    "nf_grid",
    "fp_grid",
    "dynamic_grid",
    "FORMAT_KINDS",
    "format_plugins",
    "register_format",
]

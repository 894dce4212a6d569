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

from .base import (Format, QParams, QuantizedWeight, block_length, fake_quantize_, from_blocks, n_groups,
                   quantize_weight, to_blocks)
from .grids import FP_DEFAULT_SPLIT, dynamic_grid, fp_grid, nf_grid, parse_fp_spec
from .mx import BLOCK_KINDS, canonical_block_format, is_block_kind, make_block_format  # issue 12

FORMAT_KINDS = ("int", "fp", "nf", "dynamic")
MIN_BITS = {"int": 2, "fp": 3, "nf": 2, "dynamic": 2}
MAX_BITS = 8


def canonical_format(spec: str, bits: int) -> str:
    """Validate a format spec for a width and return its canonical name (e.g. 'fp' → 'fp:e2m1').

    Raises ValueError with a one-line reason.
    """
    spec = str(spec).strip().lower()
    if is_block_kind(spec):  # issue 12: fp8 / MX / NVFP4 scaled block formats (formats/mx.py)
        return canonical_block_format(spec, bits)
    kind, _, detail = spec.partition(":")
    if kind not in FORMAT_KINDS:
        raise ValueError(
            f"unknown format {spec!r}; choose one of int, fp, fp:eXmY, nf, dynamic, {', '.join(BLOCK_KINDS)}"
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
]

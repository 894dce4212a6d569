"""Scaled low-precision block formats: FP8, OCP Microscaling (MX) v1.0 and NVFP4.

Pure, vectorised tensor functions (no Python loop over rows or blocks), shared by weight
quantization (`make_format("mxfp4", 4)` behaves like every other `Format`) and activation
fake-quantization (`formats.act`).

Element types (sign + e exponent bits + m mantissa bits, bias 2^(e−1)−1, subnormals; OCP names):

    name   max normal  emax  smallest subnormal   notes
    e4m3   448         8     2^-9                 OCP FP8 E4M3 (S.1111.111 is NaN: no 480)
    e5m2   57344       15    2^-16                OCP FP8 E5M2 (inf/NaN codes never produced)
    e3m2   28          4     2^-4 = 0.0625        OCP FP6 E3M2
    e2m3   7.5         2     2^-3 = 0.125         OCP FP6 E2M3
    e2m1   6           2     0.5                  OCP FP4 E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6}
    int8   127/64      0     1/64                 MXINT8: two's complement, implicit 2^-6;
                                                  symmetric range ±127/64 (−2 = −128/64 unused)

Rounding: round to nearest, ties to even (on the element's own grid, subnormals included), then
saturate to ±max normal (the spec's saturating conversion; inf also saturates).

Scaled formats (the scale is per block along the LAST dim of the input):
- ``fp8`` (``fp8:e4m3`` / ``fp8:e5m2``): fp32 scale = absmax / max_normal per block (group_size −1 =
  per output channel, any divisor = per group); 8 + 32/block bits per weight.
- ``mxfp8`` (e4m3 | e5m2), ``mxfp6`` (e2m3 | e3m2), ``mxfp4`` (e2m1), ``mxint8``: blocks of 32, one
  shared E8M0 scale X = 2^(floor(log2 absmax) − emax_elem), exponent clamped to [−127, 127]
  (OCP MX v1.0 §6.3, the same "floor" rule torchao's ``to_mx`` uses); element = round(v / X).
  Bits per weight = element bits + 8/32 (MXFP4: 4.25, MXFP6: 6.25, MXFP8/MXINT8: 8.25).
- ``nvfp4``: e2m1 elements in blocks of 16; one fp32 tensor scale t = absmax(tensor) / (6·448);
  per block an E4M3 scale s = e4m3(absmax(block) / 6 / t), clamped to [2^-6, 448] (normal E4M3
  only, as torchao's ``nvfp4_quantize``: a block whose absmax is below 6·2^-6·t, about
  3.5e-5 of the tensor absmax, gets the scale 2^-6·t); element = e2m1(v / (s·t)); 4 + 8/16 = 4.5 bits per weight, plus 32 bits
  per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .base import Format, QParams


@dataclass(frozen=True)
class Elem:
    """A scalar element type: sign + `ebits` exponent + `mbits` mantissa (or int8 fixed point)."""

    name: str
    ebits: int
    mbits: int
    max: float  # largest finite magnitude produced (saturation bound)
    emax: int  # exponent of the largest normal (floor(log2(max)))
    bits: int

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (1 − bias); subnormals share its quantum."""
        return 1 - self.bias

    @property
    def is_int(self) -> bool:
        return self.ebits == 0


ELEMS = {
    "e4m3": Elem("e4m3", 4, 3, 448.0, 8, 8),
    "e5m2": Elem("e5m2", 5, 2, 57344.0, 15, 8),
    "e3m2": Elem("e3m2", 3, 2, 28.0, 4, 6),
    "e2m3": Elem("e2m3", 2, 3, 7.5, 2, 6),
    "e2m1": Elem("e2m1", 2, 1, 6.0, 2, 4),
    # MXINT8: 8-bit two's complement with an implicit 2^-6 (1 sign, 7 fraction bits after the
    # binary point of a 1.6 fixed point number); emax 0; symmetric saturation at 127/64.
    "int8": Elem("int8", 0, 6, 127.0 / 64.0, 0, 8),
}


def round_elem_reference(x: torch.Tensor, elem: Elem) -> torch.Tensor:
    """Round float32 `x` to the nearest value of `elem` (ties to even), saturating at ±elem.max —
    the plain arithmetic definition (kept as the reference :func:`round_elem` is tested against).

    For a float element: the quantum of |x| is 2^(max(floor(log2|x|), emin) − mbits) (subnormals
    share the smallest normal binade's quantum), |x| / quantum is exact (a power of two), and
    ``torch.round`` rounds half to even. A carry into the next binade (1.96875 → 2 in e2m3) is
    exact too. int8: round(x·64)/64.
    """
    x = x.float()
    a = x.abs()
    if elem.is_int:
        q = torch.round(a * 2.0**elem.mbits) / 2.0**elem.mbits
    else:
        _, e = torch.frexp(a)  # a = f·2^e, f in [0.5, 1): floor(log2 a) = e − 1 (exact)
        quantum = torch.ldexp(torch.ones_like(a), (e - 1).clamp(min=elem.emin) - elem.mbits)
        q = torch.round(a / quantum) * quantum
    q = q.clamp(max=elem.max)  # saturate (also maps inf to max)
    return torch.copysign(q, x)


def round_elem(x: torch.Tensor, elem: Elem) -> torch.Tensor:
    """Round float32 `x` to the nearest value of `elem` (ties to even), saturating at ±elem.max.

    Same result as :func:`round_elem_reference` (tested on every tie of every grid), in a few cheap
    vectorised passes: the quantum 2^(max(floor(log2|x|), emin) − mbits) is built directly as a
    float32 bit pattern (the exponent field of max(|x|, 2^emin), lowered by mbits, mantissa zero),
    then ``round(x / quantum) · quantum`` (exact divisions by powers of two; ``round`` is RNE; a
    carry into the next binade is exact) and one clamp. No frexp/ldexp, no ``where``, no scalar
    fp8 casts (torch's CPU float8 conversion is several times slower).
    """
    x = x.float()
    if elem.is_int:
        k = 2.0**elem.mbits
        return torch.round(x * k).div_(k).clamp_(-elem.max, elem.max)
    a = x.abs().clamp_(min=2.0**elem.emin)
    q = (a.view(torch.int32).bitwise_and_(0x7F800000).sub_(elem.mbits << 23)).view(torch.float32)
    return torch.round(x / q).mul_(q).clamp_(-elem.max, elem.max)


@lru_cache(maxsize=None)
def elem_values(name: str) -> torch.Tensor:
    """Value of every code 0 .. 2^bits − 1 (sign bit on top; e4m3's NaN codes are NaN)."""
    el = ELEMS[name]
    n = 2**el.bits
    half = n // 2
    vals = []
    for c in range(n):
        if el.is_int:  # two's complement
            v = (c - n if c >= half else c) / 2.0**el.mbits
            vals.append(float(v))
            continue
        sign = -1.0 if c >= half else 1.0
        mag = c % half
        e, m = divmod(mag, 2**el.mbits)
        if e == 0:
            v = m / 2**el.mbits * 2.0**el.emin
        else:
            v = (1 + m / 2**el.mbits) * 2.0 ** (e - el.bias)
        if v > el.max:  # e4m3 S.1111.111: NaN; e5m2 exponent 31: inf/NaN
            v = float("nan")
        vals.append(sign * v)
    return torch.tensor(vals, dtype=torch.float32)


def encode_elem(q: torch.Tensor, elem: Elem) -> torch.Tensor:
    """Bit pattern (uint8) of values already on the element grid (the output of round_elem)."""
    q = q.float()
    if elem.is_int:
        k = torch.round(q * 2.0**elem.mbits).to(torch.int16)
        return (k & 0xFF).to(torch.uint8)
    a = q.abs()
    _, e = torch.frexp(a)
    e = e - 1
    sub = a < 2.0**elem.emin
    man = torch.where(
        sub,
        a / 2.0 ** (elem.emin - elem.mbits),
        (torch.ldexp(a, -e) - 1.0) * 2.0**elem.mbits + ((e + elem.bias) * 2**elem.mbits).float(),
    )
    code = torch.round(man).to(torch.int16)
    sign = torch.signbit(q).to(torch.int16) << (elem.bits - 1)
    return (code | sign).to(torch.uint8)


# --------------------------------------------------------------------------------- scales
def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) for a > 0, exact (int32)."""
    _, e = torch.frexp(a)
    return e - 1


def e8m0_scale(absmax: torch.Tensor, elem: Elem) -> torch.Tensor:
    """OCP MX shared scale 2^(floor(log2 absmax) − emax_elem), exponent clamped to the E8M0 range
    [−127, 127]; an all-zero block gets 2^−127 (its elements are 0 whatever the scale)."""
    a = absmax.float()
    e = torch.where(a > 0, _floor_log2(a) - elem.emax, torch.full_like(a, -127, dtype=torch.int32))
    e = e.clamp(-127, 127)
    return torch.ldexp(torch.ones_like(a), e)


E4M3 = ELEMS["e4m3"]
E4M3_MIN_NORMAL = 2.0**-6  # block scales are kept normal (as torchao; see nvfp4_block_scale)
NVFP4_TENSOR_DIVISOR = 6.0 * 448.0


def nvfp4_tensor_scale(absmax_tensor: torch.Tensor) -> torch.Tensor:
    """fp32 per-tensor scale t = absmax / (6 · 448), so that every block scale fits E4M3 (1 for a
    zero tensor)."""
    t = absmax_tensor.float() / NVFP4_TENSOR_DIVISOR
    return torch.where(t > 0, t, torch.ones_like(t))


def nvfp4_block_scale(absmax_block: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 block scale (as float32, a value of the e4m3 grid): e4m3(absmax / 6 / t), clamped
    to the normal E4M3 range [2^-6, 448]."""
    s = (absmax_block.float() / 6.0) / tensor_scale
    return round_elem(s.clamp(E4M3_MIN_NORMAL, E4M3.max), E4M3)


# --------------------------------------------------------------------------------- formats
# name -> (element, block size (None = any group size), bits of per-block statistic, per-tensor bits)
_SPECS = {
    "fp8:e4m3": ("e4m3", None, 32, 0),
    "fp8:e5m2": ("e5m2", None, 32, 0),
    "mxfp8:e4m3": ("e4m3", 32, 8, 0),
    "mxfp8:e5m2": ("e5m2", 32, 8, 0),
    "mxfp6:e2m3": ("e2m3", 32, 8, 0),
    "mxfp6:e3m2": ("e3m2", 32, 8, 0),
    "mxfp4": ("e2m1", 32, 8, 0),
    "mxint8": ("int8", 32, 8, 0),
    "nvfp4": ("e2m1", 16, 8, 32),
}
# kind -> default element (the canonical name carries it)
_DEFAULT_ELEM = {"fp8": "e4m3", "mxfp8": "e4m3", "mxfp6": "e2m3"}
BLOCK_KINDS = ("fp8", "mxfp8", "mxfp6", "mxfp4", "mxint8", "nvfp4")


def is_block_kind(spec: str) -> bool:
    return str(spec).strip().lower().partition(":")[0] in BLOCK_KINDS


def canonical_block_format(spec: str, bits: int | None = None) -> str:
    """'mxfp8' → 'mxfp8:e4m3', 'mxfp6' → 'mxfp6:e2m3', 'fp8' → 'fp8:e4m3'. Checks `bits` against the
    element width (None = not given). Raises ValueError with one line."""
    s = str(spec).strip().lower()
    kind, _, detail = s.partition(":")
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block format {spec!r}; choose one of {', '.join(BLOCK_KINDS)}")
    if kind in _DEFAULT_ELEM:
        name = f"{kind}:{detail or _DEFAULT_ELEM[kind]}"
    elif detail:
        raise ValueError(f"format {kind} takes no ':' parameter, got {spec!r}")
    else:
        name = kind
    if name not in _SPECS:
        ok = sorted(n for n in _SPECS if n.startswith(kind + ":"))
        raise ValueError(f"format {spec!r} is not defined; choose one of {', '.join(ok)}")
    el = ELEMS[_SPECS[name][0]]
    if bits is not None and bits != el.bits:
        raise ValueError(f"format {name} has {el.bits}-bit elements, but bits={bits}; use bits={el.bits} or drop bits")
    return name


def format_bits(spec: str) -> int:
    """Element width implied by a block format name."""
    return ELEMS[_SPECS[canonical_block_format(spec)][0]].bits


def fixed_block(spec: str) -> int | None:
    """The block length a format fixes (32 for MX, 16 for NVFP4), or None (fp8: any)."""
    return _SPECS[canonical_block_format(spec)][1]


class BlockFormat(Format):
    """A scaled element format behind the `Format` interface (fit / quantize / dequantize / fake).

    `fit` reduces over the last dim (one block). For NVFP4 the per-tensor fp32 scale comes from the
    absmax over the last three dims of the input ([out, n_blocks, 16] for a whole matrix, or
    [..., out, n_blocks, 16] for a stack of candidate matrices) — i.e. one scale per matrix.
    """

    def __init__(self, name: str):
        elem_name, block, stat_bits, tensor_bits = _SPECS[name]
        self.elem = ELEMS[elem_name]
        super().__init__(name, self.elem.bits, True, None)
        self.kind = "block"
        self.block = block
        self._stat_bits = stat_bits
        self.tensor_stat_bits = tensor_bits
        self.family = name.partition(":")[0]

    @property
    def stat_bits(self) -> int:  # bits per block statistic
        return self._stat_bits

    def __repr__(self) -> str:
        return f"BlockFormat({self.name}, {self.bits}-bit elements, block {self.block or 'any'})"

    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> QParams:
        w = w.float()
        absmax = w.abs().amax(dim=-1, keepdim=True) * clip
        if self.family == "fp8":
            s = absmax / self.elem.max
            return QParams(torch.where(s > 0, s, torch.ones_like(s)))
        if self.family == "nvfp4":
            dims = tuple(range(max(0, w.dim() - 3), w.dim()))
            t = nvfp4_tensor_scale(absmax.amax(dim=dims, keepdim=True))
            return QParams(nvfp4_block_scale(absmax, t) * t, None)
        return QParams(e8m0_scale(absmax, self.elem))

    def quantize(self, w: torch.Tensor, qp: QParams) -> torch.Tensor:
        return encode_elem(round_elem(w.float() / qp.scale, self.elem), self.elem)

    def dequantize(self, codes: torch.Tensor, qp: QParams) -> torch.Tensor:
        return elem_values(self.elem.name).to(codes.device)[codes.long()] * qp.scale

    def fake(self, w: torch.Tensor, qp: QParams) -> torch.Tensor:
        return round_elem(w.float() / qp.scale, self.elem) * qp.scale

    def bits_per_weight(self, block: int) -> float:
        return self.bits + self.stat_bits / block


@lru_cache(maxsize=None)
def make_block_format(spec: str, bits: int | None = None) -> BlockFormat:
    return BlockFormat(canonical_block_format(spec, bits))


def check_block_args(fmt_name: str, group_size: int | None, sym_given: bool, method: str) -> int:
    """Validate a block format's group size / sym / method; returns the group size to use.

    group_size None = not given (the format's block, or per channel for fp8). One-line QuantArgError.
    """
    from ..errors import QuantArgError

    blk = fixed_block(fmt_name)
    if sym_given:
        raise QuantArgError(
            f"hf-quant: format={fmt_name} fixes its own encoding (sign-magnitude elements, one "
            f"{'E8M0' if blk == 32 else 'E4M3' if blk == 16 else 'fp32'} scale, no zero point); drop sym"
        )
    if blk is not None and group_size is not None and group_size != blk:
        what = "one E8M0 scale per 32 weights (OCP MX v1.0)" if blk == 32 else \
            "one E4M3 scale per 16 weights + an fp32 tensor scale"
        raise QuantArgError(
            f"hf-quant: format={fmt_name} fixes its block: {what}, so group_size={group_size} would "
            f"misstate the format and its bits; use group_size={blk} or drop group_size"
        )
    if fmt_name == "nvfp4" and method == "gptq":
        raise QuantArgError(
            "hf-quant: format=nvfp4 needs one fp32 scale per whole weight matrix, which gptq's "
            "column-by-column fit cannot see; use method=rtn or awq with nvfp4, or mxfp4 with gptq"
        )
    if blk is not None:
        return blk
    return -1 if group_size is None else group_size


__all__ = [
    "Elem",
    "ELEMS",
    "round_elem",
    "round_elem_reference",
    "elem_values",
    "encode_elem",
    "e8m0_scale",
    "nvfp4_tensor_scale",
    "nvfp4_block_scale",
    "BlockFormat",
    "BLOCK_KINDS",
    "is_block_kind",
    "canonical_block_format",
    "make_block_format",
    "format_bits",
    "fixed_block",
    "check_block_args",
]

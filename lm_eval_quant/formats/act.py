"""Activation fake-quantization: dynamic, computed on each forward from the activation itself.

    spec = ActSpec(bits=8, format="int", group_size=-1)     # W?A8: symmetric int8 per token
    x_hat = fake_quant_act(x, spec)                          # same shape and dtype as x

Formats (the scale is never stored, so it stays fp32; only the elements are rounded):
- ``int`` (bits 4/6/8): symmetric, levels −(2^(k−1)−1) … 2^(k−1)−1, scale = max|x| / (2^(k−1)−1)
  per token (``group_size`` −1, SmoothQuant's per-token dynamic quantizer), per block of
  ``group_size`` hidden channels, or per tensor (``group_size`` 0); ``round`` ties to even.
- ``fp8`` / ``fp8:e5m2``: scale = max|x| / max_normal per token (or block / tensor), OCP FP8
  rounding with saturation.
- ``mxfp8`` (e4m3|e5m2), ``mxfp6`` (e2m3|e3m2), ``mxfp4``, ``mxint8``: OCP MX blocks of 32 along the
  hidden dim with an E8M0 scale each; ``nvfp4``: blocks of 16 with an E4M3 scale and one fp32
  scale for the whole activation tensor of that call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mx import ELEMS, canonical_block_format, make_block_format, round_elem

ACT_FORMATS = ("int", "fp8", "mxfp8", "mxfp6", "mxfp4", "mxint8", "nvfp4")
ACT_INT_BITS = (4, 6, 8)


@dataclass(frozen=True)
class ActSpec:
    bits: int
    format: str = "int"  # canonical: int | fp8:e4m3 | fp8:e5m2 | mxfp8:e4m3 | ... | nvfp4
    group_size: int = -1  # −1 per token, 0 per tensor, > 0 blocks along the hidden dim

    @property
    def family(self) -> str:
        return self.format.partition(":")[0]


def canonical_act_format(fmt: str, bits: int | None) -> tuple[str, int]:
    """(canonical format, bits) or ValueError with one line."""
    f = str(fmt).strip().lower()
    kind = f.partition(":")[0]
    if kind not in ACT_FORMATS:
        raise ValueError(f"act_format={fmt} is not one of {', '.join(ACT_FORMATS)}")
    if kind == "int":
        if f != "int":
            raise ValueError(f"act_format=int takes no ':' parameter, got {fmt}")
        if bits is None or bits not in ACT_INT_BITS:
            raise ValueError(
                f"act_bits={bits} is not supported for int activations; use act_bits=4, 6 or 8"
            )
        return "int", bits
    name = canonical_block_format(f, None)
    ebits = make_block_format(name).bits
    if bits is not None and bits != ebits:
        raise ValueError(f"act_format={name} has {ebits}-bit elements, but act_bits={bits}; use act_bits={ebits} or drop it")
    return name, ebits


def _blocks(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View of float32 x as [..., n_blocks, g] (g = hidden for per token, all for per tensor)."""
    h = x.shape[-1]
    if group_size == 0:
        return x.reshape(1, -1)
    g = h if group_size == -1 else group_size
    return x.reshape(*x.shape[:-1], h // g, g)


def fake_quant_act(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """Fake-quantize an activation tensor along its last (hidden) dim; returns x's dtype."""
    xf = x.float()
    if spec.format == "int":
        b = _blocks(xf, spec.group_size)
        qmax = 2 ** (spec.bits - 1) - 1
        s = b.abs().amax(dim=-1, keepdim=True) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        out = torch.round(b / s).clamp_(-qmax, qmax).mul_(s)
    elif spec.family == "fp8":
        b = _blocks(xf, spec.group_size)
        el = ELEMS[spec.format.partition(":")[2]]
        s = b.abs().amax(dim=-1, keepdim=True) / el.max
        s = torch.where(s > 0, s, torch.ones_like(s))
        out = round_elem(b / s, el).mul_(s)
    else:
        fmt = make_block_format(spec.format)
        h = xf.shape[-1]
        if spec.family == "nvfp4":  # one tensor scale for the whole activation of this call
            b = xf.reshape(-1, h // fmt.block, fmt.block)
        else:
            b = xf.reshape(*xf.shape[:-1], h // fmt.block, fmt.block)
        out = fmt.fake(b, fmt.fit(b))
    return out.reshape(x.shape).to(x.dtype)


__all__ = ["ActSpec", "ACT_FORMATS", "ACT_INT_BITS", "canonical_act_format", "fake_quant_act"]

"""Block-wise quantizers over a code grid: fit statistics, quantize, dequantize.

Every function reduces over the LAST dimension of its input, which is one block (a row, or a
group of `group_size` input columns of a row). Nothing loops in Python over rows or groups.
Statistics are rounded to fp16, the precision they are counted at in the bit accounting, so the
fake-quantized weights are exactly what a stored k-bit tensor plus fp16 statistics decode to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FP16_TINY = float(torch.finfo(torch.float16).tiny)
_FP16_MAX = float(torch.finfo(torch.float16).max)


def _to_fp16_grid(x: torch.Tensor) -> torch.Tensor:
    """Round a positive statistic to the nearest fp16 value (kept in float32), never 0 or inf."""
    return x.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)


@dataclass
class QParams:
    """Per-block statistics: `scale` (float32, fp16-representable) and, for int formats, the
    integer `zero` point (float32 holding integers); both shaped like the input with last dim 1."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None


class Format:
    """A k-bit number format applied block-wise.

    kind "int": uniform integer levels 0..2^k−1 with a scale and zero point (asymmetric) or a
    fixed zero point 2^(k−1) (symmetric, GPTQ's convention: scale = 2·max|w| / (2^k − 1)).
    kind "grid": a sorted table of normalised values in [-1, 1] (fp, nf, dynamic) scaled by the
    block's absmax; the code is the index of the nearest table value.
    """

    def __init__(self, name: str, bits: int, sym: bool, grid: torch.Tensor | None = None):
        self.name = name
        self.bits = int(bits)
        self.sym = bool(sym)
        self.grid = grid
        self.kind = "int" if grid is None else "grid"
        self.maxq = 2**self.bits - 1
        if grid is not None:
            self._mid = (grid[1:] + grid[:-1]) / 2

    # -- accounting ---------------------------------------------------------------------------
    @property
    def stat_bits(self) -> int:
        """Bits of statistics stored per block: an fp16 scale, plus, when asymmetric, the zero
        point at k bits (it is an integer code in [0, 2^k), see ``fit``; GPTQ-format checkpoints
        store it packed at k bits too). docs/DESIGN.md, "Bits per weight"."""
        return 16 + self.bits if (self.kind == "int" and not self.sym) else 16

    def bits_per_weight(self, block: int) -> float:
        return self.bits + self.stat_bits / block

    def __repr__(self) -> str:
        s = "sym" if self.sym else "asym"
        return f"Format({self.name}, {self.bits}-bit, {s})"

    # -- statistics ---------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> QParams:
        """Fit one set of statistics per block (last dim). `clip` < 1 shrinks the range."""
        w = w.float()
        if self.kind == "grid":
            absmax = w.abs().amax(dim=-1, keepdim=True) * clip
            absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            return QParams(_to_fp16_grid(absmax))
        zeros = torch.zeros(w.shape[:-1] + (1,), dtype=torch.float32, device=w.device)
        xmin = torch.minimum(w.amin(dim=-1, keepdim=True), zeros) * clip
        xmax = torch.maximum(w.amax(dim=-1, keepdim=True), zeros) * clip
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        dead = (xmin == 0) & (xmax == 0)
        xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
        xmax = torch.where(dead, torch.ones_like(xmax), xmax)
        scale = _to_fp16_grid((xmax - xmin) / self.maxq)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return QParams(scale, zero)

    # -- codes ----------------------------------------------------------------------------------
    def quantize(self, w: torch.Tensor, qp: QParams) -> torch.Tensor:
        """Integer codes in [0, 2^k) (uint8)."""
        w = w.float()
        if self.kind == "grid":
            mid = self._mid.to(w.device)
            return torch.bucketize(w / qp.scale, mid).to(torch.uint8)
        q = torch.clamp(torch.round(w / qp.scale) + qp.zero, 0, self.maxq)
        return q.to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, qp: QParams) -> torch.Tensor:
        if self.kind == "grid":
            return self.grid.to(codes.device)[codes.long()] * qp.scale
        return (codes.float() - qp.zero) * qp.scale

    def fake(self, w: torch.Tensor, qp: QParams) -> torch.Tensor:
        """dequantize(quantize(w)) without materialising codes; float32 result."""
        w = w.float()
        if self.kind == "grid":
            grid = self.grid.to(w.device)
            idx = torch.bucketize(w / qp.scale, self._mid.to(w.device))
            return grid[idx] * qp.scale
        q = torch.clamp(torch.round(w / qp.scale) + qp.zero, 0, self.maxq)
        return (q - qp.zero) * qp.scale


@dataclass
class QuantizedWeight:
    """Result of quantizing a whole [out, in] matrix block-wise."""

    w_hat: torch.Tensor  # [out, in], the input dtype
    codes: torch.Tensor  # [out, in] uint8
    scale: torch.Tensor  # [out, n_groups] float32
    zero: torch.Tensor | None  # [out, n_groups] float32 (int asym/sym) or None
    group_size: int  # effective block length along the input dim


def block_length(in_features: int, group_size: int) -> int:
    """Length of a full block along the input dim: -1 (per output channel), or a group size at least
    as wide as the row, gives the whole row; otherwise ``group_size``.  A group size that does not
    divide the row is allowed: the last group of each row is then shorter (``in_features % g``
    columns), as in the GPTQ reference (``g_idx = i // g``)."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size={group_size} must be -1 (per output channel) or a positive integer")
    return min(int(group_size), in_features)


def n_groups(in_features: int, group_size: int) -> int:
    """Number of blocks per row, counting a shorter last block (``ceil(in / g)``)."""
    g = block_length(in_features, group_size)
    return -(-in_features // g)


def to_blocks(W: torch.Tensor, g: int) -> torch.Tensor:
    """``W[..., in]`` as ``[..., ceil(in/g), g]`` blocks.  A short last block is padded by repeating
    its own last column, which leaves every block statistic (min, max, absmax) unchanged; the pad is
    dropped again by :func:`from_blocks`.  No copy when ``g`` divides ``in``."""
    in_f = W.shape[-1]
    pad = (-in_f) % g
    if pad:
        W = torch.cat([W, W[..., -1:].expand(*W.shape[:-1], pad)], dim=-1)
    return W.reshape(*W.shape[:-1], W.shape[-1] // g, g)


def from_blocks(B: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``[..., n, g]`` → ``[..., in_features]`` (pad columns dropped)."""
    flat = B.reshape(*B.shape[:-2], B.shape[-2] * B.shape[-1])
    return flat if flat.shape[-1] == in_features else flat[..., :in_features]


def quantize_weight(
    W: torch.Tensor, fmt: Format, group_size: int, clip: float | torch.Tensor = 1.0
) -> QuantizedWeight:
    """Quantize a [out, in] matrix block-wise along the input dimension, vectorised.

    `clip` may be a float or a tensor shaped [out, n_groups, 1] (per-block clip ratios).  A group
    size that does not divide ``in`` gives a shorter last group per row.
    """
    out_f, in_f = W.shape
    g = block_length(in_f, group_size)
    blocks = to_blocks(W.float(), g)
    qp = fmt.fit(blocks, clip)
    codes = fmt.quantize(blocks, qp)
    w_hat = from_blocks(fmt.dequantize(codes, qp), in_f).to(W.dtype)
    zero = None if qp.zero is None else qp.zero.squeeze(-1)
    return QuantizedWeight(w_hat, from_blocks(codes, in_f).contiguous(), qp.scale.squeeze(-1), zero, g)


@torch.no_grad()
def fake_quantize_(W: torch.Tensor, fmt: Format, group_size: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Fake-quantize a [out, in] matrix block-wise IN PLACE and return it.

    The result is bit-identical to ``quantize_weight(W, fmt, group_size, clip).w_hat`` but no codes
    are materialised: for int formats a float32 contiguous ``W`` is rewritten through
    ``div_ / round_ / add_ / clamp_ / sub_ / mul_`` on its own storage (the statistics cost one
    min and one max pass); other dtypes or layouts go through one float32 work copy, copied back.
    Grid formats (fp, nf, dynamic) need one bucketize pass and a gather.
    """
    out_f, in_f = W.shape
    g = block_length(in_f, group_size)
    if in_f % g:  # ragged last group: through a padded work copy
        W.copy_(quantize_weight(W, fmt, group_size, clip).w_hat)
        return W
    direct = W.dtype == torch.float32 and W.is_contiguous()
    work = W if direct else W.float().contiguous()
    blocks = work.view(out_f, in_f // g, g)
    qp = fmt.fit(blocks, clip)
    if fmt.kind == "grid":
        idx = torch.bucketize(blocks / qp.scale, fmt._mid.to(W.device))
        torch.mul(fmt.grid.to(W.device)[idx], qp.scale, out=blocks)
    elif fmt.kind == "block":  # issue 12: fp8 / MX / NVFP4 (formats/mx.py)
        blocks.copy_(fmt.fake(blocks, qp))
    else:
        blocks.div_(qp.scale).round_().add_(qp.zero).clamp_(0, fmt.maxq).sub_(qp.zero).mul_(qp.scale)
    if not direct:
        W.copy_(work)
    return W

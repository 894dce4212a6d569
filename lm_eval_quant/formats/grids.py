"""Code-grid builders: pure functions returning the sorted, normalised values of a k-bit type.

Each grid is a 1-D float32 tensor in [-1, 1] whose largest magnitude is 1, so that a block's
absmax maps onto the largest code. Like bitsandbytes' code-map builders, these are plain functions
of the bit width (and the format's parameters), with no state.
"""

from __future__ import annotations

import torch

# Default exponent/mantissa split of the minifloat type for each total width (sign bit included).
# 4 → e2m1 (OCP FP4, bitsandbytes FP4 layout), 8 → e4m3 (OCP FP8 E4M3 without NaN codes).
FP_DEFAULT_SPLIT = {3: (2, 0), 4: (2, 1), 5: (2, 2), 6: (3, 2), 7: (3, 3), 8: (4, 3)}


def nf_offset(bits: int) -> float:
    """QLoRA's offset δ: the quantile level of the largest code, 1 − ½(1/(2(2^k−1)) + 1/(2·2^k))."""
    n = 2**bits
    return 1.0 - 0.5 * (1.0 / (2 * (n - 1)) + 1.0 / (2 * n))


def nf_grid(bits: int, offset: float | None = None) -> torch.Tensor:
    """Normal-float grid (QLoRA): quantiles of N(0, 1) normalised to [-1, 1] with an exact zero.

    2^(k−1) positive levels from the normal quantile function at k evenly spaced probabilities in
    [0.5, δ] (0.5 itself excluded), 2^(k−1)−1 negative levels likewise, and 0. At k = 4 with
    bitsandbytes' offset this equals bitsandbytes' NF4 table.
    """
    if offset is None:
        # δ rounded to 7 decimals: 0.9677083 at k = 4, the constant bitsandbytes uses.
        offset = round(nf_offset(bits), 7)
    half = 2 ** (bits - 1)
    # Probabilities on a float32 linspace and the quantile function evaluated at float32 (scipy's
    # float32 ndtri loop, as `scipy.stats.norm.ppf` on float32 input), normalised in float64, then
    # cast to float32: this reproduces bitsandbytes' NF4 table bit for bit.
    from scipy.special import ndtri

    pos_p = torch.linspace(offset, 0.5, half + 1)[:-1].numpy()
    neg_p = torch.linspace(offset, 0.5, half)[:-1].numpy()
    pos = torch.from_numpy(ndtri(pos_p)).double()
    neg = -torch.from_numpy(ndtri(neg_p)).double()
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.max()).to(torch.float32)


def fp_magnitudes(exp_bits: int, man_bits: int) -> list[float]:
    """Non-negative magnitudes of a minifloat ExMy: bias 2^(x−1)−1, subnormals, no inf/NaN codes."""
    if exp_bits < 1 or man_bits < 0:
        raise ValueError(f"fp needs at least one exponent bit, got e{exp_bits}m{man_bits}")
    bias = 2 ** (exp_bits - 1) - 1
    mags = []
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            frac = m / 2**man_bits
            if e == 0:  # subnormal
                mags.append(frac * 2.0 ** (1 - bias))
            else:
                mags.append((1.0 + frac) * 2.0 ** (e - bias))
    return mags


def fp_grid(exp_bits: int, man_bits: int) -> torch.Tensor:
    """Signed minifloat grid, normalised by its largest magnitude. +0 and −0 share one value, so
    the grid has 2^k − 1 distinct values for a k = 1 + x + y bit type."""
    mags = torch.tensor(fp_magnitudes(exp_bits, man_bits), dtype=torch.float64)
    values = torch.unique(torch.cat([mags, -mags]))
    return (values / values.abs().max()).to(torch.float32)


def dynamic_grid(bits: int) -> torch.Tensor:
    """Dynamic-exponent type (Dettmers 2016; the 'dynamic' type of 2212.09720), signed.

    After the sign bit, a run of e zero bits encodes the decimal exponent 10^−e, a 1 bit ends the
    run, and the f = k − 2 − e bits left are a linear fraction: the 2^f midpoints of an even split of
    [0.1, 1]. The all-zero code is 0, and the one spare code (sign bit with all zeros) is 1.0, the
    block's absmax. 2^k values in all (bitsandbytes' `create_dynamic_map(signed=True)` at k = 8).
    """
    if bits < 2:
        raise ValueError("dynamic needs at least 2 bits")
    data: list[float] = []
    non_sign = bits - 1
    for e in range(non_sign):  # e leading zeros then the indicator bit
        f = non_sign - 1 - e
        n = 2**f
        bounds = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0).tolist()
        scale = 10.0 ** (-e)
        data += [scale * v for v in means]
        data += [-scale * v for v in means]
    data += [0.0, 1.0]
    values = torch.tensor(data, dtype=torch.float32).sort().values
    return values


def parse_fp_spec(spec: str) -> tuple[int, int]:
    """'e3m2' → (3, 2)."""
    s = spec.lower()
    if not (s.startswith("e") and "m" in s):
        raise ValueError(spec)
    e, m = s[1:].split("m", 1)
    return int(e), int(m)


__all__ = [
    "FP_DEFAULT_SPLIT",
    "nf_offset",
    "nf_grid",
    "fp_magnitudes",
    "fp_grid",
    "dynamic_grid",
    "parse_fp_spec",
]


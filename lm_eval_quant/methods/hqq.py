"""HQQ: Half-Quadratic Quantization (Badri & Shaji 2023), calibration-free, our implementation.

Why our own code and not a call into the ``hqq`` package: the package's quantizer is a thin
function of one weight tensor that we can reproduce exactly in a few vectorised lines, while its
model path (``HQQLinear``, transformers' ``HqqConfig``, broken on transformers 5) replaces modules
and packs bits; our methods leave plain ``nn.Linear`` modules holding fake-quantized weights, which
keeps the cache, the accounting, activation quantization and the other methods composable. The
package (``pip install hqq``, built with ``DISABLE_CUDA=1`` on CPU) is the test oracle:
``tests/test_hqq.py`` checks that :func:`hqq_fit` gives the package's ``Quantizer.quantize``
codes, scales and zeros on the same tensors.

Per block of ``group_size`` weights (asymmetric k-bit affine, ``W_q = round(W/s + z)``,
``Ŵ = s·(W_q − z)``; zero point ``z`` a real number):

1. start from min/max: ``1/s = (2^k − 1) / (max − min)`` (capped at 2·10^4), ``z = −min/s``;
2. minimise ``‖W − Ŵ‖_p^p`` (p = 0.7, a sparsity-promoting loss that ignores a few large errors)
   over ``z`` with the scale fixed, by half-quadratic splitting: with an auxiliary ``W_e``,
   alternate ``W_e = shrink_p(W − Ŵ, β)`` — the generalised soft threshold
   ``sign(x)·max(|x| − |x|^(p−1)/β, 0)`` — and the closed-form
   ``z = mean(W_q − (W − W_e)/s)`` over the block, β = 10, for at most 20 iterations, stopping at
   the first iteration whose mean |W − Ŵ| (whole tensor) does not improve on the best so far;
   The paper grows β ← κ·β (κ = 1.01) each iteration. The maintained package's optimizer
   (``optimize_weights_proximal_legacy``, what ``Quantizer.quantize`` runs) gives results equal to
   a constant β whatever κ it is given (observed, pinned in tests/test_hqq.py), so to agree with
   it our default is ``kappa=1``; ``kappa=1.01`` gives the paper's schedule;
3. codes ``W_q = clamp(round(W/s + z), 0, 2^k − 1)`` with the final z; the stored statistics are
   rounded to fp16 (scale and zero: 32 bits per block, the same accounting as int asym) and
   ``Ŵ = fp16(s)·(W_q − fp16(z))`` is what the model gets.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import QuantArgError
from ..formats.base import _to_fp16_grid, n_groups
from .base import (
    Method,
    Option,
    QuantConfig,
    QuantContext,
    QuantReport,
    check_group_size,
    quantizable_linears,
    set_weight_matrix,
    untie_if_shared,
    weight_matrix,
)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal step of the lp (p < 1) penalty."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * torch.pow(x.abs() + 1e-8, p - 1))


@torch.no_grad()
def hqq_fit(blocks: torch.Tensor, bits: int, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
            kappa: float = 1.0, round_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ on ``blocks [..., g]`` (one block per last-dim row), in float32.

    Returns ``(codes, scale, zero)``: codes float32 in [0, 2^k − 1], ``scale`` and ``zero`` shaped
    ``[..., 1]`` with ``Ŵ = scale · (codes − zero)`` (``scale`` = the package's ``1/scale``).
    """
    W = blocks.float()
    maxq = 2**bits - 1
    wmin = W.amin(dim=-1, keepdim=True)
    wmax = W.amax(dim=-1, keepdim=True)
    rng = wmax - wmin
    # 1/s, capped at 2e4; a constant block gets 1/s = 1 (the package's convention: Ŵ stays exact)
    inv = torch.where(rng > 0, maxq / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.ones_like(rng)).clamp(max=2e4)
    zero = -wmin * inv
    if round_zero:
        zero = torch.round(zero)
    best = float("inf")
    for _ in range(int(iters)):
        Wq = torch.round(W * inv + zero).clamp(0, maxq)
        Wr = (Wq - zero) / inv
        We = shrink_lp(W - Wr, beta, lp_norm)
        zero = torch.mean(Wq - (W - We) * inv, dim=-1, keepdim=True)
        beta *= kappa
        err = float(torch.abs(W - Wr).mean())
        if err < best:
            best = err
        else:
            break
    codes = torch.round(W * inv + zero).clamp(0, maxq)
    return codes, 1.0 / inv, zero


@torch.no_grad()
def hqq_quantize_matrix(W: torch.Tensor, bits: int, group_size: int, **opts) -> torch.Tensor:
    """Fake-quantized ``W [out, in]`` (same dtype): HQQ per block, statistics rounded to fp16."""
    out_f, in_f = W.shape
    g = in_f if group_size == -1 else group_size
    blocks = W.float().reshape(out_f, in_f // g, g)
    codes, scale, zero = hqq_fit(blocks, bits, **opts)
    s16 = _to_fp16_grid(scale)
    z16 = zero.to(torch.float16).to(torch.float32)
    return (s16 * (codes - z16)).reshape(out_f, in_f).to(W.dtype)


class HQQ(Method):
    name = "hqq"
    OPTIONS = {
        "iters": Option(int, 20, min=1, help="HQQ uses 20"),
        "lp_norm": Option(float, 0.7, gt=0, max=1, help="HQQ uses 0.7"),
        "beta": Option(float, 10.0, gt=0, help="HQQ uses 10"),
        "kappa": Option(float, 1.0, min=1, help="the paper's kappa 1.01, the package's effectively 1"),
    }

    def validate(self, cfg: QuantConfig) -> None:
        if cfg.format != "int" or cfg.sym:
            raise QuantArgError(
                f"hf-quant: method=hqq optimises an asymmetric int zero point; format={cfg.format}"
                f"{' sym=true' if cfg.sym else ''} is not what it does: use format=int and drop sym"
            )

    @torch.no_grad()
    def quantize(self, model, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        t0 = time.perf_counter()
        o = self._opts(cfg)  # typed and validated by the argument layer
        opts = {k: o[k] for k in ("iters", "lp_norm", "beta", "kappa")}
        linears = quantizable_linears(model, cfg.skip)
        check_group_size(linears, cfg.group_size)
        device = torch.device(ctx.device) if ctx.device is not None else None
        report = QuantReport()
        extra_bits: dict[str, int] = {}
        for name, mod in tqdm(linears, desc=f"hqq {cfg.bits}-bit", unit="layer", disable=not ctx.progress):
            untie_if_shared(model, mod)
            W = weight_matrix(mod)
            Wd = W.to(device) if device is not None else W
            set_weight_matrix(mod, hqq_quantize_matrix(Wd, cfg.bits, cfg.group_size, **opts).to(W.device))
            report.quantized.append(name)
            report.modified.append(f"{name}.weight")
            # HQQ's zero point is a real number stored at fp16, not a k-bit code as int asym counts it
            rows, cols = W.shape
            extra_bits[name] = rows * n_groups(cols, cfg.group_size) * (16 - int(cfg.bits))
        report.extra["extra_bits"] = extra_bits
        report.seconds = time.perf_counter() - t0
        report.extra["hqq"] = {**opts, "stats": "fp16 scale + fp16 zero per block"}
        return report


__all__ = ["HQQ", "hqq_fit", "hqq_quantize_matrix", "shrink_lp"]

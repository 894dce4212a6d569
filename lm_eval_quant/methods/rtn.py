"""Round-to-nearest: every weight block quantized independently to its nearest grid point.

No data is needed. Works with every number format (int sym/asym, fp, nf, dynamic) and any group
size; the work is one vectorised in-place `fake_quantize_` call per linear layer (bit-identical
to `quantize_weight(...).w_hat`, without materialising codes or extra full-size copies).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..formats import fake_quantize_, make_format
from .base import (
    Method,
    QuantConfig,
    QuantContext,
    QuantReport,
    check_group_size,
    quantizable_linears,
    set_weight_matrix,
    untie_if_shared,
    weight_matrix,
)


class RTN(Method):
    name = "rtn"
    exportable = True  # capability: written as a GPTQ checkpoint by export

    @torch.no_grad()
    def quantize(self, model, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        t0 = time.perf_counter()
        fmt = make_format(cfg.format, cfg.bits, cfg.sym)
        linears = quantizable_linears(model, cfg.skip)
        check_group_size(linears, cfg.group_size)
        report = QuantReport()
        device = torch.device(ctx.device) if ctx.device is not None else None
        for name, mod in tqdm(linears, desc=f"rtn {cfg.bits}-bit", unit="layer", disable=not ctx.progress):
            untie_if_shared(model, mod)
            W = weight_matrix(mod)
            if device is not None and device.type != W.device.type:
                # weights kept on CPU (or offloaded), compute device elsewhere: round trip one layer
                set_weight_matrix(mod, fake_quantize_(W.to(device), fmt, cfg.group_size).to(W.device))
            else:
                fake_quantize_(W, fmt, cfg.group_size)
            report.quantized.append(name)
            report.modified.append(f"{name}.weight")
        report.seconds = time.perf_counter() - t0
        return report

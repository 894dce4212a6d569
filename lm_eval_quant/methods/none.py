"""The full-precision baseline: nothing is quantized, the same code path is used."""

from __future__ import annotations

from .base import Method, QuantConfig, QuantContext, QuantReport


class NoQuant(Method):
    name = "none"
    takes_sym = False
    supported_bits = ()
    default_format = "none"

    def check_format(self, cfg: QuantConfig) -> str:
        return "none"

    def quantize(self, model, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        return QuantReport()

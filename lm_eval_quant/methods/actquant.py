"""Weight-activation quantization: activation fake-quant at the input of every quantized linear.

    act = parse_act_args(act_bits="8", act_format=None, act_group_size=None, method="rtn")
    handles = install_act_quant(model, names, act)      # forward pre-hooks, no weight copies
    scheme_label(cfg, act)                               # "W4A8", "W8A8-fp8", "W4A4-mxfp4", ...

The hook replaces the linear's input ``x`` by ``fake_quant_act(x, spec)`` (see formats/act.py);
it composes with every fake-quant weight method (rtn, gptq, awq, smoothquant, none = W16Ax), since
those leave plain ``nn.Linear`` modules behind. bitsandbytes replaces the linears by its own
kernels (which quantize activations their own way): asking for both is a one-line error.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import QuantArgError
from ..formats.act import ActSpec, canonical_act_format, fake_quant_act
from ..formats.mx import fixed_block
from .base import parse_int, weight_matrix

ACT_KEYS = ("act_bits", "act_format", "act_group_size")


def pop_act_args(kwargs: dict) -> dict:
    """Take the activation arguments out of model_args (in place)."""
    return {k: kwargs.pop(k) for k in list(kwargs) if k in ACT_KEYS}


def parse_act_args(act_bits: Any = None, act_format: Any = None, act_group_size: Any = None,
                   method: str = "rtn") -> ActSpec | None:
    """A validated ActSpec, or None for weight-only quantization. One-line QuantArgError."""
    if act_bits is None and act_format is None and act_group_size is None:
        return None
    if act_bits is None and act_format is None:
        raise QuantArgError("hf-quant: act_group_size needs act_bits (4, 6, 8) or act_format")
    if method == "bnb":
        raise QuantArgError(
            "hf-quant: activation quantization (act_bits/act_format) is for fake-quant methods "
            "(rtn, gptq, awq, smoothquant, none); bnb runs its own kernels: drop the act_* arguments"
        )
    bits = None if act_bits is None else parse_int("act_bits", act_bits)
    fmt = "int" if act_format is None else str(act_format).strip().lower()
    try:
        name, bits = canonical_act_format(fmt, bits)
    except ValueError as e:
        raise QuantArgError(f"hf-quant: {e}") from None
    fam = name.partition(":")[0]
    gs_given = act_group_size is not None
    gs = -1 if not gs_given else parse_int("act_group_size", act_group_size)
    if fam in ("int", "fp8"):
        if gs < -1:
            raise QuantArgError(
                f"hf-quant: act_group_size={gs}: use -1 (per token), 0 (per tensor) or a block length > 0"
            )
    else:
        blk = fixed_block(name)
        if gs_given and gs != blk:
            raise QuantArgError(
                f"hf-quant: act_format={name} fixes its block at {blk} channels; act_group_size={gs} "
                f"would misstate it: use act_group_size={blk} or drop it"
            )
        gs = blk
    return ActSpec(bits=bits, format=name, group_size=gs)


def check_act_shapes(linears: list[tuple[str, nn.Module]], act: ActSpec) -> None:
    """The block length must divide every quantized linear's input width."""
    if act is None or act.group_size in (-1, 0):
        return
    for name, mod in linears:
        in_f = weight_matrix(mod).shape[1]
        if in_f % act.group_size:
            raise QuantArgError(
                f"hf-quant: act_group_size={act.group_size} does not divide in_features={in_f} of layer "
                f"{name}; use a divisor of it, or -1 (per token)"
            )


class _ActHook:
    """One instance serves every hooked linear of a model. Linears that read the very same tensor
    (q/k/v after one norm; gate/up) get one quantization of it: the last input and its quantized
    copy are kept, and a call with that same tensor object reuses the copy (the quantizer is a
    pure function of the tensor, so the result is identical)."""

    __slots__ = ("spec", "_last_in", "_last_out")

    def __init__(self, spec: ActSpec):
        self.spec = spec
        self._last_in = None
        self._last_out = None

    def clear(self) -> None:
        self._last_in = self._last_out = None

    def __call__(self, module, args):
        if not args:
            return None
        x = args[0]
        if x is self._last_in:
            xq = self._last_out
        else:
            xq = fake_quant_act(x, self.spec)
            self._last_in, self._last_out = x, xq
        return (xq,) + tuple(args[1:])


def install_act_quant(model: nn.Module, names: list[str], act: ActSpec) -> list:
    """Register the activation fake-quant pre-hook on each named module; returns the handles."""
    mods = dict(model.named_modules())
    hook = _ActHook(act)
    handles = [mods[n].register_forward_pre_hook(hook) for n in names]
    # drop the kept input/output pair when the model's forward ends (no activation outlives it)
    handles.append(model.register_forward_hook(lambda *_: hook.clear()))
    return handles


def scheme_label(cfg, act: ActSpec | None) -> str:
    """W{weight bits}A{activation bits}, plus the activation format when it is not int:
    W4A16 (weights only), W8A8, W4A8, W8A8-fp8, W4A4-mxfp4, W16A8 (method=none with act_bits)."""
    w = 16 if cfg.is_baseline else int(cfg.bits)
    if act is None:
        return f"W{w}A16"
    suffix = "" if act.format == "int" else "-" + act.format.replace(":e4m3", "")
    return f"W{w}A{act.bits}{suffix}"


def act_info(act: ActSpec | None, n_linears: int) -> dict:
    if act is None:
        return {"bits": 16, "format": "none", "group_size": None, "linears": 0}
    gran = {-1: "per-token", 0: "per-tensor"}.get(act.group_size, f"block-{act.group_size}")
    return {"bits": act.bits, "format": act.format, "group_size": act.group_size,
            "granularity": gran, "dynamic": True, "linears": n_linears}


__all__ = ["ACT_KEYS", "pop_act_args", "parse_act_args", "check_act_shapes", "install_act_quant",
           "scheme_label", "act_info"]

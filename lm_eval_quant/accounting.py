"""Bit accounting: what a quantized model really costs in memory.

For each quantized weight matrix: k bits per weight plus the per-block statistics (an fp16 scale,
and for asymmetric int the zero point, an integer code stored at k bits) — 4-bit, groups of 128:
4 + (16 + 4)/128 = 4.156 bits per weight; the same definition as an exported or pre-quantized
GPTQ checkpoint (prequant.account_prequantized). Everything left unquantized (embeddings, the
output head, norms, biases) counts at the narrower of the checkpoint's storage dtype (when given)
and its dtype in memory. These are the figures 2212.09720 and 2405.03146 plot against.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from torch import nn

from . import __version__
from .formats import make_format, n_groups
from .linears import weight_matrix

if TYPE_CHECKING:  # a type only: accounting sits below methods (no import circle)
    from .methods.base import QuantConfig


def dtype_bits(dtype) -> int:
    return dtype.itemsize * 8


def _modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def account(
    model: nn.Module,
    cfg: QuantConfig,
    quantized: list[str] | None = None,
    extra_bits: dict[str, int] | None = None,
    storage_dtype=None,
) -> dict:
    """Accounting for a fake-quantized model.

    quantized: names of the modules whose weight was quantized with `cfg` (block = group size,
    or the whole input row for group_size=-1). extra_bits: optional per-module extra storage in
    bits (e.g. GPTQ's g_idx with act_order). storage_dtype: the checkpoint's dtype (a torch
    dtype or its name); unquantized floating-point tensors count at the narrower of it and the
    dtype they were evaluated in (an upcast adds no information: an fp16 checkpoint evaluated
    in float32 is an fp16 model; a downcast is what was evaluated: an fp32 checkpoint evaluated
    in bfloat16 is a bf16 model). Both dtypes are recorded (``storage_dtype``, ``eval_dtype``).
    """
    quantized = list(quantized or [])
    mods = _modules_by_name(model)
    seen: set[int] = set()
    params_total = 0
    total_bits = 0
    params_q = 0
    bits_q = 0
    qweights = set()
    fmt = None if cfg.is_baseline else make_format(cfg.format, cfg.bits, cfg.sym)
    for name in quantized:
        mod = mods[name]
        w = mod.weight
        qweights.add(id(w))
        out_f, in_f = weight_matrix(mod).shape
        n = out_f * in_f
        # the real number of blocks: a shorter last group per row counts as a whole block of statistics
        b = n * cfg.bits + out_f * n_groups(in_f, cfg.group_size) * fmt.stat_bits
        b += getattr(fmt, "tensor_stat_bits", 0)  # issue 12: NVFP4's fp32 per-tensor scale
        b += int((extra_bits or {}).get(name, 0))
        params_q += n
        bits_q += b
    sdt = as_dtype(storage_dtype)
    eval_dtype = None
    for p in model.parameters():  # unique tensors (tied weights once)
        if id(p) in seen:
            continue
        seen.add(id(p))
        params_total += p.numel()
        if p.dtype.is_floating_point and eval_dtype is None:
            eval_dtype = p.dtype
        if id(p) not in qweights:
            b = dtype_bits(p.dtype)
            if sdt is not None and p.dtype.is_floating_point:
                b = min(b, dtype_bits(sdt))
            total_bits += p.numel() * b
    total_bits += bits_q
    qc = cfg.to_dict()
    dtypes = {"storage_dtype": _name(sdt or eval_dtype), "eval_dtype": _name(eval_dtype)}
    if cfg.is_baseline and (sdt or eval_dtype) is not None:
        # an fp32 checkpoint evaluated in fp32 is a 32-bit baseline, not 16
        qc["bits"] = min(dtype_bits(d) for d in (sdt, eval_dtype) if d is not None)
    return summary(qc, params_total, params_q, len(quantized), bits_q, total_bits, **dtypes)


def as_dtype(d):
    """A torch floating dtype from a dtype or its name ("float16", "torch.bfloat16"); None else."""
    import torch

    if d is None or isinstance(d, torch.dtype):
        return d
    t = getattr(torch, str(d).replace("torch.", "").strip(), None)
    return t if isinstance(t, torch.dtype) and t.is_floating_point else None


def _name(dt) -> str | None:
    return None if dt is None else str(dt).replace("torch.", "")


def summary(quant_config, params_total: int, params_q: int, layers_q: int, bits_q: float,
            total_bits: float, **extra) -> dict:
    """The accounting block every path reports (fake quant, bitsandbytes, pre-quantized
    checkpoints): the same keys, derived the same way from the counted bits. ``extra`` keys
    (e.g. ``bnb``, ``prequantized``) are appended."""
    info = {
        "quant_config": quant_config,
        "params_total": params_total,
        "params_quantized": params_q,
        "fraction_quantized": (params_q / params_total) if params_total else 0.0,
        "layers_quantized": layers_q,
        "bits_per_quantized_weight": (bits_q / params_q) if params_q else None,
        "total_bits": total_bits,
        "total_bytes": total_bits / 8,
        "total_gb": total_bits / 8 / 1e9,
        "bits_per_param": total_bits / params_total if params_total else None,
        "lm_eval_quant_version": __version__,
    }
    info.update(extra)
    return info


def checkpoint_dtype(model) -> str | None:
    """The dtype the checkpoint stores its weights in (its config.json ``dtype``/``torch_dtype``),
    read from the file when the model came from a local folder, as transformers may rewrite the
    in-memory config with the dtype it loaded in. None when unknown."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and os.path.isfile(os.path.join(str(path), "config.json")):
        try:
            with open(os.path.join(str(path), "config.json"), encoding="utf-8") as fh:
                conf = json.load(fh)
            d = as_dtype(conf.get("dtype") or conf.get("torch_dtype"))
            return None if d is None else str(d).replace("torch.", "")
        except (OSError, ValueError):
            return None
    return None

"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights, then quantize.

For every set of linears that read one normalisation's output (Llama: q/k/v after the attention
norm, gate/up after the MLP norm; GPT-2/OPT: the fused qkv / fc1 after their LayerNorms — the
groups the paper smooths):

1. ``max|X_j|`` per input channel j over the calibration tokens (full-precision forward, decoder
   layer by decoder layer with :mod:`.layerwise`);
2. ``s_j = max|X_j|^α / max|W_j|^(1−α)`` with ``max|W_j|`` over the group's weight columns j
   (both clamped ≥ 1e-5, as the reference code), α = 0.5 by default;
3. fold: the norm's weight (and bias) ``/= s``, the linears' input columns ``*= s`` — AWQ's own fold
   (:func:`lm_eval_quant.methods.awq._fold`, called, not rewritten). The full-precision function is
   unchanged; every fold is checked on one calibration sample (the layer's output before vs after,
   relative error ≤ 1e-3 in fp32, 5e-2 in fp16/bf16) and reverted otherwise (Gemma's ``(1 + w)``
   norms), reported in ``extra["smoothquant"]["unsmoothed"]``;
4. ``method=smoothquant``: the weights are then quantized with RTN in the configured format
   (paper: W8A8 = int8 symmetric per output channel, activations int8 per token; hf-quant makes
   that the default: bits 8, group_size −1, sym, act_bits = bits).
   ``smooth=α`` on rtn / gptq / awq runs steps 1–3 first, then that method (Smoothed below);
   the smoothing calibrates with that method's ``calib``/``nsamples``/``seqlen``/``calib_seed``
   when it has them (gptq, awq), else with the defaults below.

Linears fed by another linear (o_proj, down_proj) are not smoothed, as in the paper.
Options: ``alpha`` (0.5), ``calib`` (``auto``: Pile validation → c4 → wikitext2, as AWQ),
``nsamples`` (128), ``seqlen`` (512), ``calib_seed`` (0), ``calib_batch`` (0 = automatic).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from ..errors import QuantArgError
from .awq import _first, _fold, _get_calibration, _in_features, _is_norm, _params_of, _rel_err, _slice_batch
from .base import Method, Option, QuantConfig, QuantContext, QuantReport, quantizable_linears, weight_matrix

SMOOTH_DEFAULTS = {"calib": "auto", "nsamples": 128, "seqlen": 512, "calib_seed": 0, "calib_batch": 0}


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max_i|W_ij|^(1−α)`` over the group's ``[out_i, in]`` weights."""
    w_max = torch.cat([w.float().abs() for w in weights], 0).amax(dim=0).clamp(min=1e-5)
    a = act_max.float().clamp(min=1e-5)
    return (a.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def _smooth_layer(step, alpha: float, log: dict, modified: set[str]) -> None:
    layer = step.layer
    all_lin = step.linears()
    if not all_lin:
        return
    groups = step.linear_groups(linears=all_lin)
    prefix = step.name + "."
    amax = [torch.zeros(_in_features(g[0][1]), device=step.device) for g in groups]
    seen_in: list[Any] = [None] * len(groups)
    outputs: dict[int, tuple[str, nn.Module, torch.Tensor]] = {}
    first = {"on": True}
    handles = []
    for gi, g in enumerate(groups):
        def pre(mod, args, _gi=gi):
            x = args[0]
            amax[_gi] = torch.maximum(amax[_gi], x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float())
            if first["on"] and seen_in[_gi] is None:
                seen_in[_gi] = x
        handles.append(g[0][1].register_forward_pre_hook(pre))
    for lname, sub in layer.named_modules():
        w = getattr(sub, "weight", None)
        if not lname or not isinstance(w, torch.Tensor) or w.dim() != 1:
            continue

        def post(mod, args, out, _n=lname):
            if first["on"] and isinstance(out, torch.Tensor):
                outputs[id(out)] = (_n, mod, out)
        handles.append(sub.register_forward_hook(post))
    try:
        step.forward(batches=[0])
        producers = []
        for gi, g in enumerate(groups):
            t = seen_in[gi]
            prod = outputs.get(id(t)) if t is not None else None
            producers.append(prod if prod is not None and _is_norm(prod[1], _in_features(g[0][1])) else None)
        first["on"] = False
        outputs.clear()
        seen_in = [None] * len(groups)
        if len(step.inputs) > 1:
            step.forward(batches=range(1, len(step.inputs)))
    finally:
        for h in handles:
            h.remove()

    n0 = step.inputs[0].shape[0]
    probe = (step.inputs[0][:1], _slice_batch(step.args[0], n0), _slice_batch(step.kwargs[0], n0))
    ref = _first(layer(probe[0], *probe[1], **probe[2])).float().clone()
    dt = next(layer.parameters()).dtype
    tol = 1e-3 if dt in (torch.float32, torch.float64) else 5e-2
    for gi, g in enumerate(groups):
        gname = "+".join(n[len(prefix):] for n, _ in g)
        key = f"{step.name}:{gname}"
        prod = producers[gi]
        if prod is None:
            log["not_norm_fed"].append(key)
            continue
        pname, pmod, _ = prod
        members = [m for _, m in g]
        s = smoothing_scales(amax[gi], [weight_matrix(m) for m in members], alpha)
        saved = [(p, p.data.clone()) for m in [pmod] + members for p in _params_of(m).values()]
        _fold(("norm", pmod, None), members, s)
        out = _first(layer(probe[0], *probe[1], **probe[2])).float()
        err = _rel_err(out, ref)
        if not math.isfinite(err) or err > tol:
            for p, d in saved:
                p.data.copy_(d)
            log["unsmoothed"].append(f"{key} (fold into {pname} changes the output: rel err {err:.2e})")
            continue
        log["smoothed"].append(key)
        log["act_max_ratio"][key] = float(amax[gi].max() / amax[gi].clamp(min=1e-5).median())
        modified.update(f"{n}.weight" for n, _ in g)
        modified.update(f"{step.name}.{pname}.{k}" for k in _params_of(pmod))


def smooth_model(model: nn.Module, input_ids: torch.Tensor, alpha: float = 0.5, *, device=None,
                 batch_size: int | None = None, progress: bool = False) -> dict:
    """Compute the smoothing scales on ``input_ids [n, seqlen]`` and fold them into ``model``
    (function unchanged). Returns a log with ``modified`` (parameter names) and ``smoothed``."""
    from .layerwise import find_decoder_layers, run_layerwise

    find_decoder_layers(model)
    log: dict[str, Any] = {"alpha": alpha, "smoothed": [], "unsmoothed": [], "not_norm_fed": [], "act_max_ratio": {}}
    modified: set[str] = set()
    run_layerwise(model, input_ids, lambda st: _smooth_layer(st, alpha, log, modified), device=device,
                  batch_size=batch_size, progress=progress, desc="smoothquant")
    log["modified"] = sorted(modified)
    return log


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise QuantArgError(f"hf-quant: smoothing alpha={alpha} must be in [0, 1] (SmoothQuant uses 0.5)")
    return alpha


def _calibrate_and_smooth(model, opts: dict, alpha: float, ctx: QuantContext) -> tuple[dict, dict]:
    tok = getattr(ctx, "tokenizer", None)
    if tok is None:
        raise QuantArgError("hf-quant: smoothquant needs the model's tokenizer for calibration data")
    ids, calib_info = _get_calibration(tok, opts, model)
    log = smooth_model(model, ids, alpha, device=getattr(ctx, "device", None),
                       batch_size=opts["calib_batch"] or None,
                       progress=bool(getattr(ctx, "progress", True)))
    return log, calib_info


def _public(log: dict) -> dict:
    return {k: v for k, v in log.items() if k != "modified"}


class SmoothQuant(Method):
    name = "smoothquant"
    needs_calibration = True
    OPTIONS = {
        # alpha's range is checked by _check_alpha, shared with smooth= on rtn/gptq/awq
        "alpha": Option(float, 0.5, help="SmoothQuant uses 0.5"),
        "calib": Option(str, SMOOTH_DEFAULTS["calib"]),
        "nsamples": Option(int, SMOOTH_DEFAULTS["nsamples"], min=1, help="e.g. nsamples=128"),
        "seqlen": Option(int, SMOOTH_DEFAULTS["seqlen"], min=1, help="e.g. seqlen=512"),
        "calib_seed": Option(int, SMOOTH_DEFAULTS["calib_seed"]),
        "calib_batch": Option(int, SMOOTH_DEFAULTS["calib_batch"], min=0, help="0 = automatic"),
    }

    def validate(self, cfg: QuantConfig) -> None:
        """What the options' declarations cannot say (they are typed and range-checked already)."""
        from .calibration import validate_calib_args

        o = self._opts(cfg)
        _check_alpha(o["alpha"])
        calib = "pile" if o["calib"].lower() == "auto" else o["calib"]
        validate_calib_args(calib, o["nsamples"], o["seqlen"], o["calib_seed"])

    def quantize(self, model: nn.Module, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        from . import get_method

        t0 = time.perf_counter()
        o = self._opts(cfg)  # typed and validated by the argument layer
        quantizable_linears(model, cfg.skip)
        log, calib_info = _calibrate_and_smooth(model, o, o["alpha"], ctx)
        rep = get_method("rtn").quantize(model, cfg, ctx)
        rep.modified = sorted(set(rep.modified) | set(log["modified"]))
        rep.extra.update({"calibration": calib_info, "smoothquant": _public(log)})
        rep.seconds = time.perf_counter() - t0
        return rep


class Smoothed(Method):
    """``smooth=α`` on another method: SmoothQuant's smoothing first, then ``inner``."""

    needs_calibration = True

    def __init__(self, inner: Method, alpha: float):
        self.inner = inner
        self.alpha = _check_alpha(alpha)
        self.name = inner.name
        self.OPTIONS = inner.OPTIONS
        self.default_format = inner.default_format

    def check_format(self, cfg):
        return self.inner.check_format(cfg)

    def validate(self, cfg):
        return self.inner.validate(cfg)

    def load_kwargs(self, cfg):
        return self.inner.load_kwargs(cfg)

    def accounting(self, model, cfg, report, storage_dtype=None):
        return self.inner.accounting(model, cfg, report, storage_dtype=storage_dtype)

    def quantize(self, model: nn.Module, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        t0 = time.perf_counter()
        # the method's own calibration settings when it has them (gptq, awq), else SmoothQuant's
        opts = {**SMOOTH_DEFAULTS, **{k: v for k, v in (cfg.options or {}).items() if k in SMOOTH_DEFAULTS}}
        log, calib_info = _calibrate_and_smooth(model, opts, self.alpha, ctx)
        rep = self.inner.quantize(model, cfg, ctx)
        rep.modified = sorted(set(rep.modified) | set(log["modified"]))
        rep.extra["smoothquant"] = {**_public(log), "calibration": calib_info}
        rep.seconds = time.perf_counter() - t0
        return rep


def with_smoothing(cfg: QuantConfig, method: Method, smooth: Any) -> tuple[QuantConfig, Method]:
    """Wrap ``method`` for ``smooth=α`` (rtn, gptq, awq). Returns a new config whose options carry α
    (cache key, results) and the wrapped method; the caller's ``cfg`` is left as it was."""
    from dataclasses import replace

    from .base import parse_float

    if cfg.is_baseline or cfg.method not in ("rtn", "gptq", "awq"):
        raise QuantArgError(
            f"hf-quant: smooth= is an option of rtn, gptq and awq (SmoothQuant first, then the method); "
            f"for method={cfg.method} use method=smoothquant alpha=... or drop smooth"
        )
    a = _check_alpha(parse_float("smooth", smooth))
    return replace(cfg, options={**cfg.options, "smooth": a}), Smoothed(method, a)


__all__ = ["SmoothQuant", "Smoothed", "smooth_model", "smoothing_scales", "with_smoothing"]

"""Export int RTN / GPTQ / AWQ results as a standard GPTQ-format checkpoint.

    lm-eval-quant export --model_args pretrained=DIR,method=gptq,bits=4,group_size=128 --output OUT
    # or, inside an evaluation:  --model_args ...,save_quantized=OUT

Steps: :func:`plan_export` (checks, which linears, block layout, dtypes) → :func:`pack_export`
(integer state → packed tensors) → :func:`write_export` (files, one rename); the command is in
:mod:`lm_eval_quant.export_cli`.

What is written (the layout GPTQModel, transformers+optimum and vLLM read):

* for every quantized linear ``X`` (weight [out, in]):
  ``X.qweight`` int32 [in·bits/32, out] -- codes packed along the input dim, little-endian bit
  stream (code j of a 32-code run starts at bit ``bits·j`` of the run's ``bits`` words; 2/4/8 bits
  therefore never straddle a word, 3 bits does: GPTQ's 3-bit layout);
  ``X.qzeros`` int32 [n_groups, out·bits/32] -- zero points packed the same way along the output dim;
  ``X.scales`` fp16 [n_groups, out]; ``X.g_idx`` int32 [in] (group of each input column: ``i // g``,
  or the act-order groups); ``X.bias`` when the layer has one.  Dequantization is
  ``W[o, i] = scales[g_idx[i], o] · (code[i, o] − zero[g_idx[i], o])``.
* every other tensor (norms, embeddings, lm_head, AWQ-folded norm weights) at the source
  checkpoint's storage dtype (an fp16 model evaluated in fp32 writes fp16 embeddings); a head
  tied to the embedding (``tie_word_embeddings``) is written once and re-tied by loaders;
* ``config.json`` with ``quantization_config`` (quant_method gptq, bits, group_size, desc_act, sym,
  checkpoint_format, ...) + generation config + tokenizer files.

Zero-point convention.  ``checkpoint_format="gptq"`` (v1, what vLLM and most tools read) stores
``zero − 1``; loaders add 1 to every packed field in one integer add, so a stored zero of 0 (−1 in
the field) would carry into the neighbouring field.  ``"gptq_v2"`` (GPTQModel's internal format)
stores the zero as is.  ``checkpoint_format=auto`` (default) writes v1 whenever every zero point is
≥ 1 (always true for sym, where zero = 2^(k−1), and almost always for asym) and v2 otherwise.
GPTQModel 7.6 loads both on CPU (TorchQuantLinear converts v1 → v2 at load).

Where the integer codes come from.  GPTQ's groups are fit on error-updated weights, so refitting
the format on ŵ does not give back its scale/zero.  When the method kept its integer state
(``QuantReport.extra["qstate"][name] = {codes, scale, zero, g_idx}``, GPTQ's ``keep_qstate=true``)
it is used as is (and checked against the weights).  Otherwise it is recovered exactly from ŵ:
in every group ŵ = (q − z)·s with integer q ∈ [0, 2^k) and an fp16 scale s, so all values of a
group are integer multiples of s.  We take the smallest gap between the group's distinct values as
a multiple of s, set s = range / round(range / gap), check that every ŵ/s is an integer (to 2^-7
relative, which also covers bf16 weights), and choose the zero point inside the range the codes
allow (sym: fixed 2^(k−1)).  Any (q, z, s) that passes reproduces ŵ exactly, even where it is not
the method's own (e.g. a GPTQ group that never used its top code).  Groups that fail the cheap
estimate are retried with s = range / m for every m ≤ 2^k − 1; a layer still off the grid is an
error ("not quantized to a k-bit int grid").  act_order groups are taken from ``qstate["g_idx"]``
(without it an act-order model cannot be exported: its groups are not contiguous).

Tolerance of the round trip (tests/test_export.py): scales are fp16 in both our fake-quant
formats and the checkpoint, so the dequantized weights are identical; GPTQModel's CPU kernel
dequantizes in fp16, so logits agree to about 1e-3 relative on float32 models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QuantArgError

EXPORT_BITS = (2, 3, 4, 8)
# group sizes GPTQ loaders read back (GPTQModel's kernels: -1 and powers of two from 32; a
# checkpoint written at group_size 4 or 16 fails to load there, so it is refused here)
EXPORT_GROUP_SIZES = (-1, 32, 64, 128, 256, 512, 1024)
# model_args keys the export command takes besides the quantization ones
EXPORT_KEYS = ("pretrained", "revision", "dtype", "torch_dtype", "trust_remote_code", "batch_size",
               "max_length", "device", "parallelize")
_TMP_RE = r"\.tmp-(\d+)$"
_PREFIX = "export"  # error messages: "lm-eval-quant: error: export: ..."
_PROG = "lm-eval-quant export"


# ---------------------------------------------------------------------------------------------
# argument checks (cheap, before any model work)
# ---------------------------------------------------------------------------------------------
def check_exportable(cfg) -> None:
    """Raise QuantArgError (one line) unless `cfg` can be written as a GPTQ checkpoint."""
    from .methods import available_methods, get_method

    if cfg.method == "none" or not get_method(cfg.method).exportable:
        what = "nothing is quantized" if cfg.method == "none" else f"method={cfg.method} is not exportable"
        ok = [m for m in available_methods() if m != "none" and getattr(get_method(m), "exportable", False)]
        raise QuantArgError(
            f"{_PREFIX}: {what}; GPTQ-format export needs method={' or '.join(ok)} with format=int"
        )
    if str(cfg.format) != "int":
        raise QuantArgError(
            f"{_PREFIX}: format={cfg.format} cannot be written as a GPTQ checkpoint, which stores "
            f"uniform integer codes with a scale and zero point; use format=int"
        )
    if cfg.bits not in EXPORT_BITS:
        raise QuantArgError(
            f"{_PREFIX}: bits={cfg.bits} has no GPTQ checkpoint layout; use bits=2, 3, 4 or 8"
        )
    if cfg.group_size not in EXPORT_GROUP_SIZES:
        raise QuantArgError(
            f"{_PREFIX}: group_size={cfg.group_size} writes a GPTQ checkpoint that GPTQ loaders refuse to "
            f"read; use group_size {', '.join(str(g) for g in EXPORT_GROUP_SIZES)}"
        )


def check_export_shapes(model, cfg) -> None:
    """Every linear that will be quantized fits the GPTQ layout; works on a meta (weightless) model."""
    from .methods.base import quantizable_linears, weight_matrix

    for name, mod in quantizable_linears(model, cfg.skip):
        out_f, in_f = weight_matrix(mod).shape
        _check_shapes(name, out_f, in_f, int(cfg.bits), int(cfg.group_size))


def _check_shapes(name: str, out_f: int, in_f: int, bits: int, group: int) -> None:
    if (in_f * bits) % 32:
        raise QuantArgError(
            f"{_PREFIX}: layer {name} has in_features={in_f}; {bits}-bit GPTQ packing needs "
            f"in_features*bits divisible by 32"
        )
    if (out_f * bits) % 32:
        raise QuantArgError(
            f"{_PREFIX}: layer {name} has out_features={out_f}; {bits}-bit GPTQ zero-point packing "
            f"needs out_features*bits divisible by 32"
        )


# ---------------------------------------------------------------------------------------------
# bit packing (pure tensor functions)
# ---------------------------------------------------------------------------------------------
def pack_rows(values, bits: int):
    """Pack integer codes [N, M] (0 ≤ v < 2^bits) along dim 0 into int32 [N·bits/32, M].

    Runs of 32 codes fill `bits` consecutive 32-bit words as one little-endian bit stream: code j
    of a run occupies stream bits [bits·j, bits·j + bits). For 2/4/8 bits this is the familiar
    ``word |= code << (bits·j)``; for 3 bits it is GPTQ's layout (codes 10 and 21 straddle words).
    """
    import torch

    v = values.to(torch.int64)
    n, m = v.shape
    if (n * bits) % 32 or n % 32 and bits == 3:
        raise ValueError(f"cannot pack {n} rows of {bits}-bit codes into 32-bit words")
    if int(v.min()) < 0 or int(v.max()) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if 32 % bits == 0:
        per = 32 // bits
        v = v.reshape(n // per, per, m)
        shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
        words = (v << shifts).sum(dim=1)
    else:
        runs = v.reshape(n // 32, 32, m)
        words = torch.zeros(n // 32, bits, m, dtype=torch.int64)
        for j in range(32):
            off = bits * j
            w, sh = divmod(off, 32)
            words[:, w] |= (runs[:, j] << sh) & 0xFFFFFFFF
            if sh + bits > 32:
                words[:, w + 1] |= runs[:, j] >> (32 - sh)
        words = words.reshape(n // 32 * bits, m)
    words = words & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_rows(packed, bits: int, n: int, dtype=None):
    """Inverse of :func:`pack_rows`: int32 [n·bits/32, M] → codes [n, M] (int64, or `dtype`)."""
    import torch

    dtype = dtype or torch.int64
    m = packed.shape[1]
    if 32 % bits == 0:  # in int32: an arithmetic shift then the mask gives the same bits
        per = 32 // bits
        shifts = (torch.arange(per, dtype=torch.int32) * bits).view(1, per, 1)
        v = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return v.reshape(-1, m)[:n].to(dtype)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    runs = w.reshape(-1, bits, m)
    out = torch.zeros(runs.shape[0], 32, m, dtype=torch.int64)
    mask = (1 << bits) - 1
    for j in range(32):
        off = bits * j
        wi, sh = divmod(off, 32)
        val = runs[:, wi] >> sh
        if sh + bits > 32:
            val = val | (runs[:, wi + 1] << (32 - sh))
        out[:, j] = val & mask
    return out.reshape(-1, m)[:n].to(dtype)


def pack_cols(values, bits: int):
    """Pack [N, M] codes along dim 1 → int32 [N, M·bits/32] (GPTQ's qzeros layout)."""
    return pack_rows(values.t().contiguous(), bits).t().contiguous()


def unpack_cols(packed, bits: int, m: int):
    return unpack_rows(packed.t().contiguous(), bits, m).t().contiguous()


def gptq_tensors(codes, scale, zero, g_idx, bits: int, off: int) -> dict:
    """One linear's GPTQ tensors from its integer state: codes [out, in], scale [out, G], integer
    zero [out, G], g_idx [in]; ``off`` = 1 for v1 checkpoints (stores zero − 1), 0 for v2.
    Used by the export and by ``execution=real`` (:mod:`lm_eval_quant.execution`)."""
    import torch

    z = torch.round(zero).to(torch.int64) if zero.is_floating_point() else zero.to(torch.int64)
    return {
        "qweight": pack_rows(codes.t().contiguous().to(torch.int64), bits),
        "qzeros": pack_cols((z - off).t().contiguous() & ((1 << bits) - 1), bits),
        "scales": scale.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


# ---------------------------------------------------------------------------------------------
# integer state: from the method, or recovered exactly from the fake-quantized weights
# ---------------------------------------------------------------------------------------------
def _fp16(x):
    import torch

    tiny = float(torch.finfo(torch.float16).tiny)
    return x.clamp(min=tiny, max=65504.0).to(torch.float16).to(torch.float32)


def recover_qstate(w_hat, bits: int, group_size: int, sym: bool, g_idx=None, name: str = "layer") -> dict:
    """Integer codes, fp16-representable scales and zero points that reproduce ŵ [out, in].

    Returns {"codes": uint8 [out, in], "scale": float32 [out, G], "zero": float32 [out, G],
    "g_idx": int32 [in]}. Raises QuantArgError when a group is not on a `bits`-bit int grid.
    See the module docstring for the method.
    """
    import torch

    from .formats.base import block_length, from_blocks, to_blocks

    W = w_hat.detach().to("cpu", torch.float32)
    out_f, in_f = W.shape
    g = block_length(in_f, group_size)
    n_groups = -(-in_f // g)  # a shorter last group when g does not divide in_f
    maxq = (1 << bits) - 1
    g_idx, perm = _group_order(g_idx, in_f, g, n_groups, name)
    Wp = W if perm is None else W[:, perm]
    # [out·G, g]; a short last group is padded with copies of its own last value (same statistics)
    B = to_blocks(Wp, g).reshape(out_f * n_groups, g)
    rng = B.amax(dim=1) - B.amin(dim=1)
    s = _grid_step_guess(B, maxq)
    scale, zero, ok = _solve_grid(B, s, maxq, sym)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten()
        for mm in range(maxq, 0, -1):
            if bad.numel() == 0:
                break
            sc2, z2, ok2 = _solve_grid(B, torch.where(rng > 0, rng / mm, s), maxq, sym)
            fix = bad[ok2[bad]]
            scale[fix], zero[fix], ok[fix] = sc2[fix], z2[fix], True
            bad = bad[~ok2[bad]]
        if bad.numel():
            i = int(bad[0])
            raise QuantArgError(
                f"{_PREFIX}: weights of {name} (row {i // n_groups}, group {i % n_groups}) are not on a "
                f"{bits}-bit{' symmetric' if sym else ''} int grid with group_size={group_size}; "
                f"was the model quantized with these settings?"
            )
    codes = (torch.round(B / scale.unsqueeze(1)) + zero.unsqueeze(1)).clamp(0, maxq)
    codes = from_blocks(codes.reshape(out_f, n_groups, g), in_f).to(torch.uint8).contiguous()
    if perm is not None:
        full = torch.empty_like(codes)
        full[:, perm] = codes
        codes = full
    return {"codes": codes, "scale": scale.reshape(out_f, n_groups),
            "zero": zero.reshape(out_f, n_groups), "g_idx": g_idx}


def _group_order(g_idx, in_f: int, g: int, n_groups: int, name: str):
    """(g_idx as int32, the column permutation that sorts the columns by group, or None when they
    are in order already); an error when g_idx does not make ``n_groups`` groups of ``g`` columns."""
    import torch

    if g_idx is None:
        return torch.arange(in_f, dtype=torch.int32) // g, None
    g_idx = g_idx.to(torch.int32).cpu()
    counts = torch.bincount(g_idx.long(), minlength=n_groups)
    want = torch.full((n_groups,), g, dtype=counts.dtype)
    want[-1] = in_f - (n_groups - 1) * g
    if counts.numel() != n_groups or bool((counts != want).any()):
        raise QuantArgError(f"{_PREFIX}: g_idx of {name} does not have {n_groups} groups of {g} columns")
    perm = torch.argsort(g_idx.long(), stable=True)
    if bool((perm == torch.arange(in_f)).all()):
        perm = None
    return g_idx, perm


def _grid_step_guess(B, maxq: int):
    """Each group's (row of ``B``) grid step read from its values: range / round(range / smallest
    clear gap between sorted values), 0 when that needs more than maxq steps; for a one-value group
    |value| (code offset ±1), or 1 when it is all zero."""
    import torch

    vmin = B.amin(dim=1)
    vmax = B.amax(dim=1)
    rng = vmax - vmin
    srt = B.sort(dim=1).values
    gaps = srt[:, 1:] - srt[:, :-1]
    tol_gap = rng * 1e-4
    gaps = torch.where(gaps > tol_gap.unsqueeze(1), gaps, torch.full_like(gaps, float("inf")))
    gap = gaps.amin(dim=1)
    m = torch.round(rng / gap).clamp(min=1)
    s = torch.where(torch.isfinite(gap) & (m <= maxq), rng / m, torch.zeros_like(rng))
    single = rng == 0
    return torch.where(single, torch.where(vmin != 0, vmin.abs(), torch.ones_like(vmin)), s)


def _solve_grid(B, scale, maxq: int, sym: bool):
    """(fp16-representable scale, integer zero, ok) per group of ``B`` for a candidate step: ok
    where every value lies on the grid (to fp16 precision) with codes in [0, maxq]."""
    import torch

    scale = _fp16(torch.where(scale > 0, scale, torch.ones_like(scale)))
    k = torch.round(B / scale.unsqueeze(1))
    err = (B - k * scale.unsqueeze(1)).abs()
    ok = (err <= (2.0**-7) * B.abs() + 1e-30).all(dim=1)
    kmin, kmax = k.amin(dim=1), k.amax(dim=1)
    if sym:
        z = torch.full_like(scale, float((maxq + 1) // 2))
        ok &= (kmin + z >= 0) & (kmax + z <= maxq)
    else:
        lo = (-kmin).clamp(min=0)          # smallest zero keeping codes ≥ 0
        hi = (maxq - kmax).clamp(max=maxq)  # largest zero keeping codes ≤ maxq
        ok &= lo <= hi
        # prefer a zero ≥ 1 (v1 checkpoints cannot hold 0) when the codes leave the choice
        z = torch.where(lo < 1, torch.minimum(torch.ones_like(lo), hi), lo).clamp(min=0)
    return scale, z, ok


def _dequant(qs: dict):
    gi = qs["g_idx"].long()
    return (qs["codes"].float() - qs["zero"][:, gi]) * qs["scale"][:, gi]


def _check_qstate(name: str, qs: dict, w, bits: int) -> dict:
    """Validate a method-provided qstate against the layer weights; return it normalised."""
    import torch

    for k in ("codes", "scale", "zero", "g_idx"):
        if qs.get(k) is None:
            raise QuantArgError(f"{_PREFIX}: qstate of {name} has no {k}; is the format int?")
    out = {"codes": qs["codes"].cpu().to(torch.uint8), "scale": qs["scale"].cpu().float(),
           "zero": qs["zero"].cpu().float(), "g_idx": qs["g_idx"].cpu().to(torch.int32)}
    if int(out["codes"].max()) >= (1 << bits):
        raise QuantArgError(f"{_PREFIX}: qstate codes of {name} exceed {bits} bits")
    if not torch.equal(_fp16(out["scale"]), out["scale"]):
        raise QuantArgError(f"{_PREFIX}: qstate scales of {name} are not fp16-representable")
    deq = _dequant(out)
    wf = w.detach().cpu().float()
    err = (deq - wf).abs().max().item()
    if err > 2.0**-7 * wf.abs().max().item() + 1e-12:
        raise QuantArgError(
            f"{_PREFIX}: the kept qstate of {name} does not match its weights (max diff {err:.3g}); "
            f"the weights changed after quantization"
        )
    return out


# ---------------------------------------------------------------------------------------------
# writing the checkpoint
# ---------------------------------------------------------------------------------------------
def _linears(model, cfg, report):
    from .methods.base import quantizable_linears, weight_matrix

    lins = quantizable_linears(model, tuple(cfg.skip))
    if report is not None and getattr(report, "quantized", None):
        keep = set(report.quantized)
        lins = [(n, m) for n, m in lins if n in keep]
    return [(n, m, weight_matrix(m)) for n, m in lins]


def _block_suffixes(model, names: list[str]) -> tuple[str | None, list[str] | None, list[str]]:
    """(decoder block prefix, modules_in_block_to_quantize suffixes or None, names outside blocks)."""
    try:
        from .methods.layerwise import LAYER_PATHS
    except Exception:  # pragma: no cover
        LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
    prefix = None
    for p in LAYER_PATHS:
        obj = model
        try:
            for part in p.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        prefix = p
        break
    if prefix is None:
        return None, None, names
    inside, outside = [], []
    for n in names:
        (inside if n.startswith(prefix + ".") else outside).append(n)
    return prefix, inside, outside


@dataclass
class ExportPlan:
    """What will be written, decided before any packing: the linears, their kept integer state,
    the decoder-block layout, the dtype of every tensor that is not packed."""

    cfg: Any
    bits: int
    group: int
    lins: list  # [(name, module, W [out, in])]
    qstate: dict
    block: str | None
    modules_in_block: list | None
    storage_dtype: Any  # torch dtype of unquantized tensors and config.json's dtype
    checkpoint_format: str
    source: str | None = None


def plan_export(model, cfg, report=None, qstate: dict | None = None, checkpoint_format: str = "auto",
                storage_dtype: Any = None, source: str | None = None) -> ExportPlan:
    """Check that `model` (quantized with `cfg`) can be written and decide how; one-line
    QuantArgError otherwise. `storage_dtype` None: the checkpoint's own dtype when the model
    came from a local folder (:func:`lm_eval_quant.accounting.checkpoint_dtype`), else the model's."""
    from .accounting import as_dtype, checkpoint_dtype

    check_exportable(cfg)
    if checkpoint_format not in ("auto", "gptq", "gptq_v2"):
        raise QuantArgError(f"{_PREFIX}: checkpoint_format must be auto, gptq or gptq_v2, got {checkpoint_format!r}")
    bits, group = int(cfg.bits), int(cfg.group_size)
    if qstate is None and report is not None:
        qstate = (getattr(report, "extra", None) or {}).get("qstate")
    qstate = qstate or {}
    opts = cfg.options or {}
    if opts.get("act_order") and not opts.get("static_groups"):
        missing = [n for n in ((report.quantized if report is not None else None) or []) if n not in qstate]
        if not qstate or missing:
            raise QuantArgError(
                f"{_PREFIX}: act_order=true puts columns in non-contiguous groups that cannot be read back "
                f"from the weights; quantize with keep_qstate=true (the export command does this itself)"
            )
    lins = _linears(model, cfg, report)
    if not lins:
        raise QuantArgError(f"{_PREFIX}: the model has no quantized linear layers to export")
    for name, _, W in lins:
        _check_shapes(name, W.shape[0], W.shape[1], bits, group)
    names = [n for n, _, _ in lins]
    block, inside, outside = _block_suffixes(model, names)
    if outside:
        raise QuantArgError(
            f"{_PREFIX}: {outside[0]} lies outside the decoder layers; GPTQ checkpoints only quantize "
            f"linears inside them (keep it in skip=)"
        )
    sdt = as_dtype(storage_dtype) if storage_dtype is not None else as_dtype(checkpoint_dtype(model))
    if sdt is None:
        sdt = next(model.parameters()).dtype
    return ExportPlan(cfg=cfg, bits=bits, group=group, lins=lins, qstate=qstate, block=block,
                      modules_in_block=_modules_in_block(model, block, inside), storage_dtype=sdt,
                      checkpoint_format=checkpoint_format, source=None if source is None else str(source))


def _modules_in_block(model, block: str, inside: list[str]) -> list | None:
    """GPTQ's ``modules_in_block_to_quantize`` when skip= leaves some in-block linears
    unquantized (the same ones in every layer), else None."""
    all_in_block = [n for n, m in model.named_modules() if n.startswith(block + ".") and _is_lin(m)]
    if set(all_in_block) == set(inside):
        return None

    def suffix(n):
        rest = n[len(block) + 1:]
        return rest.split(".", 1)[1] if "." in rest else rest

    want = sorted({suffix(n) for n in inside})
    for n in all_in_block:
        if (n in set(inside)) != (suffix(n) in want):
            raise QuantArgError(
                f"{_PREFIX}: skip= excludes {n} in some decoder layers but not in others; a GPTQ "
                f"checkpoint can only leave the same linears unquantized in every layer"
            )
    return [want]


def save_quantized(model, cfg, path, report=None, tokenizer=None, qstate: dict | None = None,
                   checkpoint_format: str = "auto", progress: bool = True, source: str | None = None,
                   storage_dtype: Any = None) -> Path:
    """Write the (fake-)quantized `model` as a GPTQ-format checkpoint in `path`: plan, pack, write.

    `cfg` is the QuantConfig the model was quantized with; `report` its QuantReport (its
    ``quantized`` list names the linears; ``extra["qstate"]`` is used when present); `qstate`
    overrides the report's (``{}``: ignore it and recover the state from the weights). `source`
    (the model id it came from) is recorded in the config's quantization meta. Tensors that are
    not packed (embeddings, norms, a tied head written once) are written at `storage_dtype`
    (default: the source checkpoint's dtype). The model is not modified. Returns the output path.
    """
    plan = plan_export(model, cfg, report, qstate, checkpoint_format, storage_dtype, source)
    out = Path(path)
    check_output(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        state, fmt, desc_act = pack_export(model, plan, progress)
        return write_export(model, plan, state, fmt, desc_act, out, tmp, tokenizer)
    except OSError as e:  # no space, read-only, ...: nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise QuantArgError(f"{_PREFIX}: writing {out} failed ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pack_export(model, plan: ExportPlan, progress: bool = True) -> tuple[dict, str, bool]:
    """(state dict to write, checkpoint format "gptq"/"gptq_v2", desc_act): every planned linear
    packed from its integer state (kept, else recovered from the weights), every other tensor at
    the plan's storage dtype, a tied output head once."""
    import torch
    from tqdm.auto import tqdm

    from .formats.base import block_length

    bits, group = plan.bits, plan.group
    packed: dict[str, Any] = {}
    any_zero0 = False
    desc_act = False
    with torch.no_grad():
        for name, mod, W in tqdm(plan.lins, desc="export: packing", unit="layer", disable=not progress):
            qs = plan.qstate.get(name)
            if qs is not None:
                qs = _check_qstate(name, qs, W, bits)
            else:
                qs = recover_qstate(W, bits, group, bool(plan.cfg.sym), name=name)
            n_in = W.shape[1]
            gsz = block_length(n_in, group)
            desc_act |= not torch.equal(qs["g_idx"].long(), torch.arange(n_in) // gsz)
            zero = torch.round(qs["zero"]).to(torch.int64)        # [out, G]
            any_zero0 |= bool((zero == 0).any())
            packed[name] = (qs["codes"], qs["scale"], zero, qs["g_idx"])

        fmt = plan.checkpoint_format
        if fmt == "auto":
            fmt = "gptq_v2" if any_zero0 else "gptq"
        elif fmt == "gptq" and any_zero0:
            raise QuantArgError(
                f"{_PREFIX}: some zero points are 0, which checkpoint_format=gptq (v1, stores zero-1) "
                f"cannot hold; use checkpoint_format=gptq_v2 or auto"
            )
        off = 1 if fmt == "gptq" else 0

        state: dict[str, torch.Tensor] = {}
        replaced = set()
        for name, (codes, scale, zero, g_idx) in packed.items():
            mod = model.get_submodule(name)
            for k, v in gptq_tensors(codes, scale, zero, g_idx, bits, off).items():
                state[f"{name}.{k}"] = v
            if getattr(mod, "bias", None) is not None:
                state[f"{name}.bias"] = mod.bias.detach().cpu().to(torch.float16).contiguous()
                replaced.add(f"{name}.bias")
            replaced.add(f"{name}.weight")
        replaced |= set(tied_duplicates(model))
        for k, v in model.state_dict().items():
            if k in replaced:
                continue
            v = v.detach().cpu()
            if v.is_floating_point() and v.dtype != plan.storage_dtype:
                v = v.to(plan.storage_dtype)
            state[k] = v.contiguous().clone()
    return state, fmt, desc_act


def tied_duplicates(model) -> list[str]:
    """State-dict names that are the same tensor as an earlier one because the config ties them
    (``tie_word_embeddings``: the output head is the input embedding): written once, loaders
    re-tie them from the config. Untied copies (e.g. a head the method quantized) are kept."""
    conf = getattr(model, "config", None)
    if not getattr(conf, "tie_word_embeddings", False):
        return []
    seen: dict[tuple, str] = {}
    dups = []
    for k, v in model.state_dict(keep_vars=True).items():
        if not getattr(v, "numel", lambda: 0)():
            continue
        ptr = (v.data_ptr(), tuple(v.shape), v.dtype)
        if ptr in seen:
            dups.append(k)
        else:
            seen[ptr] = k
    return dups


def write_export(model, plan: ExportPlan, state: dict, fmt: str, desc_act: bool, out: Path, tmp: Path,
                 tokenizer=None) -> Path:
    """Write the tensors, config.json (+ quantization_config), generation config and tokenizer
    into `tmp`, then publish it as `out` with one rename."""
    from safetensors.torch import save_file

    from . import __version__

    cfg = plan.cfg
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    opts = cfg.options or {}
    qcfg = {
        "quant_method": "gptq",
        "bits": plan.bits,
        "group_size": plan.group,
        "desc_act": bool(desc_act),
        "sym": bool(cfg.sym),
        "static_groups": bool(opts.get("static_groups", False)),
        "true_sequential": bool(opts.get("true_sequential", True)),
        "damp_percent": float(opts.get("damp", 0.01)),
        "lm_head": False,
        "checkpoint_format": fmt,
        "format": fmt,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"lm_eval_quant:{__version__}"],
                 "lm_eval_quant": {"quant_config": cfg.to_dict(), "source": plan.source}},
    }
    if plan.modules_in_block is not None:
        qcfg["block_name_to_quantize"] = plan.block
        qcfg["modules_in_block_to_quantize"] = plan.modules_in_block
    conf = model.config.to_dict()
    conf["quantization_config"] = qcfg
    conf["dtype"] = str(plan.storage_dtype).replace("torch.", "")
    conf.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True, default=str) + "\n")
    (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(tmp)
        except (ValueError, TypeError) as e:  # an invalid generation config: the checkpoint loads without it
            print(f"{_PROG}: warning: generation_config.json not written ({e})", file=sys.stderr)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def check_output(out) -> None:
    """Before any model work: the target must be a new or empty folder, or one we exported
    before, in a place we can write. Stale ``OUT.tmp-<pid>`` folders of runs that died are
    removed."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise QuantArgError(f"{_PREFIX}: output {out} is a file; give a folder")
    if re.search(_TMP_RE, out.name):
        raise QuantArgError(f"{_PREFIX}: output {out} looks like an unfinished export's temp folder; choose another name")
    if out.exists() and any(out.iterdir()):
        try:
            q = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
            ours = any(str(x).startswith("lm_eval_quant:") for x in (q.get("meta") or {}).get("quantizer", []))
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise QuantArgError(
                f"{_PREFIX}: output folder {out} is not empty and is not an earlier lm-eval-quant export; "
                f"choose a new folder"
            )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QuantArgError(f"{_PREFIX}: cannot create {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantArgError(f"{_PREFIX}: cannot write {out}: {parent} is not writable")
    clean_stale_tmp(out)


def clean_stale_tmp(out: Path) -> list[Path]:
    """Remove ``OUT.tmp-<pid>`` folders left by exports that were killed or ran out of space
    (their process is gone). Returns what was removed."""
    removed = []
    parent = Path(out).parent
    if not parent.is_dir():
        return removed
    for p in parent.glob(f"{Path(out).name}.tmp-*"):
        m = re.search(_TMP_RE, p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        print(f"{_PROG}: removed {len(removed)} unfinished export folder(s) next to {out}", file=sys.stderr)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_lin(m) -> bool:
    from .methods.base import is_quantizable

    return is_quantizable(m)


def main(argv: list[str] | None = None) -> int:
    """`lm-eval-quant export ...` (the command lives in :mod:`lm_eval_quant.export_cli`)."""
    from .export_cli import main as _main

    return _main(argv)

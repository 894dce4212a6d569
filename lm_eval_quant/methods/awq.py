"""AWQ: activation-aware weight quantization (Lin et al. 2023), our own implementation.

Per decoder layer (driven by :mod:`lm_eval_quant.methods.layerwise`, so each layer sees the
outputs of the already quantized previous layers):

1. One full-precision forward of the layer over the calibration batch accumulates, for every set
   of linears that share one input tensor (q/k/v; gate/up; o; down — found by
   ``LayerStep.linear_groups``), the per-input-channel mean ``s_x = mean|x|`` and the Gram matrix
   ``H = Xᵀ X`` (``in × in``).  With H the quantization error of any weight ``Ŵ`` on all
   calibration tokens is exact and cheap: ``||X Ŵᵀ − X Wᵀ||² = Σ_rows e H eᵀ`` (e = Ŵ − W row).
2. **Scale search.**  For α = i/n_grid, i = 0..n_grid−1 (α = 0 is plain RTN):
   ``s = s_x^α`` (s_x clamped ≥ 1e-4), normalised by ``√(max s · min s)``; the group's quantized
   linears get ``Q(W·diag(s))·diag(s)⁻¹`` and the best α (smallest loss; ties to the smaller α) is
   kept.  The loss (option ``loss``):
   * ``module`` (default, the paper's "module2inspect"): MSE of the output of the group's
     *enclosing module* — the lowest common ancestor of its linears inside the decoder layer
     (q/k/v → ``self_attn``; gate/up → ``mlp``) — against its full-precision output, on the
     calibration tokens.  Its positional and keyword args and its output are recorded during the
     fp forward of step 1 (forward pre-hook ``with_kwargs=True``); for each α the weights are
     swapped in, the module is called once per calibration batch, and the weights are restored.
     One-linear groups (o, down, GPT-2 ``c_attn``) use the linear loss below, which is then exactly
     the same thing; a group whose only common ancestor is the decoder layer, or whose module does
     not reproduce its recorded output when called standalone, falls back to it too (reported in
     ``extra["awq"]["loss_fallback"]``).  Costs ``n_grid`` forwards of the modules per layer.
   * ``linear``: MSE of the group's *concatenated linear outputs* ``X [Q(W·s)/s]ᵀ`` against
     ``X Wᵀ``, in closed form in H, vectorised over α (cheaper, no module forwards).
3. **Fold.** ``1/s`` goes into what produces the group's input, ``s`` into the linears' input
   columns, so the full-precision function is unchanged:
   * a norm (LayerNorm / RMSNorm) whose output tensor *is* the group input: ``weight /= s`` (and
     ``bias``) — detected generically by tensor identity during the forward;
   * a linear whose outputs reach the group channel by channel through a positively homogeneous
     path: ``v_proj → o_proj`` (attention is linear in V; only when ``v_proj.out == o_proj.in``,
     i.e. not for grouped-query attention), GPT-2 ``c_attn[V part] → attn.c_proj``,
     ``up_proj → down_proj`` (``act(gate)·up``), OPT ``fc1 → fc2`` (ReLU); and any linear whose
     output tensor is the group input.  GPT-2's ``mlp.c_proj`` follows a GELU: not foldable,
     so it gets clip + RTN only.
   Every fold is checked numerically on one calibration sample (layer output before vs after,
   relative error ≤ 1e-3 in fp32, 5e-2 in fp16/bf16); a fold that changes the function (e.g.
   Gemma's ``(1 + w)`` norms, GELU paths) is reverted and the group is left unscaled (reported in
   ``extra["awq"]["unscaled"]``).
4. **Clip search** (``clip=true``): per output row and group, shrink ``max|w|`` over ``clip_grid``
   ratios from 1.0 down to ``max_shrink`` (0.5), clamp the weights to ``±ratio·max|w|``, quantize,
   and keep the ratio with the smallest error of that group's partial output
   ``X_g (ŵ_g − w_g)ᵀ`` on the calibration tokens (the diagonal blocks of H, as the AWQ code
   measures it).  The weights are clamped to the chosen ratio.  ``clip_qk=false`` does as the
   reference code and leaves the query/key projections (``q_*``, ``k_*``, ``query``, ``key``,
   fused ``qkv`` / ``Wqkv`` / ``c_attn``) unclipped: their errors meet in ``q·kᵀ``, which the
   partial-output error does not measure (``extra["awq"]["clip_skipped"]``).  The default
   (``true``) clips them too: 3-bit stories260K perplexity 5.96 vs 6.22 (per-channel) and 4.57 vs
   4.72 (g32) with ``loss=linear``; the 150-step toy Llama prefers ``false`` (2.0505 vs 2.0586).
5. Quantize with round-to-nearest in the chosen format (every format: int sym/asym, fp, nf,
   dynamic) and group size.

Options: ``n_grid`` (20; 1 disables the scale search), ``loss`` (``module``|``linear``, default
``module``), ``clip`` (true), ``clip_qk`` (true), ``clip_grid`` (20),
``max_shrink`` (0.5), ``calib`` (``auto``: the paper's Pile validation set, falling back to c4 then
wikitext2 — see calibration.py for where each comes from; or c4|wikitext2|pile|PATH),
``nsamples`` (128), ``seqlen`` (512, as the paper; clipped to the model maximum), ``calib_seed``
(0), ``calib_batch`` (0 = automatic).  Deterministic: the same config gives identical weights.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import QuantArgError
from ..formats import block_length, from_blocks, make_format, n_groups, quantize_weight, to_blocks
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

__all__ = [
    "AWQ",
    "fake_quant",
    "search_scale",
    "search_scale_module",
    "search_clip",
    "apply_clip",
    "scale_candidates",
    "awq_quantize_model",
]

# elements per temporary [chunk, out, in] tensor in the searches (~16 MB in fp32).  A format's fake()
# makes several such temporaries at once: at 1 << 25 the clip search alone held ~500 MB on SmolLM2's
# MLP (peak RSS 1.36x the fp32 weights above the model); 1 << 22 is as fast and keeps it small
_BUDGET = 1 << 22
_NORM_HINTS = ("norm", "ln")
# linears whose outputs meet in the q·kᵀ product are not clipped (as llm-awq / AutoAWQ: "due to qk bmm,
# it is hard to clip precisely"); c_attn / qkv_proj / query_key_value are fused q/k/v projections
_NO_CLIP = ("q_", "k_", "query", "key", "wqkv", "qkv", "c_attn")


def _no_clip(name: str) -> bool:
    leaf = name.rpartition(".")[2].lower()
    return any(h in leaf for h in _NO_CLIP)


# ----------------------------------------------------------------------------------------- math
def fake_quant(W: torch.Tensor, fmt, group_size: int) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``W[..., out, in]`` block-wise along ``in`` (float32)."""
    in_f = W.shape[-1]
    B = to_blocks(W.float(), block_length(in_f, group_size))  # a shorter last group is padded, then dropped
    return from_blocks(fmt.fake(B, fmt.fit(B)), in_f)


def scale_candidates(x_mean: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``s = s_x^α`` per α (rows), normalised by ``√(max s · min s)``; ``[len(alphas), in]``."""
    sx = x_mean.float().clamp(min=1e-4)
    s = sx[None, :] ** alphas.float()[:, None]
    s = s / (s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True)).sqrt()
    return s


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], H: torch.Tensor, x_mean: torch.Tensor, n_tokens: int,
                 fmt, group_size: int, n_grid: int = 20) -> tuple[torch.Tensor, float, torch.Tensor]:
    """AWQ grid search over α for linears sharing one input.

    weights: the group's ``[out_i, in]`` matrices (the ones that will be quantized);
    H: ``Xᵀ X`` of their input (``in × in``, float32); x_mean: ``mean|x|`` per input channel.
    Returns ``(s, best_alpha, mse)`` where ``mse[i]`` is the output MSE of the group's concatenated
    linear outputs at ``α = i / n_grid`` (``mse[0]`` is plain RTN); ties go to the smaller α.
    """
    W = torch.cat([w.float() for w in weights], 0).to(H.device)
    out_f, in_f = W.shape
    alphas = torch.arange(n_grid, dtype=torch.float32, device=H.device) / n_grid
    S = scale_candidates(x_mean.to(H.device), alphas)
    losses = torch.empty(n_grid, dtype=torch.float64)
    chunk = max(1, _BUDGET // max(1, out_f * in_f))
    for a0 in range(0, n_grid, chunk):
        s = S[a0 : a0 + chunk]  # [a, in]
        Ws = W[None] * s[:, None, :]
        E = fake_quant(Ws, fmt, group_size) / s[:, None, :] - W[None]
        del Ws
        losses[a0 : a0 + chunk] = ((E @ H) * E).sum(dim=(1, 2)).double().cpu()
        del E
    mse = losses / max(1, n_tokens * out_f)
    best = int(torch.argmin(mse))  # first minimum: the smallest α among ties
    return S[best].clone(), float(alphas[best]), mse


@torch.no_grad()
def search_scale_module(module: nn.Module, calls: list, members: list[nn.Module], x_mean: torch.Tensor,
                        fmt, group_size: int, n_grid: int = 20) -> tuple[torch.Tensor, float, torch.Tensor]:
    """AWQ grid search over α measured on the output of the enclosing ``module`` (the paper's loss).

    calls: ``[(args, kwargs, ref_out), ...]`` recorded during the full-precision forward of the layer
    (one entry per calibration batch); members: the group's linears that will be quantized (they
    must live inside ``module``).  For each α the members' weights are temporarily replaced by
    ``Q(W·diag(s))·diag(s)⁻¹``, ``module`` is called on every recorded input and the squared error
    of its (first) output against ``ref_out`` is summed; the weights are restored afterwards.
    Returns ``(s, best_alpha, mse)`` like :func:`search_scale` (``mse[0]`` is plain RTN).
    """
    dev = weight_matrix(members[0]).device
    alphas = torch.arange(n_grid, dtype=torch.float32, device=dev) / n_grid
    S = scale_candidates(x_mean.to(dev), alphas)
    W0 = [weight_matrix(m).float().clone() for m in members]  # exact upcast: also what is restored
    losses = torch.empty(n_grid, dtype=torch.float64)
    numel = sum(int(ref.numel()) for _, _, ref in calls)
    try:
        for i in range(n_grid):
            s = S[i]
            for m, W in zip(members, W0):
                set_weight_matrix(m, fake_quant(W * s[None, :], fmt, group_size) / s[None, :])
            tot = torch.zeros((), dtype=torch.float64, device=dev)
            for args, kwargs, ref in calls:
                out = _first(module(*args, **kwargs))
                tot += ((out.float() - ref.float()) ** 2).sum(dtype=torch.float64)
            losses[i] = float(tot)
    finally:
        for m, W in zip(members, W0):
            set_weight_matrix(m, W)
    mse = losses / max(1, numel)
    best = int(torch.argmin(mse))  # first minimum: the smallest α among ties
    return S[best].clone(), float(alphas[best]), mse


def _diag_blocks(H: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal ``g × g`` blocks of H: ``[n_groups, g, g]``."""
    n = H.shape[0] // g
    return H.reshape(n, g, n, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor, fmt, group_size: int, clip_grid: int = 20,
                max_shrink: float = 0.5, return_errors: bool = False):
    """Per (output row, group) clip ratio minimising the group's partial output error.

    For ratio r on ``linspace(1, max_shrink, clip_grid)``: ``w_c = clamp(w, ±r·max|w|)``, quantized;
    error ``(ŵ − w) H_gg (ŵ − w)ᵀ`` with ``H_gg`` the group's diagonal block of ``Xᵀ X``.
    Returns ratios ``[out, n_groups, 1]`` (and the errors ``[grid, out, n_groups]`` if asked).
    """
    W = W.float().to(H.device)
    out_f, in_f = W.shape
    g = block_length(in_f, group_size)
    ng = n_groups(in_f, group_size)
    pad = ng * g - in_f
    H = H.float()
    if pad:  # a shorter last group: pad columns repeat the group's last weight and get zero rows of H
        H = torch.nn.functional.pad(H, (0, pad, 0, pad))
    Hb = _diag_blocks(H, g)  # [ng, g, g]
    ratios = torch.linspace(1.0, float(max_shrink), clip_grid, device=H.device) if clip_grid > 1 \
        else torch.ones(1, device=H.device)
    Wb = to_blocks(W, g)
    amax = Wb.abs().amax(dim=-1, keepdim=True)  # [out, ng, 1]
    best = torch.empty(out_f, ng, 1, device=H.device)
    errs_all = [] if return_errors else None
    rows = max(1, _BUDGET // max(1, len(ratios) * ng * g))
    for r0 in range(0, out_f, rows):
        w = Wb[r0 : r0 + rows]  # [o, ng, g]
        lim = ratios[:, None, None, None] * amax[None, r0 : r0 + rows]  # [R, o, ng, 1]
        wc = torch.maximum(torch.minimum(w[None], lim), -lim)
        e = fmt.fake(wc, fmt.fit(wc)) - w[None]  # [R, o, ng, g]
        err = torch.einsum("rong,ngh,ronh->ron", e, Hb, e)
        best[r0 : r0 + rows, :, 0] = ratios[err.argmin(dim=0)]
        if return_errors:
            errs_all.append(err.cpu())
    if return_errors:
        return best, torch.cat(errs_all, dim=1)
    return best


def apply_clip(W: torch.Tensor, ratio: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp each (row, group) of ``W [out, in]`` to ``±ratio·max|w|`` (ratio ``[out, n_groups, 1]``)."""
    in_f = W.shape[1]
    Wb = to_blocks(W.float(), block_length(in_f, group_size))
    lim = ratio.to(W.device) * Wb.abs().amax(dim=-1, keepdim=True)
    return from_blocks(torch.maximum(torch.minimum(Wb, lim), -lim), in_f)


# ------------------------------------------------------------------------------------ structure
def _slice_batch(obj: Any, n: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[:1] if obj.dim() > 0 and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, n) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, n) for k, v in obj.items()}
    return obj


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "last_hidden_state", out)


def _in_features(m: nn.Module) -> int:
    return weight_matrix(m).shape[1]


def _out_features(m: nn.Module) -> int:
    return weight_matrix(m).shape[0]


def _is_norm(mod: nn.Module, in_f: int) -> bool:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() != in_f:
        return False
    cname = type(mod).__name__.lower()
    return isinstance(mod, nn.LayerNorm) or any(h in cname for h in _NORM_HINTS)


def _linear_rule(local: str, module: nn.Module, by_local: dict[str, nn.Module]):
    """Producer linear (and its output-row slice) of a linear's input by name, or None."""
    parent, _, leaf = local.rpartition(".")

    def sib(n):
        return by_local.get(f"{parent}.{n}" if parent else n)

    in_f = _in_features(module)
    if leaf in ("o_proj", "out_proj", "dense", "wo"):
        v = sib("v_proj")
        if v is not None and _out_features(v) == in_f:
            return v, slice(0, in_f)
    if leaf == "c_proj":
        c = sib("c_attn")
        if c is not None and _out_features(c) == 3 * in_f:
            return c, slice(2 * in_f, 3 * in_f)
    if leaf == "down_proj":
        up = sib("up_proj")
        if up is not None and _out_features(up) == in_f:
            return up, slice(0, in_f)
    if leaf == "fc2":
        fc1 = sib("fc1")
        if fc1 is not None and _out_features(fc1) == in_f:
            return fc1, slice(0, in_f)
    return None


def _params_of(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in (("weight", getattr(mod, "weight", None)), ("bias", getattr(mod, "bias", None)))
            if isinstance(v, torch.Tensor)}


@torch.no_grad()
def _fold(producer, members: list[nn.Module], s: torch.Tensor) -> None:
    """Divide the producer's outputs by s and multiply the members' input columns by s."""
    kind, mod, rows = producer
    if kind == "norm":
        for p in _params_of(mod).values():
            p.data.copy_((p.data.float() / s.to(p.device)).to(p.dtype))
    else:
        W = weight_matrix(mod).float().clone()
        W[rows] = W[rows] / s.to(W.device)[:, None]
        set_weight_matrix(mod, W)
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor):
            bb = b.data.float().clone()
            bb[rows] = bb[rows] / s.to(bb.device)
            b.data.copy_(bb.to(b.dtype))
    for m in members:
        W = weight_matrix(m).float() * s.to(m.weight.device)[None, :]
        set_weight_matrix(m, W)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _enclosing_module(layer: nn.Module, locals_: list[str]) -> tuple[nn.Module | None, str]:
    """Lowest common ancestor (inside ``layer``) of the group's linears, by their local names.

    ``(None, "")`` for a one-linear group (its own output is the loss: the H closed form is exact) and
    when the only common ancestor is the decoder layer itself.
    """
    if len(locals_) < 2:
        return None, ""
    parts = [n.split(".") for n in locals_]
    common: list[str] = []
    for xs in zip(*parts):
        if any(x != xs[0] for x in xs):
            break
        common.append(xs[0])
    if not common or any(len(p) == len(common) for p in parts):
        return None, ""
    name = ".".join(common)
    try:
        return layer.get_submodule(name), name
    except AttributeError:
        return None, ""


class _Capture:
    """Records ``(args, kwargs, first output)`` of every call of one module during a forward."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        self._pending: tuple | None = None
        self.ok = True
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                        module.register_forward_hook(self._post)]

    def _pre(self, mod, args, kwargs):
        self._pending = (tuple(args), dict(kwargs))

    def _post(self, mod, args, out):
        o = _first(out)
        if self._pending is None or not isinstance(o, torch.Tensor):
            self.ok = False
            return
        self.calls.append((*self._pending, o.detach()))
        self._pending = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _Stats:
    __slots__ = ("H", "absum", "n")

    def __init__(self, in_f: int, device):
        self.H = torch.zeros(in_f, in_f, dtype=torch.float32, device=device)
        self.absum = torch.zeros(in_f, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.H.addmm_(x.t(), x)
        self.absum += x.abs().sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.absum / max(1, self.n)).float()


@torch.no_grad()
def _module_replays(cap, tol: float) -> bool:
    """Can the captured module be called standalone on its first recorded input (same output)?"""
    mod, _, c = cap
    if not c.ok or not c.calls:
        return False
    args, kwargs, ref = c.calls[0]
    try:
        out = _first(mod(*args, **kwargs))
    except Exception:
        return False
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return False
    err = _rel_err(out, ref)
    return math.isfinite(err) and err <= tol


# ------------------------------------------------------------------------------------ the layer
@dataclass
class _AWQSettings:
    """The search settings of one AWQ run (typed by the argument layer)."""

    fmt: Any
    group_size: int
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    quantize: bool = True
    loss: str = "module"
    clip_qk: bool = True


class _LayerView:
    """One decoder layer's linears, grouped by shared input, with their local and full names."""

    def __init__(self, step):
        self.step = step
        self.layer = step.layer
        self.linears = step.linears()  # every linear of the layer: folds must scale skipped consumers too
        self.groups = step.linear_groups(linears=self.linears)
        prefix = step.name + "."
        self.by_local = {n[len(prefix):]: m for n, m in self.linears}
        self.local_of = {id(m): n[len(prefix):] for n, m in self.linears}
        self.name_of = {id(m): n for n, m in self.linears}


def _awq_layer(step, qnames: set[str], st: _AWQSettings, log: dict, modified: set[str]) -> None:
    """AWQ on one decoder layer, in four named steps: statistics (one fp forward, which also
    finds each group's producer), scale search + fold, then clip search + round-to-nearest."""
    view = _LayerView(step)
    if not any(n in qnames for n, _ in view.linears):
        return
    captures = _module_captures(view, qnames, st)
    stats, producers = _layer_statistics(view, captures)
    scales = _search_and_fold_scales(view, qnames, st, stats, producers, captures, log, modified)
    if st.quantize:
        _clip_and_quantize(view, qnames, st, stats, scales, log, modified)


def _module_captures(view: _LayerView, qnames: set[str], st: _AWQSettings) -> list:
    """loss=module: record the inputs/outputs of each multi-linear group's enclosing module."""
    captures: list[tuple[nn.Module, str, _Capture] | None] = [None] * len(view.groups)
    if st.loss == "module" and st.n_grid > 1:
        by_mod: dict[int, _Capture] = {}
        for gi, g in enumerate(view.groups):
            if not any(n in qnames for n, _ in g):
                continue
            mod, mname = _enclosing_module(view.layer, [view.local_of[id(m)] for _, m in g])
            if mod is None:
                continue
            if id(mod) not in by_mod:
                by_mod[id(mod)] = _Capture(mod)
            captures[gi] = (mod, mname, by_mod[id(mod)])
    return captures


def _layer_statistics(view: _LayerView, captures: list) -> tuple[list, list]:
    """Step 1: one fp forward over every calibration batch: the input statistics of every group,
    and (from the first batch, by tensor identity) the module that produces each group's input."""
    step, groups, layer, local_of = view.step, view.groups, view.layer, view.local_of
    stats = [_Stats(_in_features(g[0][1]), step.device) for g in groups]
    outputs: dict[int, tuple[str, nn.Module, torch.Tensor]] = {}  # keeps the tensors alive
    inputs_seen: list[torch.Tensor | None] = [None] * len(groups)
    first = {"on": True}
    handles = []
    for gi, g in enumerate(groups):
        def pre(mod, args, _gi=gi):
            stats[_gi].add(args[0])
            if first["on"] and inputs_seen[_gi] is None:
                inputs_seen[_gi] = args[0]
        handles.append(g[0][1].register_forward_pre_hook(pre))
    for lname, sub in layer.named_modules():
        if not lname or not (id(sub) in local_of or isinstance(getattr(sub, "weight", None), torch.Tensor)
                             and sub.weight.dim() == 1):
            continue  # only linears and norm-like modules can be producers

        def post(mod, args, out, _n=lname):
            if first["on"] and isinstance(out, torch.Tensor):
                outputs[id(out)] = (_n, mod, out)
        handles.append(sub.register_forward_hook(post))
    try:
        # the first batch records identities; keep its tensors alive until producers are resolved
        step.forward(batches=[0])
        producers = _producers(view, inputs_seen, outputs)
        first["on"] = False
        inputs_seen = [None] * len(groups)
        outputs.clear()
        if len(step.inputs) > 1:
            step.forward(batches=range(1, len(step.inputs)))
    finally:
        for h in handles:
            h.remove()
        for c in captures:
            if c is not None:
                c[2].remove()
    return stats, producers


def _producers(view: _LayerView, inputs_seen: list, outputs: dict) -> list:
    """Each group's producer: the norm or linear whose output is the group's input (so the scale
    can be folded into it), else a known linear pair (e.g. v_proj -> o_proj), else None."""
    producers = []
    for gi, g in enumerate(view.groups):
        t = inputs_seen[gi]
        prod = None
        if t is not None and id(t) in outputs:
            pname, pmod, _ = outputs[id(t)]
            in_f = _in_features(g[0][1])
            if _is_norm(pmod, in_f):
                prod = ("norm", pmod, None, pname)
            elif id(pmod) in view.local_of and _out_features(pmod) == in_f:
                prod = ("linear", pmod, slice(0, in_f), view.local_of[id(pmod)])
        if prod is None and len(g) == 1:
            r = _linear_rule(view.local_of[id(g[0][1])], g[0][1], view.by_local)
            if r is not None:
                prod = ("linear", r[0], r[1], view.local_of[id(r[0])])
        producers.append(prod)
    return producers


def _search_and_fold_scales(view: _LayerView, qnames: set[str], st: _AWQSettings, stats: list, producers: list,
                            captures: list, log: dict, modified: set[str]) -> list:
    """Step 2: per group (in call order) search the activation-aware scale and fold it into the
    producer; a fold that changes the layer's output on the first sample is undone."""
    step, layer, local_of, name_of = view.step, view.layer, view.local_of, view.name_of
    n0 = step.inputs[0].shape[0]
    probe = (step.inputs[0][:1], _slice_batch(step.args[0], n0), _slice_batch(step.kwargs[0], n0))
    with torch.no_grad():
        ref = _first(layer(probe[0], *probe[1], **probe[2])).float().clone()
    dt = next(layer.parameters()).dtype
    tol = 1e-3 if dt == torch.float32 or dt == torch.float64 else 5e-2

    scales: list[torch.Tensor | None] = [None] * len(view.groups)
    for gi, g in enumerate(view.groups):
        qmem = [(n, m) for n, m in g if n in qnames]
        prod = producers[gi]
        gname = "+".join(local_of[id(m)] for _, m in g)
        if not qmem or st.n_grid <= 1:
            continue
        if prod is None:
            log["unscaled"].append(f"{step.name}:{gname} (no foldable producer)")
            continue
        sg = stats[gi]
        key = f"{step.name}:{gname}"
        cap = captures[gi]
        if cap is not None and not _module_replays(cap, tol):
            log["loss_fallback"].append(f"{key} ({cap[1]} cannot be called on its recorded inputs)")
            cap = None
        if cap is not None:
            s, alpha, mse = search_scale_module(cap[0], cap[2].calls, [m for _, m in qmem], sg.mean, st.fmt,
                                                st.group_size, st.n_grid)
            log["loss"][key] = f"module:{cap[1]}"
        else:
            s, alpha, mse = search_scale([weight_matrix(m) for _, m in qmem], sg.H, sg.mean, sg.n, st.fmt,
                                         st.group_size, st.n_grid)
            log["loss"][key] = "linear"
        kind, pmod, rows, pname = prod
        if alpha == 0.0:
            log["alpha"][key] = 0.0
            continue
        saved = [(p, p.data.clone()) for m in [pmod] + [m for _, m in g] for p in _params_of(m).values()]
        _fold((kind, pmod, rows), [m for _, m in g], s)
        with torch.no_grad():
            out = _first(layer(probe[0], *probe[1], **probe[2])).float()
        err = _rel_err(out, ref)
        if not math.isfinite(err) or err > tol:
            for p, d in saved:
                p.data.copy_(d)
            log["unscaled"].append(f"{step.name}:{gname} (fold into {pname} changes the output: rel err {err:.2e})")
            continue
        scales[gi] = s
        log["alpha"][key] = alpha
        log["mse_gain"][key] = float(mse[0] / mse.min()) if float(mse.min()) > 0 else 1.0
        modified.update(f"{name_of[id(m)]}.weight" for _, m in g)
        if kind == "norm":
            modified.update(f"{step.name}.{pname}.{k}" for k in _params_of(pmod))
        else:
            modified.update(f"{name_of[id(pmod)]}.{k}" for k in _params_of(pmod))
    return scales


def _clip_and_quantize(view: _LayerView, qnames: set[str], st: _AWQSettings, stats: list, scales: list,
                       log: dict, modified: set[str]) -> None:
    """Steps 3 and 4: clip search (on the scaled Hessian) and round-to-nearest, for the quantized
    members of every group."""
    for gi, g in enumerate(view.groups):
        sg = stats[gi]
        s = scales[gi]
        H = sg.H if s is None else sg.H / (s[:, None] * s[None, :])
        for n, m in g:
            if n not in qnames:
                continue
            W = weight_matrix(m).float()
            if st.clip and not st.clip_qk and _no_clip(n):
                log["clip_skipped"].append(n)
            elif st.clip:
                ratio = search_clip(W, H, st.fmt, st.group_size, st.clip_grid, st.max_shrink)
                W = apply_clip(W, ratio, st.group_size)
                log["clip_mean"][n] = float(ratio.mean())
            set_weight_matrix(m, quantize_weight(W, st.fmt, st.group_size).w_hat)
            modified.add(n + ".weight")
            log["quantized"].append(n)


# ------------------------------------------------------------------------------------ the method
_CALIB_AUTO = ("pile", "c4", "wikitext2")
_LOSSES = ("module", "linear")


def _get_calibration(tok, o: dict, model) -> tuple[torch.Tensor, dict]:
    from .calibration import get_calibration, model_max_seqlen

    args = (o["nsamples"], o["seqlen"], o["calib_seed"])
    maxlen = model_max_seqlen(model)
    if o["calib"].lower() != "auto":
        return get_calibration(tok, o["calib"], *args, max_seqlen=maxlen)
    errors = []
    for name in _CALIB_AUTO:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ids, info = get_calibration(tok, name, *args, max_seqlen=maxlen)
        except QuantArgError as e:
            errors.append(str(e))
            continue
        if name != "pile":
            warnings.warn(f"awq: calib=auto: the Pile validation set is unavailable; calibrating on {name} ({info.get('origin')})")
        info["calib_auto"] = name
        return ids, info
    raise QuantArgError(
        "hf-quant: method=awq calib=auto found none of pile, c4, wikitext2 (offline?); "
        "pass calib=PATH to a .txt/.json/.jsonl file or set LMQ_DATA_DIR (" + errors[-1][:120] + ")"
    )


@torch.no_grad()
def awq_quantize_model(model: nn.Module, input_ids: torch.Tensor, cfg: QuantConfig, *, n_grid: int = 20,
                       clip: bool = True, clip_grid: int = 20, max_shrink: float = 0.5,
                       quantize: bool = True, device=None, batch_size: int | None = None,
                       progress: bool = False, loss: str = "module", clip_qk: bool = True) -> dict:
    """Run AWQ on ``model`` with calibration tokens ``input_ids [n, seqlen]``; returns a log dict.

    ``quantize=False`` only searches and folds the scales (the model's function is unchanged:
    used by the tests); the returned ``modified`` lists every parameter that changed.
    """
    from .layerwise import find_decoder_layers, run_layerwise

    fmt = make_format(cfg.format, cfg.bits, cfg.sym)
    find_decoder_layers(model)
    all_lin = quantizable_linears(model, cfg.skip)
    check_group_size(all_lin, cfg.group_size)
    qnames = {n for n, _ in all_lin}
    if loss not in _LOSSES:
        raise QuantArgError(f"hf-quant: loss={loss} must be one of {'|'.join(_LOSSES)} (module = the paper's)")
    log: dict[str, Any] = {"alpha": {}, "mse_gain": {}, "unscaled": [], "clip_mean": {}, "quantized": [],
                           "loss": {}, "loss_fallback": [], "clip_skipped": []}
    modified: set[str] = set()

    settings = _AWQSettings(fmt, cfg.group_size, n_grid, clip, clip_grid, max_shrink, quantize, loss, clip_qk)

    def cb(step):
        _awq_layer(step, qnames, settings, log, modified)

    run_layerwise(model, input_ids, cb, device=device, batch_size=batch_size, progress=progress, desc="awq")
    rtn_outside = []
    if quantize:
        done = set(log["quantized"])
        for n, m in all_lin:
            if n not in done:
                untie_if_shared(model, m)
                set_weight_matrix(m, quantize_weight(weight_matrix(m), fmt, cfg.group_size).w_hat)
                modified.add(n + ".weight")
                log["quantized"].append(n)
                rtn_outside.append(n)
    log["rtn_outside_layers"] = rtn_outside
    log["modified"] = sorted(modified)
    return log


class AWQ(Method):
    name = "awq"
    exportable = True  # capability: written as a GPTQ checkpoint by export
    needs_calibration = True
    OPTIONS = {
        "n_grid": Option(int, 20, min=1, help="1 = no scale search; the paper uses 20"),
        "loss": Option(str, "module", choices=_LOSSES, help="module = the paper's enclosing-module output"),
        "clip": Option(bool, True),
        "clip_qk": Option(bool, True),
        "clip_grid": Option(int, 20, min=1, help="the paper uses 20"),
        "max_shrink": Option(float, 0.5, gt=0, max=1, help="the paper uses 0.5"),
        "calib": Option(str, "auto"),
        "nsamples": Option(int, 128, min=1, help="e.g. nsamples=128"),
        "seqlen": Option(int, 512, min=1, help="e.g. seqlen=512"),
        "calib_seed": Option(int, 0),
        "calib_batch": Option(int, 0, min=0, help="0 = automatic"),
    }

    def validate(self, cfg: QuantConfig) -> None:
        """What the options' declarations cannot say (they are typed and range-checked already)."""
        from .calibration import validate_calib_args

        try:
            make_format(cfg.format, cfg.bits, cfg.sym)
        except ValueError as e:
            raise QuantArgError(f"hf-quant: method=awq: {e}") from None
        o = self._opts(cfg)
        calib = "pile" if o["calib"].lower() == "auto" else o["calib"]
        validate_calib_args(calib, o["nsamples"], o["seqlen"], o["calib_seed"])

    def quantize(self, model: nn.Module, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        from .layerwise import find_decoder_layers

        t0 = time.perf_counter()
        o = self._opts(cfg)  # typed and validated by the argument layer
        find_decoder_layers(model)  # one line before calibration when the layers are unknown
        check_group_size(quantizable_linears(model, cfg.skip), cfg.group_size)
        tok = getattr(ctx, "tokenizer", None)
        if tok is None:
            raise QuantArgError("hf-quant: method=awq needs the model's tokenizer for calibration data")
        ids, calib_info = _get_calibration(tok, o, model)
        log = awq_quantize_model(
            model, ids, cfg, n_grid=o["n_grid"], clip=o["clip"], clip_grid=o["clip_grid"],
            max_shrink=o["max_shrink"], quantize=True, device=getattr(ctx, "device", None),
            batch_size=o["calib_batch"] or None, progress=bool(getattr(ctx, "progress", True)),
            loss=o["loss"], clip_qk=o["clip_qk"],
        )
        alphas = list(log["alpha"].values())
        extra = {
            "calibration": calib_info,
            "awq": {
                "n_grid": o["n_grid"], "loss": o["loss"], "loss_by_group": log["loss"],
                "loss_fallback": log["loss_fallback"], "clip": o["clip"], "clip_qk": o["clip_qk"], "clip_grid": o["clip_grid"],
                "max_shrink": o["max_shrink"], "alpha": log["alpha"],
                "alpha_mean": (sum(alphas) / len(alphas)) if alphas else None,
                "unscaled": log["unscaled"], "clip_mean": log["clip_mean"], "clip_skipped": log["clip_skipped"],
                "rtn_outside_layers": log["rtn_outside_layers"],
            },
        }
        return QuantReport(quantized=log["quantized"], modified=log["modified"],
                           seconds=time.perf_counter() - t0, extra=extra)

"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022): our own implementation.

``GPTQSolver`` is the algorithm for one linear layer (the paper's reference ``gptq.py`` in one
readable class); ``GPTQ`` is the :class:`Method` that runs it decoder layer by decoder layer on
calibration data (``methods.layerwise`` + ``methods.calibration``).

Per linear with weight W [out, in] and calibration inputs X:

1. ``H = 2 X Xᵀ / N``, a running mean over batches (float32), from the layer's real inputs.  Option
   ``token_cap`` (default 0 = off, the reference's plain Hessian): a token whose input mean square
   exceeds ``token_cap`` × the batch median counts as if it had that mean square (direction kept).
   Why it exists: in real LLMs the first position ("attention sink") feeds some ``down_proj``
   layers at up to ~10⁵× the median mean square; 16 such tokens then make 79–100% of trace(H),
   ``damp · mean(diag H)`` drowns the other tokens' statistics, and the layer's error on ordinary
   held-out text was 1.35× and 2.34× RTN's (SmolLM2-135M layers 11 and 28; 0.92× and 0.43× with
   ``token_cap=100``).  End to end on SmolLM2 the effect is mixed (W3 g64 61.1 vs 62.9, W4 24.99
   vs 24.48 WikiText-2 perplexity), so it is not the default; ``act_order=true`` is what moves
   3-bit GPTQ on that model (47.8 against RTN's 65.5).
2. Dead inputs (``H[i,i] == 0``): ``H[i,i] = 1``, ``W[:, i] = 0``.
3. ``act_order``: columns permuted by descending ``diag(H)``; ``g_idx`` maps each original column to
   its group.  ``static_groups``: group statistics are fitted up front on the unpermuted W.
4. ``H += damp · mean(diag H) · I``; ``U = upper Cholesky factor of H⁻¹``.  When the factorisation
   fails, damp is multiplied by 10 and retried (a warning; ``QuantReport.extra["damp_retries"]``).
5. Columns in blocks of ``block_size``: for column i, fit the group's statistics (with ``fmt.fit``)
   when a new group starts -- on the current, already error-updated weights of that group --,
   ``q = fmt.fake(w_i)``, ``err = (w_i − q) / U[i,i]``, ``W[:, i:] −= err · U[i, i:]`` inside the block,
   then all later columns get the block's accumulated error in one matrix product.  (The block is
   enlarged/shrunk to a multiple of the group size so that every group lies inside one block; the
   result of the lazy update does not depend on the block size.)

Every number format of :mod:`lm_eval_quant.formats` works (int sym/asym, fp, nf, dynamic).
Within a decoder layer, with ``true_sequential`` (default) the linears are quantized in the order
the forward calls them, grouped by shared input (q/k/v → o → gate/up → down), each group seeing the
outputs of the already-quantized earlier ones.

Options (``model_args``): damp=0.01, block_size=128, act_order=False, static_groups=False, token_cap=0,
true_sequential=True, calib=c4, nsamples=128, seqlen=2048, calib_seed=0, keep_qstate=False,
calib_batch=0 (samples per Hessian update; 0 = about 4096 tokens), forward_batch=0 (samples per
layer forward inside a calib batch; 0 = about 512 tokens; the result does not depend on it: the
inputs of each linear are gathered back into the whole calib batch before the Hessian update).

Memory: besides the model, one calib batch's layer activations of ``forward_batch`` samples, the
calibration hidden states (nsamples × seqlen × hidden, model dtype), the self-attention outputs of
all samples once attention is final (memoized to skip recomputing attention), one gathered linear
input of ``calib_batch`` samples, the Hessians of the current group and one [in, in] Cholesky buffer.
With ``keep_qstate=True`` the report's ``extra["qstate"][name]`` holds ``codes`` (uint8 [out, in], in
the original column order), ``scale``/``zero`` (float32 [out, n_groups]; zero None for grid formats),
``g_idx`` (int32 [in], group of each original column), ``perm`` (int64 [in] or None), ``group_size``.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import nn

from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.formats import Format, QParams, make_format, quantize_weight
from lm_eval_quant.methods.base import (Method, Option, QuantConfig, QuantContext, QuantReport, check_group_size,
                                       quantizable_linears, set_weight_matrix, untie_if_shared, weight_matrix)
from lm_eval_quant.methods.calibration import get_calibration, model_max_seqlen, validate_calib_args
from lm_eval_quant.methods.layerwise import LayerStep, find_decoder_layers, release_free_memory, run_layerwise

__all__ = ["GPTQSolver", "GPTQ"]


class GPTQSolver:
    """GPTQ for one linear layer: feed it inputs with :meth:`add_batch`, then call :meth:`quantize`.

    ``add_batch(x)`` accepts any [..., in_features] tensor.  ``quantize(...)`` returns a dict with
    ``w_hat`` [out, in] float32 (original column order) and, when ``keep_qstate``, the integer state.
    The solver does not touch the module; the caller writes ``w_hat`` back.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device | None = None, token_cap: float = 0.0):
        """``weight`` is the [out, in] matrix (any dtype); H lives on ``device`` (default: weight's).

        ``token_cap`` > 0 bounds each token's weight in H: a token whose input mean square exceeds
        ``token_cap`` × the median of its batch counts as if it had that mean square (its direction is
        kept, its magnitude capped).  0 is the reference's plain ``2 X Xᵀ / N``.
        """
        self.weight = weight
        self.rows, self.columns = weight.shape
        self.device = device or weight.device
        self.token_cap = float(token_cap or 0.0)
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.device)
        self.nsamples = 0
        self.capped = 0  # tokens whose weight the cap reduced

    @staticmethod
    def token_weights(x: torch.Tensor, cap: float) -> torch.Tensor:
        """``min(1, cap · median(ms) / ms_t)`` per row of ``x [n, in]``, ms_t = mean(x_t²)."""
        ms = x.pow(2).mean(dim=1)
        ref = ms.median()
        if not bool(ref > 0):
            return torch.ones_like(ms)
        return torch.where(ms > cap * ref, cap * ref / ms, torch.ones_like(ms))

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Running mean of 2·x xᵀ over all tokens seen so far (each token weighted, with ``token_cap``)."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        if self.token_cap > 0:
            w = self.token_weights(x, self.token_cap)
            self.capped += int((w < 1).sum())
            x = x * w.sqrt()[:, None]
        total = self.nsamples + n
        if self.nsamples:
            self.H.mul_(self.nsamples / total)
        self.nsamples = total
        self.H.addmm_(x.t(), x, alpha=2.0 / total)

    def copy_hessian_from(self, other: "GPTQSolver") -> None:
        """Take a copy of ``other``'s accumulated H (a linear fed the very same inputs)."""
        if other.H is None or other.H.shape != self.H.shape:
            raise RuntimeError("gptq: a shared Hessian must come from a linear of the same input width, "
                               "before it is solved")
        self.H = other.H.clone()
        self.nsamples, self.capped = other.nsamples, other.capped

    # ----------------------------------------------------------------------------------------
    @staticmethod
    def _upper_chol_of_inverse(H: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float, int]:
        """U with Uᵀ U = (H + λ I)⁻¹, λ = damp·mean(diag H); damp ×10 per failed try."""
        mean_diag = torch.mean(torch.diag(H)).item()
        if not math.isfinite(mean_diag) or mean_diag <= 0:
            mean_diag = 1.0
        base = H.diagonal().clone()
        # One [in, in] work buffer for L, then H⁻¹, then U, in column-major (Fortran) order: LAPACK works
        # in place on it and torch makes no internal column-major copy, so the peak is H + 1 buffer
        # instead of H + L + H⁻¹ + U + a copy (for a 2816-wide down_proj: 64 MB instead of 160 MB).
        # The results are the same bits as with fresh tensors.  H itself is kept for the retries.
        # U is returned as that column-major view; the caller makes it contiguous once H is freed.
        buf = torch.empty_like(H).mT
        info_buf = torch.zeros((), dtype=torch.int32, device=H.device)
        d = damp
        for attempt in range(max_tries):
            H.diagonal().copy_(base + d * mean_diag)
            L, info = torch.linalg.cholesky_ex(H, out=(buf, info_buf))
            if int(info) == 0:
                Hinv = torch.cholesky_inverse(L, out=L)
                U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True, out=(Hinv, info_buf))
                if int(info2) == 0 and bool(torch.isfinite(U).all()):
                    return U, d, attempt
                del Hinv, U
            del L
            d = d * 10.0 if d > 0 else 1e-4
        raise RuntimeError(f"Cholesky failed even with damp={d / 10:g}")

    @torch.no_grad()
    def quantize(self, fmt: Format, group_size: int = -1, damp: float = 0.01, block_size: int = 128,
                 act_order: bool = False, static_groups: bool = False, keep_qstate: bool = False) -> dict:
        W = self.weight.to(device=self.device, dtype=torch.float32).clone()
        H = self.H
        self.H = None  # free as we go
        rows, cols = W.shape
        gs = cols if group_size in (-1, None) or group_size >= cols else int(group_size)
        n_groups = -(-cols // gs)  # a group size that does not divide cols: the last group is shorter

        dead = torch.diag(H) == 0
        n_dead = int(dead.sum())
        if n_dead:
            H[dead, dead] = 1.0
            W[:, dead] = 0.0

        static_qp: list[QParams] | None = None
        if static_groups:
            static_qp = [fmt.fit(W[:, g * gs:(g + 1) * gs]) for g in range(n_groups)]

        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        U, damp_used, retries = self._upper_chol_of_inverse(H, damp)
        del H
        U = U.contiguous()  # row-major for the column loop (same values; H's memory is free by now)

        # Each group must be fitted on its current (error-updated) weights: make every group either lie
        # inside one block (gs < bs: bs a multiple of gs) or start at a block start (gs >= bs: bs divides
        # gs).  The lazy update gives the same result for any block size.
        bs = max(1, int(block_size))
        if gs < bs:
            bs = (bs // gs) * gs
        else:
            bs = next(d for d in range(bs, 0, -1) if gs % d == 0)

        codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device) if keep_qstate else None
        scales = torch.empty(rows, n_groups, dtype=torch.float32, device=W.device)
        zeros = torch.empty(rows, n_groups, dtype=torch.float32, device=W.device) if fmt.kind == "int" else None
        loss = torch.zeros((), dtype=torch.float64, device=W.device)

        perm_l = perm.tolist() if perm is not None else None
        qp = None
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            # the block's columns as contiguous rows: each column's rank-1 update of the columns after it
            # is then one contiguous [bs - i - 1, rows] update (same bits; the solver 5-30% faster on SmolLM2's shapes)
            W1t = W[:, i1:i2].t().contiguous()
            Q1 = torch.empty(rows, i2 - i1, dtype=W.dtype, device=W.device)
            Err1 = torch.empty_like(Q1)
            U1 = U[i1:i2, i1:i2]
            U1t = U1.t()
            diag1 = torch.diagonal(U1).tolist()
            for i in range(i2 - i1):
                col = i1 + i
                if static_qp is not None:
                    qp = static_qp[(perm_l[col] if perm_l is not None else col) // gs]
                elif col % gs == 0:
                    # current (error-updated) weights of the group
                    qp = fmt.fit(W[:, col:col + gs] if i == 0 else W1t[i:i + gs].t())
                    g = col // gs
                    scales[:, g] = qp.scale[:, 0]
                    if zeros is not None:
                        zeros[:, g] = qp.zero[:, 0]
                w = W1t[i:i + 1].t()
                q = fmt.fake(w, qp)
                if codes is not None:
                    codes[:, col:col + 1] = fmt.quantize(w, qp)
                Q1[:, i:i + 1] = q
                err = (w - q).div_(diag1[i])
                Err1[:, i:i + 1] = err
                if i + 1 < i2 - i1:
                    W1t[i + 1:].addmm_(U1t[i + 1:, i:i + 1], err.t(), alpha=-1.0)
            W[:, i1:i2] = Q1  # the finished block's columns are never read again: W becomes Q in place
            loss += Err1.double().pow(2).sum() / 2
            if i2 < cols:
                W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)

        if static_qp is not None:
            for g, p in enumerate(static_qp):
                scales[:, g] = p.scale[:, 0]
                if zeros is not None:
                    zeros[:, g] = p.zero[:, 0]

        Q = W
        del U
        # g_idx: group of each ORIGINAL column
        if perm is not None:
            invperm = torch.argsort(perm)
            Q = Q[:, invperm]
            if codes is not None:
                codes = codes[:, invperm]
            if static_qp is not None:
                g_idx = torch.arange(cols, device=Q.device) // gs
            else:
                g_idx = invperm // gs
        else:
            g_idx = torch.arange(cols, device=Q.device) // gs
        out: dict[str, Any] = {"w_hat": Q, "loss": float(loss), "damp": damp_used, "retries": retries,
                               "dead": n_dead}
        if keep_qstate:
            out["qstate"] = {"codes": codes.cpu(), "scale": scales.cpu(),
                             "zero": None if zeros is None else zeros.cpu(),
                             "g_idx": g_idx.to(torch.int32).cpu(),
                             "perm": None if perm is None else perm.cpu(), "group_size": gs}
        return out


# ---------------------------------------------------------------------------------------------
class _BatchGather:
    """Forward pre-hooks that feed the solvers one whole calib batch at a time.

    With ``micro_batch`` the layer runs on chunks of a batch; each linear's input chunks are copied
    into one buffer of the batch's size (linears fed the very same tensor, q/k/v or gate/up, share a
    buffer) and ``flush`` (the forward's ``on_batch_end``) hands every buffer to its solvers: each
    solver sees exactly the tensor it would have seen from one forward of the whole batch, so H is
    bit-identical to the unchunked run.  A batch run in one chunk goes to the solvers directly.

    Linears fed the very same tensor (q/k/v, gate/up) share one Hessian: only the first of them (the
    leader) accumulates it and the others copy it when the pass is over (:meth:`share`); the same
    bits as accumulating it once per linear, at a third of the cost for q/k/v.
    """

    def __init__(self, step: LayerStep, solvers: dict[str, GPTQSolver]):
        self.step = step
        self.solvers = solvers
        self.bufs: dict[str, torch.Tensor] = {}   # buffer key -> [rows of batch, ...] input
        self.users: dict[str, list[str]] = {}     # buffer key -> solver names
        self.seen: list[tuple[torch.Tensor, str]] = []  # inputs of the running chunk -> first linear fed it
        self.chunk: tuple = ()
        self.leader: dict[str, str] = {}          # solver name -> the solver whose H it shares
        self.fed: set[str] = set()                # solvers that accumulated at least one batch

    def _add(self, name: str, x: torch.Tensor, lead: str | None) -> None:
        """Feed ``x`` to solver ``name``, or note that it shares ``lead``'s (identical) input."""
        if lead is None or lead == name:
            if name in self.leader:
                raise RuntimeError(f"gptq: {name} shared its input with {self.leader[name]} in one batch "
                                   "and not in another")
            self.solvers[name].add_batch(x)
            self.fed.add(name)
            return
        if self.leader.setdefault(name, lead) != lead or name in self.fed:
            raise RuntimeError(f"gptq: {name} does not share one input with the same linear in every batch")

    def share(self) -> None:
        """After the pass: every follower gets a copy of its leader's Hessian (before any solve, which
        consumes the leader's)."""
        for name, lead in self.leader.items():
            self.solvers[name].copy_hessian_from(self.solvers[lead])

    def hook(self, name: str):
        def pre_hook(mod, args):
            x = args[0]
            b, s, e, n = self.step.chunk
            if self.step.chunk != self.chunk:
                self.chunk, self.seen = self.step.chunk, []
            key = next((k for t, k in self.seen if t is x), None)  # the first linear fed this very tensor
            if key is None:
                self.seen.append((x, name))
            if (s == 0 and e == n) or b < 0 or x.dim() == 0 or x.shape[0] != e - s:
                # whole batch in one forward (or rows not batch-major): straight to the solver
                self._add(name, x, key)
                return
            if key is None:
                key = name
                buf = self.bufs.get(key)
                if buf is None:
                    buf = self.bufs[key] = torch.empty((n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
                buf[s:e].copy_(x)
            users = self.users.setdefault(key, [])
            if name not in users:
                users.append(name)
        return pre_hook

    def flush(self, b: int) -> None:
        self.seen, self.chunk = [], ()
        for key, buf in self.bufs.items():
            users = self.users.get(key, ())
            for name in users:
                self._add(name, buf, users[0])
        self.bufs.clear()
        self.users.clear()


class GPTQ(Method):
    name = "gptq"
    exportable = True  # capability: written as a GPTQ checkpoint by export
    needs_calibration = True
    OPTIONS = {
        "damp": Option(float, 0.01, gt=0, lt=10, help="a small positive number, e.g. damp=0.01"),
        "block_size": Option(int, 128, min=1, help="e.g. 128"),
        "act_order": Option(bool, False),
        "static_groups": Option(bool, False),
        "true_sequential": Option(bool, True),
        "calib": Option(str, "c4"),
        "nsamples": Option(int, 128, min=1, help="e.g. nsamples=128"),
        "seqlen": Option(int, 2048, min=1, help="e.g. seqlen=2048"),
        "calib_seed": Option(int, 0),
        "keep_qstate": Option(bool, False),
        "calib_batch": Option(int, 0, min=0, help="0 = automatic"),
        "forward_batch": Option(int, 0, min=0, help="0 = automatic"),
        "token_cap": Option(float, 0.0, min=0, help="0 = off (the plain Hessian), else >= 1"),
    }

    def validate(self, cfg: QuantConfig) -> None:
        """What the options' declarations cannot say (they are typed and range-checked already)."""
        try:
            make_format(cfg.format, cfg.bits, cfg.sym)
        except ValueError as e:
            raise QuantArgError(f"hf-quant: method=gptq: {e}") from None
        o = self._opts(cfg)
        tc = o["token_cap"]
        if not math.isfinite(tc) or (tc != 0 and tc < 1):
            raise QuantArgError(f"hf-quant: token_cap={tc} must be 0 (off: the plain Hessian) or >= 1, e.g. token_cap=100")
        validate_calib_args(o["calib"], o["nsamples"], o["seqlen"], o["calib_seed"])

    def quantize(self, model: nn.Module, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        t0 = time.perf_counter()
        o = self._opts(cfg)  # typed and validated by the argument layer
        fmt = make_format(cfg.format, cfg.bits, cfg.sym)
        find_decoder_layers(model)  # one clear line before calibration when the layers are unknown
        all_lin = quantizable_linears(model, cfg.skip)
        check_group_size(all_lin, cfg.group_size)
        names = {n for n, _ in all_lin}
        tok = getattr(ctx, "tokenizer", None)
        if tok is None:
            raise QuantArgError("hf-quant: method=gptq needs the model's tokenizer for calibration data")
        ids, calib_info = get_calibration(tok, o["calib"], o["nsamples"], o["seqlen"],
                                          o["calib_seed"], max_seqlen=model_max_seqlen(model))
        seed = getattr(ctx, "seed", 0)
        if seed is not None:
            torch.manual_seed(int(seed))
        layers = _GPTQLayers(names, fmt, cfg.group_size, o)
        seqlen = int(ids.shape[1])
        fwd = o["forward_batch"] or max(1, 512 // max(1, seqlen))
        run_layerwise(model, ids, layers, device=getattr(ctx, "device", None),
                      batch_size=o["calib_batch"] or None, progress=bool(getattr(ctx, "progress", True)),
                      desc="gptq", micro_batch=fwd)
        # linears outside the decoder layers (e.g. lm_head with skip=none): round-to-nearest
        rtn_outside = []
        for n, m in all_lin:
            if n not in layers.quantized:
                untie_if_shared(model, m)
                set_weight_matrix(m, quantize_weight(weight_matrix(m), fmt, cfg.group_size).w_hat)
                layers.quantized.append(n)
                layers.modified.append(n + ".weight")
                rtn_outside.append(n)
        extra: dict[str, Any] = {"calibration": calib_info, "damp": o["damp"], "act_order": o["act_order"],
                                 "static_groups": o["static_groups"], "true_sequential": o["true_sequential"],
                                 "block_size": o["block_size"], "damp_retries": layers.retries,
                                 "dead_inputs": layers.dead_total, "loss": layers.losses,
                                 "token_cap": o["token_cap"], "capped_tokens": layers.capped,
                                 "rtn_outside_layers": rtn_outside}
        if o["keep_qstate"]:
            extra["qstate"] = layers.qstate
        return QuantReport(quantized=layers.quantized, modified=layers.modified,
                           seconds=time.perf_counter() - t0, extra=extra)


class _GPTQLayers:
    """The run_layerwise callback of GPTQ: quantizes one decoder layer's linears (in sequential
    groups with true_sequential) and keeps what the report needs across layers."""

    def __init__(self, names: set[str], fmt: Format, group_size: int, o: dict):
        self.names, self.fmt, self.group_size, self.o = names, fmt, group_size, o
        self.modified: list[str] = []
        self.quantized: list[str] = []
        self.retries: dict[str, float] = {}
        self.losses: dict[str, float] = {}
        self.qstate: dict[str, dict] = {}
        self.capped: dict[str, int] = {}
        self.dead_total = 0

    def __call__(self, step: LayerStep) -> None:
        seq = self.o["true_sequential"]
        lin = [(n, m) for n, m in step.linears() if n in self.names]
        if not lin:
            return
        groups = step.linear_groups(linears=lin) if seq else [lin]
        lin_ids = {id(m) for _, m in lin}
        done: set[int] = set()
        # direct children holding quantized linears (self_attn, mlp, ...): once all their linears are
        # final, later passes reuse their outputs instead of recomputing them (attention is costly)
        children = []
        for child in step.layer.children():
            ids = {id(m) for m in child.modules() if id(m) in lin_ids}
            if ids:
                children.append((child, ids))
        for group in groups:
            self._quantize_group(step, group)
            done.update(id(m) for _, m in group)
            if seq:
                for child, ids in children:
                    if ids <= done:
                        step.memoize(child)

    def _quantize_group(self, step: LayerStep, group: list) -> None:
        """Collect the Hessians of ``group``'s linears in one pass over the calibration batches,
        then solve and write each."""
        o = self.o
        solvers = {n: GPTQSolver(weight_matrix(m), step.device, token_cap=o["token_cap"]) for n, m in group}
        gather = _BatchGather(step, solvers)
        handles = [m.register_forward_pre_hook(gather.hook(n)) for n, m in group]
        try:
            step.forward(stop_after=[m for _, m in group], on_batch_end=gather.flush)
            gather.share()
        finally:
            for h in handles:
                h.remove()
            del gather
        for n, m in group:
            if solvers[n].capped:
                self.capped[n] = solvers[n].capped
            res = solvers[n].quantize(self.fmt, self.group_size, o["damp"], o["block_size"], o["act_order"],
                                      o["static_groups"], o["keep_qstate"])
            del solvers[n]
            set_weight_matrix(m, res.pop("w_hat"))
            release_free_memory()
            self._record(n, res)

    def _record(self, n: str, res: dict) -> None:
        self.modified.append(n + ".weight")
        self.quantized.append(n)
        self.losses[n] = res["loss"]
        self.dead_total += res["dead"]
        if res["retries"]:
            self.retries[n] = res["damp"]
            warnings.warn(f"gptq: Cholesky failed for {n} with damp={self.o['damp']:g}; "
                          f"succeeded with damp={res['damp']:g}")
        if self.o["keep_qstate"]:
            self.qstate[n] = res["qstate"]

"""Token-level KL divergence between a full-precision and a quantized model on perplexity tasks,
computed while lm-eval scores them (llama.cpp's ``--kl-divergence-base`` / ``--kl-divergence``).

**Compact fp reference.** For every scored token of every window of a perplexity task, the
unquantized run stores the ids and log-probabilities of its top ``k = 32`` tokens (``int32`` ids,
``float32`` log-probabilities, normalised by the full-vocabulary log-sum-exp, so the log-sum-exp
itself is folded in) and the log of the probability mass outside them (``float32``, computed by a
log-sum-exp over the rest of the vocabulary, so no ``1 − Σ`` cancellation): 260 bytes per token,
once per model and task, in ``<kl_ref>/<task>.topk.npz``; every quantized run of that model reads
it.

**KL from it.** With S the fp top-k set, T the rest of the vocabulary, P_T = 1 − Σ_S p and
Q_T = 1 − Σ_S q (q is the quantized model's full distribution, known exactly at that point)::

    KL_k = Σ_{x∈S} p(x) log(p(x)/q(x)) + P_T log(P_T/Q_T)

(Q_T is likewise a log-sum-exp over the quantized model's tail) is the exact KL between the two
distributions with the tail T merged into one outcome. By the
log-sum inequality 0 ≤ KL(p‖q) − KL_k = P_T · KL(p_T/P_T ‖ q_T/Q_T): the stored form gives a
*lower bound* that is exact when the fp model puts no mass outside its top 32, and whose gap is
the tail mass times the KL inside the tail. The per-token P_T is stored with the KL
(``tail_mass``) so the report shows how much mass the bound can miss. Measured on a real model
(SmolLM2-135M, vocabulary 49,152, two WikiText-2 windows of 512 tokens, fp32 vs RTN g64): the fp
model leaves 0.19 of its mass outside its top 32 per token on average, and the top-32 bound is
68% of the exact mean KLD at 8 bits (0.00079 vs 0.00115 nats) and 77% at 3 bits (1.006 vs 1.309);
p99 84% and 98%; storing k = 256 (``kl_topk=256`` on the fp run) leaves 0.089 outside and
reaches 87% / 90%. So read KLD figures as lower bounds that rank precisions correctly, not as
llama.cpp's exact full-vocabulary numbers (llama.cpp stores every logit). Same-top-token is exact
(the fp top-1 is stored).

**Matching tokens.** Requests are matched by content, not order: each loglikelihood request of a
perplexity task (the ``TokenText`` windows of ``wikitext2_gptq``/``c4_gptq``) or each rolling window
(``loglikelihood_rolling`` tasks such as ``wikitext``) is keyed by a hash of the exact input token
ids the model sees; :func:`install` wraps the HFLM instance's ``_model_call`` (remembers the batch)
and ``_select_cont_toks`` (gets each request's log-softmaxed logits) to capture them.

Layer 3 (imports torch; used by ``models.hf_quant``); the report reads the output files with
:mod:`lm_eval_quant.report.tokkl`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("lm_eval_quant")

TOPK = 32
REF_SUFFIX = ".topk.npz"


def key_of(ids) -> str:
    """Hash of an input token sequence (the request's model input)."""
    a = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
    return hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _tail_logmass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{x∉ids} exp(logp[x]) per row, computed directly (no 1 − Σ cancellation);
    −inf when ids cover the whole vocabulary."""
    masked = logp.double().scatter(-1, ids.long(), float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def topk_ref(logp: torch.Tensor, k: int = TOPK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [n, k], log-probs float32 [n, k], tail log-mass float32 [n]) of normalised
    log-probabilities [n, vocab]."""
    v, i = logp.float().topk(min(k, logp.shape[-1]), dim=-1)
    tail = _tail_logmass(logp, i)
    return (i.to(torch.int32).cpu().numpy(), v.cpu().numpy().astype(np.float32),
            tail.cpu().numpy().astype(np.float32))


def kl_from_topk(ref_ids: np.ndarray, ref_logp: np.ndarray, logq: torch.Tensor,
                 ref_tail: np.ndarray | None = None) -> dict:
    """Per token: KL_k (see the module docstring), same top token, fp tail mass P_T.
    ``logq``: the other model's normalised log-probabilities [n, vocab]; ``ref_tail``: the fp
    tail log-mass stored with the reference (else 1 − Σ top-k, which loses precision when the
    tail is tiny)."""
    ids = torch.as_tensor(ref_ids, dtype=torch.long)
    lp = torch.as_tensor(ref_logp, dtype=torch.float64)
    lq_full = logq.detach().cpu()
    lq = lq_full.gather(-1, ids).double()
    p = lp.exp()
    head = (p * (lp - lq)).sum(-1)
    if ref_tail is not None:
        lpt = torch.as_tensor(ref_tail, dtype=torch.float64)
    else:
        lpt = (1.0 - p.sum(-1)).clamp(min=0.0).log()
    lqt = _tail_logmass(lq_full, ids)
    pt = lpt.exp()
    tail = torch.where(torch.isfinite(lpt), pt * (lpt - lqt), torch.zeros_like(pt))
    kl = (head + tail).clamp(min=0.0)
    same = lq_full.argmax(-1) == ids[:, 0]
    return {"kl": kl.numpy().astype(np.float32), "same_top": same.numpy(),
            "tail_mass": pt.numpy().astype(np.float32)}


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class TokenKL:
    """The capture state of one HFLM instance (see :func:`install`)."""

    def __init__(self, lm, ref_dir, out_dir=None, reference: bool = False, k: int = TOPK,
                 model_id: str = ""):
        self.lm = lm
        self.ref_dir = Path(ref_dir)
        self.out_dir = Path(out_dir) if out_dir else None
        self.reference = reference
        self.k = k
        self.model_id = model_id
        self.keys: dict[str, tuple[str, int, int]] = {}   # key -> (task, doc_id, window)
        self.buf: dict[str, dict[str, dict]] = {}          # task -> key -> arrays
        self.refs: dict[str, dict | None] = {}
        self._inps = None
        self._row = 0
        self.warned: set[str] = set()

    # -- registration --------------------------------------------------------------------
    def _input_ids(self, ctx, cont) -> list[int]:
        max_len = self.lm.max_length
        return (list(ctx) + list(cont))[-(max_len + 1):][:-1]

    def register_loglikelihood(self, requests) -> None:
        lm = self.lm
        for req in requests:
            args = getattr(req, "args", None) or getattr(req, "arguments", None)
            if not args or len(args) != 2 or not hasattr(args[1], "lmq_token_ids"):
                continue
            context, continuation = args
            if context == "":
                continue
            ctx, cont = lm._encode_pair(context, continuation)
            key = key_of(self._input_ids(ctx, cont))
            self.keys[key] = (req.task_name, int(req.doc_id), 0)

    def register_rolling(self, requests) -> None:
        from lm_eval import utils

        lm = self.lm
        for req in requests:
            (string,) = req.args
            wins = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=lm.tok_encode(string), prefix_token=lm.prefix_token_id,
                max_seq_len=lm.max_length, context_len=1))
            for w, (ctx, cont) in enumerate(wins):
                self.keys[key_of(self._input_ids(ctx, cont))] = (req.task_name, int(req.doc_id), w)

    # -- capture -------------------------------------------------------------------------
    def on_model_call(self, inps) -> None:
        self._inps = inps
        self._row = 0

    def on_select(self, logits, contlen, inplen) -> None:
        row = self._row
        self._row += 1
        if self._inps is None or not self.keys or inplen is None or row >= self._inps.shape[0]:
            return
        key = key_of(self._inps[row, :inplen].detach().cpu().numpy())
        hit = self.keys.get(key)
        if hit is None:
            return
        task = hit[0]
        lp = logits[inplen - contlen: inplen]
        if self.reference:
            ids, v, tail = topk_ref(lp, self.k)
            self.buf.setdefault(task, {})[key] = {"ids": ids, "logp": v, "tail": tail,
                                                  "doc": hit[1], "win": hit[2]}
            return
        ref = self._ref(task)
        if ref is None:
            return
        span = ref["index"].get(key)
        if span is None:
            self.buf.setdefault(task, {}).setdefault("__missing__", {"n": 0})["n"] += 1
            return
        a, b = span
        if b - a != contlen:
            self.buf.setdefault(task, {}).setdefault("__missing__", {"n": 0})["n"] += 1
            return
        r = kl_from_topk(ref["ids"][a:b], ref["logp"][a:b], lp, ref["tail"][a:b])
        r["doc"], r["win"] = hit[1], hit[2]
        self.buf.setdefault(task, {})[key] = r

    def _ref(self, task: str) -> dict | None:
        if task not in self.refs:
            p = self.ref_dir / f"{task}{REF_SUFFIX}"
            if not p.is_file():
                log.warning("token KL: no full-precision reference %s; run the model's method=none "
                            "cell (same kl_ref) first — %s gets no KLD figures", p, task)
                self.refs[task] = None
            else:
                with np.load(p, allow_pickle=False) as z:
                    keys = [str(x) for x in z["keys"]]
                    off = z["offsets"]
                    self.refs[task] = {
                        "ids": z["ids"], "logp": z["logp"], "tail": z["tail_logmass"],
                        "meta": json.loads(str(z["meta"])),
                        "index": {k: (int(off[i]), int(off[i + 1])) for i, k in enumerate(keys)},
                        "path": str(p)}
        return self.refs[task]

    # -- output ----------------------------------------------------------------------------
    def flush(self) -> list[Path]:
        """Write what was captured since the last flush; returns the files written."""
        written = []
        for task, recs in list(self.buf.items()):
            missing = recs.pop("__missing__", {"n": 0})["n"]
            if not recs:
                if missing:
                    log.warning("token KL: none of %d %s windows is in the fp reference (different "
                                "model, tokenizer or window length?)", missing, task)
                continue
            order = sorted(recs, key=lambda k: (recs[k]["doc"], recs[k]["win"]))
            meta = {"task": task, "k": self.k, "model": self.model_id, "windows": len(order),
                    "created": time.time()}
            if self.reference:
                lens = [recs[k]["ids"].shape[0] for k in order]
                offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
                p = self.ref_dir / f"{task}{REF_SUFFIX}"
                _atomic_savez(p, keys=np.asarray(order), offsets=offsets,
                              ids=np.concatenate([recs[k]["ids"] for k in order]),
                              logp=np.concatenate([recs[k]["logp"] for k in order]),
                              tail_logmass=np.concatenate([recs[k]["tail"] for k in order]),
                              meta=np.asarray(json.dumps(meta)))
            else:
                if self.out_dir is None:
                    continue
                meta.update(ref=(self.refs.get(task) or {}).get("path"),
                            ref_model=((self.refs.get(task) or {}).get("meta") or {}).get("model"),
                            windows_not_in_ref=missing)
                p = self.out_dir / f"tokkl_{task}.npz"
                _atomic_savez(p, kl=np.concatenate([recs[k]["kl"] for k in order]),
                              same_top=np.concatenate([recs[k]["same_top"] for k in order]),
                              tail_mass=np.concatenate([recs[k]["tail_mass"] for k in order]),
                              window=np.concatenate([np.full(len(recs[k]["kl"]), recs[k]["doc"], np.int32)
                                                     for k in order]),
                              meta=np.asarray(json.dumps(meta)))
            written.append(p)
        self.buf.clear()
        return written


def install(lm, ref_dir, out_dir=None, reference: bool = False, k: int = TOPK, model_id: str = "") -> TokenKL:
    """Wrap ``lm`` (an HFLM instance) so that perplexity-task requests store (``reference``) or
    compare against (otherwise) the fp top-k log-probabilities under ``ref_dir``. Quantized runs
    write ``out_dir/tokkl_<task>.npz``. Other requests are untouched."""
    st = TokenKL(lm, ref_dir, out_dir, reference=reference, k=k, model_id=model_id)
    orig_ll, orig_roll = lm.loglikelihood, lm.loglikelihood_rolling
    orig_call, orig_sel = lm._model_call, lm._select_cont_toks

    def loglikelihood(requests, *a, **kw):
        st.register_loglikelihood(requests)
        out = orig_ll(requests, *a, **kw)
        st.flush()
        return out

    def loglikelihood_rolling(requests, *a, **kw):
        st.register_rolling(requests)
        out = orig_roll(requests, *a, **kw)
        st.flush()
        return out

    def _model_call(inps, *a, **kw):
        st.on_model_call(inps)
        return orig_call(inps, *a, **kw)

    def _select_cont_toks(logits, contlen=None, inplen=None):
        out = orig_sel(logits, contlen=contlen, inplen=inplen)
        try:
            st.on_select(logits, contlen, inplen)
        except Exception as e:  # noqa: BLE001  (never break the evaluation for a side metric)
            if "capture" not in st.warned:
                st.warned.add("capture")
                log.warning("token KL capture failed (%s: %s); KLD figures will be missing",
                            type(e).__name__, e)
        return out

    lm.loglikelihood = loglikelihood
    lm.loglikelihood_rolling = loglikelihood_rolling
    lm._model_call = _model_call
    lm._select_cont_toks = _select_cont_toks
    lm._lmq_tokkl = st
    return st

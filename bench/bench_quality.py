#!/usr/bin/env python
"""Real-model quality: fp / RTN / GPTQ / AWQ against GPTQModel 7.6.0 and an AWQ oracle, side by side.

    bash ../shared/tools/real_model.sh smollm2-135m        # builds the real models offline (once)
    python bench/bench_quality.py --models smollm2-135m --bits 4 3 --groups 128 64
    python bench/bench_quality.py --table                 # the markdown table of what has run

Every job (model × method × bits × group) runs in a fresh subprocess and appends one JSON line to
``bench/out/quality.jsonl`` (``--out``); a job already there is not run again, so an interrupted
bench resumes.  All implementations see the SAME calibration windows (``--nsamples`` × ``--seqlen``
token windows of the C4 subset in the shared data folder, seed 0) and are evaluated on the SAME
WikiText-2 windows: the ``wikitext2_gptq`` protocol (test rows joined with blank lines, tokenized once,
disjoint windows of ``--eval-seqlen`` tokens, exp(mean NLL) over every token but each window's first),
on the first ``--eval-windows`` windows (0 = all).  Models are loaded and evaluated in float32.

Methods (``--methods``):
  fp                 the unquantized model
  rtn                round-to-nearest, int asymmetric (the house default)
  gptq               ours, house defaults (damp 0.01, block 128, true_sequential, no act_order)
  gptq-ao            ours with act_order=true
  gptq-cap100        ours with token_cap=100 (massive-activation tokens capped in H)
  gptq-ao-cap100     ours with act_order=true and token_cap=100
  gptq-d05           ours with damp=0.05 (GPTQModel's default dampening)
  gptqmodel          GPTQModel with OUR settings matched: damp 0.01, desc_act off, act_group_aware off
  gptqmodel-defaults GPTQModel with its own defaults (damp 0.05, act_group_aware on)
  gptqmodel-awq      GPTQModel's AWQ (:func:`gptqmodel_awq_quantize`) with its own defaults (duo scaling
                     s = mean|x|^α / mean|w|^(1-α), grid 20, clip search on), run in bfloat16: in float32
                     on CPU its folds come out inconsistent (a 2-layer SmolLM2 cut: logits off by 36 % at
                     W4, vs 2.9 % in bfloat16).  Its packed GEMM layout is CUDA-only and 4-bit only, so the
                     bench skips packing and evaluates the model it leaves behind (the fake-quantized
                     linears and the folded norms), upcast to float32
  awq                ours, house defaults (loss=module, grid 20, clip search)
  awq-linear         ours with loss=linear (closed form on the scaled linears' own outputs)
  awq-oracle         a direct transcription of the AWQ paper's search written in this file
                     (:func:`awq_oracle`): s = mean|x|^α over a grid of 20, the enclosing block's
                     output error, fold into the producer, then the clip search; an independent
                     check of methods/awq.py

Wall time is the quantize call only; "peak RSS / model" is the peak resident memory above the
loaded model during quantization divided by the fp32 weights' bytes.  Caveat for every figure on
these models: their weights were published as 4-bit GGUF and dequantized, so they already lie on a
~4-bit grid per block of 32 input columns; that flatters RTN-4 at groups that are multiples of 32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

METHODS = ["fp", "rtn", "gptq", "gptq-ao", "gptq-cap100", "gptq-ao-cap100", "gptq-d05", "gptqmodel", "gptqmodel-defaults", "gptqmodel-awq", "awq", "awq-linear", "awq-oracle"]


def models_root() -> Path:
    return Path(os.environ.get("LMQ_MODELS") or Path.home() / ".cache" / "lmq-models")


def data_dir() -> Path | None:
    from lm_eval_quant.methods.calibration import local_data_dir

    return local_data_dir()


# ------------------------------------------------------------------------------ shared inputs
def calib_ids(tok, nsamples: int, seqlen: int):
    from lm_eval_quant.methods.calibration import get_calibration

    ids, _ = get_calibration(tok, "c4", nsamples, seqlen, seed=0)
    return ids


def eval_ids(tok, windows: int, seqlen: int):
    import torch

    text = (data_dir() / "wikitext2" / "wikitext2_test_joined_gptq_style.txt").read_text(encoding="utf-8")
    if windows:  # tokenize only what the first windows need (plus margin); the ids are the same prefix
        text = text[: windows * seqlen * 8]
    ids = torch.tensor(tok(text)["input_ids"])
    n = ids.numel() // seqlen if not windows else min(windows, ids.numel() // seqlen)
    return ids[: n * seqlen]


# ------------------------------------------------------------------------------ the AWQ oracle
def awq_oracle(model, calib, fmt, group_size: int, n_grid: int = 20, max_shrink: float = 0.5,
               clip_tokens: int = 4096):
    """The AWQ paper's procedure, transcribed directly (Llama/Gemma-style decoder layers only).

    Per decoder layer, on the inputs produced by the already-quantized previous layers:
      1. record each linear's input; s_x = mean|x| per input channel;
      2. for the four scaled groups — (input norm → q,k,v; loss on self_attn's output),
         (v → o; loss on o's output), (post-attention norm → gate,up; loss on the mlp's output),
         (up → down; loss on down's output) — try s = s_x^α / sqrt(max·min), α = i/n_grid, with the
         members' weights replaced by Q(W·s)/s, and keep the α of least squared output error;
      3. fold s: the producer (norm weight, or v/up rows) is divided by s, the members multiplied;
      4. clip search for every linear except q/k: per (row, group) the ratio r on linspace(1, 0.5, 20)
         that minimises ‖(W − Q(clamp(W, ±r·max|w|))) X‖² on clip_tokens sampled inputs;
      5. round to nearest with the clipped weights; the layer's outputs feed the next layer.
    Returns the list of quantized linear names.
    """
    import torch

    from lm_eval_quant.formats import quantize_weight, to_blocks, from_blocks, block_length

    layers = model.model.layers
    emb = model.model.embed_tokens
    dev = "cpu"

    def fq(W):
        return quantize_weight(W, fmt, group_size).w_hat

    # inputs of layer 0 and the other arguments the decoder passes (position embeddings, mask)
    cap = {}

    class Stop(Exception):
        pass

    def pre(mod, args, kwargs):
        cap.setdefault("x", []).append(args[0] if args else kwargs["hidden_states"])
        cap["args"] = args[1:]
        cap["kw"] = {k: v for k, v in kwargs.items()
                     if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache", "cache_position")}
        raise Stop

    h = layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        for r in calib:
            try:
                model(r[None].to(dev))
            except Stop:
                pass
    h.remove()
    xs, largs, kw = cap["x"], cap["args"], cap["kw"]

    def first(o):
        return o[0] if isinstance(o, (tuple, list)) else o

    def layer_outputs(layer, module=None):
        """Run the layer on every calibration input; return the outputs of ``module`` (or the layer)."""
        got = []
        hh = module.register_forward_hook(lambda m, a, o: got.append(first(o))) if module is not None else None
        try:
            outs = [first(layer(x, *largs, **kw)) for x in xs]
        finally:
            if hh is not None:
                hh.remove()
        return got if module is not None else outs

    names = []
    for li, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        rec = {}

        def hook(name):
            def f(mod, args):
                rec.setdefault(name, []).append(args[0].detach())
            return f

        lin = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
               "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
        hs = [m.register_forward_pre_hook(hook(n)) for n, m in lin.items()]
        with torch.no_grad():
            layer_outputs(layer)
        for hh in hs:
            hh.remove()
        X = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in rec.items()}
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        groups = [  # (producer, members, loss: the enclosing block's output)
            (layer.input_layernorm, ["q", "k", "v"], lambda: layer_outputs(layer, attn)),
            (attn.v_proj, ["o"], lambda: [attn.o_proj(X["o"])]),
            (mlp_norm, ["gate", "up"], lambda: layer_outputs(layer, mlp)),
            (mlp.up_proj, ["down"], lambda: [mlp.down_proj(X["down"])]),
        ]
        with torch.no_grad():
            for prod, members, run in groups:
                mods = [lin[m] for m in members]
                if prod is attn.v_proj and attn.v_proj.weight.shape[0] != attn.o_proj.weight.shape[1]:
                    continue  # grouped-query attention: v's rows do not map one-to-one onto o's inputs
                sx = X[members[0]].abs().float().mean(0)
                ref = [t.clone() for t in run()]
                W0 = [m.weight.data.clone() for m in mods]
                best, best_err = None, math.inf
                for i in range(n_grid):
                    a = i / n_grid
                    s = sx.clamp(min=1e-4) ** a
                    s = s / (s.max() * s.min()).sqrt()
                    for m, W in zip(mods, W0):
                        m.weight.data = fq(W * s[None, :]) / s[None, :]
                    e = sum(float(((o - r) ** 2).sum()) for o, r in zip(run(), ref))
                    if e < best_err:
                        best, best_err = s, e
                for m, W in zip(mods, W0):
                    m.weight.data = W * best[None, :]
                # fold 1/s into the producer: a linear's rows, or a norm's weight (Gemma norms scale by 1 + w)
                if prod is attn.v_proj or prod is mlp.up_proj:
                    prod.weight.data = prod.weight.data / best[:, None]
                elif "gemma" in type(prod).__name__.lower():
                    prod.weight.data = (1 + prod.weight.data) / best - 1
                else:
                    prod.weight.data = prod.weight.data / best
                for m in members:  # the recorded inputs follow the fold
                    X[m] = X[m] / best[None, :]
            # clip search and rounding
            gen = torch.Generator().manual_seed(li)
            for n, m in lin.items():
                W = m.weight.data.float()
                if n not in ("q", "k"):
                    Xn = X[n]
                    Xs = Xn[torch.randperm(Xn.shape[0], generator=gen)[:clip_tokens]].float()
                    g = block_length(W.shape[1], group_size)
                    Wb = to_blocks(W, g)                                     # [out, G, g]
                    Xb = torch.nn.functional.pad(Xs, (0, Wb.shape[1] * g - W.shape[1])).reshape(Xs.shape[0], -1, g)
                    amax = Wb.abs().amax(-1, keepdim=True)
                    best_r = torch.ones_like(amax)
                    best_e = torch.full_like(amax, math.inf)
                    for r in torch.linspace(1.0, max_shrink, 20):
                        lim = r * amax
                        wc = torch.maximum(torch.minimum(Wb, lim), -lim)
                        qc = to_blocks(fq(from_blocks(wc, W.shape[1])), g)
                        e = torch.einsum("ogk,tgk->otg", qc - Wb, Xb).pow(2).sum(1)[..., None]  # [out, G, 1]
                        better = e < best_e
                        best_e = torch.where(better, e, best_e)
                        best_r = torch.where(better, r, best_r)
                    lim = best_r * amax
                    W = from_blocks(torch.maximum(torch.minimum(Wb, lim), -lim), W.shape[1])
                m.weight.data = fq(W).to(m.weight.dtype)
                names.append(f"model.layers.{li}.{'self_attn' if n in 'qkvo' else 'mlp'}.{n}_proj")
            xs = layer_outputs(layer)
    return names


def gptqmodel_awq_quantize(model_dir, calib, bits: int, group_size: int, *, batch_size: int, dtype: str = "float32"):
    """GPTQModel 7.6.0's AWQ on the given windows; returns (an fp32 HF model, seconds, PeakRSS, model bytes).

    Its AWQ writes each fake-quantized weight into the linear (``weight.data = wq``) and folds the scales
    into the norms and producers before it packs; packing (into the CUDA-only GEMM layout, 4 bits only)
    is replaced by a no-op that only drops the per-module state, so the quantized model is read as is."""
    import gc

    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import QuantizeConfig
    from gptqmodel.looper import awq_processor
    from gptqmodel.quantization.config import METHOD
    from gptqmodel.utils.backend import BACKEND
    from bench_gptq import PeakRSS, gptqmodel_load

    def no_pack(self, module):
        module.stream_sync()
        for k in ("w", "w_wq_diff", "wq", "q_zeros", "q_scales"):
            module.state.pop(k, None)

    awq_processor.AWQProcessor.pack_module = no_pack
    qc = QuantizeConfig(method=METHOD.AWQ, bits=bits, group_size=group_size, sym=False, offload_to_disk=False)
    model, mbytes, data = gptqmodel_load(model_dir, qc, calib, getattr(torch, dtype))
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        # AWQ_TORCH: the portable kernel (the default choice, AWQ_GEMM, refuses a machine without CUDA)
        model.quantize(data, batch_size=batch_size, calibration_sort=None, backend=BACKEND.AWQ_TORCH)
        seconds = time.perf_counter() - t0
    hf = model.model.float().eval()
    bad = [n for n, m in hf.named_modules() if m.__class__.__name__ != "Linear" and hasattr(m, "qweight")]
    assert not bad, f"packed modules left: {bad[:3]}"
    return hf, seconds, mem, mbytes


# ------------------------------------------------------------------------------ one job
def worker(job: dict) -> dict:
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench_gptq import PeakRSS, gptqmodel_quantize
    from lm_eval_quant.ppl import window_nll

    torch.set_num_threads(int(job.get("threads", 1)))
    mdir = models_root() / job["model"]
    tok = AutoTokenizer.from_pretrained(str(mdir))
    calib = calib_ids(tok, job["nsamples"], job["seqlen"])
    ev = eval_ids(tok, job["eval_windows"], job["eval_seqlen"])
    meth, bits, gs = job["method"], job["bits"], job["group"]
    out: dict = {}
    bs = max(1, 4096 // calib.shape[1])
    if meth == "gptqmodel-awq":
        model, secs, mem, mbytes = gptqmodel_awq_quantize(mdir, calib, bits, gs, batch_size=bs, dtype="bfloat16")
    elif meth.startswith("gptqmodel"):
        model, secs, mem, mbytes, _ = gptqmodel_quantize(mdir, calib, bits, gs, False, batch_size=bs,
                                                         defaults=meth == "gptqmodel-defaults")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32).eval()
        mbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if meth == "awq-oracle":
                from lm_eval_quant.formats import make_format

                with torch.no_grad():
                    awq_oracle(model, calib, make_format("int", bits, False), gs)
            elif meth != "fp":
                import lm_eval_quant.methods.awq as awq_mod
                import lm_eval_quant.methods.gptq as gptq_mod
                from lm_eval_quant.methods import build_config, get_method
                from lm_eval_quant.methods.base import QuantContext

                name = meth.split("-")[0]
                opts = dict(job.get("options") or {})
                if meth.startswith("gptq-ao"):
                    opts["act_order"] = True
                if meth.endswith("-cap100"):
                    opts["token_cap"] = 100.0
                if meth == "awq-linear":
                    opts["loss"] = "linear"
                if meth == "gptq-d05":
                    opts["damp"] = 0.05
                if name in ("gptq", "awq"):
                    opts.update(calib="c4", nsamples=job["nsamples"], seqlen=job["seqlen"])
                    # the very same windows as every other job, loaded before the timed and measured call
                    gptq_mod.get_calibration = lambda *a, **k: (calib, {"source": "bench"})
                    awq_mod._get_calibration = lambda *a, **k: (calib, {"source": "bench"})
                cfg = build_config(method=name, bits=bits, group_size=gs, sym=False, **opts)
                get_method(name).quantize(model, cfg, QuantContext(tokenizer=tok, progress=True))
            secs = time.perf_counter() - t0
    total, count = window_nll(model, ev, job["eval_seqlen"], batch_size=1)
    out.update(ppl=math.exp(total / count), eval_tokens=count, seconds=secs,
               peak_over_model=(mem.peak - mem.base) / mbytes, layers=model.config.num_hidden_layers)
    return out


def job_key(j: dict) -> str:
    return json.dumps({k: j[k] for k in ("model", "method", "bits", "group", "nsamples", "seqlen",
                                         "eval_windows", "eval_seqlen", "options")}, sort_keys=True)


def load_rows(path: Path) -> dict[str, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[job_key(r["job"])] = r
    return rows


def table(rows: dict[str, dict]) -> str:
    """One markdown table per (model, calibration, eval) setting: rows = method, columns = bits/group."""
    by = {}
    for r in rows.values():
        j = r["job"]
        setting = (j["model"], j["nsamples"], j["seqlen"], j["eval_windows"], j["eval_seqlen"])
        by.setdefault(setting, []).append(r)
    out = []
    for (model, ns, sl, ew, es), rs in sorted(by.items()):
        fp = next((r["result"]["ppl"] for r in rs if r["job"]["method"] == "fp" and "result" in r), None)
        cols = sorted({(r["job"]["bits"], r["job"]["group"]) for r in rs if r["job"]["method"] != "fp"},
                      key=lambda c: (-c[0], -c[1]))
        out.append(f"**{model}**: calibration {ns}×{sl} C4 tokens; WikiText-2 token perplexity "
                   f"({'all' if not ew else ew} windows of {es}); fp = {fp:.3f}" if fp else f"**{model}**")
        out.append("")
        out.append("| method | " + " | ".join(f"W{b} g{g}" for b, g in cols) + " | s/layer (W4) |")
        out.append("|---|" + "---|" * (len(cols) + 1))
        meths = [m for m in METHODS if m != "fp" and any(r["job"]["method"] == m for r in rs)]
        for m in meths:
            cells, secs = [], ""
            for b, g in cols:
                r = next((r for r in rs if r["job"]["method"] == m and r["job"]["bits"] == b
                          and r["job"]["group"] == g), None)
                if r is None:
                    cells.append("")
                elif "result" not in r:
                    cells.append("error")
                else:
                    cells.append(f"{r['result']['ppl']:.2f}")
                    if b == 4 and not secs:
                        secs = f"{r['result']['seconds'] / r['result']['layers']:.1f}"
            out.append(f"| {m} | " + " | ".join(cells) + f" | {secs} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--groups", nargs="+", type=int, default=[128, 64])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8, help="first N WikiText-2 windows (0 = all)")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table of what has run and exit")
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    if a.table:
        print(table(load_rows(a.out)))
        return 0
    if data_dir() is None:
        print("bench_quality: no shared data folder (set LMQ_DATA_DIR)", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = load_rows(a.out)
    for model in a.models:
        if not (models_root() / model / "config.json").exists():
            print(f"bench_quality: {model} not built; run: bash ../shared/tools/real_model.sh {model}", file=sys.stderr)
            continue
        for meth in a.methods:
            for bits in ([16] if meth == "fp" else a.bits):
                for gs in ([-1] if meth == "fp" else a.groups):
                    job = dict(model=model, method=meth, bits=bits, group=gs, nsamples=a.nsamples, seqlen=a.seqlen,
                               eval_windows=a.eval_windows, eval_seqlen=a.eval_seqlen, options={},
                               threads=a.threads)
                    if job_key(job) in done and "result" in done[job_key(job)]:
                        continue
                    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1",
                               HF_DATASETS_OFFLINE="1", GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false",
                               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                    t0 = time.time()
                    try:
                        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                                           capture_output=True, text=True, timeout=a.timeout)
                        res = next((json.loads(x[7:]) for x in r.stdout.splitlines()[::-1] if x.startswith("RESULT ")),
                                   None)
                        err = None if res else (r.stderr[-2000:] or f"rc={r.returncode}")
                    except subprocess.TimeoutExpired:
                        res, err = None, f"timeout after {a.timeout} s"
                    row = {"job": job, "result": res} if res else {"job": job, "error": err}
                    with a.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done[job_key(job)] = row
                    print(f"{model} {meth} W{bits} g{gs}: "
                          f"{'ppl %.3f' % res['ppl'] if res else 'ERROR ' + err.splitlines()[-1][:200]} "
                          f"({time.time() - t0:.0f} s)", flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())

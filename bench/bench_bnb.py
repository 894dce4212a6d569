#!/usr/bin/env python
"""bitsandbytes throughput vs our fake-quant RTN vs plain hf, on the same loglikelihood requests.

    python bench/bench_bnb.py                      # random Llama ~57M params, 48 requests, CPU
    python bench/bench_bnb.py --hidden 512 --layers 4 --requests 24 --repeats 2   # quicker

Every variant is loaded through lm-eval's model classes (`hf`, `hf-quant`) and answers the same
`loglikelihood` requests (contexts of story text + a short continuation); we time
`lm.loglikelihood(requests)` (best of --repeats, after one warm-up batch) and report
tokens/s (wall clock, and per CPU-second of this process — less distorted on a shared
machine), the load(+quantize) time, the bit accounting (bits per quantized weight,
model MB), and the largest |Δ loglikelihood| against plain hf as a sanity check.
Offline: a seeded random Llama from lm_eval_quant.toy (memoised under ~/.cache/lm_eval_quant/toy).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = [
    ("hf (fp32)", "hf", ""),
    ("hf-quant rtn int4 g128 (fake)", "hf-quant", "method=rtn,bits=4,group_size=128,cache=false"),
    ("hf-quant rtn nf4 g64 (fake)", "hf-quant", "method=rtn,bits=4,format=nf,group_size=64,cache=false"),
    ("hf-quant bnb nf4", "hf-quant", "method=bnb,format=nf4"),
    ("hf-quant bnb nf4 double_quant", "hf-quant", "method=bnb,format=nf4,double_quant=true"),
    ("hf-quant bnb fp4", "hf-quant", "method=bnb,format=fp4"),
    ("hf-quant bnb int8 (LLM.int8)", "hf-quant", "method=bnb,bits=8"),
]


def make_requests(tok, n: int, ctx_tokens: int, seed: int = 0):
    from lm_eval.api.instance import Instance

    from lm_eval_quant.toy import make_corpus

    text = make_corpus(400_000, seed=seed + 7)
    ids = tok(text)["input_ids"]
    reqs, n_cont = [], 0
    step = max(1, (len(ids) - ctx_tokens - 8) // n)
    for i in range(n):
        s = i * step
        ctx = tok.decode(ids[s : s + ctx_tokens])
        cont = tok.decode(ids[s + ctx_tokens : s + ctx_tokens + 4])
        reqs.append(Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i))
        n_cont += 4
    return reqs


def run_variant(model_name: str, args: str, path: Path, reqs, batch_size: int, repeats: int):
    import torch
    from lm_eval.api.registry import get_model

    t0 = time.perf_counter()
    margs = f"pretrained={path},dtype=float32" + (f",{args}" if args else "")
    lm = get_model(model_name).create_from_arg_string(margs, {"batch_size": batch_size, "device": "cpu"})
    load_s = time.perf_counter() - t0
    lm.loglikelihood(reqs[:batch_size], disable_tqdm=True)  # warm-up (bnb packs on first call)
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = lm.loglikelihood(reqs, disable_tqdm=True)
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    q = lm.get_model_info().get("quantization", {}) if model_name == "hf-quant" else {}
    if not q:
        n = sum(p.numel() for p in lm.model.parameters())
        q = {"bits_per_quantized_weight": None, "total_bytes": n * 4}
    ll = [x[0] for x in out]
    del lm
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return load_s, best, best_cpu, q, ll


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--ctx-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--only", default="", help="comma list of variant numbers (0-based) to run")
    a = ap.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import lm_eval_quant
    from lm_eval_quant.toy import cached_tiny_model

    lm_eval_quant.register()
    path = cached_tiny_model(
        arch="llama", hidden=a.hidden, layers=a.layers, heads=a.heads, intermediate=a.intermediate,
        train_steps=0, seed=0, max_pos=max(512, a.ctx_tokens + 16),
    )
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    conf = AutoConfig.from_pretrained(str(path))
    reqs = make_requests(tok, a.requests, a.ctx_tokens)
    n_tok = sum(len(tok(r.arguments[0] + r.arguments[1])["input_ids"]) for r in reqs)
    nparams = None
    print(
        f"# random Llama hidden={a.hidden} layers={a.layers} heads={a.heads} inter={a.intermediate} "
        f"vocab={conf.vocab_size}; {a.requests} loglikelihood requests, ~{n_tok} tokens; batch {a.batch_size}; "
        f"torch threads {torch.get_num_threads()}; best of {a.repeats}",
        flush=True,
    )
    sel = [int(x) for x in a.only.split(",") if x.strip()] or list(range(len(VARIANTS)))
    rows, ref = [], None
    for i in sel:
        label, model_name, args = VARIANTS[i]
        load_s, best, cpu, q, ll = run_variant(model_name, args, path, reqs, a.batch_size, a.repeats)
        if nparams is None and q.get("params_total"):
            nparams = q["params_total"]
        if i == 0:
            ref = ll
        dll = max(abs(x - y) for x, y in zip(ll, ref)) if ref is not None else float("nan")
        bpw = q.get("bits_per_quantized_weight")
        rows.append((label, load_s, best, cpu, n_tok / best, n_tok / cpu, bpw, q.get("total_bytes", 0) / 2**20, dll))
        print(f"  done: {label}  ({best:.2f}s)", file=sys.stderr, flush=True)
    hdr = (f"| {'variant':<32} | load s | eval s | eval cpu s | tok/s | tok/cpu-s | bits/qweight "
           f"| model MiB | max abs dLL vs hf |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for label, load_s, best, cpu, tps, tpc, bpw, mib, dll in rows:
        b = f"{bpw:.4f}" if bpw else "32 (fp32)"
        print(f"| {label:<32} | {load_s:6.1f} | {best:6.2f} | {cpu:10.2f} | {tps:5.0f} | {tpc:9.0f} | {b:>12} "
              f"| {mib:9.1f} | {dll:17.4f} |")
    if nparams:
        print(f"# params: {nparams / 1e6:.1f} M")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""execution=real vs fake on CPU: resident weight bytes, peak RSS, forward tokens/s.

    python bench/bench_real.py                     # random ~100M Llama, int4 g128, RTN
    python bench/bench_real.py --method gptq --bits 4 --batch 4 --seqlen 256 --iters 3

Each mode runs in a fresh subprocess (its own peak RSS). Both import GPTQModel first, so the
baseline RSS (taken after the imports, before the weights load) is the same kind in both. Then:
load the fp32 model, quantize (through the same code hf-quant uses), for `real` swap the linears
for packed int4 kernel modules (lm_eval_quant.execution.make_real, auto kernel = GPTQModel's
TorchLinear on CPU), measure the resident bytes of the model's parameters and buffers
(lm_eval_quant.execution.resident_bytes), and time forward passes over random token batches (the
work of loglikelihood scoring). Peak RSS is the process's VmHWM minus the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import gptqmodel  # noqa: F401  (same imports in both modes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_quant.execution import MemoryProbe, make_real, plan_execution, resident_bytes
    from lm_eval_quant.methods import build_config, get_method
    from lm_eval_quant.methods.base import QuantContext

    probe = MemoryProbe("cpu").start()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    fp32 = resident_bytes(model)["total_bytes"]
    opts = {}
    if a.method == "gptq":
        opts = dict(calib=a.calib, nsamples=8, seqlen=128, keep_qstate=True)
    cfg = build_config(method=a.method, bits=a.bits, group_size=a.group_size, **opts)
    t0 = time.perf_counter()
    rep = get_method(a.method).quantize(model, cfg, QuantContext(tokenizer=AutoTokenizer.from_pretrained(a.model),
                                                                 progress=False))
    q_s = time.perf_counter() - t0
    kernel, pack_s = "none (fake)", 0.0
    if a.mode == "real":
        t0 = time.perf_counter()
        info = make_real(model, cfg, rep, plan_execution(cfg, "real"), device="cpu", progress=False)
        pack_s = time.perf_counter() - t0
        kernel = info["kernel"]
    res = resident_bytes(model)["total_bytes"]
    import gc

    from lm_eval_quant.execution import _rss_bytes
    from lm_eval_quant.methods.layerwise import release_free_memory

    gc.collect()
    release_free_memory()
    rss_ready = _rss_bytes() - probe.baseline  # standing memory once the model is ready
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (a.batch, a.seqlen), generator=g)
    with torch.no_grad():
        model(ids[:1, :8])
        t0 = time.perf_counter()
        for _ in range(a.iters):
            model(ids)
        tps = a.batch * a.seqlen * a.iters / (time.perf_counter() - t0)
    pk = probe.peak()
    return {"mode": a.mode, "kernel": kernel, "fp32_bytes": fp32, "resident_bytes": res,
            "resident_vs_fp32": round(res / fp32, 4), "peak_rss_above_baseline_bytes": pk["peak_rss_above_baseline_bytes"],
            "baseline_rss_bytes": pk["baseline_rss_bytes"], "rss_ready_above_baseline_bytes": rss_ready, "tok_s": round(tps, 1), "quantize_s": round(q_s, 2),
            "pack_s": round(pack_s, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: random ~100M toy Llama)")
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq", "awq"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", choices=("fake", "real"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calib", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.mode = a.worker
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0
    from lm_eval_quant import toy

    work = Path(os.environ.get("LMQ_BENCH_DIR") or Path(tempfile.gettempdir()) / "lmq-bench")
    if a.model is None:
        a.model = str(toy.cached_tiny_model(work / "toy", arch="llama", hidden=1024, layers=8, heads=16,
                                            intermediate=2816, train_steps=0))
    calib = work / "calib.txt"
    if not calib.exists():
        calib.parent.mkdir(parents=True, exist_ok=True)
        calib.write_text(toy.make_corpus(100_000, seed=3))
    rows = []
    for mode in ("fake", "real"):
        cmd = [sys.executable, __file__, "--worker", mode, "--model", a.model, "--method", a.method, "--bits",
               str(a.bits), "--group-size", str(a.group_size), "--batch", str(a.batch), "--seqlen", str(a.seqlen),
               "--iters", str(a.iters), "--threads", str(a.threads), "--calib", str(calib)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), HF_HUB_OFFLINE="1")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(line[-1][7:])
        rows.append(r)
        print(json.dumps(r), flush=True)
    mb = 1 / 2**20
    print(f"\n{a.method} int{a.bits} g{a.group_size}, model {Path(a.model).name}, "
          f"forward {a.batch}x{a.seqlen}x{a.iters}, {a.threads} thread(s)")
    print("| execution | kernel | resident MiB | ÷ fp32 model | RSS when ready, above start MiB | peak RSS above start MiB | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['kernel']} | {r['resident_bytes'] * mb:.1f} | {r['resident_vs_fp32']:.3f} | "
              f"{r['rss_ready_above_baseline_bytes'] * mb:.0f} | {r['peak_rss_above_baseline_bytes'] * mb:.0f} | {r['tok_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

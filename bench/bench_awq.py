#!/usr/bin/env python
"""Benchmark: our AWQ against GPTQModel's AWQ (and our RTN) on the same model and calibration tokens.

    PYTHONPATH=. GPTQMODEL_CPU_WORKERS=2 python bench/bench_awq.py                 # toy + stories260K
    PYTHONPATH=. python bench/bench_awq.py --models toy --bits 3,4 --group-size 32 --repeats 2

Every cell runs in a fresh subprocess (so peak RSS is that run's own): load the fp model, quantize
it, report wall time of the quantization (min over --repeats runs), the process' peak RSS while
quantizing (VmHWM) next to the fp model's bytes, and perplexity on held-out text with the GPTQ
protocol (disjoint windows, lm_eval_quant.ppl).  Calibration: the same token windows for every
implementation (``nsamples`` × ``seqlen`` drawn by lm_eval_quant.methods.calibration from story text).
GPTQModel's AWQ is run with its defaults for AWQ (GEMM format, asymmetric, same bits/group size);
its perplexity is measured on the model it returns (its AWQ torch kernels on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def _rss_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _model_path(name: str) -> Path:
    if name == "toy":
        from lm_eval_quant.toy import cached_tiny_model

        return cached_tiny_model(arch="llama", hidden=64, layers=2, heads=4, intermediate=128,
                                 train_steps=150, batch_size=8, seq_len=64)  # = tests/conftest trained_llama
    if name == "stories260K":
        from lm_eval_quant.toy import shared_dir

        sd = shared_dir()
        if sd is None or not (sd / "models" / "stories260K").is_dir():
            raise SystemExit("stories260K not found (../shared/models/stories260K)")
        return sd / "models" / "stories260K"
    return Path(name)


def _calib_ids(tok, nsamples: int, seqlen: int, seed: int = 0):
    from lm_eval_quant.methods.calibration import get_calibration
    from lm_eval_quant.toy import make_corpus

    p = Path(tempfile.gettempdir()) / "lmq_bench_awq_calib.txt"
    if not p.exists():
        p.write_text(make_corpus(120_000, seed=7))
    ids, _ = get_calibration(tok, str(p), nsamples, seqlen, seed)
    return ids


def worker(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_quant.ppl import perplexity
    from lm_eval_quant.toy import heldout_text

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = _model_path(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    ev = torch.tensor(tok(heldout_text(30_000))["input_ids"])
    calib = _calib_ids(tok, a.nsamples, a.seqlen)
    skip = a.skip
    out = {"impl": a.impl, "model": a.model, "bits": a.bits, "group_size": a.group_size}
    if a.impl == "gptqmodel":
        from gptqmodel import GPTQModel
        from gptqmodel.quantization.config import AWQConfig

        ds = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calib]
        dyn = {r"-:.*down_proj.*": {}} if "down_proj" in skip else None  # '-:' = leave unquantized
        cfg = AWQConfig(bits=a.bits, group_size=a.group_size, sym=False, dynamic=dyn,
                        offload_to_disk=False)  # its default disk offload fails on CPU (meta tensors)
        rss0 = _rss_kb("VmRSS")
        t0 = time.perf_counter()
        gm = GPTQModel.load(str(path), cfg, device="cpu", dtype=torch.bfloat16)  # its AWQ CPU kernel: fp16/bf16 only
        fp_bytes = sum(p.numel() * p.element_size() for p in gm.model.parameters())
        gm.quantize(ds, batch_size=1, tokenizer=tok, backend=os.environ.get("LMQ_GPTQMODEL_AWQ_BACKEND", "awq_torch"))
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_mb"] = _rss_kb("VmHWM") / 1024
        out["rss_before_mb"] = rss0 / 1024
        model = gm.model
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        rss0 = _rss_kb("VmRSS")
        t0 = time.perf_counter()
        if a.impl == "ours":
            from lm_eval_quant.methods.awq import awq_quantize_model
            from lm_eval_quant.methods.base import QuantConfig

            cfg = QuantConfig(method="awq", bits=a.bits, group_size=a.group_size, format="int", sym=False,
                              skip=tuple(skip.split("|")))
            awq_quantize_model(model, calib, cfg, progress=False)
        elif a.impl == "rtn":
            from lm_eval_quant.methods import build_config, get_method
            from lm_eval_quant.methods.base import QuantContext

            get_method("rtn").quantize(model, build_config(method="rtn", bits=a.bits, group_size=a.group_size,
                                                           skip=skip), QuantContext(progress=False))
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_mb"] = _rss_kb("VmHWM") / 1024
        out["rss_before_mb"] = rss0 / 1024
    out["fp_model_mb"] = fp_bytes / 2**20
    with torch.no_grad():
        out["ppl"] = perplexity(model, ev, a.eval_seqlen)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="toy,stories260K")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-size", default="32")
    ap.add_argument("--impls", default="ours,gptqmodel,rtn")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-seqlen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="toy", help=argparse.SUPPRESS)
    ap.add_argument("--bits1", type=int, dest="bits_one", help=argparse.SUPPRESS)
    ap.add_argument("--gs1", type=int, dest="gs_one", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="lm_head", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.bits, a.group_size = a.bits_one, a.gs_one
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0

    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for model in a.models.split(","):
        for bits in [int(b) for b in a.bits.split(",")]:
            for gs in [int(g) for g in a.group_size.split(",")]:
                # stories260K: intermediate 172 is not a multiple of 32 → down_proj stays fp for g32
                skip = "lm_head|down_proj" if (model == "stories260K" and gs != -1 and 172 % gs) else "lm_head"
                for impl in a.impls.split(","):
                    best = None
                    for _ in range(a.repeats):
                        cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--model", model,
                               "--bits1", str(bits), "--gs1", str(gs), "--skip", skip,
                               "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                               "--eval-seqlen", str(a.eval_seqlen)]
                        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                        if p.returncode or not line:
                            err = (p.stderr.strip().splitlines() or ["?"])[-1][:150]
                            best = {"impl": impl, "model": model, "bits": bits, "group_size": gs, "error": err}
                            break
                        r = json.loads(line[0][7:])
                        if best is None or r["seconds"] < best["seconds"]:
                            best = r
                    best["skip"] = skip
                    rows.append(best)
                    print(json.dumps(best), file=sys.stderr, flush=True)
    print("| model | bits | group | impl | perplexity | quantize s (min) | peak RSS MB | fp model MB | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['bits']} | {r['group_size']} | {r['impl']} | – | – | – | – | failed: {r['error']} |")
            continue
        note = "down_proj fp" if "down_proj" in r.get("skip", "") else ""
        print(f"| {r['model']} | {r['bits']} | {r['group_size']} | {r['impl']} | {r['ppl']:.4f} | {r['seconds']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['fp_model_mb']:.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

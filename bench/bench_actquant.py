#!/usr/bin/env python
"""Activation fake-quant throughput: `hf-quant` with act_bits / act_format against plain `hf`.

The same loglikelihood requests through plain `hf` and through `hf-quant` with weights RTN-quantized
(fake, so the same dense matmuls) and activations fake-quantized at the input of every linear
(a forward pre-hook). Alternated chunk by chunk, median of N rounds (the noise of a shared
machine falls on both alike). Goal: every activation scheme >= 0.75x of plain `hf`.

    python bench/bench_actquant.py                      # W4A8 int, W8A8-fp8, W4A4-mxfp4, W4A4-nvfp4
    python bench/bench_actquant.py --requests 128 --rounds 4

Everything is built offline (random weights, toy tokenizer); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEMES = {
    "W4A8": dict(method="rtn", bits=4, group_size=128, act_bits=8),
    "W8A8-fp8": dict(method="rtn", format="fp8", act_format="fp8"),
    "W4A4-mxfp4": dict(method="rtn", format="mxfp4", act_format="mxfp4"),
    "W4A4-nvfp4": dict(method="rtn", format="nvfp4", act_format="nvfp4"),
}


def run(n_requests: int, rounds: int, batch_size: int, workdir: Path, hidden: int, layers: int,
        schemes: list[str]) -> list[dict]:
    import torch
    from bench_rtn import _requests

    import lm_eval_quant
    from lm_eval_quant.toy import make_tiny_model

    lm_eval_quant.register()
    from lm_eval.api.registry import get_model

    mdir = make_tiny_model(workdir / "evalmodel", arch="llama", hidden=hidden, layers=layers,
                           heads=max(4, hidden // 64), train_steps=0, seed=0)
    common = dict(pretrained=str(mdir), device="cpu", batch_size=batch_size, dtype="float32")
    hf = get_model("hf")(**common)
    lms = {s: get_model("hf-quant")(**common, **SCHEMES[s], cache=False) for s in schemes}
    for s, lm in lms.items():
        assert lm.get_model_info()["quantization"]["scheme"] == s, s
    n_params = sum(p.numel() for p in hf.model.parameters())
    reqs = _requests(hf.tokenizer, n_requests, 96, seed=1)
    n_tok = sum(len(hf.tok_encode(a + b)) for a, b in (r.arguments for r in reqs))
    chunks = [reqs[i:i + 2 * batch_size] for i in range(0, len(reqs), 2 * batch_size)]

    def timed(lm, chunk) -> float:
        t0 = time.perf_counter()
        out = lm.loglikelihood(chunk, disable_tqdm=True)
        assert len(out) == len(chunk)
        return time.perf_counter() - t0

    names = ["hf"] + schemes
    models = {"hf": hf, **lms}
    for n in names:
        timed(models[n], chunks[0])  # warm-up
    wall: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    for _ in range(rounds):
        w = {n: 0.0 for n in names}
        for chunk in chunks:
            order = names if k % 2 == 0 else names[::-1]
            for n in order:
                w[n] += timed(models[n], chunk)
            k += 1
        for n in names:
            wall[n].append(w[n])
    med = {n: statistics.median(v) for n, v in wall.items()}
    rows = []
    for n in names:
        rows.append(dict(model=n, seconds=med[n], tps=n_tok / med[n], ratio=med["hf"] / med[n]))
    print(f"activation fake-quant throughput vs hf — random Llama {n_params / 1e6:.1f} M params "
          f"(hidden {hidden}, {layers} layers), {n_requests} requests, {n_tok} tokens, batch {batch_size}; "
          f"median of {rounds} rounds, chunk-wise alternated; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| model       | seconds | tokens/s | vs hf | goal |")
    print("|-------------|---------|----------|-------|------|")
    for r in rows:
        goal = "" if r["model"] == "hf" else ("ok" if r["ratio"] >= 0.75 else "MISS")
        print(f"| {r['model']:<11} | {r['seconds']:7.2f} | {r['tps']:8.0f} | {r['ratio']:5.2f}x | {goal:<4} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma list of " + ", ".join(SCHEMES))
    a = ap.parse_args(argv)
    schemes = [s for s in a.schemes.split(",") if s]
    with tempfile.TemporaryDirectory() as d:
        rows = run(a.requests, a.rounds, a.batch_size, Path(d), a.hidden, a.layers, schemes)
    return 0 if all(r["ratio"] >= 0.75 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

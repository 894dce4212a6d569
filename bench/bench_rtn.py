#!/usr/bin/env python
"""RTN benchmark.

(a) Time to RTN-quantize a ~110M-parameter random Llama (hidden 768, 12 layers, intermediate
    2048, vocab 32000, tied embeddings) with the package's RTN, against the time to read and write
    its weights once (safetensors load + save of the whole state dict). Goal: RTN <= 2x I/O.
(b) Evaluation throughput of `hf-quant` (fake-quantized, method=rtn bits=4) against plain `hf` on
    the same loglikelihood requests. Goal: >= 0.97x. Both wrappers run the same dense model
    (fake quantization changes the weights' values only), alternated chunk by chunk, median of N rounds, to damp the noise of a shared machine.

    python bench/bench_rtn.py                 # both parts, prints a table
    python bench/bench_rtn.py --part a --repeats 5
    python bench/bench_rtn.py --part b --requests 96

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


def _big_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).eval()
    return model


def part_a(repeats: int, configs: list[tuple[str, int, int]], workdir: Path) -> list[dict]:
    import torch
    from safetensors.torch import load_file, save_file

    from lm_eval_quant.methods import build_config, get_method
    from lm_eval_quant.methods.base import QuantContext, quantizable_linears

    model = _big_llama()
    n_params = sum(p.numel() for p in model.parameters())
    lin = quantizable_linears(model, ("lm_head",))
    n_q = sum(m.weight.numel() for _, m in lin)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    orig = {k: v.clone() for k, v in state.items()}
    path = workdir / "model.safetensors"
    save_file(state, str(path))  # warm the page cache: we time CPU work, not a cold disk

    def io_once() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        sd = load_file(str(path))
        save_file(sd, str(workdir / "copy.safetensors"))
        return time.perf_counter() - t0, time.process_time() - c0

    io_runs = [io_once() for _ in range(repeats)]
    io, io_cpu = min(r[0] for r in io_runs), min(r[1] for r in io_runs)
    size_mb = path.stat().st_size / 2**20

    rows = []
    for fmt, bits, gs in configs:
        cfg = build_config(method="rtn", bits=bits, group_size=gs, format=fmt)
        method = get_method("rtn")
        times, cpus = [], []
        for _ in range(repeats):
            with torch.no_grad():
                for k, v in model.state_dict().items():  # restore full precision
                    if k in orig:
                        v.copy_(orig[k])
            ctx = QuantContext(tokenizer=None, device="cpu", seed=0, progress=False)
            t0, c0 = time.perf_counter(), time.process_time()
            rep = method.quantize(model, cfg, ctx)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        assert len(rep.quantized) == len(lin), (len(rep.quantized), len(lin))
        t, tc = min(times), min(cpus)
        rows.append(dict(config=f"rtn {fmt}{bits} g{gs}", params=n_params, quantized=n_q,
                         rtn_s=t, io_s=io, ratio=t / io, rtn_cpu=tc, io_cpu=io_cpu,
                         cpu_ratio=tc / io_cpu, size_mb=size_mb))
    return rows


def _requests(tok, n: int, ctx_tokens: int, seed: int):
    import random

    from lm_eval.api.instance import Instance

    from lm_eval_quant.toy import make_corpus

    text = make_corpus(n * ctx_tokens * 8, seed=seed)
    ids = tok(text)["input_ids"]
    r = random.Random(seed)
    reqs = []
    for i in range(n):
        s = r.randrange(0, len(ids) - ctx_tokens - 8)
        ctx = tok.decode(ids[s:s + ctx_tokens])
        cont = tok.decode(ids[s + ctx_tokens:s + ctx_tokens + r.randint(1, 6)])
        if not cont.strip():
            cont = " the"
        reqs.append(Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i))
    return reqs


def part_b(n_requests: int, rounds: int, batch_size: int, workdir: Path, hidden: int, layers: int) -> dict:
    import torch

    import lm_eval_quant
    from lm_eval_quant.toy import make_tiny_model

    lm_eval_quant.register()
    from lm_eval.api.registry import get_model

    mdir = make_tiny_model(workdir / "evalmodel", arch="llama", hidden=hidden, layers=layers,
                           heads=max(4, hidden // 64), train_steps=0, seed=0)
    n_params = None
    common = dict(pretrained=str(mdir), device="cpu", batch_size=batch_size, dtype="float32")
    hf = get_model("hf")(**common)
    hq = get_model("hf-quant")(**common, method="rtn", bits=4, group_size=128)
    n_params = sum(p.numel() for p in hf.model.parameters())
    # quantization really happened: weights differ, shapes and dtypes do not
    diff = [k for (k, a), (_, b) in zip(hf.model.state_dict().items(), hq.model.state_dict().items())
            if not torch.equal(a, b)]
    assert diff, "hf-quant did not change any weight"
    reqs = _requests(hf.tokenizer, n_requests, 96, seed=1)
    n_tok = sum(len(hf.tok_encode(a + b)) for a, b in (r.arguments for r in reqs))

    chunks = [reqs[i:i + 2 * batch_size] for i in range(0, len(reqs), 2 * batch_size)]

    def timed(lm, chunk) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = lm.loglikelihood(chunk, disable_tqdm=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert len(out) == len(chunk)
        return dt, dc

    timed(hf, chunks[0]), timed(hq, chunks[0])  # warm-up (allocator, threads)
    # fine-grained alternation (chunk by chunk, order flipped every time) so that the load of a
    # shared machine falls on both models alike; per round the sums over all requests
    wall = {"hf": [], "hq": []}
    cpu = {"hf": [], "hq": []}
    k = 0
    for _ in range(rounds):
        w = {"hf": 0.0, "hq": 0.0}
        c = {"hf": 0.0, "hq": 0.0}
        for chunk in chunks:
            for name in (("hf", "hq") if k % 2 == 0 else ("hq", "hf")):
                dt, dc = timed(hf if name == "hf" else hq, chunk)
                w[name] += dt
                c[name] += dc
            k += 1
        for name in w:
            wall[name].append(w[name])
            cpu[name].append(c[name])
    med = {n: statistics.median(v) for n, v in wall.items()}
    medc = {n: statistics.median(v) for n, v in cpu.items()}
    return dict(params=n_params, requests=n_requests, tokens=n_tok, hf_s=med["hf"], hq_s=med["hq"],
                hf_cpu=medc["hf"], hq_cpu=medc["hq"], hf_tps=n_tok / med["hf"], hq_tps=n_tok / med["hq"],
                ratio=med["hf"] / med["hq"], cpu_ratio=medc["hf"] / medc["hq"], rounds=rounds,
                weights_changed=len(diff), threads=torch.get_num_threads())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3, help="(a) best of N timings")
    ap.add_argument("--requests", type=int, default=64, help="(b) loglikelihood requests")
    ap.add_argument("--rounds", type=int, default=4, help="(b) alternating timing rounds")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-hidden", type=int, default=256)
    ap.add_argument("--eval-layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="(a) one config only")
    args = ap.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    configs = [("int", 4, 128)] if args.quick else [
        ("int", 4, 128), ("int", 3, 128), ("int", 4, -1), ("nf", 4, 64), ("fp", 4, 128)]
    with tempfile.TemporaryDirectory(prefix="bench_rtn_") as tmp:
        tmp = Path(tmp)
        if args.part in ("a", "all"):
            rows = part_a(args.repeats, configs, tmp)
            r0 = rows[0]
            print(f"\n(a) RTN quantize vs one safetensors read+write — random Llama, "
                  f"{r0['params'] / 1e6:.1f} M params ({r0['quantized'] / 1e6:.1f} M in quantized linears), "
                  f"{r0['size_mb']:.0f} MiB fp32; best of {args.repeats}")
            print(f"| {'config':<18} | {'RTN s':>7} | {'read+write s':>12} | {'RTN / IO':>8} | goal "
                  f"| {'RTN cpu s':>9} | {'IO cpu s':>8} | {'cpu ratio':>9} |")
            print(f"|{'-' * 20}|{'-' * 9}|{'-' * 14}|{'-' * 10}|------|{'-' * 11}|{'-' * 10}|{'-' * 11}|")
            for r in rows:
                ok = "ok" if r["ratio"] <= 2.0 else "MISS"
                print(f"| {r['config']:<18} | {r['rtn_s']:7.2f} | {r['io_s']:12.2f} | {r['ratio']:7.2f}x | {ok:<4} "
                      f"| {r['rtn_cpu']:9.2f} | {r['io_cpu']:8.2f} | {r['cpu_ratio']:8.2f}x |")
            print("(wall clock is the goal's measure; cpu = process CPU time, all threads, which a busy "
                  "shared machine distorts less)")
        if args.part in ("b", "all"):
            b = part_b(args.requests, args.rounds, args.batch_size, tmp, args.eval_hidden, args.eval_layers)
            ok = "ok" if b["ratio"] >= 0.97 else "MISS"
            print(f"\n(b) loglikelihood throughput, hf-quant (rtn int4 g128, fake-quant) vs hf — random "
                  f"Llama {b['params'] / 1e6:.1f} M params, {b['requests']} requests, {b['tokens']} tokens, "
                  f"batch {args.batch_size}; median of {b['rounds']} rounds, chunk-wise alternated")
            print(f"| {'model':<9} | {'seconds':>7} | {'tokens/s':>9} | {'cpu s':>7} |")
            print(f"|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 9}|")
            print(f"| {'hf':<9} | {b['hf_s']:7.2f} | {b['hf_tps']:9.0f} | {b['hf_cpu']:7.2f} |")
            print(f"| {'hf-quant':<9} | {b['hq_s']:7.2f} | {b['hq_tps']:9.0f} | {b['hq_cpu']:7.2f} |")
            print(f"hf-quant / hf throughput: {b['ratio']:.3f}x wall (cpu time: {b['cpu_ratio']:.3f}x); "
                  f"goal >= 0.97x: {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

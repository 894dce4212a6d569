#!/usr/bin/env python
"""GPU check: GPTQ layer-wise on CUDA, RTN, fake vs real-kernel throughput, vLLM on an export.

    bash bench/gpu_check.sh             # 1B and 7B Llama shapes, random weights, ≤ 8 min on one GPU
    bash bench/gpu_check.sh --dry-run   # tiny shapes on CPU (CI / no GPU): same code path

Nothing is downloaded: models are random-initialised from Llama configs (1B: TinyLlama-1.1B shape,
7B: Llama-2-7B shape, both with fewer decoder layers than the real model by default so the check
fits in minutes; per-layer figures are what scales), the tokenizer and calibration text are the
offline toy ones (lm_eval_quant.toy). Per shape, in one process:

1. GPTQ (int4 g128 asym, keep_qstate) layer-wise with the model on the host and each layer on the
   device: seconds per layer, peak device memory (CUDA max_memory_allocated; on CPU peak RSS above
   the start);
2. RTN (int4 g128) on the device: seconds;
3. throughput of a forward pass over random token batches (the work of loglikelihood scoring),
   tokens/s, fake-quantized (bf16 weights on the device) vs real (execution=real: packed int4
   GPTQModel kernel, chosen automatically), with the measured resident weight bytes of each;
4. with vLLM installed: the GPTQ export scored by vLLM (prompt log-probs), tokens/s.

One table is printed at the end (and written as JSON with --json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

SHAPES = {
    # name: hidden, intermediate, layers (real model), heads, kv heads, vocab
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


def build_model(shape: str, layers: int | None, dtype, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = int(layers)
    conf = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **kw)
    with torch.device("meta"):
        model = LlamaForCausalLM(conf)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.model.rotary_emb.__init__(conf)  # inv_freq buffers after to_empty
    return model.eval()


def forward_tps(model, device, vocab: int, batch: int, seqlen: int, iters: int) -> float:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seqlen), generator=g).to(device)
    with torch.no_grad():
        model(ids[:1, :16])  # warm-up (kernel init / autotune)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batch * seqlen * iters / (time.perf_counter() - t0)


def run_shape(shape, a, device, dtype, tok, calib, out_rows):
    import torch

    from lm_eval_quant.execution import MemoryProbe, make_real, plan_execution, resident_bytes
    from lm_eval_quant.methods import build_config, get_method
    from lm_eval_quant.methods.base import QuantContext

    layers = a.layers.get(shape)
    t0 = time.perf_counter()
    base = build_model(shape, layers, dtype)
    n_layers = base.config.num_hidden_layers
    row = {"shape": shape, "layers": n_layers, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "build_s": round(time.perf_counter() - t0, 1)}
    vocab = base.config.vocab_size

    # 1. GPTQ layer-wise (model on host, one layer at a time on the device)
    m = copy.deepcopy(base)
    cfg = build_config(method="gptq", bits=4, group_size=a.group_size, keep_qstate=True, calib=str(calib),
                       nsamples=a.nsamples, seqlen=a.seqlen)
    probe = MemoryProbe(device).start()
    t0 = time.perf_counter()
    rep = get_method("gptq").quantize(m, cfg, QuantContext(tokenizer=tok, device=device, progress=not a.quiet))
    row["gptq_s_per_layer"] = round((time.perf_counter() - t0) / n_layers, 2)
    pk = probe.peak()
    row["gptq_peak_gb"] = round((pk.get("peak_device_bytes") or pk.get("peak_rss_above_baseline_bytes")) / 1e9, 3)

    export_dir = None
    if a.vllm and not a.dry_run:
        from lm_eval_quant.export import save_quantized

        export_dir = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "export"
        save_quantized(m, cfg, export_dir, report=rep, tokenizer=tok, progress=False)

    # 3a. fake-quantized throughput on the device
    m.to(device)
    row["fake_weights_gb"] = round(resident_bytes(m)["total_bytes"] / 1e9, 3)
    probe = MemoryProbe(device).start()
    row["fake_tok_s"] = round(forward_tps(m, device, vocab, a.batch, a.eval_seqlen, a.iters), 1)
    pk = probe.peak()
    row["fake_eval_peak_gb"] = round((pk.get("peak_device_bytes") or pk.get("peak_rss_above_baseline_bytes")) / 1e9, 3)
    m.to("cpu")
    # 3b. real kernels: pack on the host, one layer at a time onto the device
    probe = MemoryProbe(device).start()
    info = make_real(m, cfg, rep, plan_execution(cfg, "real"), device=device, progress=False)
    row["kernel"] = info["kernel"]
    row["real_weights_gb"] = round(resident_bytes(m)["total_bytes"] / 1e9, 3)
    row["real_tok_s"] = round(forward_tps(m, device, vocab, a.batch, a.eval_seqlen, a.iters), 1)
    pk = probe.peak()
    row["real_eval_peak_gb"] = round((pk.get("peak_device_bytes") or pk.get("peak_rss_above_baseline_bytes")) / 1e9, 3)
    del m, rep
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. RTN on the device
    m = copy.deepcopy(base).to(device)
    del base
    cfg_r = build_config(method="rtn", bits=4, group_size=a.group_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    get_method("rtn").quantize(m, cfg_r, QuantContext(device=device, progress=False))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row["rtn_s"] = round(time.perf_counter() - t0, 2)
    del m
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. vLLM on the export: after every shape's other figures (main() prints the table first)
    row["vllm_tok_s"] = None
    row["_export"] = str(export_dir) if export_dir is not None else None
    row["_vocab"] = vocab
    out_rows.append(row)
    print(json.dumps(row), flush=True)


def vllm_tps(export_dir, vocab, a):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "not installed"
    try:
        import torch
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(export_dir), dtype="float16", gpu_memory_utilization=0.6,
                  max_model_len=max(512, a.eval_seqlen + 8), enforce_eager=True)
        g = torch.Generator().manual_seed(2)
        prompts = [{"prompt_token_ids": torch.randint(3, vocab, (a.eval_seqlen,), generator=g).tolist()}
                   for _ in range(a.batch * a.iters)]
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0)
        llm.generate(prompts[:1], sp, use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        tps = len(prompts) * a.eval_seqlen / (time.perf_counter() - t0)
        del llm
        return round(tps, 1)
    except Exception as e:  # noqa: BLE001 - the check reports, it does not stop
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


COLS = [("shape", "shape"), ("layers", "layers"), ("device", "device"), ("gptq_s_per_layer", "GPTQ s/layer"),
        ("gptq_peak_gb", "GPTQ peak GB"), ("rtn_s", "RTN s"), ("fake_weights_gb", "fake weights GB"),
        ("real_weights_gb", "real weights GB"), ("kernel", "kernel"), ("fake_tok_s", "fake tok/s"),
        ("real_tok_s", "real tok/s"), ("fake_eval_peak_gb", "fake eval peak GB"),
        ("real_eval_peak_gb", "real eval peak GB"), ("vllm_tok_s", "vLLM tok/s")]


def table(rows) -> str:
    head = "| " + " | ".join(h for _, h in COLS) + " |"
    sep = "|" + "|".join("---" for _ in COLS) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k, _ in COLS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (no GPU needed)")
    ap.add_argument("--shapes", nargs="+", default=None, help="1b 7b (default) or tiny")
    ap.add_argument("--layers-1b", type=int, default=8)
    ap.add_argument("--layers-7b", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-vllm", dest="vllm", action="store_false")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    import torch

    from lm_eval_quant.toy import make_corpus, make_tokenizer

    if a.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = a.shapes or ["tiny"]
        a.nsamples, a.seqlen, a.batch, a.eval_seqlen, a.iters, a.group_size = 4, 32, 2, 32, 1, 32
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run for the CPU check", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = a.shapes or ["1b", "7b"]
    a.layers = {"1b": a.layers_1b, "7b": a.layers_7b, "tiny": None}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    corpus = make_corpus(400_000, seed=3)
    calib = work / "calib.txt"
    calib.write_text(corpus)
    tok = make_tokenizer(corpus, save_dir=work / "tok")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for s in shapes:
        run_shape(s, a, device, dtype, tok, calib, rows)
    if any(r.get("_export") for r in rows):
        print(table(rows), flush=True)  # the table so far, in case vLLM's start-up runs out of time
        for r in rows:
            if r.get("_export"):
                r["vllm_tok_s"] = vllm_tps(r["_export"], r["_vocab"], a)
    for r in rows:
        r.pop("_export", None)
        r.pop("_vocab", None)
    print()
    print(f"gpu_check ({'dry run, ' if a.dry_run else ''}{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {time.perf_counter() - t0:.0f} s; int4 g{a.group_size}; "
          f"calib {a.nsamples}x{a.seqlen}; eval {a.batch}x{a.eval_seqlen}x{a.iters}; random weights)")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

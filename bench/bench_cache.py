"""Start-up time of an evaluation: plain `hf` load vs `hf-quant` cache hit vs cache miss.

    PYTHONPATH=. python bench/bench_cache.py            # ~100M random Llama (default)
    PYTHONPATH=. python bench/bench_cache.py --small    # 6M model, a quick smoke run

Every measurement runs in a fresh Python process (so nothing is warm in the interpreter; the
files are in the OS page cache after the first run, as in a sweep). Inside the process we time
(a) constructing the lm-eval model object -- HFLM(pretrained=…) or HFQuantLM(…, method=rtn) --
and (b) the same plus the first forward pass ("to first logits": weights are memory-mapped, so
pages are only touched by the first forward). Imports are timed separately and are the same for
all rows. Median of --repeats runs.

Rows: hf (plain load), hf-quant hit (cached RTN 4-bit g128), hf-quant miss (empty cache:
quantize + store), hf-quant cache=false (quantize only). The requirement: hit ≤ 1.1× hf.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, os, sys, time
    t0 = time.perf_counter()
    import torch
    import lm_eval_quant
    lm_eval_quant.register()
    from lm_eval.models.huggingface import HFLM
    from lm_eval_quant.models.hf_quant import HFQuantLM
    t_imp = time.perf_counter() - t0
    kind, model_dir, cache_dir = sys.argv[1:4]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t1 = time.perf_counter(); c1 = time.process_time()
    if kind == "hf":
        lm = HFLM(pretrained=model_dir, device="cpu", batch_size=1)
    else:
        lm = HFQuantLM(pretrained=model_dir, device="cpu", batch_size=1, method="rtn", bits=4,
                       group_size=128, cache=(kind != "nocache"), cache_dir=cache_dir)
    t_load = time.perf_counter() - t1; c_load = time.process_time() - c1
    ids = torch.arange(1, 9).view(1, -1)  # short: measures page-in, not compute
    with torch.no_grad():
        lm.model(ids)
    t_first = time.perf_counter() - t1; c_first = time.process_time() - c1
    hit = None
    if kind != "hf":
        hit = (lm._lmq_report.extra.get("cache") or {}).get("hit")
    print("RESULT " + json.dumps({"imports": t_imp, "load": t_load, "first": t_first, "cpu_load": c_load, "cpu_first": c_first, "hit": hit}))
""")


def run(kind: str, model_dir: Path, cache_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run([sys.executable, "-c", CHILD, kind, str(model_dir), str(cache_dir)],
                       env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"bench child failed ({kind}):\n{p.stderr[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="6M-parameter model instead of ~100M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where to build the model (default: a temp dir)")
    args = ap.parse_args(argv)

    from lm_eval_quant.toy import make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cache_"))
    shape = (dict(hidden=256, layers=4, heads=4, intermediate=768) if args.small
             else dict(hidden=768, layers=12, heads=12, intermediate=2048))
    model_dir = work / ("model_small" if args.small else "model_100m")
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, arch="llama", train_steps=0, seed=0, vocab_size=512, **shape)
    n_params = _count(model_dir)
    cache_dir = work / "cache"

    rows = {"hf": [], "hit": [], "miss": [], "nocache": []}
    run("hf", model_dir, cache_dir)                       # warm the page cache / first-run costs
    for _ in range(args.repeats):
        rows["hf"].append(run("hf", model_dir, cache_dir))
        shutil.rmtree(cache_dir, ignore_errors=True)
        r = run("miss", model_dir, cache_dir)
        assert r["hit"] is False, r
        rows["miss"].append(r)
        r = run("hit", model_dir, cache_dir)
        assert r["hit"] is True, r
        rows["hit"].append(r)
        rows["nocache"].append(run("nocache", model_dir, cache_dir))

    def med(k, f):
        return statistics.median(r[f] for r in rows[k])

    print(f"model: random Llama, {n_params / 1e6:.1f}M params (fp32), RTN int4 g128; "
          f"median of {args.repeats} fresh processes; imports {med('hf', 'imports'):.2f} s (same for all rows)")
    print("wall = elapsed seconds; cpu = process CPU seconds (robust when the machine is shared)")
    hdr = f"{'start-up':<30}" + "".join(f"{h:>13}" for h in ("ready wall", "× hf", "ready cpu", "× hf",
                                                              "logits wall", "× hf", "logits cpu", "× hf"))
    print(hdr)
    names = {"hf": "hf (plain load)", "hit": "hf-quant, cache hit", "miss": "hf-quant, cache miss (+store)",
             "nocache": "hf-quant, cache=false"}
    for k in ("hf", "hit", "miss", "nocache"):
        cells = []
        for f in ("load", "cpu_load", "first", "cpu_first"):
            v = med(k, f)
            cells += [f"{v:>13.2f}", f"{v / med('hf', f):>13.2f}"]
        print(f"{names[k]:<30}" + "".join(cells))
    entry = next((cache_dir / "entries").iterdir())
    size = (entry / "tensors.safetensors").stat().st_size
    print(f"cache entry: {size / 2**20:.0f} MiB ({entry})")
    return 0


def _count(d: Path) -> int:
    cfg = json.loads((d / "config.json").read_text())
    h, L, i, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    return L * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


if __name__ == "__main__":
    sys.exit(main())

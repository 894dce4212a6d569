"""GPTQ and AWQ on a REAL LLM: SmolLM2-135M-Instruct (Llama architecture), built offline by
``../shared/tools/real_model.sh smollm2-135m`` into ``$LMQ_REAL_MODELS`` (or ``$LMQ_MODELS``, or
``~/.cache/lmq-models``).  Skipped cleanly when the model folder or the shared data is absent.

Toys and random weights could not show that our GPTQ lost to RTN on this model (the attention-sink
token dominated the down_proj Hessians); these tests pin the orderings on the real thing:
fp < GPTQ-4 < RTN-4 and GPTQ-3 well below RTN-3 (GPTQ with ``act_order=true``, which is what pays off
on this model: bench/README.md), AWQ-3 far below RTN-3, with a small calibration (C4 subset, seed 0:
16 × 512 tokens for GPTQ, 8 × 512 for AWQ) and the ``wikitext2_gptq`` protocol on the first 2 windows
of 2048 tokens.

Why 16 × 512 for GPTQ: 3-bit GPTQ is chaotic -- the rounding of one column moves every later column
through the error feedback, so a last-bit difference in H (another BLAS thread count, another CPU)
changes ~70% of the codes.  The per-layer losses stay within ~1% of each other, but the end-to-end
perplexity of such equally good solutions spread widely with 8 × 512 calibration tokens (GPTQ-3 58.2 with
2 torch threads, 68.9 with 1, against RTN-3 66.8; a CI machine measured 66.7): 4,096 tokens under-determine
the 1,536-wide down_proj Hessians.  With 16 × 512 the spread over calibration seeds 0/1/2 is
50.7 / 53.1 / 52.0 (8 windows: 52.4 / 52.0 / 53.7 against RTN-3 65.5).
Caveat: the model's weights come from a 4-bit GGUF (Q4 blocks of 32), which flatters RTN-4 at
groups that are multiples of 32; 3-bit figures are not flattered.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from lm_eval_quant.methods import build_config, get_method
from lm_eval_quant.methods.base import QuantContext
from lm_eval_quant.methods.calibration import local_data_dir
from lm_eval_quant.ppl import window_nll

pytestmark = pytest.mark.slow


def real_model(name: str) -> Path | None:
    for env in ("LMQ_REAL_MODELS", "LMQ_MODELS"):
        if os.environ.get(env):
            root = Path(os.environ[env])
            break
    else:
        root = Path.home() / ".cache" / "lmq-models"
    p = root / name
    return p if (p / "config.json").is_file() and list(p.glob("*.safetensors")) else None


SMOL = real_model("smollm2-135m")
DATA = local_data_dir()
needs = pytest.mark.skipif(SMOL is None or DATA is None,
                           reason="needs ../shared/tools/real_model.sh smollm2-135m and the shared data folder")


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(SMOL))
    model = AutoModelForCausalLM.from_pretrained(str(SMOL), dtype=torch.float32).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    text = (DATA / "wikitext2" / "wikitext2_test_joined_gptq_style.txt").read_text(encoding="utf-8")[:40_000]
    ids = torch.tensor(tok(text)["input_ids"])[: 2 * 2048]
    return model, tok, state, ids, None


def _ppl(model, ids):
    total, count = window_nll(model, ids, 2048, batch_size=1)
    return math.exp(total / count)


@pytest.fixture(scope="module")
def ladder(smol):
    """Perplexity of fp, RTN, GPTQ and AWQ at 4 and 3 bits, asymmetric int, group 64 (the methods
    draw the same seeded calibration windows)."""
    model, tok, state, ids, _ = smol
    res = {"fp": _ppl(model, ids)}
    ao = {"act_order": True}
    runs = [("rtn", 4, {}), ("gptq", 4, ao), ("rtn", 3, {}), ("gptq", 3, ao), ("awq", 3, {})]
    for meth, bits, opts in runs:
        model.load_state_dict(state)
        if meth != "rtn":
            opts = dict(opts, calib="c4", nsamples=16 if meth == "gptq" else 8, seqlen=512)
        cfg = build_config(method=meth, bits=bits, group_size=64, sym=False, **opts)
        get_method(meth).quantize(model, cfg, QuantContext(tokenizer=tok, progress=False))
        res[f"{meth}{bits}"] = _ppl(model, ids)
    model.load_state_dict(state)
    print("real-model ladder (SmolLM2-135M, g64):", {k: round(v, 3) for k, v in res.items()})
    return res


@needs
def test_gptq_beats_rtn_on_a_real_llm(ladder):
    r = ladder
    assert r["fp"] < r["gptq4"] < r["rtn4"], r
    # measured (16x512 calibration, 2 windows, seeds 0/1/2): fp 18.84, rtn4 25.11, rtn3 66.83,
    # gptq3 50.70 / 53.08 / 52.01 (0.76-0.79x RTN-3); the bound leaves room for the chaos above
    assert r["gptq3"] < 0.88 * r["rtn3"], r


@needs
def test_awq_beats_rtn_at_3_bits_on_a_real_llm(ladder):
    assert ladder["awq3"] < 0.75 * ladder["rtn3"], ladder  # measured 37.57 vs 66.83


@needs
def test_ragged_default_group_runs_on_a_real_llm(smol):
    """group_size=128 on hidden 576 (4 full groups and one of 64): runs, and accounts 5 groups."""
    from lm_eval_quant.accounting import account

    model, tok, state, ids, _ = smol
    model.load_state_dict(state)
    cfg = build_config(method="rtn", bits=4, group_size=128, sym=False)
    rep = get_method("rtn").quantize(model, cfg, QuantContext(progress=False))
    acc = account(model, cfg, rep.quantized)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert len(torch.unique(q[0, 512:])) <= 16  # the short last group is on its own 4-bit grid
    n = sum(dict(model.named_modules())[m].weight.numel() for m in rep.quantized)
    groups = sum(w.shape[0] * -(-w.shape[1] // 128) for w in (dict(model.named_modules())[m].weight for m in rep.quantized))
    assert acc["bits_per_quantized_weight"] == pytest.approx(4 + (16 + 4) * groups / n)  # fp16 scale + 4-bit zero
    model.load_state_dict(state)

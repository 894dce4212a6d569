"""method=bnb: bitsandbytes NF4 / FP4 / LLM.int8 through transformers' BitsAndBytesConfig.

Expected numbers are written down here and computed by hand from the fixture's shapes:
- the NF4 table (QLoRA / bitsandbytes) pinned to 8 digits, and a few hand-rounded values;
- dequantized weights of a real loaded model == nearest table value x block absmax;
- bits per quantized weight: 4 + 32/64 = 4.5 exactly (fp32 absmax per 64 weights);
  double quantization = 4 + (8 per block + 32 per 256 blocks + 32 offset per matrix) / weights
  from the fixture's block counts; LLM.int8 = 8 + 32 per output row;
- the same numbers in the results JSON of an lm-eval run with model="hf-quant".
"""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from lm_eval_quant.errors import QuantArgError  # noqa: E402
from lm_eval_quant.methods import build_config, get_method  # noqa: E402
from lm_eval_quant.methods.base import QuantContext  # noqa: E402

# bitsandbytes' NF4 code (QLoRA appendix E), 8 significant digits.
NF4_TABLE = [
    -1.0, -0.69619280, -0.52507305, -0.39491749, -0.28444138, -0.18477343, -0.091050036, 0.0,
    0.079580300, 0.16093020, 0.24611230, 0.33791524, 0.44070983, 0.56261700, 0.72295684, 1.0,
]
# fixture shape (hand numbers below depend on it)
HIDDEN, INTER, LAYERS, HEADS = 64, 128, 2, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lm_eval_quant.toy import cached_tiny_model

    # random init is enough here (memoised on disk: $LMQ_TOY_CACHE or ~/.cache/lm_eval_quant/toy)
    return cached_tiny_model(
        arch="llama", hidden=HIDDEN, layers=LAYERS, heads=HEADS, intermediate=INTER, train_steps=0, seed=0
    )


def _load(path, **args):
    from transformers import AutoModelForCausalLM

    cfg = build_config(method="bnb", **args)
    m = get_method("bnb")
    model = AutoModelForCausalLM.from_pretrained(str(path), **m.load_kwargs(cfg))
    rep = m.quantize(model, cfg, QuantContext(progress=False))
    return model, cfg, m.accounting(model, cfg, rep)


def _fp_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


# ------------------------------------------------------------------------------------ hand figures
N_PER_LAYER = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER  # q k v o + gate up down
N_Q = LAYERS * N_PER_LAYER  # 2 * (16384 + 24576) = 81920
MATS = [HIDDEN * HIDDEN] * 4 + [HIDDEN * INTER] * 3  # weights per matrix, one layer
ROWS_PER_LAYER = 4 * HIDDEN + 2 * INTER + HIDDEN  # output rows: q k v o, gate up, down


def test_hand_numbers_are_what_we_think():
    assert N_Q == 81920
    assert sum(MATS) * LAYERS == N_Q


# ------------------------------------------------------------------------------------ the NF4 grid
def test_nf4_table_pinned():
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", "cpu").float()
    assert code.tolist() == pytest.approx(NF4_TABLE, abs=2e-8)


def test_nf4_dequant_is_table_times_absmax_hand_values():
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    # one block of 64 with absmax 2.0 (the block holds -2.0): hand rounding to the NF4 grid
    w = torch.zeros(64)
    w[0] = -2.0
    w[1:6] = torch.tensor([0.6, 0.2, -0.9, 1.3, 0.05])  # /2 = 0.3, 0.1, -0.45, 0.65, 0.025
    # 0.3 lies above the 0.2461|0.3379 midpoint 0.2920 -> 0.33791524
    # 0.1 lies below the 0.0796|0.1609 midpoint 0.1203 -> 0.07958030
    # -0.45 lies above the -0.5251|-0.3949 midpoint -0.4600 -> -0.39491749
    # 0.65 lies above the 0.5626|0.7230 midpoint 0.6428 -> 0.72295684
    # 0.025 lies below the 0|0.0796 midpoint 0.0398 -> 0
    expect = 2.0 * torch.tensor([-1.0, 0.33791524, 0.07958030, -0.39491749, 0.72295684, 0.0])
    q, st = quantize_4bit(w.view(1, 64), blocksize=64, quant_type="nf4")
    assert st.absmax.tolist() == [2.0]
    d = dequantize_4bit(q, st).view(-1)
    assert d[:6].tolist() == pytest.approx(expect.tolist(), abs=1e-6)
    assert d[6:].abs().max().item() == 0.0


def _nearest_grid(W: torch.Tensor, grid: torch.Tensor, block: int) -> torch.Tensor:
    """Reference: each block of `block` consecutive (row-major) weights scaled by its absmax,
    rounded to the nearest grid value."""
    flat = W.reshape(-1, block).float()
    a = flat.abs().amax(dim=1, keepdim=True)
    idx = (flat / a).unsqueeze(-1).sub(grid).abs().argmin(-1)
    return (grid[idx] * a).reshape(W.shape)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_loaded_model_weights_equal_nearest_table_value(tiny, fmt):
    from bitsandbytes.functional import dequantize_4bit, get_4bit_type

    fp = _fp_model(tiny)
    model, cfg, _ = _load(tiny, format=fmt)
    grid = get_4bit_type(fmt, "cpu").float()
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        W = fp.get_submodule(name).weight.data
        mod = model.get_submodule(name)
        assert isinstance(mod, bnb.nn.Linear4bit)
        got = dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        ref = _nearest_grid(W, grid, 64)
        # exact except where a weight sits on a rounding midpoint (none in a random matrix)
        mismatch = (got - ref).abs() > 1e-6 * ref.abs().clamp_min(1e-3)
        assert mismatch.float().mean().item() < 1e-3, f"{name}: {mismatch.sum()} of {W.numel()} differ"
        # and every value is a table value times its block's absmax
        a = W.reshape(-1, 64).abs().amax(1, keepdim=True)
        ratio = got.reshape(-1, 64) / a
        assert (ratio.unsqueeze(-1) - grid).abs().min(-1).values.max().item() < 1e-6


# ------------------------------------------------------------------------------------ accounting
def _unquantized_bits(path) -> tuple[int, int]:
    """(params, bits) of everything that is not a decoder linear, from the fp32 fixture."""
    fp = _fp_model(path)
    n = sum(p.numel() for p in fp.parameters()) - N_Q
    return n, n * 32


def test_accounting_nf4_exact(tiny):
    model, cfg, acc = _load(tiny, format="nf4")
    assert acc["params_quantized"] == N_Q
    assert acc["layers_quantized"] == 7 * LAYERS
    assert acc["bits_per_quantized_weight"] == 4 + 32 / 64 == 4.5
    n_un, b_un = _unquantized_bits(tiny)
    assert acc["params_total"] == n_un + N_Q
    assert acc["total_bits"] == b_un + N_Q * 4.5
    assert acc["total_bytes"] == acc["total_bits"] / 8
    assert acc["bits_per_param"] == pytest.approx(acc["total_bits"] / acc["params_total"])
    b = acc["bnb"]
    assert b["bnb_4bit_quant_type"] == "nf4" and b["bnb_4bit_use_double_quant"] is False
    assert b["blocksize"] == 64 and b["blocks"] == N_Q // 64 and b["absmax_dtype"] == "float32"
    assert b["bnb_4bit_compute_dtype"] == "float32"  # auto on CPU
    assert acc["quant_config"]["method"] == "bnb" and acc["quant_config"]["group_size"] == 64
    # lm_head stays full precision
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_accounting_double_quant_from_block_counts(tiny):
    _, _, acc = _load(tiny, format="nf4", double_quant="true")
    # per matrix: one uint8 absmax per 64 weights, one fp32 absmax per 256 blocks, one fp32 offset
    stat = 0
    for n in MATS * LAYERS:
        blocks = math.ceil(n / 64)
        stat += 8 * blocks + 32 * math.ceil(blocks / 256) + 32
    assert stat == 8 * (N_Q // 64) + 14 * 64  # every matrix here has <= 256 blocks
    assert acc["bits_per_quantized_weight"] == pytest.approx(4 + stat / N_Q, abs=1e-12)
    assert acc["bits_per_quantized_weight"] == pytest.approx(4.1359375, abs=1e-9)
    b = acc["bnb"]
    assert b["absmax_dtype"] == "uint8" and b["nested_blocksize"] == 256 and b["nested_blocks"] == 14
    assert b["bnb_4bit_use_double_quant"] is True


def test_accounting_int8_rows(tiny):
    model, cfg, acc = _load(tiny, bits=8)
    rows = LAYERS * ROWS_PER_LAYER
    assert acc["bits_per_quantized_weight"] == 8 + 32 * rows / N_Q == 8.45
    assert acc["bnb"]["load_in_8bit"] is True and acc["bnb"]["llm_int8_threshold"] == 6.0
    assert cfg.group_size == -1 and cfg.format == "int8"
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), bnb.nn.Linear8bitLt)


def test_skip_pattern_keeps_modules_full_precision(tiny):
    model, _, acc = _load(tiny, format="nf4", skip="lm_head|*.mlp.down_proj")
    assert not isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), bnb.nn.Linear4bit)
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), bnb.nn.Linear4bit)
    n_down = LAYERS * HIDDEN * INTER
    assert acc["params_quantized"] == N_Q - n_down
    assert acc["layers_quantized"] == 6 * LAYERS


def test_compute_dtype_option(tiny):
    model, _, acc = _load(tiny, format="nf4", compute_dtype="bfloat16")
    mod = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert mod.compute_dtype == torch.bfloat16
    assert acc["bnb"]["bnb_4bit_compute_dtype"] == "bfloat16"


def test_nf4_logits_match_our_fake_quant_nf4_g64(tiny):
    """bnb NF4 (blocks of 64 along each row, fp32 absmax) and our RTN with format=nf,
    group_size=64 (same grid, same blocks, but an fp16 scale) compute nearly the same weights
    (they differ only where the fp16-rounded scale moves a weight across a rounding midpoint),
    so their logits agree 10x more closely than either agrees with full precision."""
    from lm_eval_quant.methods import get_method as gm

    fp = _fp_model(tiny)
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fp(ids).logits
        model, _, _ = _load(tiny, format="nf4")
        got = model(ids).logits
        cfg = build_config(method="rtn", bits=4, format="nf", group_size=64)  # nf is symmetric by construction (sym=true is refused)
        fq = _fp_model(tiny)
        gm("rtn").quantize(fq, cfg, QuantContext(progress=False))
        fake = fq(ids).logits
    d_bnb_fake = (got - fake).abs().max().item()
    d_bnb_fp = (got - ref).abs().max().item()
    assert d_bnb_fp > 1e-3  # quantization really happened
    assert d_bnb_fake < d_bnb_fp / 10, (d_bnb_fake, d_bnb_fp)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "args, needle",
    [
        (dict(bits=3), "bits=4"),
        (dict(bits=16, format="nf4"), None),  # bits=16 is the baseline: no error, nothing quantized
        (dict(format="int"), "nf4 or fp4"),
        (dict(bits=8, format="nf4"), "needs bits=4"),
        (dict(blocksize=128), "blocksize=128"),
        (dict(group_size=32), "group_size=32"),
        (dict(bits=8, group_size=64), "group_size=64"),
        (dict(compute_dtype="int4"), "compute_dtype"),
        (dict(double_quant="maybe"), "double_quant"),
        (dict(bits=8, double_quant="true"), "double_quant"),
        (dict(int8_threshold=4.0), "int8_threshold"),
        (dict(damp=0.1), "damp"),
    ],
)
def test_one_line_errors(args, needle):
    if needle is None:
        cfg = build_config(method="bnb", **args)
        assert cfg.method == "none"
        return
    with pytest.raises(QuantArgError) as e:
        build_config(method="bnb", **args)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg


def test_accepted_spellings():
    assert build_config(method="bnb").format == "nf4"
    assert build_config(method="bnb", format="fp").format == "fp4"
    assert build_config(method="bnb", bits=8).format == "int8"
    assert build_config(method="bnb", bits=8, format="int").format == "int8"
    assert build_config(method="bnb", group_size=64).group_size == 64


# ------------------------------------------------------------------------------------ end to end
TASK_YAML = """
task: lmq_bnb_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("bnb_task")
    rows = [
        {"context": f"{n} went to the park with the", "choices": [" dog.", " sky.", " seven."], "label": 0}
        for n in ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna"]
    ]
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "lmq_bnb_toy.yaml").write_text(TASK_YAML.format(data=d / "data.jsonl"))
    return d


def _hf_quant_available() -> bool:
    try:
        import lm_eval_quant.models.hf_quant  # noqa: F401
    except Exception:
        return False
    return True


needs_wrapper = pytest.mark.skipif(not _hf_quant_available(), reason="lm_eval_quant.models.hf_quant not there yet")


@needs_wrapper
@pytest.mark.parametrize(
    "extra, bpw",
    [
        ("format=nf4", 4.5),
        ("format=fp4,double_quant=true", 4.1359375),
        ("bits=8", 8.45),
    ],
)
def test_end_to_end_simple_evaluate(tiny, toy_task, extra, bpw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lm_eval_quant

    lm_eval_quant.register()
    res = lm_eval.simple_evaluate(
        model="hf-quant",
        model_args=f"pretrained={tiny},method=bnb,{extra}",
        tasks=["lmq_bnb_toy"],
        task_manager=TaskManager(include_path=str(toy_task), include_defaults=False),
        limit=4,
        batch_size=4,
        device="cpu",
    )
    acc = res["results"]["lmq_bnb_toy"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    q = res["config"]["quantization"]
    json.dumps(q)  # JSON-able as written into the results file
    assert q["bits_per_quantized_weight"] == pytest.approx(bpw, abs=1e-12)
    assert q["quant_config"]["method"] == "bnb"
    assert "bnb" in q and q["bnb"]["llm_int8_skip_modules"][0] == "lm_head"


@needs_wrapper
@pytest.mark.slow
def test_cli_lm_eval_hf_quant_nf4_results_json(tiny, toy_task, tmp_path):
    """`lm-eval-quant --model hf-quant ...` (the stock lm_eval CLI with hf-quant registered):
    the results file written by lm-eval carries the bnb config and the exact bits. (One-line
    CLI errors are covered for every method by tests/test_discovery.py; the bnb messages are
    checked in test_one_line_errors.)"""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "lm_eval_quant.cli", "--model", "hf-quant",
           "--model_args", f"pretrained={tiny},method=bnb,format=nf4",
           "--tasks", "lmq_bnb_toy", "--include_path", str(toy_task), "--limit", "3",
           "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1, files
    q = json.loads(files[0].read_text())["config"]["quantization"]
    assert q["bits_per_quantized_weight"] == 4.5
    assert q["bnb"]["bnb_4bit_quant_type"] == "nf4" and q["bnb"]["blocks"] == N_Q // 64

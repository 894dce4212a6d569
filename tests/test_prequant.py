"""Pre-quantized checkpoints (GPTQ / bitsandbytes; AWQ and compressed-tensors share the code path):
detection, one-line refusals, loading through transformers' own quantizers, and bit accounting
read from the checkpoint.

The GPTQ checkpoint is written here by hand (symmetric RTN, 4-bit, groups of 32, packed in the
GPTQ v1 layout: qweight int32 [in/8, out], qzeros int32 [groups, out/8] holding zero-1, fp16
scales [groups, out], g_idx [in]) so every stored number is known: transformers + GPTQModel must
load it into a model whose logits equal those of the fp32 model carrying our dequantized weights,
and the accounting must equal, per matrix, n*4 + (n/32)*(16+4) + 32*in bits.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from lm_eval_quant import prequant  # noqa: E402
from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.formats import make_format  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS = 64, 128, 2, 4
BITS, GROUP = 4, 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# [out, in] of each linear of one layer
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]


def _have(mod: str) -> bool:
    try:
        __import__(mod)
    except Exception:
        return False
    return True


needs_gptq = pytest.mark.skipif(not (_have("gptqmodel") and _have("optimum")), reason="gptq extra not installed")


def _split_checkpoint(src: Path, dst: Path):
    """Start a quantized copy of the fp32 HF folder `src` in `dst`: copy every file but the
    weights, and split the state dict into (tensors kept as they are, [(module, fp32 weight)]
    of the linears to quantize)."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    keep, linears = {}, []
    for k, v in load_file(str(src / "model.safetensors")).items():
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        if mod is None or mod.split(".")[-1] not in LINEARS:
            keep[k] = v.contiguous()
        else:
            linears.append((mod, v.float()))
    return keep, linears


def pack_gptq_v1(src: Path, dst: Path, bits: int = BITS, group: int = GROUP) -> dict:
    """Write `src` (fp32 HF folder) as a GPTQ v1 checkpoint with symmetric RTN weights.
    Returns {module name: dequantized weight [out, in] (fp32)}."""
    from safetensors.torch import save_file

    out, linears = _split_checkpoint(src, dst)
    deq = {}
    per, maxq, zero = 32 // bits, 2**bits - 1, 2 ** (bits - 1)
    for mod, W in linears:
        o, i = W.shape
        ng = i // group
        Wg = W.reshape(o, ng, group)
        scale = (2 * Wg.abs().amax(-1).clamp_min(1e-8) / maxq).half()  # GPTQ sym convention
        q = torch.clamp(torch.round(Wg / scale.float().unsqueeze(-1)) + zero, 0, maxq).to(torch.int64)
        deq[mod] = ((q - zero).float() * scale.float().unsqueeze(-1)).reshape(o, i)
        qT = q.reshape(o, i).t().contiguous().numpy().astype(np.uint32)  # [in, out]
        qw = np.zeros((i // per, o), dtype=np.uint32)
        for s in range(per):
            qw |= qT[s::per] << np.uint32(bits * s)
        zs = np.full((ng, o), zero - 1, dtype=np.uint32)  # the v1 layout stores zero - 1
        qz = np.zeros((ng, o // per), dtype=np.uint32)
        for s in range(per):
            qz |= zs[:, s::per] << np.uint32(bits * s)
        out[mod + ".qweight"] = torch.from_numpy(qw.view(np.int32).copy())
        out[mod + ".qzeros"] = torch.from_numpy(qz.view(np.int32).copy())
        out[mod + ".scales"] = scale.t().contiguous()
        out[mod + ".g_idx"] = torch.arange(i, dtype=torch.int32) // group
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "damp_percent": 0.05,
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


@pytest.fixture(scope="module")
def tiny():
    from lm_eval_quant.toy import cached_tiny_model

    return cached_tiny_model(
        arch="llama", hidden=HIDDEN, layers=LAYERS, heads=HEADS, intermediate=INTER, train_steps=0, seed=0
    )


@pytest.fixture(scope="module")
def gptq_ckpt(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq_hand") / "ckpt"
    deq = pack_gptq_v1(Path(tiny), d)
    return d, deq


@pytest.fixture(scope="module")
def gptq_model(gptq_ckpt):
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gptq_ckpt[0]))


# ------------------------------------------------------------------------------------ detection
def test_detect(tiny, gptq_ckpt):
    assert prequant.read_quantization_config(tiny) is None
    qc = prequant.read_quantization_config(gptq_ckpt[0])
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert prequant.describe(qc) == "gptq 4-bit group_size=32 sym desc_act=False"
    assert prequant.check_prequantized(tiny, "rtn") is None  # not pre-quantized: anything goes


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "bnb", "RTN"])
def test_refuse_method_on_prequantized(gptq_ckpt, method):
    with pytest.raises(QuantArgError) as e:
        prequant.check_prequantized(gptq_ckpt[0], method)
    msg = str(e.value)
    assert "\n" not in msg and "already quantized" in msg and "gptq 4-bit" in msg, msg


@needs_gptq
@pytest.mark.parametrize("method", [None, "none", ""])
def test_accept_no_method_on_prequantized(gptq_ckpt, method):
    assert prequant.check_prequantized(gptq_ckpt[0], method)["bits"] == 4


def test_missing_backend_is_one_line(tmp_path, monkeypatch):
    d = tmp_path / "ct"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}}))
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import now fails
    with pytest.raises(QuantArgError) as e:
        prequant.check_prequantized(d, None)
    msg = str(e.value)
    assert "\n" not in msg and "compressed_tensors" in msg and "lm-eval-quant[compressed-tensors]" in msg


# ------------------------------------------------------------------------------------ loading
@needs_gptq
def test_gptq_checkpoint_loads_with_our_weights(tiny, gptq_ckpt, gptq_model):
    from transformers import AutoModelForCausalLM

    _, deq = gptq_ckpt
    ref = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    fp = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, W in deq.items():
            ref.get_submodule(name).weight.copy_(W)
        got = gptq_model(ids).logits.float()
        want = ref(ids).logits
        d_fp = (fp(ids).logits - want).abs().max().item()
    d = (got - want).abs().max().item()
    # the GPTQ kernel computes with fp16 scales; it must land 10x closer to our dequantized
    # model than the quantization error itself (a wrong zero point or packing order would not)
    assert d < d_fp / 10, (d, d_fp)
    assert type(gptq_model.get_submodule("model.layers.0.self_attn.q_proj")).__name__ != "Linear"


# ------------------------------------------------------------------------------------ accounting
def _hand_bits_per_matrix(o: int, i: int) -> int:
    """What the GPTQ file holds: codes + fp16 scale & packed zero per group + int32 g_idx."""
    n = o * i
    return n * BITS + (n // GROUP) * (16 + BITS) + 32 * i


def _hand_bits_defined(o: int, i: int) -> int:
    """Our one definition (docs/DESIGN.md): the fixture is sym without act order, so its packed
    zeros (all 2^(k-1)) and its g_idx (i // group) are layout overhead: codes + fp16 scale."""
    n = o * i
    return n * BITS + (n // GROUP) * 16


@needs_gptq
def test_gptq_accounting_from_packed_tensors(tiny, gptq_model):
    from transformers import AutoModelForCausalLM

    info = prequant.account_prequantized(gptq_model)
    n_q = LAYERS * sum(o * i for o, i in SHAPES)
    file_bits_q = LAYERS * sum(_hand_bits_per_matrix(o, i) for o, i in SHAPES)
    bits_q = LAYERS * sum(_hand_bits_defined(o, i) for o, i in SHAPES)
    assert (n_q, file_bits_q, bits_q) == (81920, 411648, 368640)
    assert info["params_quantized"] == n_q
    assert info["layers_quantized"] == 7 * LAYERS
    # the same figure as on the fly: 4-bit sym, groups of 32 → 4 + 16/32
    assert info["bits_per_quantized_weight"] == bits_q / n_q == 4.5
    assert info["bits_per_quantized_weight"] == make_format("int", 4, True).bits_per_weight(32)
    assert info["prequantized"]["file_bits_per_quantized_weight"] == file_bits_q / n_q == 5.025
    assert info["prequantized"]["layout_overhead_bits"] == file_bits_q - bits_q
    fp = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    n_un = sum(p.numel() for p in fp.parameters()) - n_q
    assert info["params_total"] == n_un + n_q
    # the rest is loaded in the checkpoint's dtype (fp32 here)
    assert info["total_bits"] == n_un * 32 + bits_q
    pre = info["prequantized"]
    assert (pre["quant_method"], pre["bits"], pre["group_size"], pre["sym"], pre["desc_act"]) == ("gptq", 4, 32, True, False)
    assert pre["nominal_bits_per_weight"] == 4 + 20 / 32
    assert pre["quantized_tensor_bits"]["g_idx"] == LAYERS * 32 * sum(i for _, i in SHAPES)
    assert pre["quantization_config"]["damp_percent"] == 0.05  # read from config.json, not defaults
    # on-disk tensors: the same bits plus the layout overhead (the file holds what was loaded)
    assert pre["checkpoint_tensor_bytes"] * 8 == info["total_bits"] + pre["layout_overhead_bits"]
    assert pre["packed_tensors_read_from"] == ["checkpoint"]
    json.dumps(info)


@needs_gptq
def test_gptq_accounting_from_memory_when_no_local_files(gptq_ckpt):
    """Without the checkpoint folder (e.g. a hub id) the loaded packed tensors are read; right
    after loading they are the checkpoint's, so the figure is the same."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(gptq_ckpt[0]))
    m.name_or_path = m.config._name_or_path = "someone/not-a-local-folder"
    info = prequant.account_prequantized(m)
    assert info["prequantized"]["packed_tensors_read_from"] == ["memory"]
    assert info["bits_per_quantized_weight"] == 4.5
    assert info["prequantized"]["file_bits_per_quantized_weight"] == 5.025
    assert info["quant_config"]["bits"] == 4 and info["quant_config"]["method"] == "gptq"


def test_not_prequantized_returns_none(tiny):
    from transformers import AutoModelForCausalLM

    assert prequant.account_prequantized(AutoModelForCausalLM.from_pretrained(str(tiny))) is None


def test_bnb_prequantized_checkpoint(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m = AutoModelForCausalLM.from_pretrained(
        str(tiny), quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    m.save_pretrained(str(tmp_path / "nf4"))
    with pytest.raises(QuantArgError):
        prequant.check_prequantized(tmp_path / "nf4", "bnb")
    assert prequant.check_prequantized(tmp_path / "nf4", None)["bnb_4bit_quant_type"] == "nf4"
    re = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"))
    info = prequant.account_prequantized(re)
    assert info["bits_per_quantized_weight"] == 4.5
    assert info["params_quantized"] == 81920
    assert info["prequantized"]["quant_method"] == "bitsandbytes"
    assert info["prequantized"]["description"] == "bitsandbytes nf4"


# ------------------------------------------------------------------------------------ end to end
def _hf_quant_available() -> bool:
    try:
        import lm_eval_quant.models.hf_quant  # noqa: F401
    except Exception:
        return False
    return True


needs_wrapper = pytest.mark.skipif(not _hf_quant_available(), reason="lm_eval_quant.models.hf_quant not there yet")

TASK_YAML = """
task: lmq_prequant_toy
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
    d = tmp_path_factory.mktemp("prequant_task")
    rows = [
        {"context": f"{n} saw a big", "choices": [" dog.", " blue.", " ran."], "label": 0}
        for n in ["Lily", "Tom", "Mia", "Ben"]
    ]
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "lmq_prequant_toy.yaml").write_text(TASK_YAML.format(data=d / "data.jsonl"))
    return d


@needs_wrapper
@needs_gptq
@pytest.mark.parametrize("method_arg", [",method=none", ""])
def test_end_to_end_gptq_checkpoint(gptq_ckpt, toy_task, method_arg):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lm_eval_quant

    lm_eval_quant.register()
    res = lm_eval.simple_evaluate(
        model="hf-quant",
        model_args=f"pretrained={gptq_ckpt[0]}{method_arg}",
        tasks=["lmq_prequant_toy"],
        task_manager=TaskManager(include_path=str(toy_task), include_defaults=False),
        limit=4,
        batch_size=4,
        device="cpu",
    )
    assert 0.0 <= res["results"]["lmq_prequant_toy"]["acc,none"] <= 1.0
    q = res["config"]["quantization"]
    json.dumps(q)
    assert q["bits_per_quantized_weight"] == 4.5  # = on the fly (sym 4-bit g32); the file: 5.025
    assert q["prequantized"]["file_bits_per_quantized_weight"] == 5.025
    assert q["prequantized"]["bits"] == 4 and q["prequantized"]["group_size"] == 32
    assert (q["quant_config"]["method"], q["quant_config"]["bits"], q["quant_config"]["group_size"]) == ("gptq", 4, 32)


@needs_wrapper
def test_end_to_end_refuses_method_on_prequantized(gptq_ckpt):
    from lm_eval_quant.models.hf_quant import HFQuantLM

    with pytest.raises(QuantArgError) as e:
        HFQuantLM(pretrained=str(gptq_ckpt[0]), method="rtn", bits=4, group_size=32, device="cpu")
    assert "\n" not in str(e.value) and "already quantized" in str(e.value)


# ------------------------------------------------------------------------------------ other formats (config level)
def test_awq_and_compressed_tensors_configs_are_described():
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert prequant.describe(awq) == "awq 4-bit group_size=128"
    qd = prequant._quant_config_dict(awq, "awq")
    assert (qd["method"], qd["bits"], qd["group_size"], qd["sym"]) == ("awq", 4, 128, False)
    assert prequant.nominal_bits_per_weight(awq) == 4 + 20 / 128
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                           "group_size": 128, "symmetric": True}}}}
    assert prequant.describe(ct) == "compressed-tensors pack-quantized int4 group"
    qd = prequant._quant_config_dict(ct, prequant._method_of(ct))
    assert (qd["method"], qd["bits"], qd["group_size"], qd["sym"]) == ("compressed-tensors", 4, 128, True)
    assert prequant._method_of({"load_in_4bit": True, "quant_method": "bitsandbytes"}) == "bitsandbytes"


def test_refusal_names_checkpoint_kind_for_awq(tmp_path):
    d = tmp_path / "awq"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}}))
    with pytest.raises(QuantArgError) as e:
        prequant.check_prequantized(d, "gptq")
    assert "awq 4-bit group_size=128" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ compressed-tensors
def pack_compressed_tensors(src: Path, dst: Path, bits: int = BITS, group: int = GROUP) -> dict:
    """`src` as a compressed-tensors "pack-quantized" checkpoint: symmetric int4, groups of 32,
    q in [-8, 7] packed by compressed_tensors' own pack_to_int32, fp16 scales [out, in/32],
    weight_shape. Returns {module: dequantized weight [out, in]}."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    out, linears = _split_checkpoint(src, dst)
    deq = {}
    qmax = 2 ** (bits - 1) - 1
    for mod, W in linears:
        o, i = W.shape
        Wg = W.reshape(o, i // group, group)
        scale = (Wg.abs().amax(-1).clamp_min(1e-8) / qmax).half()
        q = torch.clamp(torch.round(Wg / scale.float().unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
        deq[mod] = (q.float() * scale.float().unsqueeze(-1)).reshape(o, i)
        out[mod + ".weight_packed"] = pack_to_int32(q.reshape(o, i), bits)
        out[mod + ".weight_scale"] = scale.contiguous()
        out[mod + ".weight_shape"] = torch.tensor([o, i], dtype=torch.int64)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                      "input_activations": None, "output_activations": None,
                                      "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                  "strategy": "group", "group_size": group, "dynamic": False}}},
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


def test_compressed_tensors_checkpoint_loads_and_accounts(tiny, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    d = tmp_path / "ct"
    deq = pack_compressed_tensors(Path(tiny), d)
    assert prequant.check_prequantized(d, None)["format"] == "pack-quantized"
    m = AutoModelForCausalLM.from_pretrained(str(d))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    fp = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name, W in deq.items():
            ref.get_submodule(name).weight.copy_(W)
        got, want = m(ids).logits.float(), ref(ids).logits
        d_fp = (fp(ids).logits - want).abs().max().item()
    assert (got - want).abs().max().item() < d_fp / 100
    info = prequant.account_prequantized(m)
    # per matrix: n*4 packed + (n/32) fp16 scales + 2 int64 for the shape
    n_q = LAYERS * sum(o * i for o, i in SHAPES)
    bits_q = LAYERS * sum(o * i * 4 + (o * i // 32) * 16 + 128 for o, i in SHAPES)
    assert info["params_quantized"] == n_q and info["layers_quantized"] == 14
    assert info["bits_per_quantized_weight"] == bits_q / n_q
    assert info["quant_config"]["method"] == "compressed-tensors" and info["quant_config"]["group_size"] == 32
    n_un = sum(p.numel() for p in fp.parameters()) - n_q
    assert info["total_bits"] == n_un * 32 + bits_q

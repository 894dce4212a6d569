"""Pre-quantized checkpoints: detection, argument checks, and exact bit accounting.

`pretrained=` may name a checkpoint that is already quantized — its config.json carries a
`quantization_config` (quant_method gptq, awq, compressed-tensors, bitsandbytes, ...).
transformers' own quantizers load it (GPTQ and AWQ through GPTQModel/optimum,
compressed-tensors through the `compressed-tensors` package, bitsandbytes natively); we do not
quantize it again, and refuse, in one line, any method=rtn/gptq/awq/bnb on top of it.

Bit accounting is read from the checkpoint, not guessed: the quantization_config (bits,
group_size, sym, desc_act, format), and the real packed tensors of every quantized module as
loaded (GPTQ/AWQ: qweight, qzeros, scales, g_idx; compressed-tensors: weight_packed /
weight_scale / weight_zero_point / weight_shape; bitsandbytes: codes + absmax) at their real
dtype and count. Everything else (embeddings, norms, output head, biases) counts at the dtype it
was loaded in, as in `lm_eval_quant.accounting.account`.

Hooks for the hf-quant wrapper:
    qc = check_prequantized(pretrained, method, revision=..., subfolder=...)   # before loading
    info = account_prequantized(model, cfg)                                   # after loading
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from .errors import QuantArgError

# quant_method -> (python modules that must import, extra to install)
BACKENDS: dict[str, tuple[tuple[str, ...], str]] = {
    "gptq": (("optimum", "gptqmodel"), "lm-eval-quant[gptq]"),
    "awq": (("gptqmodel",), "lm-eval-quant[gptq]"),
    "compressed-tensors": (("compressed_tensors",), "lm-eval-quant[compressed-tensors]"),
    "bitsandbytes": (("bitsandbytes",), "lm-eval-quant[bnb]"),
}
# tensors that make a module "quantized" in the formats we know
_PACKED_KEYS = ("qweight", "weight_packed")
# the storage tensors of those formats (GPTQ/AWQ; compressed-tensors). Kernels may cache
# derived tensors after their first forward (dequantized weights, repacked layouts): those are
# not the checkpoint's storage and are not counted.
_STORAGE_KEYS = {
    "qweight", "qzeros", "scales", "g_idx",
    "weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape",
    "weight_global_scale",
}
_SAFETENSORS_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U8": 8, "U16": 16, "U32": 32, "U64": 64, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F4": 4, "I4": 4, "U4": 4,
}


# --------------------------------------------------------------------------------------------
# detection (cheap: config.json only)
# --------------------------------------------------------------------------------------------
def _as_dict(qc: Any) -> dict:
    if qc is None:
        return {}
    if isinstance(qc, dict):
        d = dict(qc)
    elif hasattr(qc, "to_dict"):
        d = qc.to_dict()
    else:
        d = dict(vars(qc))
    out = {}
    for k, v in d.items():
        if hasattr(v, "value") and not isinstance(v, (str, int, float, bool)):
            v = v.value  # enums (QuantizationMethod.GPTQ -> "gptq")
        out[k] = v
    return out


def _method_of(qc: dict) -> str:
    m = qc.get("quant_method") or qc.get("method") or ""
    m = str(getattr(m, "value", m)).lower()
    if m in ("compressed_tensors",):
        m = "compressed-tensors"
    if m == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        m = "bitsandbytes"
    return m


def read_quantization_config(
    pretrained: Any, revision: str | None = None, subfolder: str = "", trust_remote_code: bool = False
) -> dict | None:
    """The `quantization_config` of a checkpoint's config.json, or None if it has none.

    Local folders are read directly; other names go through transformers' config resolution
    (which uses the local Hugging Face cache when offline). Failures return None: the model
    load itself reports a missing or broken checkpoint."""
    if pretrained is None or not isinstance(pretrained, (str, Path)):
        qc = getattr(getattr(pretrained, "config", None), "quantization_config", None)
        return _as_dict(qc) or None
    local = Path(str(pretrained)) / (subfolder or "") / "config.json"
    if local.is_file():
        try:
            qc = json.loads(local.read_text()).get("quantization_config")
        except (OSError, ValueError):
            return None
        return _as_dict(qc) or None
    try:
        from transformers import AutoConfig

        kw = {"revision": revision or "main", "trust_remote_code": trust_remote_code}
        if subfolder:
            kw["subfolder"] = subfolder
        cfg = AutoConfig.from_pretrained(str(pretrained), **kw)
    except Exception:
        return None
    return _as_dict(getattr(cfg, "quantization_config", None)) or None


def describe(qc: dict) -> str:
    """Short human description, e.g. 'gptq 4-bit group_size=128 sym desc_act=False'."""
    m = _method_of(qc)
    if m == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return "bitsandbytes LLM.int8"
        return f"bitsandbytes {qc.get('bnb_4bit_quant_type', 'fp4')}"
    if m == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        parts = []
        for g in groups.values():
            w = (g or {}).get("weights") or {}
            if w:
                parts.append(f"{w.get('type', '?')}{w.get('num_bits', '?')} {w.get('strategy', '')}".strip())
        return f"compressed-tensors {qc.get('format', '')} {'; '.join(parts)}".strip()
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    s = f"{m} {bits}-bit group_size={gs}"
    if "sym" in qc:
        s += " sym" if qc["sym"] else " asym"
    if "desc_act" in qc:
        s += f" desc_act={qc['desc_act']}"
    return s


def check_prequantized(
    pretrained: Any,
    method: str | None,
    revision: str | None = None,
    subfolder: str = "",
    trust_remote_code: bool = False,
) -> dict | None:
    """Call before loading. Returns the checkpoint's quantization_config (None if the
    checkpoint is not pre-quantized). Raises QuantArgError (one line) when a quantization method
    is asked for on top of it, or when the backend transformers needs to load it is missing.

    `method`: the method the user asked for (None when not given). A pre-quantized checkpoint
    is evaluated as it is: method must be left out or be `none`."""
    qc = read_quantization_config(pretrained, revision, subfolder, trust_remote_code)
    if not qc:
        return None
    m = _method_of(qc)
    asked = None if method is None else str(method).strip().lower()
    if asked not in (None, "", "none"):
        raise QuantArgError(
            f"hf-quant: {pretrained} is already quantized ({describe(qc)}); method={asked} "
            f"cannot be applied on top of it: leave method out (or method=none) to evaluate it "
            f"as it is, or point pretrained= at the full-precision model"
        )
    mods, extra = BACKENDS.get(m, ((), ""))
    import importlib

    for mod in mods:
        try:
            importlib.import_module(mod)
        except Exception as e:
            raise QuantArgError(
                f"hf-quant: loading a {m} checkpoint needs the python package {mod} "
                f"(pip install '{extra}'): {type(e).__name__}: {e}"
            ) from None
    return qc


# --------------------------------------------------------------------------------------------
# accounting (after loading)
# --------------------------------------------------------------------------------------------
def _tensor_bits(t) -> int:
    return int(t.numel()) * t.element_size() * 8


def _in_out(mod, sd: dict, qc: dict, method: str) -> tuple[int, int]:
    """Logical [out, in] of a quantized linear: from the module, else from its tensors."""
    i, o = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
    if isinstance(i, int) and isinstance(o, int):
        return o, i
    if "weight_shape" in sd:
        o, i = (int(x) for x in sd["weight_shape"].tolist())
        return o, i
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    qw = sd["qweight"]
    if method == "awq":
        return qw.shape[1] * 32 // bits, qw.shape[0]
    i = sd["g_idx"].numel() if "g_idx" in sd else qw.shape[0] * 32 // bits
    return qw.shape[1], i


def _is_quantized_module(sd: dict) -> bool:
    if any(k in sd for k in _PACKED_KEYS):
        return True
    w = sd.get("weight")
    # compressed-tensors int8 / fp8 "float-quantized": a low-precision weight with its scale
    return w is not None and "weight_scale" in sd and w.element_size() == 1


def quantized_modules(model) -> list[tuple[str, Any, dict]]:
    """(name, module, own tensors) for every module holding packed quantized weights."""
    out = []
    for name, mod in model.named_modules():
        sd = {k: v for k, v in mod._parameters.items() if v is not None}
        sd.update({k: v for k, v in mod._buffers.items() if v is not None})
        if sd and _is_quantized_module(sd):
            out.append((name, mod, sd))
    return out


def safetensors_header_bits(folder: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bits) for every tensor of the .safetensors files in a folder,
    read from the file headers only (no tensor data)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            b = _SAFETENSORS_BITS.get(v["dtype"], 0) * math.prod(v["shape"])
            out[k] = (v["dtype"], list(v["shape"]), b)
    return out


def _checkpoint_dir(model) -> Path | None:
    p = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if p and Path(str(p)).is_dir():
        return Path(str(p))
    return None


def nominal_bits_per_weight(qc: dict) -> float | None:
    """The textbook figure for GPTQ/AWQ: k + (fp16 scale + k-bit packed zero) / group (asymmetric;
    the same as ``Format.bits_per_weight`` on the fly)."""
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(bits, int) or not isinstance(gs, int) or gs <= 0:
        return None
    return bits + (16 + bits) / gs


def _quant_config_dict(qc: dict, method: str, cfg: Any = None) -> dict:
    """`quant_config` in the same shape as QuantConfig.to_dict(), describing the checkpoint, so
    sweeps and reports read bits / group_size / method as for on-the-fly runs. The caller's
    config (method=none) goes under options.requested."""
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            bits, fmt, gs = 8, "int8", -1
        else:
            bits, fmt, gs = 4, str(qc.get("bnb_4bit_quant_type", "fp4")), 64
        sym = True
    elif method == "compressed-tensors":
        w = {}
        for g in (qc.get("config_groups") or {}).values():
            w = (g or {}).get("weights") or {}
            if w:
                break
        bits = w.get("num_bits")
        fmt = w.get("type", "int")
        gs = w.get("group_size") if w.get("strategy") == "group" else -1
        sym = w.get("symmetric")
    else:
        bits = qc.get("bits", qc.get("w_bit"))
        gs = qc.get("group_size", qc.get("q_group_size"))
        fmt = "int"
        sym = qc.get("sym", None if method != "awq" else not qc.get("zero_point", True))
    requested = None
    if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "is_baseline"):
        requested = cfg.to_dict()
    return {
        "method": method,
        "bits": bits,
        "group_size": gs,
        "format": fmt,
        "sym": sym,
        "skip": [],
        "options": {"prequantized": True, "desc_act": qc.get("desc_act"), "requested": requested},
    }


def account_prequantized(model, cfg=None) -> dict | None:
    """Accounting of a model loaded from a pre-quantized checkpoint; None when it is not one.

    Same keys as accounting.account plus "prequantized": the checkpoint's quantization_config
    (its method, bits, group_size, sym, desc_act, format), the byte breakdown per tensor kind,
    the nominal formula figure, and the checkpoint's on-disk tensor bytes when it is a local
    folder."""

    qc = _as_dict(getattr(getattr(model, "config", None), "quantization_config", None))
    if not qc:
        return None
    ck = _checkpoint_dir(model)
    raw = read_quantization_config(ck) if ck is not None else None
    if raw:  # the checkpoint's own words, not transformers' re-serialisation with its defaults
        qc = raw
    method = _method_of(qc)
    qc_json = json.loads(json.dumps(qc, default=str))
    if method == "bitsandbytes":
        from .methods.bnb import bnb_account

        info = bnb_account(model, None, {k: v for k, v in qc_json.items() if not k.startswith("_")})
        info["quant_config"] = _quant_config_dict(qc, method, cfg)
        info["prequantized"] = {"quant_method": method, "description": describe(qc), "quantization_config": qc_json}
        return info

    # The checkpoint's packed tensors as stored (safetensors headers): kernels may repack them
    # in memory after the first forward (GPTQModel's torch kernel unpacks qzeros to floats), so
    # the files are the stable truth. Modules not found in the files are read from memory.
    hdr = _header_bits_or_empty(ck)
    todo, decompressed = _modules_to_count(model, hdr)
    q = _count_quantized(todo, hdr, qc, method)
    params_total, total_bits = _count_unquantized(model, q["tensor_ids"])
    params_total += q["params"]
    # One definition of bits per weight for on-the-fly runs and checkpoints (docs/DESIGN.md):
    # codes + scales + zero points (asymmetric only) + g_idx (act order only). What a layout
    # stores beyond that as a pure function of its config (GPTQ's g_idx = i // group without
    # act order, its constant qzeros when sym) is layout overhead: left out of the figures and
    # reported here, with the file's own bits per weight.
    overhead = _layout_overhead_bits(qc, q["by_kind"])
    bits_q = q["bits"] - overhead
    total_bits += q["bits"] - overhead
    pre = _prequantized_block(qc, qc_json, method, q, overhead, decompressed, hdr)
    from .accounting import summary

    return summary(_quant_config_dict(qc, method, cfg), params_total, q["params"], len(todo), bits_q,
                   total_bits, prequantized=pre)


def _header_bits_or_empty(ck) -> dict:
    """safetensors_header_bits of the checkpoint folder; {} when there is none or it is unreadable."""
    if ck is None:
        return {}
    try:
        return safetensors_header_bits(ck)
    except (OSError, ValueError, struct.error):
        return {}


def _modules_to_count(model, hdr: dict) -> tuple[dict, list]:
    """{name: (module, state)} of the quantized modules, plus the names of those packed in the
    files but dense in memory (e.g. compressed-tensors decompressed on a device without its
    kernels): still quantized weights of the checkpoint."""
    mods = dict(model.named_modules())
    todo = {name: (mod, sd) for name, mod, sd in quantized_modules(model)}
    decompressed = []
    for key in hdr:
        prefix, _, leaf = key.rpartition(".")
        if leaf in _PACKED_KEYS and prefix not in todo and prefix in mods:
            m = mods[prefix]
            sd = {k: v for k, v in m._parameters.items() if v is not None}
            sd.update({k: v for k, v in m._buffers.items() if v is not None})
            todo[prefix] = (m, sd)
            decompressed.append(prefix)
    return todo, decompressed


def _count_quantized(todo: dict, hdr: dict, qc: dict, method: str) -> dict:
    """Weights and stored bits of the quantized modules, from the files' headers where the module
    is packed there, else from memory: params, bits, by_kind (bits per tensor kind), source
    ("checkpoint"/"memory"), tensor_ids (the storage tensors, not counted again as dense)."""
    tensor_ids: set[int] = set()
    params_q = bits_q = 0
    by_kind: dict[str, int] = {}
    source = set()
    for name, (mod, sd) in todo.items():
        stored = {k: hdr[f"{name}.{k}"][2] for k in _STORAGE_KEYS if f"{name}.{k}" in hdr}
        use_file = any(k in stored for k in _PACKED_KEYS)
        if use_file and isinstance(getattr(mod, "in_features", None), int):
            o, i = mod.out_features, mod.in_features
        else:
            o, i = _in_out(mod, sd, qc, method)
        params_q += o * i
        source.add("checkpoint" if use_file else "memory")
        for k, t in sd.items():
            if k in _STORAGE_KEYS:
                tensor_ids.add(id(t))  # (a dense decompressed weight is counted as packed)
        items = stored.items() if use_file else (
            (k, _tensor_bits(t)) for k, t in sd.items() if k in _STORAGE_KEYS
        )  # bias: an ordinary unquantized parameter; kernel caches: not storage
        for k, b in items:
            bits_q += b
            by_kind[k] = by_kind.get(k, 0) + b
    return {"params": params_q, "bits": bits_q, "by_kind": by_kind, "source": source, "tensor_ids": tensor_ids}


def _count_unquantized(model, skip_ids: set[int]) -> tuple[int, int]:
    """(weights, bits) of the floating-point parameters not in ``skip_ids``, each tensor once."""
    params = bits = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in skip_ids:
            continue
        seen.add(id(p))
        if not p.dtype.is_floating_point:
            continue  # packed integer params not recognised above are never counted as weights
        params += p.numel()
        bits += _tensor_bits(p)
    return params, bits


def _layout_overhead_bits(qc: dict, by_kind: dict) -> int:
    """Bits a layout stores as a pure function of its config: g_idx without act order, qzeros when sym."""
    overhead = 0
    if not qc.get("desc_act"):
        overhead += by_kind.get("g_idx", 0)
    if qc.get("sym") is True:
        overhead += by_kind.get("qzeros", 0)
    return overhead


def _prequantized_block(qc: dict, qc_json: dict, method: str, q: dict, overhead: int, decompressed: list,
                        hdr: dict) -> dict:
    """The "prequantized" entry of the accounting: the checkpoint's own description and figures."""
    pre = {
        "quant_method": method,
        "description": describe(qc),
        "bits": qc.get("bits", qc.get("w_bit")),
        "group_size": qc.get("group_size", qc.get("q_group_size")),
        "sym": qc.get("sym"),
        "desc_act": qc.get("desc_act"),
        "format": qc.get("checkpoint_format", qc.get("format", qc.get("version"))),
        "nominal_bits_per_weight": nominal_bits_per_weight(qc),
        "quantized_tensor_bits": q["by_kind"],
        "layout_overhead_bits": overhead,
        "file_bits_per_quantized_weight": (q["bits"] / q["params"]) if q["params"] else None,
        "quantization_config": {k: v for k, v in qc_json.items() if k != "meta"},
    }
    pre["packed_tensors_read_from"] = sorted(q["source"])
    if decompressed:
        # transformers unpacked these to dense weights on this device: the evaluation ran with
        # exactly the checkpoint's dequantized values, but in memory they are dense
        pre["decompressed_in_memory"] = len(decompressed)
    if hdr:
        pre["checkpoint_tensor_bytes"] = sum(b for _, _, b in hdr.values()) // 8
    return pre

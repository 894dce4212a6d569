"""bitsandbytes: real 4-bit (NF4 / FP4) and 8-bit (LLM.int8) weights through transformers.

Unlike rtn/gptq/awq this is *real* quantization done while loading: `load_kwargs` hands
transformers a `BitsAndBytesConfig` (lm-eval's own `load_in_4bit=True` path passes
`load_in_4bit` straight to `from_pretrained`, which transformers 5 no longer accepts), the
linears become `bnb.nn.Linear4bit` / `bnb.nn.Linear8bitLt`, and the bitsandbytes kernels run
the matmuls (CPU and GPU).

Arguments (`--model_args method=bnb,...`):
  bits=4 (default) with format=nf4 (default, QLoRA's NormalFloat) or fp4 (bitsandbytes' E2M1);
  bits=8 is LLM.int8 (format may be left out or given as int / int8).
  double_quant=false   quantize the per-block absmax again (8-bit, blocks of 256, fp32 scale +
                       offset). Default false, the default of transformers' BitsAndBytesConfig
                       and of bitsandbytes' Linear4bit via transformers; QLoRA's recipe uses true.
  blocksize=64         the 4-bit block size. transformers' BitsAndBytesConfig (5.23) has no block
                       size field, so only bitsandbytes' default 64 is accepted.
  compute_dtype=auto   dtype of the 4-bit matmuls: auto = float32 for a model on CPU, else the
                       model's dtype; or float32 / bfloat16 / float16.
  int8_threshold=6.0   LLM.int8 outlier threshold (input columns above it run in 16 bit).
  skip=...             fnmatch patterns (as for every method) → llm_int8_skip_modules. The output
                       head (lm_head / embed_out) always stays in full precision with bnb, even
                       with skip=none: transformers re-ties a tied head to the embeddings.
  group_size           has no meaning here: 128 (the generic default) is ignored; 64 is accepted
                       as another name for the 4-bit block size; -1 (one scale per output row)
                       as the description of LLM.int8. Anything else is refused.

Accounting is exact and read from the quantized modules themselves: the packed 4-bit codes,
`quant_state.absmax` at its real dtype and count (and for double quantization the nested
fp32 absmax of each 256 absmax values plus the fp32 offset), or for 8 bits the int8 matrix and
its fp32 per-row scales `SCB`. The fixed code tables (16 NF4/FP4 values, 256 dynamic-map values)
are constants of the format, like the int grid, and are reported apart (`code_table_bits`),
not added to the per-weight figure.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from ..errors import QuantArgError
from .base import Method, Option, QuantConfig, QuantContext, QuantReport

logger = logging.getLogger("lm_eval_quant.bnb")

BNB_DEFAULT_BLOCKSIZE = 64
_CPU_BLOCK_N = 32  # bitsandbytes 4-bit CPU kernel: output rows are repacked in blocks of 32
_FORMATS_4 = {"nf4": "nf4", "nf": "nf4", "fp4": "fp4", "fp": "fp4", "fp:e2m1": "fp4", "auto": "nf4"}
_FORMATS_8 = {"int8": "int8", "int": "int8", "llm.int8": "int8", "llm_int8": "int8", "auto": "int8"}
_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# the output head: never handed to bitsandbytes
_OUTPUT_HEADS = ("lm_head", "embed_out")


def _skip_regexes(skip: tuple[str, ...]) -> list[str]:
    """Our skip patterns (fnmatch on a module name or any dotted suffix of it, see
    base.matches) as regexes for transformers' `should_convert_module`, which re.match-es each
    pattern at the start of the full name."""
    out = []
    for p in skip:
        body = fnmatch.translate(p)  # '(?s:...)\\Z' — whole-string match
        out.append(r"(?:.*\.)?" + body)
    return out


class _OnceFilter(logging.Filter):
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ... to float16' on every call; keep
    the first, drop the repeats."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "MatMul8bitLt" not in msg:
            return True
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


_ONCE = _OnceFilter()


def _bnb_linear_types():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def _tensor_bits(t) -> int:
    if t is None:
        return 0
    return int(t.numel()) * t.element_size() * 8


def bnb_module_bits(mod: nn.Module) -> dict:
    """Exact storage of one bitsandbytes linear's weight, from its real tensors.

    Returns weights (logical count), payload_bits (the packed codes), stat_bits (absmax /
    nested absmax / offset / SCB), code_table_bits (format constants, reported apart), and the
    block structure."""
    lin4, lin8 = _bnb_linear_types()
    w = mod.weight
    if isinstance(mod, lin4):
        qs = w.quant_state
        if qs is None:
            raise RuntimeError(f"bnb: {type(mod).__name__} has no quant_state (weights not quantized yet)")
        n = int(math.prod(qs.shape))
        payload = _tensor_bits(w.data)
        stat = _tensor_bits(qs.absmax)
        code = _tensor_bits(qs.code)
        info = {
            "kind": qs.quant_type,
            "weights": n,
            "shape": list(qs.shape),
            "blocksize": int(qs.blocksize),
            "blocks": int(qs.absmax.numel()),
            "absmax_dtype": str(qs.absmax.dtype).replace("torch.", ""),
            "nested": bool(qs.nested),
        }
        if qs.nested:
            s2 = qs.state2
            stat += _tensor_bits(s2.absmax)
            off = qs.offset
            stat += _tensor_bits(off) if torch.is_tensor(off) else 32
            code += _tensor_bits(s2.code)
            info.update(
                nested_blocksize=int(s2.blocksize),
                nested_blocks=int(s2.absmax.numel()),
                nested_absmax_dtype=str(s2.absmax.dtype).replace("torch.", ""),
            )
        info.update(payload_bits=payload, stat_bits=stat, code_table_bits=code)
        return info
    if isinstance(mod, lin8):
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(mod, "state", None), "SCB", None)
        if scb is None:
            raise RuntimeError("bnb: Linear8bitLt has no SCB row scales (weights not quantized yet)")
        n = int(w.data.numel())
        return {
            "kind": "int8",
            "weights": n,
            "shape": list(w.data.shape),
            "blocksize": int(w.data.shape[1]),  # one absmax scale per output row
            "blocks": int(scb.numel()),
            "absmax_dtype": str(scb.dtype).replace("torch.", ""),
            "nested": False,
            "payload_bits": _tensor_bits(w.data),
            "stat_bits": _tensor_bits(scb),
            "code_table_bits": 0,
        }
    raise TypeError(f"not a bitsandbytes linear: {type(mod).__name__}")


def bnb_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """bitsandbytes linears whose weight really is quantized (Params4bit with a quant state, or
    Int8Params)."""
    lin4, lin8 = _bnb_linear_types()
    out = []
    for n, m in model.named_modules():
        if isinstance(m, lin4) and getattr(m.weight, "quant_state", None) is not None:
            out.append((n, m))
        elif isinstance(m, lin8) and m.weight.dtype == torch.int8:
            out.append((n, m))
    return out


def bnb_account(model: nn.Module, cfg: QuantConfig | None = None, bnb_config: dict | None = None) -> dict:
    """Bit accounting of a model whose linears are bitsandbytes modules (made by method=bnb or
    loaded from a pre-quantized bitsandbytes checkpoint). Same keys as accounting.account plus
    a "bnb" sub-dict (the config and the real block structure)."""

    lins = bnb_linears(model)
    qweight_ids = {id(m.weight) for _, m in lins}
    params_q = bits_q = payload_q = code_bits = 0
    kinds: dict[str, int] = {}
    blocks = nested_blocks = 0
    blocksizes, nested_bs, absmax_dtypes = set(), set(), set()
    for _, m in lins:
        b = bnb_module_bits(m)
        params_q += b["weights"]
        bits_q += b["payload_bits"] + b["stat_bits"]
        payload_q += b["payload_bits"]
        code_bits += b["code_table_bits"]
        kinds[b["kind"]] = kinds.get(b["kind"], 0) + 1
        blocks += b["blocks"]
        blocksizes.add(b["blocksize"])
        absmax_dtypes.add(b["absmax_dtype"])
        if b["nested"]:
            nested_blocks += b["nested_blocks"]
            nested_bs.add(b["nested_blocksize"])
    params_total = 0
    total_bits = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in qweight_ids:
            continue
        params_total += p.numel()
        total_bits += p.numel() * p.element_size() * 8
    params_total += params_q
    total_bits += bits_q
    sub = dict(bnb_config or {})
    sub.update(
        {
            "modules": kinds,
            "blocks": blocks,
            "blocksize": sorted(blocksizes)[0] if len(blocksizes) == 1 else sorted(blocksizes),
            "absmax_dtype": sorted(absmax_dtypes)[0] if len(absmax_dtypes) == 1 else sorted(absmax_dtypes),
            "nested_blocks": nested_blocks,
            "nested_blocksize": (sorted(nested_bs)[0] if len(nested_bs) == 1 else sorted(nested_bs)) if nested_bs else None,
            "payload_bits": payload_q,
            "stat_bits": bits_q - payload_q,
            "code_table_bits": code_bits,
        }
    )
    from ..accounting import summary

    return summary(cfg.to_dict() if cfg is not None else None, params_total, params_q, len(lins),
                   bits_q, total_bits, bnb=sub)


def _model_dtype(model: nn.Module) -> torch.dtype:
    dt = getattr(model, "dtype", None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


class BNB(Method):
    name = "bnb"
    # capabilities: quantized by from_pretrained (load_kwargs); blocks of its own, no sym/group_size
    quantizes_at_load = True
    takes_sym = False
    takes_group_size = False
    real_kernels = True
    supported_bits = (4, 8)
    needs_calibration = False
    default_format = "auto"
    OPTIONS = {
        "double_quant": Option(bool, False, help="4-bit only"),
        "blocksize": Option(int, BNB_DEFAULT_BLOCKSIZE, min=1, help=f"bitsandbytes uses {BNB_DEFAULT_BLOCKSIZE}"),
        "compute_dtype": Option(str, "auto", choices=tuple(_DTYPES), help="4-bit only"),
        "int8_threshold": Option(float, 6.0, min=0, help="bits=8 (LLM.int8) only"),
    }

    # ---------------------------------------------------------------- validation (no model)
    def check_format(self, cfg: QuantConfig) -> str:
        fmt = str(cfg.format).strip().lower()
        if cfg.bits == 4:
            if fmt not in _FORMATS_4:
                raise QuantArgError(
                    f"hf-quant: method=bnb bits=4 takes format=nf4 or fp4, got format={cfg.format}"
                )
            return _FORMATS_4[fmt]
        if cfg.bits == 8:
            if fmt not in _FORMATS_8:
                raise QuantArgError(
                    f"hf-quant: method=bnb bits=8 is LLM.int8 (format=int8 or left out); "
                    f"format={cfg.format} needs bits=4"
                )
            return "int8"
        raise QuantArgError(
            f"hf-quant: method=bnb supports bits=4 (nf4/fp4) or bits=8 (LLM.int8), got bits={cfg.bits}"
        )

    def validate(self, cfg: QuantConfig) -> None:
        """Checks only; :meth:`finalize` returns the config bitsandbytes really runs."""
        o = self._opts(cfg)
        fmt = self.check_format(cfg)
        bs, dq, cd, thr = o["blocksize"], o["double_quant"], o["compute_dtype"], o["int8_threshold"]
        if fmt == "int8":
            if dq:
                raise QuantArgError("hf-quant: double_quant applies to 4-bit bnb (nf4/fp4), not bits=8")
            if bs != BNB_DEFAULT_BLOCKSIZE:
                raise QuantArgError(
                    f"hf-quant: blocksize applies to 4-bit bnb; bits=8 (LLM.int8) has one scale per row"
                )
            if cd != "auto":
                raise QuantArgError(
                    f"hf-quant: compute_dtype applies to 4-bit bnb; bits=8 (LLM.int8) computes in float16"
                )
            if cfg.group_size not in (128, -1):
                raise QuantArgError(
                    f"hf-quant: group_size={cfg.group_size} has no meaning for method=bnb bits=8 "
                    f"(LLM.int8 scales each output row); drop group_size"
                )
        else:
            if bs != BNB_DEFAULT_BLOCKSIZE:
                raise QuantArgError(
                    f"hf-quant: blocksize={bs} is not supported: transformers' BitsAndBytesConfig "
                    f"has no block size, bitsandbytes uses {BNB_DEFAULT_BLOCKSIZE}; drop blocksize"
                )
            if thr != 6.0:
                raise QuantArgError("hf-quant: int8_threshold applies to bnb bits=8 (LLM.int8), not 4-bit")
            if cfg.group_size not in (128, bs):
                raise QuantArgError(
                    f"hf-quant: group_size={cfg.group_size} has no meaning for method=bnb; its 4-bit "
                    f"block size is blocksize={bs}; drop group_size"
                )
        self._check_backend()

    def finalize(self, cfg: QuantConfig) -> QuantConfig:
        """A new config: LLM.int8 scales each output row (group_size -1), 4-bit its blocks of
        ``blocksize``; every bitsandbytes format is absmax (symmetric); compute_dtype canonical."""
        o = self._opts(cfg)
        fmt = self.check_format(cfg)
        cd = "auto" if fmt == "int8" or o["compute_dtype"] == "auto" else str(_DTYPES[o["compute_dtype"]]).replace("torch.", "")
        return dataclasses.replace(cfg, format=fmt, group_size=-1 if fmt == "int8" else o["blocksize"], sym=True,
                                   options={**cfg.options, "compute_dtype": cd})

    @staticmethod
    def _check_backend() -> None:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # ImportError, or a broken native library
            raise QuantArgError(
                f"hf-quant: method=bnb needs bitsandbytes (pip install 'lm-eval-quant[bnb]'): {e}"
            ) from None

    # ---------------------------------------------------------------- loading
    def bnb_config_dict(self, cfg: QuantConfig) -> dict:
        """Plain-JSON description of what we ask transformers for (goes into the results)."""
        o = self._opts(cfg)
        if cfg.format == "int8":
            return {
                "load_in_8bit": True,
                "llm_int8_threshold": o["int8_threshold"],
                "llm_int8_skip_modules": self._skip_modules(cfg),
            }
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": cfg.format,
            "bnb_4bit_use_double_quant": o["double_quant"],
            "blocksize": o["blocksize"],
            "bnb_4bit_compute_dtype": o["compute_dtype"],
            "llm_int8_skip_modules": self._skip_modules(cfg),
        }

    @staticmethod
    def _skip_modules(cfg: QuantConfig) -> list[str]:
        # The output head always stays in full precision with bitsandbytes: transformers re-ties
        # a tied head to the embeddings after loading, leaving a Linear4bit without quant state.
        return _skip_regexes(tuple(cfg.skip) + tuple(h for h in _OUTPUT_HEADS if h not in cfg.skip))

    def check_shapes(self, model, cfg: QuantConfig, device: Any = "cpu") -> None:
        """bitsandbytes' 4-bit CPU kernel (used when the CPU has AVX512-BF16) repacks each weight
        in blocks of 32 output rows and pairs of input columns: say so before loading instead of
        an assertion deep inside bitsandbytes during evaluation."""
        if cfg.format == "int8" or str(torch.device(device).type) != "cpu":
            return
        try:
            from bitsandbytes.functional import has_avx512bf16

            if not has_avx512bf16():
                return
        except Exception as e:  # noqa: BLE001  (no native library: bitsandbytes will say so itself)
            logger.debug("bnb CPU kernel check skipped: %s", e)
            return
        from .base import matches, quantizable_linears, weight_matrix

        skip = tuple(self._skip_modules(cfg))
        for name, mod in quantizable_linears(model, tuple(cfg.skip)):
            if matches(name, skip):
                continue
            out_f, in_f = weight_matrix(mod).shape
            if out_f % _CPU_BLOCK_N or in_f % 2:
                raise QuantArgError(
                    f"hf-quant: method=bnb bits=4 on CPU: layer {name} is {out_f}x{in_f} (out x in), but "
                    f"bitsandbytes' CPU kernel needs out_features divisible by {_CPU_BLOCK_N} and even "
                    f"in_features; run on a GPU, use bits=8, or add the layer to skip="
                )

    def load_kwargs(self, cfg: QuantConfig) -> dict:
        from transformers import BitsAndBytesConfig

        o = self._opts(cfg)
        skip = self._skip_modules(cfg)
        if cfg.format == "int8":
            qc = BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=o["int8_threshold"],
                llm_int8_skip_modules=skip,
            )
        else:
            cd = _DTYPES[o["compute_dtype"]]
            qc = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=cfg.format,
                bnb_4bit_use_double_quant=o["double_quant"],
                bnb_4bit_compute_dtype=cd,  # None (auto) → float32 here, resolved in quantize()
                llm_int8_skip_modules=skip,
            )
        return {"quantization_config": qc}

    # ---------------------------------------------------------------- after loading
    def quantize(self, model: nn.Module, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        """Nothing left to compute (bitsandbytes quantized while loading): check that it did,
        fix the compute dtype, and list the quantized modules."""
        t0 = time.perf_counter()
        lins = bnb_linears(model)
        if not lins:
            raise QuantArgError(
                "hf-quant: method=bnb quantized no layer; the model has no nn.Linear outside skip="
                + "|".join(cfg.skip)
            )
        lin4, lin8 = _bnb_linear_types()
        compute = None
        if cfg.format != "int8":
            want = self._opts(cfg)["compute_dtype"]
            if want == "auto":
                dev = next((p.device for p in model.parameters()), torch.device("cpu"))
                compute = torch.float32 if dev.type == "cpu" else _model_dtype(model)
            else:
                compute = _DTYPES[want]
            for _, m in lins:
                if isinstance(m, lin4):
                    m.compute_dtype = compute
                    m.compute_type_is_set = True
        else:
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_ONCE)
        report = QuantReport()
        report.quantized = [n for n, _ in lins]
        report.modified = [f"{n}.weight" for n, _ in lins]
        report.seconds = time.perf_counter() - t0
        report.extra["bnb"] = self.bnb_config_dict(cfg)
        if compute is not None:
            report.extra["bnb"]["bnb_4bit_compute_dtype"] = str(compute).replace("torch.", "")
        report.extra["bnb"]["llm_int8_skip_modules"] = list(cfg.skip) + [
            h for h in _OUTPUT_HEADS if h not in cfg.skip
        ]
        return report

    def accounting(self, model: nn.Module, cfg: QuantConfig, report: QuantReport) -> dict:
        return bnb_account(model, cfg, (report.extra or {}).get("bnb") if report else None)

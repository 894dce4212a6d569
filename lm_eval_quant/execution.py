"""Real low-bit execution: swap fake-quantized linears for packed low-bit kernel modules.

    lm_eval --model hf-quant --model_args pretrained=...,method=gptq,bits=4,group_size=128,execution=real

After on-the-fly RTN / GPTQ / AWQ the weights are *fake*-quantized: k-bit values held in the
model's float dtype. ``execution=real`` packs every quantized linear with the GPTQ checkpoint
packing of :mod:`lm_eval_quant.export` (the same ``qweight`` / ``qzeros`` / ``scales`` /
``g_idx`` tensors a GPTQ export writes) and replaces it by a GPTQModel kernel module built from
them, so the evaluation runs on the packed weights and the process holds k bits per weight.

Which module runs (``kernel=``):

* ``auto`` (default): on CPU GPTQModel's plain torch kernel (``TorchLinear``: 2..8 bits, any
  power-of-two group size 16..1024 or -1, act-order ``g_idx``; it unpacks a layer's codes,
  dequantizes with fp16 scales and multiplies in the activations' dtype, float32 included).
  On CUDA GPTQModel's own automatic choice for the bits / group size / symmetry / dtype
  (Marlin, ExLlamaV2, Triton, ... whatever is installed and supports the layout).
* ``torch``, ``marlin``, ``exllama_v2``, ``triton``, ``torch_fused``, ``torch_aten``, ... : that
  GPTQModel backend (``gptqmodel.utils.backend.BACKEND`` names); a kernel that does not support
  the layout is refused in one line.
* NF4 (``format=nf``, bits 4) and bitsandbytes' FP4 table map to ``bitsandbytes.nn.Linear4bit``
  (``kernel=bnb``): the fake-quantized weights are handed to bitsandbytes with block size =
  group size; every block's absmax is one of its values and every value/absmax is a code of the
  table, so bitsandbytes stores exactly our codes (absmax at fp32 instead of our fp16).

Every module is built on the host from the integer state and then moved to the compute device
and initialised there (``post_init``: Marlin/ExLlama repack on the GPU). The model is converted
decoder layer by decoder layer; with a CUDA device the full-precision model stays on the host
(``hf-quant`` loads it with ``device_map=cpu``) and only packed layers go to the GPU, so the
GPU never holds the full-precision model. Memory figures are measured (:func:`resident_bytes`,
:class:`MemoryProbe`), not computed.

Where the integer state comes from: the method's kept state (GPTQ ``keep_qstate=true``, which
``execution=real`` turns on) or, for RTN / AWQ, exact recovery from the fake-quantized weights
(:func:`lm_eval_quant.export.recover_qstate`).

Layout limits (checked before the weights are loaded, one line each): int formats at 2/3/4/8 bits
(the GPTQ packing), ``in_features·bits`` and ``out_features·bits`` multiples of 32 (3 bits:
``in_features`` a multiple of 32), whole groups (a group size that does not divide
``in_features`` -- a ragged last group -- cannot be held by the packed layout), and the group sizes
the kernel lists. ``execution=auto`` falls back to fake quantization with one warning line instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import QuantArgError
from .export import EXPORT_BITS, _check_qstate, gptq_tensors, recover_qstate

log = logging.getLogger("lm_eval_quant")

EXECUTIONS = ("fake", "real", "auto")
_P = "hf-quant"
# our short names → GPTQModel BACKEND values
GPTQ_KERNELS = {
    "torch": "gptq_torch",
    "marlin": "gptq_marlin",
    "exllama_v2": "gptq_exllama_v2",
    "exllamav2": "gptq_exllama_v2",
    "triton": "gptq_triton",
    "torch_fused": "gptq_torch_fused",
    "torch_aten": "gptq_torch_aten",
    "torch_int8": "gptq_torch_int8",
    "machete": "gptq_machete",
    "bitblas": "gptq_bitblas",
}
KERNELS = ("auto", "bnb") + tuple(GPTQ_KERNELS)


@dataclass
class ExecPlan:
    """What ``execution=`` / ``kernel=`` resolved to for a config (before any model work)."""

    execution: str = "fake"  # fake | real
    backend: str | None = None  # gptq | bnb | None (fake)
    kernel: str = "none"  # auto | torch | marlin | ... | bnb | none
    requested: str = "fake"  # what the user asked for (fake | real | auto)
    fallback: str | None = None  # why execution=auto fell back to fake
    info: dict = field(default_factory=dict)

    @property
    def real(self) -> bool:
        return self.execution == "real"


def _bnb_table(kind: str):
    """bitsandbytes' 16-value code table for nf4 / fp4, normalised to max |v| = 1, sorted."""
    import torch
    from bitsandbytes.functional import get_4bit_type

    t = get_4bit_type(kind, device="cpu").float()
    return (t / t.abs().max()).sort().values


def _bnb_kind(cfg) -> str | None:
    """'nf4' / 'fp4' when the config's format is exactly one of bitsandbytes' 4-bit tables."""
    if int(cfg.bits) != 4 or str(cfg.format) == "int":
        return None
    try:
        import torch

        from .formats import make_format

        fmt = make_format(cfg.format, cfg.bits, cfg.sym)
        if fmt.grid is None:
            return None
        ours = fmt.grid.float().sort().values
        for kind in ("nf4", "fp4"):
            try:
                tab = _bnb_table(kind)
            except Exception:  # bitsandbytes missing / broken
                return None
            if tab.numel() == ours.numel() and torch.allclose(tab, ours, rtol=0, atol=1e-6):
                return kind
    except Exception:
        return None
    return None


def _unsupported(cfg, execution: str, why: str) -> ExecPlan:
    if execution == "real":
        raise QuantArgError(f"{_P}: execution=real: {why}; use execution=fake (or execution=auto to fall back)")
    msg = f"{_P}: execution=auto: {why}; evaluating fake-quantized weights instead"
    log.warning(msg)
    print(msg, file=sys.stderr)
    return ExecPlan("fake", None, "none", execution, fallback=why)


def plan_execution(cfg, execution: Any = "fake", kernel: Any = None) -> ExecPlan:
    """Resolve ``execution=`` / ``kernel=`` for ``cfg`` (cheap, no model). One-line QuantArgError
    on bad values or, with execution=real, on a config no kernel can run; execution=auto returns
    a fake plan (and warns once) instead."""
    execution = "fake" if execution is None else str(execution).strip().lower()
    if execution not in EXECUTIONS:
        raise QuantArgError(f"{_P}: execution={execution} is not one of fake, real, auto")
    k = "auto" if kernel in (None, "", "none") else str(kernel).strip().lower()
    if k not in KERNELS:
        raise QuantArgError(f"{_P}: kernel={kernel} is unknown; use one of {', '.join(KERNELS)}")
    if execution == "fake":
        if kernel not in (None, "", "none", "auto"):
            raise QuantArgError(f"{_P}: kernel={kernel} only applies with execution=real or auto")
        return ExecPlan("fake", None, "none", "fake")
    if cfg.is_baseline:
        return _unsupported(cfg, execution, "nothing is quantized (method=none or bits=16)")
    if cfg.method == "bnb":
        # bitsandbytes quantizes while loading: its linears already are real low-bit modules
        return ExecPlan("real", "bnb-load", "bnb", execution)
    if cfg.method not in ("rtn", "gptq", "awq"):
        return _unsupported(cfg, execution, f"method={cfg.method} has no real low-bit path")
    if str(cfg.format) != "int":
        kind = _bnb_kind(cfg)
        if kind is None:
            return _unsupported(
                cfg, execution,
                f"format={cfg.format} at bits={cfg.bits} has no low-bit kernel (GPTQModel kernels need "
                f"format=int at 2/3/4/8 bits; bitsandbytes needs format=nf, bits=4)")
        if k not in ("auto", "bnb"):
            raise QuantArgError(f"{_P}: kernel={k} runs int formats; format={cfg.format} runs on kernel=bnb")
        if cfg.group_size == -1:
            return _unsupported(cfg, execution, f"bitsandbytes {kind} needs a block size; group_size=-1 has none")
        return ExecPlan("real", "bnb", "bnb", execution, info={"bnb_type": kind})
    if k == "bnb":
        raise QuantArgError(f"{_P}: kernel=bnb runs format=nf at bits=4; format=int runs on GPTQModel kernels")
    if int(cfg.bits) not in EXPORT_BITS:
        return _unsupported(cfg, execution, f"bits={cfg.bits} has no packed int layout (GPTQ packing holds 2, 3, 4 or 8 bits)")
    try:
        import gptqmodel  # noqa: F401
    except Exception:
        return _unsupported(cfg, execution, "GPTQModel is not installed (pip install 'lm-eval-quant[gptq]')")
    # auto: the torch kernel runs everywhere and is the fallback of the automatic choice
    cls = _kernel_class("torch" if k == "auto" else k)
    why = _layout_problem(cls, cfg)
    if why and k == "auto":
        return _unsupported(cfg, execution, why)
    if why:
        raise QuantArgError(f"{_P}: kernel={k}: {why}")
    return ExecPlan("real", "gptq", k, execution)


# ---------------------------------------------------------------------------------------------
# kernel classes
# ---------------------------------------------------------------------------------------------
def _kernel_class(name: str):
    """GPTQModel QuantLinear class of backend ``name`` (without validating a device)."""
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import get_kernel_for_backend
    from gptqmodel.quantization import FORMAT, METHOD

    if name == "torch":
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        return TorchLinear
    try:
        return get_kernel_for_backend(BACKEND(GPTQ_KERNELS[name]), METHOD.GPTQ, FORMAT.GPTQ)
    except Exception as e:
        raise QuantArgError(f"{_P}: kernel={name} is not available in this GPTQModel install ({str(e).splitlines()[0][:120]})") from None


def _layout_problem(cls, cfg) -> str | None:
    bits, g = int(cfg.bits), int(cfg.group_size)
    sym = bool(cfg.sym)
    act = bool((cfg.options or {}).get("act_order")) and not (cfg.options or {}).get("static_groups")
    if bits not in getattr(cls, "SUPPORTS_BITS", [bits]):
        return f"{cls.__name__} supports bits {cls.SUPPORTS_BITS}, not bits={bits}"
    if g not in getattr(cls, "SUPPORTS_GROUP_SIZE", [g]):
        return f"{cls.__name__} supports group sizes {cls.SUPPORTS_GROUP_SIZE}, not group_size={g}"
    if sym not in getattr(cls, "SUPPORTS_SYM", [sym]):
        return f"{cls.__name__} does not support sym={str(sym).lower()}"
    if act not in getattr(cls, "SUPPORTS_DESC_ACT", [act]):
        return f"{cls.__name__} does not support act_order={str(act).lower()}"
    return None


def _select_kernel(plan: ExecPlan, cfg, device, dtype):
    """The QuantLinear class for ``plan`` on ``device``: explicit kernel, or auto (CPU: torch;
    CUDA: GPTQModel's selection)."""
    import torch

    dev = torch.device(device)
    if plan.kernel != "auto":
        return _kernel_class(plan.kernel)
    if dev.type == "cpu":
        return _kernel_class("torch")
    from gptqmodel.utils.importer import select_quant_linear

    act = bool((cfg.options or {}).get("act_order")) and not (cfg.options or {}).get("static_groups")
    try:
        return select_quant_linear(bits=int(cfg.bits), group_size=int(cfg.group_size), desc_act=act,
                                   sym=bool(cfg.sym), device=dev.type, backend="auto", format="gptq",
                                   quant_method="gptq", pack_dtype=torch.int32,
                                   dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)
    except Exception as e:  # pragma: no cover - GPU only
        log.warning("hf-quant: GPTQModel auto-selection failed on %s (%s); using the torch kernel", dev, e)
        return _kernel_class("torch")


# ---------------------------------------------------------------------------------------------
# shape checks (meta model or real model)
# ---------------------------------------------------------------------------------------------
def check_real_shapes(linears, cfg, plan: ExecPlan) -> None:
    """One line naming the first linear whose shape the packed layout cannot hold."""
    from .methods.base import weight_matrix

    if not plan.real or plan.backend not in ("gptq", "bnb"):
        return
    bits, g = int(cfg.bits), int(cfg.group_size)
    for name, mod in linears:
        out_f, in_f = weight_matrix(mod).shape
        if g != -1 and in_f % g:
            raise QuantArgError(
                f"{_P}: execution=real: group_size={g} leaves a ragged last group in {name} "
                f"(in_features={in_f}); packed kernels need whole groups: use a divisor of {in_f} or execution=fake")
        if plan.backend == "bnb":
            continue
        if (in_f * bits) % 32 or (bits == 3 and in_f % 32):
            raise QuantArgError(
                f"{_P}: execution=real: {name} has in_features={in_f}; {bits}-bit packing needs "
                f"in_features*bits divisible by 32{' (3 bits: in_features divisible by 32)' if bits == 3 else ''}")
        if (out_f * bits) % 32 or (bits == 3 and out_f % 32):
            raise QuantArgError(
                f"{_P}: execution=real: {name} has out_features={out_f}; {bits}-bit zero-point packing "
                f"needs out_features*bits divisible by 32")


# ---------------------------------------------------------------------------------------------
# building one real module
# ---------------------------------------------------------------------------------------------
def gptq_module(cls, qs: dict, bits: int, group_size: int, sym: bool, bias=None, device="cpu"):
    """A GPTQModel QuantLinear of class ``cls`` holding the integer state ``qs``
    ({codes uint8 [out, in], scale [out, G], zero [out, G], g_idx int32 [in]}), packed with the
    export's packer, moved to ``device`` and initialised there. ``bias`` keeps its dtype."""
    import torch

    codes, scale, zero, g_idx = qs["codes"], qs["scale"], qs["zero"], qs["g_idx"]
    out_f, in_f = codes.shape
    n_in = in_f
    gsz = n_in if group_size == -1 else group_size
    desc_act = not torch.equal(g_idx.long(), torch.arange(n_in) // gsz)
    z = torch.round(zero).to(torch.int64)
    off = 0 if getattr(cls, "REQUIRES_FORMAT_V2", False) else 1
    if off and bool((z == 0).any()):
        raise QuantArgError(
            f"{_P}: execution=real: kernel {cls.__name__} reads v1 zero points (zero-1), which cannot hold "
            f"a zero point of 0; use kernel=torch")
    mod = cls(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, in_features=in_f,
              out_features=out_f, bias=bias is not None, pack_dtype=torch.int32, register_buffers=True)
    with torch.no_grad():
        for k, v in gptq_tensors(codes, scale, z, g_idx, bits, off).items():
            getattr(mod, k).copy_(v)
        if bias is not None:
            mod.bias = bias.detach().clone()  # the model's dtype, as in the fake-quantized model
    mod.optimized = True  # no torch.compile of the dequantizer (minutes of compile on CPU)
    mod.to(device)
    mod.post_init()
    mod.eval()
    mod.requires_grad_(False)
    return mod


def bnb_module(w_hat, bias, kind: str, blocksize: int, compute_dtype, device="cpu"):
    """bitsandbytes Linear4bit holding ``w_hat`` [out, in] (already on ``kind``'s grid)."""
    import bitsandbytes as bnb
    import torch

    out_f, in_f = w_hat.shape
    mod = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                            quant_type=kind, quant_storage=torch.uint8, device="meta")
    mod.weight = bnb.nn.Params4bit(w_hat.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                   quant_type=kind, blocksize=blocksize, compress_statistics=False)
    if bias is not None:
        mod.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    mod = mod.to(device)  # Params4bit quantizes on the move
    if getattr(mod.weight, "quant_state", None) is None:  # CPU: quantize explicitly
        mod.weight = mod.weight._quantize(device if isinstance(device, str) else str(device))
    mod.eval()
    return mod


def _parent(model, name: str):
    if "." in name:
        p, leaf = name.rsplit(".", 1)
        return model.get_submodule(p), leaf
    return model, name


# ---------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------
def make_real(model, cfg, report, plan: ExecPlan, device=None, progress: bool = True) -> dict:
    """Swap every quantized linear of ``model`` (RTN/GPTQ/AWQ, fake-quantized in place, as named
    by ``report.quantized``) for a real low-bit module, decoder layer by decoder layer, moving
    each converted layer to ``device``; the rest of the model moves last. Returns a dict for the
    results config (kernel class, layers, seconds)."""
    import torch
    from tqdm.auto import tqdm

    from .methods.layerwise import release_free_memory

    if not plan.real or plan.backend not in ("gptq", "bnb"):
        raise ValueError("make_real needs a real plan for rtn/gptq/awq")
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lins, qstate = _real_linears(model, cfg, report, plan)
    cls = _real_kernel_class(plan, cfg, dev, dtype) if plan.backend == "gptq" else None

    converted = 0
    used: set[str] = set()
    new_ids: set[int] = set()
    with torch.no_grad():
        for pre, grp in tqdm(_layer_groups(model, lins), desc="execution=real: packing", unit="layer",
                             disable=not progress):
            for name, mod in grp:
                new, cls = _real_module(name, mod, cfg, plan, qstate, cls, dev, dtype)
                used.add("bnb.Linear4bit" if plan.backend == "bnb" else type(new).__name__)
                new_ids.add(id(new))
                parent, leaf = _parent(model, name)
                setattr(parent, leaf, new)
                del mod
                converted += 1
            if pre is not None:
                model.get_submodule(pre).to(dev)  # norms etc. of this layer
            release_free_memory()
    if dev.type == "cpu":
        _own_storage(model, new_ids)
    model.to(dev)  # embeddings, final norm, output head
    if report is not None and getattr(report, "extra", None) is not None:
        report.extra.pop("qstate", None)  # the packed modules hold it now
    info = {
        "kernel": "+".join(sorted(used)),
        "linears": converted,
        "pack_seconds": round(time.perf_counter() - t0, 3),
        "device": str(dev),
    }
    if plan.backend == "bnb":
        info["bnb_type"] = plan.info["bnb_type"]
    return info


def _real_linears(model, cfg, report, plan: ExecPlan) -> tuple[list, dict]:
    """The quantized linears to convert (those the report names) and GPTQ's integer state by name;
    one error before any packing when the shapes or a missing act-order state rule the run out."""
    from .methods.base import quantizable_linears

    lins = quantizable_linears(model, tuple(cfg.skip))
    if report is not None and getattr(report, "quantized", None):
        keep = set(report.quantized)
        lins = [(n, m) for n, m in lins if n in keep]
    if not lins:
        raise QuantArgError(f"{_P}: execution=real: the model has no quantized linear layers")
    check_real_shapes(lins, cfg, plan)
    qstate = ((getattr(report, "extra", None) or {}).get("qstate") or {}) if report is not None else {}
    opts = cfg.options or {}
    if plan.backend == "gptq" and opts.get("act_order") and not opts.get("static_groups"):
        missing = [n for n, _ in lins if n not in qstate]
        if missing:
            raise QuantArgError(
                f"{_P}: execution=real: act_order=true needs GPTQ's integer state (keep_qstate=true) "
                f"for {missing[0]}; its groups cannot be read back from the weights")
    return lins, qstate


def _real_kernel_class(plan: ExecPlan, cfg, dev, dtype):
    """The GPTQ kernel class: the one asked for (an error when it cannot take this layout), or with
    kernel=auto the selected one, falling back to the torch kernel on a layout it cannot take."""
    cls = _select_kernel(plan, cfg, dev, dtype)
    if cls is not None and plan.kernel != "auto":
        why = _layout_problem(cls, cfg)
        if why:
            raise QuantArgError(f"{_P}: kernel={plan.kernel}: {why}")
    if cls is not None and plan.kernel == "auto" and _layout_problem(cls, cfg):
        cls = _kernel_class("torch")
    return cls


def _layer_groups(model, lins: list) -> list[tuple[str | None, list]]:
    """The linears grouped by decoder layer, in order ((prefix, [(name, module)])), then those
    outside the layers (prefix None)."""
    try:
        from .methods.layerwise import find_decoder_layers

        path, layers = find_decoder_layers(model)
        prefixes = [f"{path}.{i}" for i in range(len(layers))]
    except QuantArgError:
        prefixes = []
    groups: list[tuple[str | None, list]] = []
    for pre in prefixes:
        groups.append((pre, [(n, m) for n, m in lins if n.startswith(pre + ".")]))
    inside = {n for _, grp in groups for n, _ in grp}
    rest = [(n, m) for n, m in lins if n not in inside]
    if rest:
        groups.append((None, rest))
    return groups


def _real_module(name: str, mod, cfg, plan: ExecPlan, qstate: dict, cls, dev, compute_dtype):
    """The real low-bit module for one fake-quantized linear, and the kernel class to go on with
    (kernel=auto falls back to the torch kernel, with a warning, when the chosen one fails)."""
    from .methods.base import weight_matrix

    bits, g, sym = int(cfg.bits), int(cfg.group_size), bool(cfg.sym)
    W = weight_matrix(mod)
    bias = getattr(mod, "bias", None)
    if plan.backend == "bnb":
        return bnb_module(W, bias, plan.info["bnb_type"], W.shape[1] if g == -1 else g,
                          compute_dtype, device=dev), cls
    qs = qstate.get(name)
    if qs is not None:
        qs = _check_qstate(name, qs, W, bits)
    else:
        qs = recover_qstate(W, bits, g, sym, name=name)
    try:
        return gptq_module(cls, qs, bits, g, sym, bias=bias, device=dev), cls
    except QuantArgError:
        raise
    except Exception as e:  # a kernel that cannot take this layer / device
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        torch_cls = _kernel_class("torch")
        if plan.kernel != "auto" or cls is torch_cls:
            raise QuantArgError(f"{_P}: execution=real: {cls.__name__} cannot hold {name} "
                                f"on {dev} ({first}); try kernel=torch") from None
        msg = f"{_P}: execution=real: {cls.__name__} failed on {name} ({first}); using the torch kernel"
        log.warning(msg)
        print(msg, file=sys.stderr)
        return gptq_module(torch_cls, qs, bits, g, sym, bias=bias, device=dev), torch_cls


def _own_storage(model, skip_ids: set[int]) -> None:
    """Copy the tensors left in full precision (embeddings, norms, head) into memory of their own.

    transformers maps the checkpoint file (safetensors, MAP_PRIVATE) and the parameters are views
    of that mapping; quantizing in place turns the touched pages into private copies, which stay
    resident until the *whole* mapping goes, i.e. until no tensor of the file is alive. Measured on
    a 100M Llama: RSS stays at the fp32 model's size after the linears are packed, and drops to
    packed + rest once these few tensors are copied (bench/README.md). Tied tensors stay tied."""
    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():
            if id(mod) in skip_ids:
                continue
            for _, prm in mod.named_parameters(recurse=False):
                if id(prm) not in seen and prm.device.type == "cpu":
                    seen.add(id(prm))
                    prm.data = prm.data.clone()
            for n, b in list(mod.named_buffers(recurse=False)):
                if b is not None and id(b) not in seen and b.device.type == "cpu":
                    seen.add(id(b))
                    c = b.clone()
                    seen.add(id(c))
                    setattr(mod, n, c)


# ---------------------------------------------------------------------------------------------
# measuring memory
# ---------------------------------------------------------------------------------------------
def resident_bytes(model) -> dict:
    """Bytes actually held by the model's parameters and buffers (each storage once, tied
    weights and views counted once), split by device type."""
    seen: set[tuple] = set()
    out = {"weights_bytes": 0, "buffers_bytes": 0}
    by_dev: dict[str, int] = {}

    def add(t, key):
        if t is None or t.device.type == "meta":
            return
        st = t.untyped_storage()
        k = (t.device.type, t.device.index, st.data_ptr())
        if k in seen:
            return
        seen.add(k)
        n = st.nbytes()
        out[key] += n
        by_dev[t.device.type] = by_dev.get(t.device.type, 0) + n

    for _, p in model.named_parameters(remove_duplicate=False):
        add(p.data, "weights_bytes")
    for _, b in model.named_buffers(remove_duplicate=False):
        add(b, "buffers_bytes")
    out["total_bytes"] = out["weights_bytes"] + out["buffers_bytes"]
    out["by_device"] = by_dev
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:  # pragma: no cover - non-Linux
        return 0


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover  (no /proc: ru_maxrss below)
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r * (1 if sys.platform == "darwin" else 1024)


class MemoryProbe:
    """Peak memory of a phase: CUDA ``max_memory_allocated`` on a CUDA device, else peak RSS
    above the RSS at :meth:`start` (the process's high-water mark, so a peak reached before
    ``start`` hides later ones below it; it is reported as measured)."""

    def __init__(self, device="cpu"):
        import torch

        self.device = torch.device(device)
        self.baseline = 0

    def start(self) -> "MemoryProbe":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = _rss_bytes()
        return self

    def peak(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_device_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "peak_kind": "cuda.max_memory_allocated"}
        peak = _peak_rss_bytes()
        return {"peak_rss_bytes": int(peak), "peak_rss_above_baseline_bytes": int(max(0, peak - self.baseline)),
                "baseline_rss_bytes": int(self.baseline), "peak_kind": "rss"}


__all__ = ["EXECUTIONS", "KERNELS", "ExecPlan", "plan_execution", "check_real_shapes", "gptq_module",
           "bnb_module", "make_real", "resident_bytes", "MemoryProbe"]

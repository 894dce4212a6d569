"""The argument layer: one vocabulary and one parser for everything a user passes as model_args.

    from lm_eval_quant.args import resolve
    r = resolve("pretrained=DIR,method=gptq,bits=3,group_size=128,damp=0.02", where="export",
                known_rest=EXPORT_KEYS)
    r.cfg        # QuantConfig, typed and validated once (method options typed from their declaration)
    r.method     # the Method object (ask it what it can do: r.method.needs_calibration, ...)
    r.wrapper    # WrapperArgs(cache=True, cache_dir=None, save_quantized=None)
    r.rest       # everything else (pretrained, dtype, ...) for the loader

Every front end (the ``hf-quant`` lm-eval model, ``export``, the sweep spec / CLI / cells, the
report) calls this module instead of parsing ``k=v,k=v`` itself, so the vocabulary below is the
only copy: method names come from the method registry, core and wrapper keys, the bit range, the
true/false words and the ``skip=`` syntax are defined here once. Every problem is one
:class:`~lm_eval_quant.errors.QuantArgError` line, raised before any weights are read.

A method declares its options in one place, its ``OPTIONS`` mapping
``name -> Option(type, default, min=, max=, gt=, lt=, choices=, help=)`` (a bare ``(type, default)``
tuple is still read, for third-party methods). They are cast and range-checked here once; the
method's ``validate`` then checks only what involves several values, and ``quantize`` reads typed
values (``Method._opts``) without casting them again.

This module imports nothing heavy at import time (no torch): the method registry is imported
lazily by the functions that need it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import QuantArgError

# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------
MIN_BITS, MAX_BITS = 2, 8          # quantized widths every weight-only method may be asked for
FULL_BITS = 16                     # bits=16 is the full-precision baseline (method=none)
DEFAULT_METHOD = "rtn"
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
DEFAULT_SKIP = ("lm_head",)
CORE_KEYS = ("method", "bits", "group_size", "format", "sym", "skip")
WRAPPER_KEYS = ("cache", "cache_dir", "save_quantized", "execution", "kernel")
TRUE_WORDS = ("true", "1", "yes", "on", "y", "t")
FALSE_WORDS = ("false", "0", "no", "off", "n", "f")
NONE_WORDS = ("none", "", "[]")
SKIP_SEPARATORS = ("|", ";", " ")  # model_args strings use ',' between keys, so not ',' here
# sym only means something for a format with a zero point; these are symmetric by construction
SYMMETRIC_FORMATS = ("fp", "nf", "dynamic")


@dataclass(frozen=True)
class Option:
    """A typed method option: ``type`` is int, float, bool or str; ``min``/``max`` bound numbers
    inclusively, ``gt``/``lt`` exclusively; ``choices`` lists the allowed strings (the value is
    lower-cased before it is checked and stored); ``help`` (e.g. "the paper uses 20") ends the
    error line. Checked once, by :func:`parse_option`; a method's ``validate`` keeps only the
    checks that involve more than one value."""

    type: type
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""
    gt: float | None = None
    lt: float | None = None

    def bounds(self) -> str:
        """``≥ 1 and ≤ 16``, ``> 0 and ≤ 1``, ... (empty when unbounded)."""
        pairs = (("≥", self.min), (">", self.gt), ("≤", self.max), ("<", self.lt))
        return " and ".join(f"{sym} {v:g}" for sym, v in pairs if v is not None)

    def out_of_range(self, v: Any) -> bool:
        if self.min is None and self.max is None and self.gt is None and self.lt is None:
            return False
        return (v != v or self.min is not None and v < self.min or self.max is not None and v > self.max
                or self.gt is not None and v <= self.gt or self.lt is not None and v >= self.lt)


def options_of(method: Any) -> dict[str, Option]:
    """A method's declared options as ``Option`` objects (``(type, default)`` tuples accepted)."""
    out: dict[str, Option] = {}
    for k, v in (getattr(method, "OPTIONS", None) or {}).items():
        out[k] = v if isinstance(v, Option) else Option(v[0], v[1])
    return out


# ---------------------------------------------------------------------------------------------
# scalar parsers (strings from model_args, or values already typed by YAML / Python)
# ---------------------------------------------------------------------------------------------
def parse_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in TRUE_WORDS:
        return True
    if s in FALSE_WORDS:
        return False
    raise QuantArgError(f"hf-quant: {name} must be true or false, got {v!r}")


def parse_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise QuantArgError(f"hf-quant: {name} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise QuantArgError(f"hf-quant: {name} must be an integer, got {v!r}")
    s = str(v).strip()
    try:
        return int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            raise QuantArgError(f"hf-quant: {name} must be an integer, got {v!r}") from None
        if f.is_integer():
            return int(f)
        raise QuantArgError(f"hf-quant: {name} must be an integer, got {v!r}") from None


def parse_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise QuantArgError(f"hf-quant: {name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise QuantArgError(f"hf-quant: {name} must be a number, got {v!r}") from None


def parse_skip(v: Any) -> tuple[str, ...]:
    """``skip=lm_head|*.mlp.down_proj`` (separators ``|``, ``;`` or space; model_args use commas
    between keys). ``skip=none`` quantizes every linear, the output head included."""
    if v is None:
        return DEFAULT_SKIP
    if isinstance(v, (list, tuple)):
        return tuple(str(x).strip() for x in v if str(x).strip())
    s = str(v).strip()
    if s.lower() in NONE_WORDS:
        return ()
    for sep in SKIP_SEPARATORS[1:]:
        s = s.replace(sep, SKIP_SEPARATORS[0])
    return tuple(x for x in s.split(SKIP_SEPARATORS[0]) if x)


def format_skip(skip: Iterable[str]) -> str:
    """The model_args spelling of a skip tuple (the inverse of :func:`parse_skip`)."""
    items = list(skip)
    return SKIP_SEPARATORS[0].join(items) if items else "none"


def parse_option(method: str, name: str, typ: Any, v: Any) -> Any:
    """Cast one option value; ``typ`` is a type or an :class:`Option`."""
    opt = typ if isinstance(typ, Option) else Option(typ, None)
    if opt.type is bool:
        out: Any = parse_bool(name, v)
    elif opt.type is int:
        out = parse_int(name, v)
    elif opt.type is float:
        out = parse_float(name, v)
    else:
        out = str(v).strip()
    note = f" ({opt.help})" if opt.help else ""
    if opt.choices is not None:
        out = str(out).lower()
        if out not in opt.choices:
            raise QuantArgError(f"hf-quant: {name}={v} must be one of {', '.join(opt.choices)} (method={method}){note}")
    if opt.out_of_range(out):
        raise QuantArgError(f"hf-quant: {name}={v} is out of range; method={method} takes {name} {opt.bounds()}{note}")
    return out


def typed_value(v: str) -> Any:
    """lm-eval's typing of a model_args value: true/false, none, int, float, else the string."""
    s = v.strip()
    low = s.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low == "none":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


# ---------------------------------------------------------------------------------------------
# the k=v,k=v string
# ---------------------------------------------------------------------------------------------
def split_model_args(margs: str | Mapping | None, where: str = "hf-quant", strict: bool = True,
                     typed: bool = False) -> dict:
    """``"k=v,k=v"`` (or a dict, copied) → dict. ``strict``: a part without ``=`` or a key given
    twice is a QuantArgError (lm-eval itself keeps the last value silently); not strict (reading
    old results files): such parts are dropped / the last value wins. ``typed``: values typed
    like lm-eval does (:func:`typed_value`), else kept as strings."""
    if margs is None:
        return {}
    if isinstance(margs, Mapping):
        return dict(margs)
    if not isinstance(margs, str):
        raise QuantArgError(f"{where}: model_args must be a k=v,k=v string or a mapping, got {type(margs).__name__}")
    out: dict[str, Any] = {}
    for part in margs.split(","):
        if not part.strip():
            continue
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or not k:
            if strict:
                raise QuantArgError(f"{where}: model_args entry {part.strip()!r} is not key=value")
            continue
        if k in out and strict:
            raise QuantArgError(
                f"{where}: model_args key {k!r} is given twice ({k}={out[k]} and {k}={v.strip()}); give it once"
            )
        out[k] = typed_value(v) if typed else v.strip()
    return out


def argv_model_args(argv: list[str]) -> str | None:
    """The ``--model_args`` string of a command line (``--model_args X`` or ``--model_args=X``)."""
    for i, a in enumerate(argv):
        for flag in ("--model_args", "--model-args"):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a[len(flag) + 1:]
    return None


def unknown_key_error(where: str, key: str, value: Any, valid: Iterable[str], context: str = "") -> QuantArgError:
    """One line: the unknown key, a close-match suggestion, and the valid keys."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    msg = f"{where}: unknown argument {key}={value}{context}"
    if close:
        msg += f"; did you mean {close[0]}?"
    return QuantArgError(f"{msg}. Valid keys: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------
# the typed config
# ---------------------------------------------------------------------------------------------
_FP_SPEC = re.compile(r"^fp:e(\d+)m(\d+)$")


def _check_format_spec(fmt: str, bits: int) -> None:
    """The one format mistake whose generic message would mislead: fp with no exponent bits."""
    m = _FP_SPEC.match(fmt)
    if m and int(m.group(1)) < 1:
        raise QuantArgError(
            f"hf-quant: format={fmt} has no exponent bits; a floating-point format needs an exponent "
            f"width of at least 1 (e.g. fp:e1m{max(bits - 2, 0)} or fp:e2m{max(bits - 3, 0)} at bits={bits}); "
            f"for evenly spaced levels use format=int"
        )


def build_config(method: Any = None, bits: Any = None, group_size: Any = None, format: Any = None,
                 sym: Any = None, skip: Any = None, **options: Any):
    """Parse and validate user arguments (strings from model_args, or typed values) into a
    QuantConfig. Every problem is a QuantArgError with one line, raised before any model work.

    Defaults: method rtn, bits 4, group_size 128, format the method's default, asymmetric.
    ``method=none`` or ``bits=16`` is the full-precision baseline through the same code path.
    """
    from .formats.mx import is_block_kind
    from .methods import get_method

    mname = DEFAULT_METHOD if method is None else str(method).strip().lower()
    m = get_method(mname)
    # fp8 / MX / NVFP4 block formats fix their element width and block length
    block_fmt = format is not None and mname not in ("none", "bnb") and is_block_kind(str(format))
    nbits = _parse_bits(mname, bits, format if block_fmt else None)
    gs = _parse_group_size(mname, group_size, format if block_fmt and nbits != FULL_BITS else None, nbits, sym)
    fmt = m.default_format if format is None else str(format).strip().lower()
    sy = False if sym is None else parse_bool("sym", sym)
    sk = parse_skip(skip)
    opts = _parse_method_options(m, mname, options)
    if nbits == FULL_BITS or mname == "none":
        from .methods.base import QuantConfig

        return QuantConfig(method="none", bits=FULL_BITS, group_size=gs, format="none", sym=False, skip=sk)
    return _method_config(m, mname, nbits, gs, fmt, sy, sk, opts, block_fmt)


def _block_name(format: Any, bits: int | None) -> str:
    """The canonical name of block format ``format`` at ``bits`` (None: its own width)."""
    from .formats.mx import canonical_block_format

    try:
        return canonical_block_format(str(format), bits)
    except ValueError as e:
        raise QuantArgError(f"hf-quant: {e}") from None


def _parse_bits(mname: str, bits: Any, block_format: Any) -> int:
    """bits as an int: the default (16 for method none, a block format's own width), or the
    given value, checked against the method and the allowed range."""
    from .formats.mx import format_bits as block_format_bits
    from .methods import available_methods

    if bits is None:
        if mname == "none":
            nbits = FULL_BITS
        else:
            nbits = block_format_bits(_block_name(block_format, None)) if block_format is not None else DEFAULT_BITS
    else:
        nbits = parse_int("bits", bits)
    if mname == "none" and nbits != FULL_BITS:
        others = ", ".join(n for n in available_methods() if n != "none")
        raise QuantArgError(
            f"hf-quant: method=none keeps full precision, so bits={nbits} makes no sense; "
            f"choose a method ({others}) or drop bits"
        )
    if nbits != FULL_BITS and not MIN_BITS <= nbits <= MAX_BITS:
        raise QuantArgError(
            f"hf-quant: bits must be an integer from {MIN_BITS} to {MAX_BITS} (or {FULL_BITS} for full "
            f"precision), got bits={bits}"
        )
    return nbits


def _parse_group_size(mname: str, group_size: Any, block_format: Any, nbits: int, sym: Any) -> int:
    """group_size as an int (default 128; -1 = per output channel); a quantizing block format
    (``block_format`` given) fixes or checks it (MX 32, NVFP4 16, fp8 any)."""
    from .formats.mx import check_block_args

    gs = DEFAULT_GROUP_SIZE if group_size is None else parse_int("group_size", group_size)
    if block_format is not None:
        gs = check_block_args(_block_name(block_format, nbits), None if group_size is None else gs,
                              sym is not None, mname)
    if gs != -1 and gs <= 0:
        raise QuantArgError(
            f"hf-quant: group_size must be -1 (per output channel) or a positive integer, got {group_size}"
        )
    return gs


def _parse_method_options(m, mname: str, options: dict) -> dict[str, Any]:
    """The method's declared options, typed and range-checked, defaults filled in; a key another
    method declares, or no method, is a one-line error."""
    from .methods import all_option_names

    declared = options_of(m)
    opts: dict[str, Any] = {}
    owners = None
    for k, v in options.items():
        if k in declared:
            opts[k] = parse_option(mname, k, declared[k], v)
        else:
            owners = owners or all_option_names()
            if k in owners:
                raise QuantArgError(
                    f"hf-quant: {k} is an option of method={owners[k]}, not of method={mname}"
                )
            raise unknown_key_error("hf-quant", k, v, list(CORE_KEYS) + list(declared), f" for method={mname}")
    for k, o in declared.items():
        opts.setdefault(k, o.default)
    return opts


def _method_config(m, mname: str, nbits: int, gs: int, fmt: str, sy: bool, sk, opts: dict, block_fmt: bool):
    """The QuantConfig of a quantizing run: format and sym checked against each other and the
    method, then the method's own validation and finalisation."""
    from .methods.base import QuantConfig

    if block_fmt:
        sy = True  # block formats are symmetric (sign-magnitude) by construction
    elif isinstance(fmt, str):
        _check_format_spec(fmt, nbits)
    kind = str(fmt).split(":", 1)[0]
    if sy and kind in SYMMETRIC_FORMATS and not block_fmt:
        raise QuantArgError(
            f"hf-quant: sym=true only applies to format=int (a scale and a zero point); format={fmt} is "
            f"symmetric by construction, so drop sym"
        )
    cfg = QuantConfig(method=mname, bits=nbits, group_size=gs, format=fmt, sym=sy, skip=sk, options=opts)
    cfg.format = m.check_format(cfg)
    if sy and not m.takes_sym:
        raise QuantArgError(f"hf-quant: method={mname} has no symmetric/asymmetric choice; drop sym")
    m.validate(cfg)
    return m.finalize(cfg)


@dataclass
class WrapperArgs:
    """The wrapper's own keys: the quantized-weights cache and the export target."""

    cache: bool = True
    cache_dir: str | None = None
    save_quantized: str | None = None
    execution: str | None = None  # fake | real | auto (checked by execution.plan_execution)
    kernel: str | None = None     # auto | torch | marlin | ... (real execution)

    @classmethod
    def parse(cls, d: Mapping) -> "WrapperArgs":
        def _path(k):
            v = d.get(k)
            return None if v is None or str(v).strip() == "" else str(v)

        return cls(cache=parse_bool("cache", d["cache"]) if d.get("cache") is not None else True,
                   cache_dir=_path("cache_dir"), save_quantized=_path("save_quantized"),
                   execution=_path("execution"), kernel=_path("kernel"))


@dataclass
class ResolvedArgs:
    cfg: Any                       # QuantConfig
    method: Any                    # Method
    wrapper: WrapperArgs
    rest: dict = field(default_factory=dict)   # everything that is not ours (pretrained, dtype, ...)
    given: dict = field(default_factory=dict)  # the quantization keys as the user gave them


def resolve(model_args: str | Mapping | None, *, where: str = "hf-quant", known_rest: Iterable[str] | None = None,
            default_method: str | None = None, for_export: bool = False,
            passthrough: Iterable[str] = ()) -> ResolvedArgs:
    """model_args (string or dict) → :class:`ResolvedArgs` (typed, validated).

    ``known_rest``: the other keys the caller accepts (e.g. HFLM's parameters); a key that is
    neither ours nor in it is an error with a close-match suggestion. ``None``: not checked.
    ``for_export``: the method keeps its exact integer state (``keep_qstate``) when it can.
    ``passthrough``: keys that belong to the caller even when another method has an option of
    that name (checked later by the caller, e.g. against the model's config).
    """
    from .methods import all_option_names, get_method

    args = split_model_args(model_args, where=where)
    core = {k: args.pop(k) for k in list(args) if k in CORE_KEYS}
    wrap = {k: args.pop(k) for k in list(args) if k in WRAPPER_KEYS}
    # lm-eval's parser turns the string "none" into None: a key given as none means none
    if "method" in core and core["method"] is None:
        core["method"] = "none"
    if "skip" in core and core["skip"] is None:
        core["skip"] = "none"
    mname = core.get("method") or default_method or DEFAULT_METHOD
    method = get_method(mname)
    declared = options_of(method)
    opts = {k: args.pop(k) for k in list(args) if k in declared}
    known = set(known_rest) if known_rest is not None else None
    owners = all_option_names()
    mine = set(passthrough) | (known or set())
    for k in list(args):
        if k in owners and k not in mine:
            opts[k] = args.pop(k)  # build_config says "x is an option of method=y"
    if known is not None:
        for k, v in args.items():
            if k not in known:
                valid = set(known) | set(CORE_KEYS) | set(WRAPPER_KEYS) | set(declared)
                raise unknown_key_error(where, k, v, valid)
    wrapper = WrapperArgs.parse(wrap)
    if (for_export or wrapper.save_quantized) and "keep_qstate" in declared:
        opts.setdefault("keep_qstate", "true")  # export writes the exact integer state
    # real execution of act_order GPTQ packs the kept integer state (its groups are not contiguous)
    if (str(wrapper.execution or "fake").lower() in ("real", "auto") and "keep_qstate" in declared
            and "act_order" in opts and parse_bool("act_order", opts["act_order"])):
        opts.setdefault("keep_qstate", "true")
    given = dict(core)
    core.setdefault("method", mname)
    cfg = build_config(**core, **opts)
    return ResolvedArgs(cfg=cfg, method=get_method(cfg.method), wrapper=wrapper, rest=args, given=given)


def config_to_model_args(cfg) -> dict:
    """The model_args keys that reproduce a QuantConfig (inverse of :func:`build_config`)."""
    d: dict[str, Any] = {"method": cfg.method}
    if cfg.method == "none":
        return d
    d.update(bits=cfg.bits, group_size=cfg.group_size, format=cfg.format, sym=cfg.sym,
             skip=format_skip(cfg.skip))
    d.update(cfg.options or {})
    return d


__all__ = [
    "CORE_KEYS", "WRAPPER_KEYS", "MIN_BITS", "MAX_BITS", "FULL_BITS", "DEFAULT_SKIP", "Option",
    "ResolvedArgs", "WrapperArgs", "build_config", "parse_bool", "parse_float", "parse_int", "parse_option",
    "parse_skip", "resolve", "split_model_args", "typed_value", "options_of", "unknown_key_error",
]

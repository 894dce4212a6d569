"""Sweep specification: models × methods × bits × group sizes × formats × sym, expanded into cells.

A spec is a YAML file (or the equivalent dict / CLI flags); see ``docs/sweep.md`` for the format.
Nothing heavy is imported here (no torch, no lm_eval): a spec is parsed and checked in
milliseconds, and every problem in it is one ``QuantArgError`` line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_quant import args as A
from lm_eval_quant.errors import QuantArgError



def _method_list() -> str:
    from lm_eval_quant.methods import available_methods

    return ", ".join(available_methods())

QUANT_BITS = tuple(range(A.MIN_BITS, A.MAX_BITS + 1))
BNB_BITS = (4, 8)
BNB_FORMATS = {"nf4": "nf4", "fp4": "fp4", "nf": "nf4", "fp": "fp4"}
INT_FORMATS = ("int",)
# hf-quant keys that are not method options but may sit in a method entry's options.
WRAPPER_KEYS = set(A.WRAPPER_KEYS) | {"skip"}
WRAPPER_KEYS |= {"act_bits", "act_format", "act_group_size", "smooth"}  # issue 12: any weight method

# Harness options, their type (for the checks) and the simple_evaluate keyword they feed.
HARNESS_OPTIONS: dict[str, tuple] = {
    "limit": ((int, float, type(None)),),
    "batch_size": ((int, str),),
    "max_batch_size": ((int, type(None)),),
    "num_fewshot": ((int, type(None)),),
    "apply_chat_template": ((bool, str),),
    "fewshot_as_multiturn": ((bool,),),
    "system_instruction": ((str, type(None)),),
    "device": ((str, type(None)),),
    "gen_kwargs": ((str, dict, type(None)),),
    "log_samples": ((bool,),),
    "token_kl": ((bool,),),
    "bootstrap_iters": ((int,),),
    "seed": ((int, list),),
    "include_path": ((str, list, type(None)),),
    "include_defaults": ((bool, str),),
    "cell_timeout": ((int, float, type(None)),),
    "metadata": ((dict, type(None)),),
}
HARNESS_DEFAULTS: dict[str, Any] = {
    "limit": None,
    "batch_size": 1,
    "num_fewshot": None,
    "apply_chat_template": False,
    "include_path": [],
    "include_defaults": "auto",
    # per-sample logs (samples_<task>_<ts>.jsonl): the report's flips/KL/calibration/significance
    "log_samples": True,
    # fp top-k reference per model + token-level KL of quantized cells on perplexity tasks
    "token_kl": True,
}
# Options that change how a cell runs but not its numbers: not part of the cell key.
_NOT_KEYED = {"cell_timeout", "include_defaults", "batch_size", "max_batch_size", "log_samples",
              "token_kl"}

TOP_KEYS = {
    "name", "models", "methods", "bits", "group_sizes", "formats", "sym", "tasks",
    "model_args", "harness", "lm_eval_model", "backend",
}
# issue 14: `backend: vllm` evaluates each cell's GPTQ export with lm-eval's vllm model
BACKENDS = {"hf": "hf-quant", "vllm": "hf-quant-vllm"}
# Harness options may also be given at the top level of the YAML for convenience.
_ALIASES = {"group_size": "group_sizes", "format": "formats", "method": "methods", "model": "models",
            "task": "tasks"}


def _slug(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-.")
    return s or "x"


def _as_list(v, what: str, empty_ok: bool = False) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)) and not v and not empty_ok:
        raise QuantArgError(f"sweep spec: {what} is an empty list; give at least one value or leave the key out")
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()] if "," in v else [v]
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def _int_list(v, what: str) -> list[int]:
    out = []
    for x in _as_list(v, what):
        try:
            out.append(A.parse_int(what, x))
        except QuantArgError:
            raise QuantArgError(f"sweep spec: {what} must be integers, got {x!r}") from None
    return out


def _bool(x, what: str) -> bool:
    try:
        return A.parse_bool(what, x)
    except QuantArgError:
        raise QuantArgError(f"sweep spec: {what} must be true/false, got {x!r}") from None


def _check_arg_value(k: str, v, where: str) -> None:
    s = str(v)
    if "," in s or "=" in s:
        raise QuantArgError(
            f"sweep spec: {where} {k}={s!r} contains ',' or '=' which an lm-eval model_args string cannot carry"
        )


def _fmt_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return str(v)


@dataclass
class ModelSpec:
    """One model of the sweep: a local path or hub id, plus labels the report uses."""

    pretrained: str
    name: str = ""          # display name (folder names, tables); default: last path component
    family: str = ""        # models of one family are one line per method in the report plots
    size: str = ""          # size label ("7B", "125M", or a number of parameters)
    model_args: dict = field(default_factory=dict)  # extra model_args for this model only

    @classmethod
    def from_any(cls, d) -> "ModelSpec":
        if isinstance(d, str):
            d = {"pretrained": d}
        if not isinstance(d, dict) or not d.get("pretrained"):
            raise QuantArgError(f"sweep spec: each model needs 'pretrained' (a path or hub id), got {d!r}")
        unknown = set(d) - {"pretrained", "name", "family", "size", "model_args"}
        if unknown:
            raise QuantArgError(
                f"sweep spec: unknown model key(s) {sorted(unknown)}; allowed: pretrained, name, family, size, model_args"
            )
        pre = str(d["pretrained"])
        name = str(d.get("name") or Path(pre.rstrip("/")).name or pre)
        if Path(pre).expanduser().exists():  # a local folder: absolute, so every cell process finds it
            pre = str(Path(pre).expanduser().resolve())
        ma = dict(d.get("model_args") or {})
        if "pretrained" in ma:
            raise QuantArgError("sweep spec: give 'pretrained' as the model's own key, not inside model_args")
        return cls(pretrained=pre, name=_slug(name), family=str(d.get("family") or ""),
                   size=str(d.get("size") if d.get("size") is not None else ""), model_args=ma)


@dataclass
class MethodSpec:
    """A method entry; axes given here override the sweep-wide ones for this method only."""

    name: str
    label: str = ""                       # display label (default: the method name)
    bits: list[int] | None = None
    group_sizes: list[int] | None = None
    formats: list[str] | None = None
    sym: list[bool] | None = None
    options: dict = field(default_factory=dict)   # method-specific model_args (damp, calib, ...)

    @classmethod
    def from_any(cls, d) -> "MethodSpec":
        if isinstance(d, str):
            d = {"name": d}
        if not isinstance(d, dict) or not d.get("name"):
            raise QuantArgError(f"sweep spec: each method needs a 'name' (one of {_method_list()}), got {d!r}")
        d = {_ALIASES.get(k, k): v for k, v in d.items()}
        unknown = set(d) - {"name", "label", "bits", "group_sizes", "formats", "sym", "options"}
        if unknown:
            raise QuantArgError(
                f"sweep spec: unknown method key(s) {sorted(unknown)}; allowed: name, label, bits, group_sizes, formats, sym, options"
            )
        name = str(d["name"]).strip().lower()
        return cls(
            name=name,
            label=_slug(d.get("label") or name),
            bits=_int_list(d["bits"], f"method {name} bits") if d.get("bits") is not None else None,
            group_sizes=_int_list(d["group_sizes"], f"method {name} group_sizes") if d.get("group_sizes") is not None else None,
            formats=[str(f) for f in _as_list(d["formats"], "formats")] if d.get("formats") is not None else None,
            sym=[_bool(s, "sym") for s in _as_list(d["sym"], "sym")] if d.get("sym") is not None else None,
            options=dict(d.get("options") or {}),
        )


@dataclass
class Cell:
    """One evaluation: one model at one precision on all the sweep's tasks."""

    name: str
    model: ModelSpec
    method: str
    method_label: str
    bits: int
    group_size: int | None
    format: str | None
    sym: bool | None
    options: dict
    tasks: list[str]
    harness: dict
    lm_eval_model: str = "hf-quant"
    skip_reason: str | None = None    # set: the combination is invalid and is not run

    @property
    def model_args(self) -> dict:
        """The dict behind the model_args string: model's args, then the quantization keys."""
        ma: dict[str, Any] = {"pretrained": self.model.pretrained}
        ma.update(self._common_args)
        ma.update(self.model.model_args)
        ma["method"] = self.method
        ma["bits"] = self.bits
        if self.group_size is not None:
            ma["group_size"] = self.group_size
        if self.format is not None:
            ma["format"] = self.format
        if self.sym is not None:
            ma["sym"] = self.sym
        ma.update(self.options)
        return ma

    _common_args: dict = field(default_factory=dict, repr=False)

    def model_args_string(self) -> str:
        return ",".join(f"{k}={_fmt_value(v)}" for k, v in self.model_args.items())

    def keyed_config(self) -> dict:
        """Everything that changes the cell's numbers; its hash is the cell's key."""
        return {
            "lm_eval_model": self.lm_eval_model,
            "model_args": {k: _fmt_value(v) for k, v in sorted(self.model_args.items())},
            "tasks": list(self.tasks),
            "harness": {k: v for k, v in sorted(self.harness.items()) if k not in _NOT_KEYED},
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.keyed_config(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def labels(self) -> dict:
        """Metadata written into the results JSON (top-level key ``"sweep"``) for the report."""
        return {
            "cell": self.name,
            "key": self.key,
            "model": self.model.name,
            "pretrained": self.model.pretrained,
            "family": self.model.family,
            "size": self.model.size,
            "method": self.method,
            "method_label": self.method_label,
            "bits": self.bits,
            "group_size": self.group_size,
            "format": self.format,
            "sym": self.sym,
            "options": dict(self.options),
        }

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "key": self.key,
            "lm_eval_model": self.lm_eval_model,
            "model_args": self.model_args_string(),
            "tasks": list(self.tasks),
            "harness": dict(self.harness),
            "labels": self.labels(),
            "skip_reason": self.skip_reason,
        }


@dataclass
class SweepSpec:
    models: list[ModelSpec]
    tasks: list[str]
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("rtn", "rtn")])
    bits: list[int] = field(default_factory=lambda: [16, 8, 4])
    group_sizes: list[int] = field(default_factory=lambda: [128])
    formats: list[str] = field(default_factory=lambda: ["int"])
    sym: list[bool] = field(default_factory=lambda: [False])
    model_args: dict = field(default_factory=dict)   # extra model_args for every cell
    harness: dict = field(default_factory=lambda: dict(HARNESS_DEFAULTS))
    name: str = "sweep"
    lm_eval_model: str = "hf-quant"

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_yaml(cls, path) -> "SweepSpec":
        p = Path(path)
        if not p.is_file():
            raise QuantArgError(f"sweep spec: file not found: {p}")
        import yaml

        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise QuantArgError(f"sweep spec: {p} is not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QuantArgError(f"sweep spec: {p} is not valid YAML ({first})") from None
        if not isinstance(d, dict):
            raise QuantArgError(f"sweep spec: {p} must hold a mapping (models:, tasks:, ...), got {type(d).__name__}")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "SweepSpec":
        if not isinstance(d, dict):
            raise QuantArgError(f"sweep spec must be a mapping, got {type(d).__name__}")
        d = {_ALIASES.get(k, k): v for k, v in d.items()}
        harness = dict(HARNESS_DEFAULTS)
        harness.update({k: v for k, v in (d.get("harness") or {}).items()})
        for k in list(d):
            if k in HARNESS_OPTIONS:
                harness[k] = d.pop(k)
        inc = harness.get("include_path")
        if isinstance(inc, str):
            inc = [p for p in inc.split(":") if p]
        if isinstance(inc, list):  # relative to the current folder, made absolute for the cell processes
            harness["include_path"] = [str(Path(str(p)).expanduser().resolve()) for p in inc]
        unknown = set(d) - TOP_KEYS
        if unknown:
            raise QuantArgError(
                f"sweep spec: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(TOP_KEYS))} "
                f"and harness options {', '.join(sorted(HARNESS_OPTIONS))}"
            )
        models = [ModelSpec.from_any(m) for m in _as_list(d.get("models"), "models", empty_ok=True)]
        tasks = [str(t) for t in _as_list(d.get("tasks"), "tasks", empty_ok=True)]
        kw: dict[str, Any] = {"models": models, "tasks": tasks, "harness": harness}
        if d.get("methods") is not None:
            kw["methods"] = [MethodSpec.from_any(m) for m in _as_list(d["methods"], "methods")]
        if d.get("bits") is not None:
            kw["bits"] = _int_list(d["bits"], "bits")
        if d.get("group_sizes") is not None:
            kw["group_sizes"] = _int_list(d["group_sizes"], "group_sizes")
        if d.get("formats") is not None:
            kw["formats"] = [str(f) for f in _as_list(d["formats"], "formats")]
        if d.get("sym") is not None:
            kw["sym"] = [_bool(s, "sym") for s in _as_list(d["sym"], "sym")]
        if d.get("model_args") is not None:
            kw["model_args"] = A.split_model_args(d["model_args"], where="sweep spec: model_args")
        if d.get("name"):
            kw["name"] = str(d["name"])
        if d.get("lm_eval_model"):
            kw["lm_eval_model"] = str(d["lm_eval_model"])
        if d.get("backend") is not None:  # issue 14
            b = str(d["backend"]).strip().lower()
            if b not in BACKENDS:
                raise QuantArgError(f"sweep spec: backend={d['backend']!r} is not one of {', '.join(BACKENDS)}")
            if d.get("lm_eval_model") and str(d["lm_eval_model"]) != BACKENDS[b]:
                raise QuantArgError(f"sweep spec: backend: {b} runs lm_eval_model {BACKENDS[b]}; drop lm_eval_model")
            kw["lm_eval_model"] = BACKENDS[b]
        spec = cls(**kw)
        spec.validate()
        return spec

    @classmethod
    def load(cls, spec) -> "SweepSpec":
        if isinstance(spec, SweepSpec):
            spec.validate()
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (str, Path)):
            return cls.from_yaml(spec)
        raise QuantArgError(f"sweep spec must be a SweepSpec, dict or YAML path, got {type(spec).__name__}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "lm_eval_model": self.lm_eval_model,
            "models": [asdict(m) for m in self.models],
            "methods": [asdict(m) for m in self.methods],
            "bits": list(self.bits),
            "group_sizes": list(self.group_sizes),
            "formats": list(self.formats),
            "sym": list(self.sym),
            "tasks": list(self.tasks),
            "model_args": dict(self.model_args),
            "harness": dict(self.harness),
        }

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        if not self.models:
            raise QuantArgError("sweep spec: 'models' is empty; give at least one model path or hub id")
        if not self.tasks:
            raise QuantArgError("sweep spec: 'tasks' is empty; give at least one lm-eval task name")
        if not self.methods:
            raise QuantArgError(f"sweep spec: 'methods' is empty; use one or more of {_method_list()}")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise QuantArgError(f"sweep spec: model name(s) {dup} used twice; give each model a distinct 'name'")
        from lm_eval_quant.methods import available_methods

        known = set(available_methods())
        labels = [m.label for m in self.methods]
        for m in self.methods:
            if m.name not in known:
                raise QuantArgError(f"sweep spec: unknown method {m.name!r}; use one of {', '.join(sorted(known))}")
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise QuantArgError(
                f"sweep spec: method label(s) {dup} used twice; give entries of the same method distinct 'label's"
            )
        for b in self.bits + [b for m in self.methods for b in (m.bits or [])]:
            if b < 1 or b > 32:
                raise QuantArgError(f"sweep spec: bits={b} is out of range; use {A.MIN_BITS}..{A.MAX_BITS}, "
                                    f"or {A.FULL_BITS} for unquantized")
        for g in self.group_sizes + [g for m in self.methods for g in (m.group_sizes or [])]:
            if g == 0 or g < -1:
                raise QuantArgError(f"sweep spec: group_size={g} is invalid; use a positive size or -1 (per output row)")
        for k, v in self.harness.items():
            if k not in HARNESS_OPTIONS:
                raise QuantArgError(
                    f"sweep spec: unknown harness option {k!r}; allowed: {', '.join(sorted(HARNESS_OPTIONS))}"
                )
            types = HARNESS_OPTIONS[k][0]
            if not isinstance(v, types):
                raise QuantArgError(
                    f"sweep spec: harness option {k}={v!r} has the wrong type; expected {'/'.join(t.__name__ for t in types)}"
                )
        inc = self.harness.get("include_defaults", "auto")
        if isinstance(inc, str) and inc != "auto":
            raise QuantArgError(f"sweep spec: include_defaults must be true, false or auto, got {inc!r}")
        for where, ma in [("model_args", self.model_args)] + [
            (f"model {m.name} model_args", m.model_args) for m in self.models
        ] + [(f"method {m.label} options", m.options) for m in self.methods]:
            for k, v in ma.items():
                _check_arg_value(k, v, where)
        for m in self.models:
            _check_arg_value("pretrained", m.pretrained, f"model {m.name}")
        reserved = {"pretrained", "method", "bits", "group_size", "format", "sym"}
        bad = reserved & (set(self.model_args) | {k for m in self.models for k in m.model_args})
        if bad:
            raise QuantArgError(
                f"sweep spec: {sorted(bad)} are sweep axes; set them with models/methods/bits/group_sizes/formats/sym, not model_args"
            )

    # ---------------------------------------------------------------- expansion
    def cells(self, check_methods: bool = True) -> list[Cell]:
        """All cells in a stable order (model-major), invalid combinations included with their
        ``skip_reason``; duplicates (e.g. the unquantized baseline reached from several methods)
        appear once."""
        out: list[Cell] = []
        seen: set[str] = set()
        harness = dict(self.harness)
        for model in self.models:
            for ms in self.methods:
                bits_l = ms.bits if ms.bits is not None else self.bits
                gs_l = ms.group_sizes if ms.group_sizes is not None else self.group_sizes
                if ms.formats is not None:
                    fmt_l = ms.formats
                elif _at_load(ms.name):
                    fmt_l = ["nf4"]
                else:
                    fmt_l = self.formats
                sym_l = ms.sym if ms.sym is not None else self.sym
                for bits, gs, fmt, sym in itertools.product(bits_l, gs_l, fmt_l, sym_l):
                    cell = self._make_cell(model, ms, bits, gs, fmt, sym, harness)
                    ident = cell.name + "|" + cell.key
                    if ident in seen:
                        continue
                    seen.add(ident)
                    out.append(cell)
        # Each model's unquantized cell first: quantized cells compare against what it stores
        # (token-level KL reference), so it must exist before they run.
        order = {id(m): k for k, m in enumerate(self.models)}
        out.sort(key=lambda c: (order.get(id(c.model), 0), c.method != "none"))
        # Distinct configs that map to the same folder name get a key suffix.
        names = [c.name for c in out]
        for c in out:
            if names.count(c.name) > 1:
                c.name = f"{c.name}-{c.key[:6]}"
        if check_methods:
            _method_checks(out)
        return out

    def _make_cell(self, model, ms, bits, gs, fmt, sym, harness) -> Cell:
        common = dict(self.model_args)
        base = dict(model=model, tasks=list(self.tasks), harness=harness, lm_eval_model=self.lm_eval_model,
                    _common_args=common)
        if ms.name == "none" or bits == 16:
            return Cell(name=f"{model.name}__none-w16", method="none", method_label="none", bits=16,
                        group_size=None, format=None, sym=None, options={}, **base)
        fmt = str(fmt)
        reason = None
        gname = "gch" if gs == -1 else f"g{gs}"
        if _at_load(ms.name):  # bitsandbytes-style: quantized by from_pretrained, its own formats
            if bits == 8:
                return Cell(name=f"{model.name}__{ms.label}-w8", method="bnb", method_label=ms.label, bits=8,
                            group_size=None, format=None, sym=None, options=dict(ms.options), **base)
            bfmt = BNB_FORMATS.get(fmt.lower())
            if bits not in BNB_BITS:
                reason = f"bnb supports bits 4 or 8, not {bits}"
            elif bfmt is None:
                reason = f"bnb 4-bit needs format nf4 or fp4, not {fmt}"
            return Cell(name=f"{model.name}__{ms.label}-w{bits}-{_slug(bfmt or fmt)}", method="bnb",
                        method_label=ms.label, bits=bits, group_size=None, format=bfmt or fmt, sym=None,
                        options=dict(ms.options), skip_reason=reason, **base)
        if bits not in QUANT_BITS:
            reason = f"{ms.name} supports bits 2..8 (or 16 unquantized), not {bits}"
        is_int = fmt.lower() in INT_FORMATS
        if fmt.lower() in ("nf4", "fp4"):
            reason = reason or f"format {fmt} is a bnb format; for {ms.name} use int, fp, fp:eXmY, nf or dynamic"
        s = bool(sym) if is_int else None
        name = f"{model.name}__{ms.label}-w{bits}-{gname}-{_slug(fmt)}" + ("-sym" if s else "")
        return Cell(name=name, method=ms.name, method_label=ms.label, bits=bits, group_size=gs, format=fmt,
                    sym=s, options=dict(ms.options), skip_reason=reason, **base)


def _at_load(name: str) -> bool:
    """The method quantizes inside from_pretrained (bitsandbytes): its cells take nf4/fp4/int8."""
    from lm_eval_quant.methods import get_method

    try:
        return bool(get_method(name).quantizes_at_load)
    except QuantArgError:
        return False


def _method_checks(cells: list[Cell]) -> None:
    """Ask the argument layer (the same ``build_config`` hf-quant runs, no model) about each
    cell; a ``QuantArgError`` marks the cell skipped with that line. Methods that cannot be
    imported here are not asked (the cell then fails at run time with the method's own one-line
    error, and the sweep goes on)."""
    for c in cells:
        if c.skip_reason or c.method == "none":
            continue
        try:
            from lm_eval_quant.methods import get_method

            meth = get_method(c.method)
        except QuantArgError as e:
            c.skip_reason = str(e)
            continue
        except ImportError:
            continue
        opts = dict(c.options)
        unknown = [k for k in opts if k not in A.options_of(meth) and k not in WRAPPER_KEYS]
        if unknown:
            c.skip_reason = (f"{c.method} has no option(s) {unknown}; its options are "
                             f"{', '.join(sorted(A.options_of(meth))) or '(none)'}")
            continue
        kw = {k: v for k, v in opts.items() if k not in WRAPPER_KEYS}
        if "skip" in opts:
            kw["skip"] = opts["skip"]
        for k in ("group_size", "format", "sym"):
            if getattr(c, k) is not None:
                kw[k] = getattr(c, k)
        try:
            A.build_config(method=c.method, bits=c.bits, **kw)
        except QuantArgError as e:
            c.skip_reason = str(e)

"""The method interface every quantization algorithm implements, and the shared config.

A method is one file with one class: it says which options it takes (`OPTIONS`), checks a config
cheaply (`validate`), may add `from_pretrained` arguments (`load_kwargs`, used by bitsandbytes),
and quantizes an already loaded Hugging Face model in place (`quantize`). Bit accounting comes
from `accounting` (default: the format's bits plus its per-block statistics).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import QuantArgError
from ..formats import canonical_format
from ..accounting import account
from ..linears import is_conv1d, is_quantizable, weight_matrix  # noqa: F401  (re-exported for methods)

from ..args import DEFAULT_SKIP, MAX_BITS, MIN_BITS  # noqa: E402  (the vocabulary: args.py)


@dataclass
class QuantConfig:
    method: str = "none"
    bits: int = 16
    group_size: int = 128
    format: str = "int"
    sym: bool = False
    skip: tuple[str, ...] = DEFAULT_SKIP
    options: dict = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.method == "none" or self.bits == 16

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        d["options"] = {k: _jsonable(v) for k, v in sorted(self.options.items())}
        return d


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


@dataclass
class QuantContext:
    """What a method may use besides the model: the tokenizer (for calibration data), the
    compute device (the model itself may stay on CPU), a seed, and whether to show progress."""

    tokenizer: Any = None
    device: torch.device | str = "cpu"
    seed: int = 0
    progress: bool = True
    model_id: str | None = None


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)  # module names quantized
    modified: list[str] = field(default_factory=list)  # parameter names whose values changed
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class Method:
    """Base class. Subclasses set `name`, `OPTIONS` and implement `quantize`.

    Capabilities: callers ask these instead of comparing method names.
    """

    name = "base"
    default_format = "int"
    # option name -> args.Option(type, default, min=, max=, gt=, lt=, choices=, help=);
    # types: int, float, bool, str. Cast and range-checked once by the argument layer, so
    # validate() checks only what involves several values and quantize() never re-casts.
    OPTIONS: dict[str, Any] = {}
    # -- capabilities ----------------------------------------------------------------------
    needs_calibration = False     # reads calibration data (calib, nsamples, seqlen options)
    quantizes_at_load = False     # quantizes inside from_pretrained (load_kwargs), not after it
    exportable = False            # its result can be written as a GPTQ-format checkpoint
    takes_sym = True              # has a symmetric/asymmetric choice (sym=)
    takes_group_size = True       # honours group_size=
    real_kernels = False          # runs quantized kernels (not fake quantization) at eval time
    supported_bits: tuple[int, ...] = tuple(range(MIN_BITS, MAX_BITS + 1))  # quantized widths it takes

    def _opts(self, cfg: QuantConfig) -> dict:
        """Every declared option: the config's value, else the declared default."""
        from ..args import options_of

        o = {k: opt.default for k, opt in options_of(self).items()}
        o.update(cfg.options or {})
        return o

    def finalize(self, cfg: QuantConfig) -> QuantConfig:
        """The config as the method really runs it (e.g. bnb: its block size, symmetric), returned
        as a new object after ``validate``; ``validate`` itself never changes the config."""
        return cfg

    def check_format(self, cfg: QuantConfig) -> str:
        """Return the canonical format name or raise QuantArgError."""
        try:
            return canonical_format(cfg.format, cfg.bits)
        except ValueError as e:
            raise QuantArgError(f"hf-quant: {e}") from None

    def validate(self, cfg: QuantConfig) -> None:  # pragma: no cover - default accepts
        """Cheap checks without the model; raise QuantArgError with one line."""

    def load_kwargs(self, cfg: QuantConfig) -> dict:
        """Extra keyword arguments for `from_pretrained` (e.g. a quantization_config)."""
        return {}

    def check_shapes(self, model: nn.Module, cfg: QuantConfig, device: Any = "cpu") -> None:
        """Check the layer widths this config needs, on a weightless (meta) copy of the model,
        before any weights are read; raise QuantArgError naming the first layer that fails.
        Default: the group size divides every quantized layer's input width."""
        if cfg.is_baseline or not self.takes_group_size:
            return
        check_group_size(quantizable_linears(model, cfg.skip), cfg.group_size)

    def quantize(self, model: nn.Module, cfg: QuantConfig, ctx: QuantContext) -> QuantReport:
        raise NotImplementedError

    def accounting(self, model: nn.Module, cfg: QuantConfig, report: QuantReport,
                   storage_dtype=None) -> dict:
        return account(model, cfg, report.quantized, extra_bits=report.extra.get("extra_bits"),
                       storage_dtype=storage_dtype)


# argument parsing lives in the argument layer (one vocabulary); re-exported for methods
from ..args import Option, parse_bool, parse_float, parse_int, parse_option, parse_skip  # noqa: E402,F401


# --------------------------------------------------------------------------------------------
# model helpers shared by methods
# --------------------------------------------------------------------------------------------
def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A module name matches a skip pattern if the pattern matches the whole name, its last
    component, or any dotted suffix of it (so `lm_head` and `mlp.down_proj` both work)."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / transformers Conv1D of the model, except those matching `skip`.

    Embeddings are never linears; the output head is excluded by the default skip ('lm_head')
    and also by identity when the model says which module is its output embedding.
    """
    try:
        out_emb = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model
        out_emb = None
    result = []
    for name, mod in model.named_modules():
        if not is_quantizable(mod):
            continue
        if matches(name, skip):
            continue
        if mod is out_emb and skip and any(matches("lm_head", (p,)) for p in skip):
            continue
        result.append((name, mod))
    return result


def set_weight_matrix(module: nn.Module, w_out_in: torch.Tensor) -> None:
    w = w_out_in.t() if is_conv1d(module) else w_out_in
    module.weight.data.copy_(w.to(module.weight.dtype))


def untie_if_shared(model: nn.Module, module: nn.Module) -> None:
    """Give `module` its own weight tensor when it is tied to another parameter (e.g. an output
    head tied to the input embeddings), so quantizing it leaves the other one intact."""
    w = module.weight
    for _, p in model.named_parameters(remove_duplicate=False):
        if p is w:
            continue
        if p.data_ptr() == w.data_ptr():
            module.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            if hasattr(model.config, "tie_word_embeddings"):
                model.config.tie_word_embeddings = False
            return
    emb = None
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model: no embeddings to compare
        pass
    if emb is not None and getattr(emb, "weight", None) is w:
        module.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False


def check_group_size(linears: list[tuple[str, nn.Module]], group_size: int) -> None:
    """One line when the group size is neither -1 nor a positive integer.  A group size that does
    not divide a layer's input width is valid: that layer's last group per row is shorter (the
    GPTQ reference's ``g_idx = i // g``), and the accounting counts its real number of groups."""
    if group_size == -1:
        return
    if not isinstance(group_size, int) or group_size <= 0:
        raise QuantArgError(
            f"hf-quant: group_size={group_size} must be -1 (per output channel) or a positive integer, e.g. 128"
        )


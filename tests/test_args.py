"""The argument layer (lm_eval_quant/args.py) and method capabilities: fast, in-process."""

from __future__ import annotations

import copy
import json
import os

import pytest

from lm_eval_quant import args as A
from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.methods import get_method


# ------------------------------------------------------------------------------- k=v strings
def test_split_model_args_strings_and_dicts():
    assert A.split_model_args("pretrained=/m, bits=4 ,skip=a|b,") == {"pretrained": "/m", "bits": "4", "skip": "a|b"}
    assert A.split_model_args("a=true,b=3,c=0.5,d=none,e=x", typed=True) == \
        {"a": True, "b": 3, "c": 0.5, "d": None, "e": "x"}
    assert A.split_model_args({"bits": 4}) == {"bits": 4}
    assert A.split_model_args(None) == {}
    # values may hold '=' (after the first one)
    assert A.split_model_args("gen=a=b") == {"gen": "a=b"}


@pytest.mark.parametrize("s,needle", [
    ("bits=4,bits=3", "'bits' is given twice (bits=4 and bits=3)"),
    ("bits=4,oops", "'oops' is not key=value"),
    ("=4", "is not key=value"),
])
def test_split_model_args_errors(s, needle):
    with pytest.raises(QuantArgError) as e:
        A.split_model_args(s, where="x")
    assert needle in str(e.value) and str(e.value).startswith("x: ")


def test_lenient_mode_keeps_last_and_drops_junk():
    assert A.split_model_args("bits=4,bits=3,junk", strict=False) == {"bits": "3"}


def test_argv_model_args():
    assert A.argv_model_args(["lm_eval", "--model", "hf-quant", "--model_args", "a=1,a=2"]) == "a=1,a=2"
    assert A.argv_model_args(["x", "--model_args=a=1"]) == "a=1"
    assert A.argv_model_args(["x", "--tasks", "t"]) is None


# ------------------------------------------------------------------------------- scalars
@pytest.mark.parametrize("v,want", [("true", True), ("YES", True), ("on", True), (1, True), ("0", False),
                                    ("off", False), (False, False)])
def test_parse_bool_vocabulary(v, want):
    assert A.parse_bool("x", v) is want


@pytest.mark.parametrize("v", ["sym", "maybe", 2, ""])
def test_parse_bool_refuses(v):
    with pytest.raises(QuantArgError, match="must be true or false"):
        A.parse_bool("x", v)


@pytest.mark.parametrize("v,want", [
    (None, ("lm_head",)), ("none", ()), ("", ()), ("lm_head|*.down_proj", ("lm_head", "*.down_proj")),
    ("a;b c", ("a", "b", "c")), (["a", "b"], ("a", "b")),
])
def test_parse_skip_syntax(v, want):
    assert A.parse_skip(v) == want


def test_format_skip_inverts_parse_skip():
    for t in [(), ("lm_head",), ("a", "*.b")]:
        assert A.parse_skip(A.format_skip(t)) == t


def test_option_declaration_ranges_and_choices():
    o = A.Option(int, 8, min=1, max=16)
    assert A.parse_option("m", "k", o, "4") == 4
    with pytest.raises(QuantArgError, match=r"k=0 is out of range; method=m takes k ≥ 1 and ≤ 16"):
        A.parse_option("m", "k", o, "0")
    c = A.Option(str, "a", choices=("a", "b"))
    with pytest.raises(QuantArgError, match="must be one of a, b"):
        A.parse_option("m", "k", c, "z")
    d = A.options_of(get_method("gptq"))["damp"]
    assert (d.type, d.default, d.gt, d.lt) == (float, 0.01, 0, 10)
    assert A.options_of(type("Old", (), {"OPTIONS": {"k": (int, 3)}}))["k"] == A.Option(int, 3)  # tuples still read


# ------------------------------------------------------------------------------- resolve
def test_resolve_splits_ours_from_the_rest():
    r = A.resolve("pretrained=/m,method=gptq,bits=3,group_size=64,damp=0.02,cache=false,cache_dir=/c,dtype=float32",
                  known_rest=["pretrained", "dtype"])
    assert (r.cfg.method, r.cfg.bits, r.cfg.group_size) == ("gptq", 3, 64)
    assert r.cfg.options["damp"] == 0.02 and isinstance(r.cfg.options["nsamples"], int)
    assert (r.wrapper.cache, r.wrapper.cache_dir, r.wrapper.save_quantized) == (False, "/c", None)
    assert r.rest == {"pretrained": "/m", "dtype": "float32"}
    assert r.method is get_method("gptq")


def test_resolve_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(QuantArgError) as e:
        A.resolve("pretrained=/m,method=rtn,group_sise=32", known_rest=["pretrained", "dtype"])
    msg = str(e.value)
    assert "unknown argument group_sise=32; did you mean group_size?" in msg
    assert "Valid keys: " in msg and "dtype" in msg and "pretrained" in msg and "\n" not in msg
    with pytest.raises(QuantArgError) as e:
        A.resolve("method=rtn,foo=bar", known_rest=[])
    assert "did you mean" not in str(e.value) and "unknown argument foo=bar" in str(e.value)


def test_resolve_other_methods_option_is_named():
    with pytest.raises(QuantArgError, match="damp is an option of method=gptq, not of method=rtn"):
        A.resolve("method=rtn,damp=0.1", known_rest=[])


def test_resolve_for_export_keeps_qstate():
    assert A.resolve("method=gptq,bits=4", known_rest=[], for_export=True).cfg.options["keep_qstate"] is True
    assert A.resolve("method=gptq,bits=4", known_rest=[]).cfg.options["keep_qstate"] is False


@pytest.mark.parametrize("kw,needle", [
    (dict(method="rtn", format="nf", sym="true"), "sym=true only applies to format=int"),
    (dict(method="rtn", format="fp:e2m1", sym=True), "sym=true only applies to format=int"),
    (dict(method="rtn", format="dynamic", sym=True), "sym=true only applies to format=int"),
    (dict(method="rtn", bits=4, format="fp:e0m3"), "no exponent bits"),
    (dict(method="bnb", bits=4, format="nf4", sym=True), "sym"),
])
def test_build_config_combinations(kw, needle):
    with pytest.raises(QuantArgError) as e:
        A.build_config(**kw)
    assert needle in str(e.value)


def test_sym_false_with_grid_formats_is_fine():
    assert A.build_config(method="rtn", format="nf", sym=False).format == "nf"


def test_config_to_model_args_round_trip():
    cfg = A.build_config(method="gptq", bits=3, group_size=64, sym=True, skip="lm_head|*.down_proj", damp=0.05)
    again = A.build_config(**A.config_to_model_args(cfg))
    assert again == cfg


# ------------------------------------------------------------------------------- capabilities
def test_capabilities_table():
    caps = {n: (m.needs_calibration, m.quantizes_at_load, m.exportable, m.takes_sym)
            for n in ("none", "rtn", "gptq", "awq", "bnb") for m in [get_method(n)]}
    assert caps == {"none": (False, False, False, False), "rtn": (False, False, True, True),
                    "gptq": (True, False, True, True), "awq": (True, False, True, True),
                    "bnb": (False, True, False, False)}


def _meta(intermediate):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    conf = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=128)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


def test_bnb_cpu_width_check(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    monkeypatch.setattr(F, "has_avx512bf16", lambda: True)
    bnb = get_method("bnb")
    cfg = A.build_config(method="bnb", bits=4)
    with pytest.raises(QuantArgError) as e:
        bnb.check_shapes(_meta(172), cfg, "cpu")
    assert "layer model.layers.0.mlp.gate_proj is 172x64" in str(e.value) and "divisible by 32" in str(e.value)
    bnb.check_shapes(_meta(192), cfg, "cpu")                       # 192 = 6·32: fine
    bnb.check_shapes(_meta(172), cfg, "cuda")                      # the GPU kernel has no such rule
    bnb.check_shapes(_meta(172), A.build_config(method="bnb", bits=8), "cpu")   # LLM.int8: no repacking
    monkeypatch.setattr(F, "has_avx512bf16", lambda: False)
    bnb.check_shapes(_meta(172), cfg, "cpu")                       # no AVX512-BF16: kernel not used


def test_group_size_check_on_meta_model():
    # a size that does not divide a width is valid (a shorter last group); a bad size is one line
    get_method("rtn").check_shapes(_meta(192), A.build_config(method="rtn", group_size=48))
    with pytest.raises(QuantArgError, match="group_size"):
        A.build_config(method="rtn", group_size=0)


# ------------------------------------------------------------------------------- hf-quant pre-load checks
def test_hf_quant_path_and_dtype_checks(tmp_path):
    from lm_eval_quant.models.hf_quant import check_paths_and_dtype, check_rest_keys

    with pytest.raises(QuantArgError, match="pretrained= is empty"):
        check_paths_and_dtype("", {})
    (tmp_path / "m").mkdir()
    with pytest.raises(QuantArgError, match="has no config.json"):
        check_paths_and_dtype(str(tmp_path / "m"), {})
    (tmp_path / "m" / "config.json").write_text("{broken")
    with pytest.raises(QuantArgError, match="is not valid JSON"):
        check_paths_and_dtype(str(tmp_path / "m"), {})
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    check_paths_and_dtype(str(tmp_path / "m"), {"dtype": "bfloat16"})
    with pytest.raises(QuantArgError, match="subfolder=x does not exist"):
        check_paths_and_dtype(str(tmp_path / "m"), {"subfolder": "x"})
    with pytest.raises(QuantArgError, match="dtype=float33 is not a torch dtype"):
        check_paths_and_dtype(str(tmp_path / "m"), {"dtype": "float33"})
    with pytest.raises(QuantArgError, match="tokenizer=/nope does not exist"):
        check_paths_and_dtype(str(tmp_path / "m"), {"tokenizer": "/nope"})
    check_rest_keys({"dtype": "auto", "batch_size": 1, "attn_implementation": "eager"})
    with pytest.raises(QuantArgError, match="did you mean batch_size"):
        check_rest_keys({"batch_sise": 1})

    class Conf:
        rope_theta = 1.0

    check_rest_keys({"rope_theta": 2.0}, Conf())            # a model-config attribute is fine


def test_export_output_checks_and_stale_temp(tmp_path):
    from lm_eval_quant.export import check_exportable, check_output, clean_stale_tmp

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(QuantArgError, match="not empty"):
        check_output(tmp_path / "full")
    (tmp_path / "f").write_text("x")
    with pytest.raises(QuantArgError, match="is a file"):
        check_output(tmp_path / "f")
    with pytest.raises(QuantArgError, match="cannot create"):
        check_output(tmp_path / "f" / "out")
    dead = tmp_path / "out.tmp-999999"
    dead.mkdir()
    live = tmp_path / f"out.tmp-{os.getppid()}"        # a running process's folder is left alone
    live.mkdir()
    assert clean_stale_tmp(tmp_path / "out") == [dead]
    assert live.exists() and not dead.exists()
    for g in (4, 16):
        with pytest.raises(QuantArgError, match=f"group_size={g} writes a GPTQ checkpoint"):
            check_exportable(A.build_config(method="rtn", bits=4, group_size=g))
    with pytest.raises(QuantArgError, match="method=bnb is not exportable; GPTQ-format export needs method="):
        check_exportable(A.build_config(method="bnb", bits=4))


# ------------------------------------------------------------------ typed method options (issue 10)
@pytest.mark.parametrize("method,kw,needle", [
    ("gptq", dict(damp="0"), "damp=0 is out of range; method=gptq takes damp > 0 and < 10"),
    ("gptq", dict(damp="nan"), "damp=nan is out of range"),
    ("gptq", dict(damp="10"), "takes damp > 0 and < 10"),
    ("gptq", dict(calib_batch="-1"), "calib_batch=-1 is out of range; method=gptq takes calib_batch ≥ 0 (0 = automatic)"),
    ("gptq", dict(seqlen="0"), "seqlen=0 is out of range"),
    ("gptq", dict(act_order="maybe"), "act_order must be true or false"),
    ("gptq", dict(block_size="1.5"), "block_size must be an integer"),
    ("awq", dict(loss="Block"), "loss=Block must be one of module, linear (method=awq)"),
    ("awq", dict(max_shrink="0"), "max_shrink=0 is out of range; method=awq takes max_shrink > 0 and ≤ 1"),
    ("hqq", dict(beta="0"), "beta=0 is out of range; method=hqq takes beta > 0"),
    ("hqq", dict(lp_norm="0"), "takes lp_norm > 0 and ≤ 1"),
    ("smoothquant", dict(calib_batch="-2"), "calib_batch=-2 is out of range"),
    ("bnb", dict(compute_dtype="int4"), "compute_dtype=int4 must be one of auto, float32"),
    ("bnb", dict(int8_threshold="-1", bits=8), "int8_threshold=-1 is out of range"),
])
def test_option_ranges_and_choices_are_one_line(method, kw, needle):
    kw.setdefault("bits", 4)
    with pytest.raises(QuantArgError) as e:
        A.build_config(method=method, **kw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_options_arrive_typed_and_choices_lower_cased():
    cfg = A.build_config(method="awq", bits="4", loss="LINEAR", n_grid="5", clip="off", max_shrink="1")
    assert cfg.options["loss"] == "linear" and cfg.options["n_grid"] == 5 and cfg.options["clip"] is False
    assert isinstance(cfg.options["max_shrink"], float)
    g = A.build_config(method="gptq", bits=4, act_order="yes", damp="1e-2")
    assert g.options["act_order"] is True and g.options["damp"] == 0.01


def test_every_method_declares_typed_options():
    from lm_eval_quant.methods import available_methods

    for name in available_methods():
        for k, v in get_method(name).OPTIONS.items():
            assert isinstance(v, A.Option), (name, k)
            assert A.parse_option(name, k, v, v.default) == v.default  # the default passes its own checks


def test_bnb_validate_does_not_mutate_the_config():
    from lm_eval_quant.methods.base import QuantConfig

    m = get_method("bnb")
    for bits, fmt in ((4, "nf4"), (8, "int8")):
        cfg = QuantConfig(method="bnb", bits=bits, group_size=128, format=fmt, sym=False,
                          options={"compute_dtype": "auto" if bits == 8 else "bf16"})
        before = copy.deepcopy(cfg)
        m.validate(cfg)
        assert cfg == before
    fin = m.finalize(cfg)
    assert fin is not cfg and (fin.group_size, fin.sym) == (-1, True) and cfg == before
    c4 = A.build_config(method="bnb", bits=4, format="nf4", compute_dtype="bf16")
    assert (c4.group_size, c4.sym, c4.options["compute_dtype"]) == (64, True, "bfloat16")

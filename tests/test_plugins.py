"""Entry-point groups lm_eval_quant.methods / lm_eval_quant.formats (issue 10), in-process.

A fake distribution's entry points (real ``importlib.metadata.EntryPoint`` objects pointing at a
module written to tmp_path) are served through a monkeypatched ``importlib.metadata.entry_points``;
the wheel-in-a-venv version of this test is in test_plugin_wheel.py (slow)."""

from __future__ import annotations

import sys
import textwrap
import logging
from importlib import metadata

import pytest
import torch

from lm_eval_quant import _plugins
from lm_eval_quant import formats as F
from lm_eval_quant import methods as M
from lm_eval_quant.args import build_config, resolve
from lm_eval_quant.errors import QuantArgError

PLUGIN_SRC = textwrap.dedent('''
    import torch
    from lm_eval_quant.args import Option
    from lm_eval_quant.formats import Format, fake_quantize_, make_format
    from lm_eval_quant.methods.base import Method, QuantReport, quantizable_linears, weight_matrix


    class MyPlug(Method):
        name = "myplug"
        OPTIONS = {"strength": Option(float, 1.0, min=0, max=1, help="1 = full round-to-nearest")}

        def quantize(self, model, cfg, ctx):
            fmt = make_format(cfg.format, cfg.bits, cfg.sym)
            o = self._opts(cfg)
            rep = QuantReport()
            for n, m in quantizable_linears(model, cfg.skip):
                w = m.weight.data
                q = fake_quantize_(w.clone(), fmt, cfg.group_size)
                w.copy_(w + o["strength"] * (q - w))
                rep.quantized.append(n)
                rep.modified.append(n + ".weight")
            return rep


    def signgrid(bits, sym):
        return Format("signgrid", bits, True, torch.linspace(-1.0, 1.0, 2 ** bits))


    signgrid.min_bits = 2

    NOT_A_METHOD = 42
''')


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    mod = "lmq_fake_plugin_mod"
    (tmp_path / f"{mod}.py").write_text(PLUGIN_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        metadata.EntryPoint("myplug", f"{mod}:MyPlug", _plugins.METHODS_GROUP),
        metadata.EntryPoint("broken", "lmq_no_such_module_xyz:Thing", _plugins.METHODS_GROUP),
        metadata.EntryPoint("notamethod", f"{mod}:NOT_A_METHOD", _plugins.METHODS_GROUP),
        metadata.EntryPoint("rtn", f"{mod}:MyPlug", _plugins.METHODS_GROUP),  # may not replace a built-in
        metadata.EntryPoint("signgrid", f"{mod}:signgrid", _plugins.FORMATS_GROUP),
    ]
    calls = []
    real = metadata.entry_points

    def fake_entry_points(**kw):
        calls.append(kw.get("group"))
        if kw.get("group") in (_plugins.METHODS_GROUP, _plugins.FORMATS_GROUP):
            return [e for e in eps if e.group == kw["group"]]
        return real(**kw)

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    _plugins.reset()
    M._INSTANCES.pop("myplug", None)
    F.make_format.cache_clear()
    yield calls
    _plugins.reset()
    M._INSTANCES.pop("myplug", None)
    F.make_format.cache_clear()
    sys.modules.pop(mod, None)


def test_entry_point_method_is_usable_and_broken_ones_warn_once(fake_dist, caplog):
    with caplog.at_level(logging.WARNING, logger="lm_eval_quant.plugins"):
        names = M.available_methods()
    assert "myplug" in names and "broken" not in names and "notamethod" not in names
    msgs = [r.getMessage() for r in caplog.records if r.name == "lm_eval_quant.plugins"]
    assert len(msgs) == 3, msgs
    assert any("plug-in broken" in m and "ModuleNotFoundError" in m for m in msgs), msgs
    assert any("plug-in notamethod" in m and "not a lm_eval_quant.methods.base.Method" in m for m in msgs), msgs
    assert any("plug-in rtn" in m and "already taken" in m for m in msgs), msgs
    assert all("\n" not in m for m in msgs)
    assert M.get_method("rtn").__class__.__name__ == "RTN"  # the built-in stays
    cfg = build_config(method="myplug", bits="3", group_size="32", strength="0.5")
    assert (cfg.method, cfg.bits, cfg.options) == ("myplug", 3, {"strength": 0.5})
    with pytest.raises(QuantArgError, match=r"strength=2 is out of range; method=myplug takes strength ≥ 0 and ≤ 1"):
        build_config(method="myplug", strength="2")
    # read once: later calls do not scan again
    n = fake_dist.count(_plugins.METHODS_GROUP)
    M.available_methods(), M.get_method("myplug"), resolve("method=myplug,bits=4", known_rest=[])
    assert fake_dist.count(_plugins.METHODS_GROUP) == n == 1


def test_entry_point_method_quantizes_a_model(fake_dist):
    from lm_eval_quant.methods.base import QuantContext

    lin = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False))
    torch.manual_seed(0)
    lin[0].weight.data.normal_()
    cfg = build_config(method="myplug", bits=2, group_size=32, skip="none")
    rep = M.get_method("myplug").quantize(lin, cfg, QuantContext(progress=False))
    assert rep.quantized == ["0"]
    assert lin[0].weight.unique().numel() <= 8 * 4  # 2 bits: at most 4 levels per row (one group)


def test_entry_point_format_is_usable(fake_dist):
    assert F.canonical_format("signgrid", 3) == "signgrid"
    fmt = F.make_format("signgrid", 3)
    assert fmt.name == "signgrid" and fmt.grid.numel() == 8
    cfg = build_config(method="rtn", bits=3, format="signgrid", group_size=16)
    assert cfg.format == "signgrid"
    w = torch.randn(4, 32)
    res = F.quantize_weight(w, fmt, 16)
    on_grid = fmt.grid[res.codes.long()].reshape(4, 2, 16) * res.scale.unsqueeze(-1)
    assert torch.allclose(res.w_hat.reshape(4, 2, 16), on_grid)  # every weight is a scaled grid value
    with pytest.raises(ValueError, match="format signgrid supports 2-8 bits"):
        F.canonical_format("signgrid", 9)


def test_without_plugins_nothing_changes(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: [])
    _plugins.reset()
    try:
        assert M.available_methods() == list(M.METHODS)
        with pytest.raises(QuantArgError, match="unknown method 'myplug'"):
            M.get_method("myplug")
        with pytest.raises(ValueError, match="unknown format 'signgrid'"):
            F.canonical_format("signgrid", 4)
    finally:
        _plugins.reset()


def test_register_in_process_refuses_builtin_names():
    with pytest.raises(ValueError):
        M.register_method("gptq", M.Method)
    with pytest.raises(ValueError):
        F.register_format("nf", lambda b, s: None)

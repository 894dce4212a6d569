"""A third-party plug-in, built as a wheel and installed into a throw-away venv (issue 10).

The package ``lmq_myplug`` declares a method (``myplug``) and a format (``signgrid``) through the
``lm_eval_quant.methods`` / ``lm_eval_quant.formats`` entry-point groups; a broken entry point
beside them must cost one warning line. Everything runs in a subprocess of the venv, which sees
this checkout (first) and the running interpreter's packages behind its own, as test_discovery does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel into a throw-away venv

REPO = Path(__file__).resolve().parents[1]

PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = ["hatchling"]
    build-backend = "hatchling.build"

    [project]
    name = "lmq-myplug"
    version = "0.1"

    [project.entry-points."lm_eval_quant.methods"]
    myplug = "lmq_myplug:MyPlug"
    brokenplug = "lmq_myplug.nope:Missing"

    [project.entry-points."lm_eval_quant.formats"]
    signgrid = "lmq_myplug:signgrid"

    [tool.hatch.build.targets.wheel]
    packages = ["lmq_myplug"]
''')

INIT = textwrap.dedent('''
    import torch
    from lm_eval_quant.args import Option
    from lm_eval_quant.formats import Format, fake_quantize_, make_format
    from lm_eval_quant.methods.base import Method, QuantReport, quantizable_linears


    class MyPlug(Method):
        OPTIONS = {"strength": Option(float, 1.0, min=0, max=1)}

        def quantize(self, model, cfg, ctx):
            fmt, o, rep = make_format(cfg.format, cfg.bits, cfg.sym), self._opts(cfg), QuantReport()
            for n, m in quantizable_linears(model, cfg.skip):
                w = m.weight.data
                w.copy_(w + o["strength"] * (fake_quantize_(w.clone(), fmt, cfg.group_size) - w))
                rep.quantized.append(n)
            return rep


    def signgrid(bits, sym):
        return Format("signgrid", bits, True, torch.linspace(-1.0, 1.0, 2 ** bits))
''')

CHECK = textwrap.dedent('''
    import warnings
    warnings.simplefilter("always")
    import torch
    import lm_eval_quant
    from lm_eval_quant.args import build_config
    from lm_eval_quant.methods import available_methods, get_method
    from lm_eval_quant.methods.base import QuantContext
    print("FILE", lm_eval_quant.__file__)
    print("METHODS", ",".join(available_methods()))
    cfg = build_config(method="myplug", bits="3", group_size="16", format="signgrid", strength="1", skip="none")
    print("CFG", cfg.method, cfg.bits, cfg.format, cfg.options["strength"])
    model = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False))
    rep = get_method("myplug").quantize(model, cfg, QuantContext(progress=False))
    print("QUANTIZED", rep.quantized, int(model[0].weight.unique().numel() <= 4 * 8))
''')


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONNOUSERSITE="1", LMQ_NO_AUTOREGISTER="1")
    return env


def test_plugin_wheel_adds_a_method_and_a_format(tmp_path):
    src = tmp_path / "src"
    (src / "lmq_myplug").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "lmq_myplug" / "__init__.py").write_text(INIT)
    try:
        import hatchling  # noqa: F401  (present: build offline, no isolation)
        iso = ["--no-build-isolation"]
    except ImportError:
        iso = []
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *iso, "-q", "-w", str(dist)],
                   check=True, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    wheel = next(dist.glob("lmq_myplug-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.check_output(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # this checkout first, then the running interpreter's packages (torch, pip, ...): path lines only
    here = [str(REPO)] + sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (vsite / "zz_lmq_plugin_base.pth").write_text("".join(p + "\n" for p in here))
    subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    p = subprocess.run([str(vpy), "-c", CHECK], capture_output=True, text=True, timeout=300,
                       env=_env(tmp_path), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)
    assert Path(out["FILE"]).resolve().is_relative_to(REPO)
    assert "myplug" in out["METHODS"].split(",") and "brokenplug" not in out["METHODS"]
    assert out["CFG"] == "myplug 3 signgrid 1.0"
    assert out["QUANTIZED"] == "['0'] 1"
    broken = [ln for ln in p.stderr.splitlines() if "plug-in brokenplug" in ln]
    assert len(broken) == 1 and "ModuleNotFoundError" in broken[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr

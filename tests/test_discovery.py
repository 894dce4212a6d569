"""Discovery from an installed wheel: the three routes to ``hf-quant``, and ``hf`` beside them.

The wheel is built from this checkout and installed into a throw-away venv (``--without-pip``,
no copies of torch & co.: a plain path line in a ``.pth`` makes the running interpreter's
site-packages visible behind the venv's own). Every check then runs in a subprocess of that venv,
from a temporary working directory and without PYTHONPATH, and first proves it imported the
installed copy, not the checkout:

1. stock CLI ``python -m lm_eval --model hf-quant`` (the ``.pth`` import hook),
2. the ``lm_eval.models`` entry point (importlib.metadata),
3. the ``lm-eval-quant`` console script (+ task_configs on the task path, merged with --include_path);
plus ``--model hf`` still works, the ``.pth`` imports neither torch nor lm_eval at start-up and
costs < 5 ms, and ``LMQ_NO_AUTOREGISTER=1`` switches it off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds wheels into throw-away venvs: minutes

REPO = Path(__file__).resolve().parents[1]
PTH = "lm_eval_quant_startup.pth"
EP_VALUE = "lm_eval_quant.models.hf_quant:HFQuantLM"


def _base_env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "LMQ_NO_AUTOREGISTER", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
               PYTHONNOUSERSITE="1")
    env.update(extra)
    return env


class Installed:
    def __init__(self, root: Path, wheel: Path):
        self.root = root
        self.wheel = wheel
        self.venv = root / "venv"
        self.python = self.venv / "bin" / "python"
        self.script = self.venv / "bin" / "lm-eval-quant"
        self.cwd = root / "cwd"
        self.cwd.mkdir(exist_ok=True)
        self.site = Path(subprocess.check_output(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            env=_base_env(root, LMQ_NO_AUTOREGISTER="1"), text=True).strip())

    def run(self, args, *, env=None, timeout=300, check=True):
        e = _base_env(self.root, **(env or {}))
        p = subprocess.run([str(a) for a in args], cwd=self.cwd, env=e, capture_output=True,
                           text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\n"
                                 f"stderr:\n{p.stderr[-5000:]}")
        return p

    def py(self, code, **kw):
        return self.run([self.python, "-c", code], **kw)


def _build_wheel(out: Path) -> Path:
    try:
        import hatchling  # noqa: F401  (present: build offline, no isolation)
        iso = ["--no-build-isolation"]
    except ImportError:
        iso = []
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", *iso, "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True, timeout=300,
                   env=_base_env(out))
    wheels = sorted(out.glob("lm_eval_quant-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def inst(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("discovery")
    wheel = _build_wheel(root / "dist")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.check_output(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # the running interpreter's packages (torch, lm_eval, pip, ...) behind the venv's own;
    # a path line only: .pth files there (e.g. an editable install of this checkout) are NOT run
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (vsite / "zz_lmq_test_base.pth").write_text("".join(p + "\n" for p in sorted(here)))
    subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                    "--no-warn-script-location", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300, env=_base_env(root))
    return Installed(root, wheel)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lm_eval_quant.toy import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", hidden=64,
                           layers=2, heads=4, train_steps=0, seed=0)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A tiny offline multiple-choice task (loglikelihood requests) in its own folder."""
    d = tmp_path_factory.mktemp("tasks")
    rows = [{"text": f"Tom had a {c} ball and he", "a": " played", "b": " ran", "label": i % 2}
            for i, c in enumerate(["red", "blue", "green", "big", "small", "soft"])]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "lmq_disc_task.yaml").write_text(
        "task: lmq_disc_task\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{text}}"\n'
        'doc_to_choice: "{{[a, b]}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return d


def _which_copy(inst: Installed, env=None) -> str:
    return inst.py("import lm_eval_quant; print(lm_eval_quant.__file__)", env=env).stdout.strip()


# ---------------------------------------------------------------- wheel + install ------------

def test_wheel_layout(inst):
    names = set(zipfile.ZipFile(inst.wheel).namelist())
    assert PTH in names, "the start-up .pth must sit at the wheel root"
    for mod in ("__init__.py", "_startup.py", "cli.py", "errors.py"):
        assert f"lm_eval_quant/{mod}" in names
    # every task file of the checkout is shipped inside the package
    src = [p.relative_to(REPO / "task_configs").as_posix() for p in (REPO / "task_configs").rglob("*")
           if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    assert src, "task_configs/ is empty"
    missing = [s for s in src if f"lm_eval_quant/task_configs/{s}" not in names]
    assert not missing, missing
    assert not any(n.startswith("task_configs/") for n in names)
    ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(inst.wheel).read(ep).decode()
    assert "[console_scripts]" in text and "lm-eval-quant = lm_eval_quant.cli:main" in text
    assert "[lm_eval.models]" in text and f"hf-quant = {EP_VALUE}" in text
    # the .pth line must not import the package when switched off
    line = zipfile.ZipFile(inst.wheel).read(PTH).decode().strip()
    assert line.startswith("import ") and "\n" not in line and "LMQ_NO_AUTOREGISTER" in line


def test_installed_copy_is_used(inst):
    f = Path(_which_copy(inst))
    assert f.is_relative_to(inst.site), f"imported {f}, not the wheel in {inst.site}"
    td = Path(inst.py("import lm_eval_quant; print(lm_eval_quant.task_dir())").stdout.strip())
    assert td == inst.site / "lm_eval_quant" / "task_configs"
    assert any(td.rglob("*.yaml"))
    assert inst.script.exists()


def test_editable_install_layout(tmp_path):
    """`pip install -e .`: the checkout is imported, the .pth hook is installed, and no stale
    copy of task_configs lands in site-packages (hatch_build.py)."""
    try:
        import hatchling  # noqa: F401
    except ImportError:
        pytest.skip("hatchling not installed (needed to build offline)")
    venv = tmp_path / "ev"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.check_output(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (vsite / "zz_lmq_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                    "--no-build-isolation", "-q", "-e", str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300, env=_base_env(tmp_path))
    assert (vsite / PTH).is_file()
    assert not (vsite / "lm_eval_quant").exists()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run(
        [str(vpy), "-c", "import sys, lm_eval_quant; print(lm_eval_quant.__file__);"
                         "print(lm_eval_quant.task_dir()); print(any(getattr(f, '_lmq_hook', 0) for f in sys.meta_path))"],
        cwd=cwd, env=_base_env(tmp_path), capture_output=True, text=True, check=True).stdout.splitlines()
    assert Path(out[0]) == REPO / "lm_eval_quant" / "__init__.py"
    assert Path(out[1]) == REPO / "task_configs"
    assert out[2] == "True"


# ---------------------------------------------------------------- the start-up hook ----------

_MODS = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def test_pth_is_lazy_and_switchable(inst):
    on = set(json.loads(inst.py(_MODS).stdout))
    off = set(json.loads(inst.py(_MODS, env={"LMQ_NO_AUTOREGISTER": "1"}).stdout))
    for heavy in ("torch", "lm_eval", "transformers", "lm_eval_quant.models", "numpy"):
        assert heavy not in on
    added = on - off
    assert added <= {"lm_eval_quant", "lm_eval_quant._startup", "__future__"}, f"start-up imports too much: {added}"
    assert "lm_eval_quant._startup" in added  # the hook is there when on ...
    assert not any(m.startswith("lm_eval_quant") for m in off)  # ... and nothing at all when off
    code = "import sys; print(sum(getattr(f, '_lmq_hook', False) for f in sys.meta_path))"
    assert inst.py(code).stdout.strip() == "1"
    for val in ("1", "true", "YES", "on"):
        assert inst.py(code, env={"LMQ_NO_AUTOREGISTER": val}).stdout.strip() == "0"
    assert inst.py(code, env={"LMQ_NO_AUTOREGISTER": "0"}).stdout.strip() == "1"


def test_pth_costs_under_5ms(inst):
    """`python -X importtime -c pass`: cumulative time of the hook's imports, best of 7 runs."""
    best = None
    for _ in range(7):
        err = inst.run([inst.python, "-X", "importtime", "-c", "pass"]).stderr
        us = [int(line.split("|")[1]) for line in err.splitlines()
              if line.startswith("import time:") and line.rstrip().endswith("lm_eval_quant._startup")]
        assert us, err[-2000:]
        best = us[0] if best is None else min(best, us[0])
    print(f"\n.pth start-up cost (importtime, best of 7): {best} us")
    assert best < 5000, f".pth hook costs {best} us at interpreter start (budget 5000 us)"


_REG = ("import lm_eval.models; from lm_eval.api.registry import model_registry as r, get_model;"
        "print('hf-quant' in r, r.origin('hf') if hasattr(r, 'origin') else '');"
        "import sys; m = sys.modules.get('lm_eval_quant'); print(m.__file__ if m else None);"
        "c = get_model('hf-quant') if 'hf-quant' in r else None; print(c.__module__ if c else None);"
        "from lm_eval.models.huggingface import HFLM; print(get_model('hf') is HFLM,"
        " bool(c) and issubclass(c, HFLM))")


def test_hook_registers_after_builtins(inst):
    out = inst.py(_REG).stdout.splitlines()
    assert out[0].startswith("True")
    assert Path(out[1]).is_relative_to(inst.site)
    assert out[2] == "lm_eval_quant.models.hf_quant"
    assert out[3] == "True True"  # 'hf' still resolves to the built-in HFLM


def test_no_autoregister_disables_hook(inst):
    out = inst.py(_REG, env={"LMQ_NO_AUTOREGISTER": "1"}).stdout.splitlines()
    assert out[0].startswith("False")
    assert out[1] == "None"  # the package was not even imported
    assert out[3].startswith("True")


def test_entry_point_declared(inst):
    """The `lm_eval.models` entry point, used the way lm-eval's registry takes plugins: as a lazy
    EntryPoint placeholder that `get_model` materialises (hook off, so nothing else registers)."""
    code = ("from importlib.metadata import entry_points; import json, sys;"
            "eps = [e for e in entry_points(group='lm_eval.models') if e.name == 'hf-quant'];"
            "print(json.dumps([[e.value, e.dist.name if e.dist else None] for e in eps]));"
            "import lm_eval.models; from lm_eval.api.registry import model_registry, get_model;"
            "assert 'hf-quant' not in model_registry;"
            "model_registry.register('hf-quant', target=eps[0]);"
            "cls = get_model('hf-quant'); from lm_eval.models.huggingface import HFLM;"
            "print(cls.__module__, cls.__name__, issubclass(cls, HFLM), get_model('hf') is HFLM,"
            " cls is eps[0].load())")
    out = inst.py(code, env={"LMQ_NO_AUTOREGISTER": "1"}).stdout.splitlines()
    eps = json.loads(out[0])
    assert [EP_VALUE, "lm-eval-quant"] in [[v, (d or "").replace("_", "-")] for v, d in eps]
    assert out[1] == "lm_eval_quant.models.hf_quant HFQuantLM True True True"


# ---------------------------------------------------------------- CLI routes, end to end -----

def _lm_args(tiny: Path, task: Path, model: str, extra_model_args: str, out: Path, include=True):
    ma = f"pretrained={tiny}" + (f",{extra_model_args}" if extra_model_args else "")
    args = ["--model", model, "--model_args", ma, "--tasks", "lmq_disc_task", "--limit", "4",
            "--device", "cpu", "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    return args + (["--include_path", str(task)] if include else [])


def _results(out: Path):
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results file under {out}"
    res = json.loads(files[-1].read_text())
    samples = sorted(out.rglob("samples_lmq_disc_task_*.jsonl"))
    assert samples
    lls = []
    for line in samples[-1].read_text().splitlines():
        s = json.loads(line)
        lls.append([float(r[0][0]) for r in s["resps"]])
    return res, lls


@pytest.fixture(scope="module")
def runs(inst, tiny, task):
    """The three CLI runs, once: stock hf, stock hf-quant rtn 4-bit, lm-eval-quant method=none."""
    r = {}
    out = inst.root / "out"
    p = inst.run([inst.python, "-m", "lm_eval", *_lm_args(tiny, task, "hf", "", out / "hf")])
    r["hf"] = (p, *_results(out / "hf"))
    p = inst.run([inst.python, "-m", "lm_eval",
                  *_lm_args(tiny, task, "hf-quant", "method=rtn,bits=4,group_size=32", out / "q4")])
    r["q4"] = (p, *_results(out / "q4"))
    p = inst.run([inst.script, *_lm_args(tiny, task, "hf-quant", "method=none", out / "none")])
    r["none"] = (p, *_results(out / "none"))
    return r


def test_stock_cli_hf_still_works(runs):
    _, res, lls = runs["hf"]
    assert res["config"]["model"] == "hf"
    assert "lmq_disc_task" in res["results"]
    assert len(lls) == 4 and all(len(x) == 2 for x in lls)


def test_stock_cli_hf_quant_via_pth(runs):
    _, res, lls = runs["q4"]
    assert res["config"]["model"] == "hf-quant"
    q = res["config"].get("quantization")
    assert q and q["quant_config"]["method"] == "rtn" and q["quant_config"]["bits"] == 4
    # really quantized: 4-bit RTN moves every loglikelihood away from full precision
    _, _, ref = runs["hf"]
    assert all(a != b for x, y in zip(lls, ref) for a, b in zip(x, y))


def test_console_script_route(runs):
    _, res, lls = runs["none"]
    assert res["config"]["model"] == "hf-quant"
    # method=none is the unquantized baseline through the same path: identical to plain hf
    _, _, ref = runs["hf"]
    assert lls == ref


def test_one_line_errors(inst, tiny, task):
    """A bad hf-quant argument: one line, no traceback, exit 2, from both CLIs."""
    bad = _lm_args(tiny, task, "hf-quant", "method=rtn,bits=9", inst.root / "bad")
    for argv in ([inst.script, *bad], [inst.python, "-m", "lm_eval", *bad]):
        p = inst.run(argv, check=False)
        assert p.returncode == 2, (argv[:3], p.returncode, p.stderr[-3000:])
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("lm-eval-quant: error: ")]
        assert len(lines) == 1 and "bits" in lines[0], p.stderr[-3000:]


def test_console_script_subcommand_missing_is_one_line(inst):
    p = inst.run([inst.script, "demo", "--help"], check=False)
    if p.returncode == 0:  # the demo module exists: its help works through the dispatcher
        assert p.stdout
        return
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("lm-eval-quant: error: ")


# ---------------------------------------------------------------- cli helpers, in process ----

def test_merge_include_paths(tmp_path):
    from lm_eval_quant.cli import merge_include_paths

    a, b, c = (str(tmp_path / n) for n in "abc")
    assert merge_include_paths(None, a) == [a]
    assert merge_include_paths(b, a) == [a, b]  # user's folders after ours: theirs win
    assert merge_include_paths(f"{b}{os.pathsep}{c}", a) == [a, b, c]
    assert merge_include_paths([b, a], a) == [a, b]  # no duplicates
    assert merge_include_paths("", [a]) == [a]


def test_add_task_dir_reaches_every_task_manager(tmp_path, task):
    """Our folder is searched by TaskManagers that lm_eval builds, with or without --include_path."""
    from lm_eval.tasks.manager import TaskManager

    from lm_eval_quant import cli

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "lmq_ours_task.yaml").write_text((task / "lmq_disc_task.yaml").read_text()
                                             .replace("task: lmq_disc_task", "task: lmq_ours_task"))
    orig = TaskManager.__init__
    try:
        cli.add_task_dir(ours)
        cli.add_task_dir(ours)  # idempotent
        tm = TaskManager(include_path=str(task), include_defaults=False)
        assert {"lmq_ours_task", "lmq_disc_task"} <= set(tm.all_tasks)
        tm = TaskManager(None, None, False)
        assert "lmq_ours_task" in tm.all_tasks and "lmq_disc_task" not in tm.all_tasks
    finally:
        TaskManager.__init__ = orig


def test_post_import_finder_fires_once_after_module_body(tmp_path, monkeypatch):
    """The hook's mechanism, in process, on a throw-away package: the callback sees the finished
    module (its body has run, submodules importable), once; the finder then leaves sys.meta_path
    and the module's loader is the real one again."""
    from lm_eval_quant import _startup

    pkg = tmp_path / "lmq_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("DONE = True\n")
    (pkg / "sub.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def callback(module):
        import lmq_probe_pkg.sub  # importing a submodule from inside the callback works

        seen.append((module.__name__, getattr(module, "DONE", False), lmq_probe_pkg.sub.X))

    finder = _startup.PostImportFinder("lmq_probe_pkg", callback)
    sys.meta_path.insert(0, finder)
    try:
        import lmq_probe_pkg

        assert seen == [("lmq_probe_pkg", True, 1)]
        assert finder not in sys.meta_path
        assert type(lmq_probe_pkg.__loader__).__name__ == "SourceFileLoader"
        assert lmq_probe_pkg.__spec__.loader is lmq_probe_pkg.__loader__
        import importlib

        importlib.reload(lmq_probe_pkg)  # no second call
        assert len(seen) == 1
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        for m in [m for m in sys.modules if m.startswith("lmq_probe_pkg")]:
            del sys.modules[m]


def test_startup_switch_values():
    from lm_eval_quant._startup import disabled

    assert not disabled({}) and not disabled({"LMQ_NO_AUTOREGISTER": ""})
    assert not disabled({"LMQ_NO_AUTOREGISTER": "0"}) and not disabled({"LMQ_NO_AUTOREGISTER": "false"})
    assert all(disabled({"LMQ_NO_AUTOREGISTER": v}) for v in ("1", "true", "Yes", " on "))

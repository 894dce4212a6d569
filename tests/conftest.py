"""Shared, offline, seeded fixtures. Models are built by lm_eval_quant.toy (seconds on CPU)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from lm_eval_quant.toy import cached_tiny_model, shared_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Quantized-weights cache in a per-session temp dir unless the caller chose one."""
    if "LMQ_CACHE_DIR" not in os.environ:
        os.environ["LMQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("lmq_cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _shared_default_task_index():
    """lm-eval's own task folder (~15,000 YAML files: 15-40 s to index here) is indexed once per
    session instead of once per ``TaskManager`` (simple_evaluate builds one when it is given none;
    our tests build one per include_path). ``TaskIndex.build`` indexes each root on its own and
    then merges them in order, later roots overriding earlier ones, so building the built-in root
    once and merging it the same way gives the same index. That folder does not change during a
    session and lm-eval deep-copies an entry's config before using it, so the entries are shared.
    Every other root (ours, the tests' temp folders) is indexed afresh each time. Forked sweep
    cells inherit it; subprocesses (the slow tests) index as usual."""
    from lm_eval.tasks import _index

    orig = _index.TaskIndex.build
    builtin = Path(_index.__file__).resolve().parent
    cache: dict[bool, dict] = {}

    def build(paths, *, resolve_includes=True):
        paths = list(paths)
        if not any(Path(p).resolve() == builtin for p in paths):
            return orig(paths, resolve_includes=resolve_includes)
        index: dict = {}
        for root in paths:
            if Path(root).resolve() == builtin:
                if resolve_includes not in cache:
                    cache[resolve_includes] = orig([root], resolve_includes=resolve_includes)
                part = cache[resolve_includes]
            else:
                part = orig([root], resolve_includes=resolve_includes)
            for name, entry in part.items():  # the merge of TaskIndex.build, warning included
                if name in index:
                    _index.log.warning("Task '%s' from %s overrides existing task from %s",
                                       name, entry.yaml_path, index[name].yaml_path)
                index[name] = entry
        return index

    _index.TaskIndex.build = staticmethod(build)
    yield
    _index.TaskIndex.build = staticmethod(orig)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    env = os.environ.get("LMQ_TOY_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("toy_models")


@pytest.fixture(scope="session")
def tiny_llama(toy_root) -> Path:
    """Random-init Llama: hidden 128 (so group 128 fits), 2 layers."""
    return cached_tiny_model(toy_root, arch="llama", hidden=128, layers=2, heads=4, intermediate=256)


@pytest.fixture(scope="session")
def llama64_dir(tmp_path_factory) -> Path:
    """Random-init Llama, hidden 64, 2 layers, saved in float32 (the export and cache tests)."""
    from lm_eval_quant.toy import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama64") / "llama", arch="llama", hidden=64, layers=2,
                           heads=4, intermediate=128, train_steps=0, seed=0)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A seeded toy text corpus for calibration (20,000 characters)."""
    from lm_eval_quant.toy import make_corpus

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(make_corpus(20_000, seed=3))
    return p


@pytest.fixture(scope="session")
def tiny_gpt2(toy_root) -> Path:
    return cached_tiny_model(toy_root, arch="gpt2", hidden=64, layers=2, heads=4, intermediate=128)


@pytest.fixture(scope="session")
def trained_llama(toy_root) -> Path:
    """A Llama trained for a few seconds on the synthetic stories: quantization error shows in
    its perplexity."""
    return cached_tiny_model(
        toy_root, arch="llama", hidden=64, layers=2, heads=4, intermediate=128,
        train_steps=150, batch_size=8, seq_len=64,
    )


# Outlier-channel recipe for `sensitive_llama` (see its docstring).
SENSITIVE_CHANNELS = (5, 23, 41, 59)
SENSITIVE_SCALE = 15.0


def add_outlier_channels(model, channels=SENSITIVE_CHANNELS, k=SENSITIVE_SCALE):
    """Function-preserving reparametrisation of a Llama: in every layer multiply RMSNorm weight
    channels `channels` (input_layernorm, post_attention_layernorm) by k and divide the matching
    input columns of the linears that read that norm's output (q/k/v_proj; gate/up_proj) by k.
    The full-precision function is unchanged; the hidden activations entering those linears now
    carry a few channels k times larger than the rest, as in real LLMs."""
    import torch

    idx = list(channels)
    with torch.no_grad():
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for norm, lins in ((layer.input_layernorm, (att.q_proj, att.k_proj, att.v_proj)),
                               (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[idx] *= k
                for lin in lins:
                    lin.weight[:, idx] /= k
    return model


@pytest.fixture(scope="session")
def sensitive_llama(toy_root, trained_llama) -> Path:
    """`trained_llama` (same weights, same full-precision function) with emergent-outlier-like
    structure added *after* training: `add_outlier_channels` with 4 of the 64 hidden channels
    scaled x15 in every RMSNorm and divided back out of the consuming linears' input columns.

    Why: the plain trained fixture is barely quantization-sensitive (3-bit RTN g32 +0.5%
    perplexity) and longer/larger training on the synthetic stories makes it less so (600 steps:
    fp 1.42, RTN3 +0.1%), so the error's direction, not its size, decides orderings there. Real
    LLMs are sensitive largely because a few hidden channels carry very large activations (large
    RMSNorm weights; LLM.int8()), which multiply the rounding error of the small weights that read
    them: that is what AWQ's per-channel scales and GPTQ's compensation address. Here 3-bit RTN
    costs ~+4.5% perplexity (fp 2.035). The folded model's logits equal the original's (checked
    here, rel 1e-4). Built once per session (a few seconds) next to the toy cache.
    """
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chans = "-".join(map(str, SENSITIVE_CHANNELS))
    dest = Path(toy_root) / f"{Path(trained_llama).name}-outliers-{chans}-x{SENSITIVE_SCALE:g}"
    if (dest / "model.safetensors").exists():
        return dest
    tok = AutoTokenizer.from_pretrained(trained_llama)
    model = AutoModelForCausalLM.from_pretrained(trained_llama).eval()
    ids = torch.tensor(tok("Once upon a time, there was a little cat named Lily. " * 4)["input_ids"])[None]
    with torch.no_grad():
        ref = model(ids).logits
        add_outlier_channels(model)
        out = model(ids).logits
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, f"outlier fold changed the function (rel {err:.2e})"
    tmp = Path(tempfile.mkdtemp(dir=toy_root, prefix=".build-"))
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    try:
        os.rename(tmp, dest)
    except OSError:  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@pytest.fixture(scope="session")
def shared() -> Path:
    s = shared_dir()
    if s is None:
        pytest.skip("../shared (real data and models) is absent")
    return s


@pytest.fixture(scope="session")
def stories260k(shared) -> Path:
    p = shared / "models" / "stories260K"
    if not (p / "model.safetensors").exists():
        pytest.skip("stories260K is absent")
    return p


@pytest.fixture(scope="session")
def toy_task_dir(tmp_path_factory) -> Path:
    """A tiny multiple-choice task (`lmq_toy_mc`) over a jsonl written here: story cloze."""
    d = tmp_path_factory.mktemp("toy_task")
    r = random.Random(0)
    names = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna"]
    objs = ["ball", "kite", "box", "hat", "cake", "book"]
    with open(d / "data.jsonl", "w") as f:
        for _ in range(24):
            n, o = r.choice(names), r.choice(objs)
            wrong = r.choice([x for x in objs if x != o])
            f.write(json.dumps({
                "ctx": f"One day, {n} found a red {o} in the park. So {n} played with the red",
                "choices": [f" {o}", f" {wrong}"],
                "label": 0,
            }) + "\n")
    (d / "lmq_toy_mc.yaml").write_text(
        "task: lmq_toy_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {d / 'data.jsonl'}\n"
        "test_split: train\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return d

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


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    env = os.environ.get("LMQ_TOY_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("toy_models")


@pytest.fixture(scope="session")
def tiny_llama(toy_root) -> Path:
    """Random-init Llama: hidden 128 (so group 128 fits), 2 layers."""
    return cached_tiny_model(toy_root, arch="llama", hidden=128, layers=2, heads=4, intermediate=256)


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

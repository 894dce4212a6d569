"""Quantized-weights cache: hit, miss on every key change, corruption, concurrent writers,
interrupted writes, cache=false."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval_quant import cache as qc  # noqa: E402
from lm_eval_quant.methods import build_config, get_method  # noqa: E402
from lm_eval_quant.methods.base import QuantContext  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lm_eval_quant.toy import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("cache") / "llama", arch="llama", hidden=64, layers=2,
                           heads=4, train_steps=0, seed=0)


def _load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


class Counter:
    """quantize_fn that runs RTN and counts its calls."""

    def __init__(self, model, cfg):
        self.model, self.cfg, self.calls = model, cfg, 0

    def __call__(self):
        self.calls += 1
        return get_method(self.cfg.method).quantize(self.model, self.cfg, QuantContext(progress=False))


def _run(model_dir, cache_dir, cfg, enabled=True):
    m = _load(model_dir)
    fn = Counter(m, cfg)
    rep, hit = qc.load_or_quantize(m, cfg, qc.model_identity(str(model_dir), cache_dir=cache_dir), fn,
                                   cache_dir=cache_dir, enabled=enabled)
    return m, rep, hit, fn.calls


def _modified(m, rep):
    sd = dict(m.named_parameters())
    return {n: sd[n].detach().clone() for n in rep.modified}


# ------------------------------------------------------------------------------------------------
def test_hit_is_bit_identical_and_skips_quantize(model_dir, tmp_path):
    cfg = build_config(method="rtn", bits=4, group_size=32)
    m1, rep1, hit1, calls1 = _run(model_dir, tmp_path, cfg)
    assert (hit1, calls1) == (False, 1) and rep1.extra["cache"]["stored"] is True
    entries = list((tmp_path / "entries").iterdir())
    assert len(entries) == 1
    man = json.loads((entries[0] / "manifest.json").read_text())
    assert set(man["tensors"]) == set(rep1.modified) and len(rep1.modified) == 14
    assert man["fields"]["quant_config"] == cfg.to_dict() and man["fields"]["dtype"] == "float32"
    import xxhash

    data = (entries[0] / "tensors.safetensors").read_bytes()
    assert man["checksum"] == f"xxh3_128:{len(data)}:{xxhash.xxh3_128(data).hexdigest()}"
    assert man["manifest_checksum"] == qc.manifest_checksum(man)

    m2, rep2, hit2, calls2 = _run(model_dir, tmp_path, cfg)
    assert (hit2, calls2) == (True, 0)
    assert rep2.modified == rep1.modified and rep2.quantized == rep1.quantized
    a, b = _modified(m1, rep1), _modified(m2, rep2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the whole model computes the same logits
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    # unmodified parameters are the original ones
    orig = _load(model_dir)
    assert torch.equal(m2.model.embed_tokens.weight, orig.model.embed_tokens.weight)
    assert not torch.equal(m2.model.layers[0].mlp.up_proj.weight, orig.model.layers[0].mlp.up_proj.weight)


def test_cache_disabled(model_dir, tmp_path):
    cfg = build_config(method="rtn", bits=4, group_size=32)
    for _ in range(2):
        _, rep, hit, calls = _run(model_dir, tmp_path, cfg, enabled=False)
        assert (hit, calls) == (False, 1) and rep.extra["cache"]["enabled"] is False
    assert not (tmp_path / "entries").exists()


def test_miss_on_config_change_end_to_end(model_dir, tmp_path):
    base = dict(method="rtn", bits=4, group_size=32)
    _run(model_dir, tmp_path, build_config(**base))
    for change in (dict(bits=3), dict(group_size=64), dict(sym=True), dict(format="nf"), dict(skip="lm_head|down_proj")):
        _, _, hit, calls = _run(model_dir, tmp_path, build_config(**{**base, **change}))
        assert (hit, calls) == (False, 1), change
    assert len(list((tmp_path / "entries").iterdir())) == 6


def test_key_covers_every_field(model_dir, tmp_path):
    ident = qc.model_identity(str(model_dir), cache_dir=tmp_path)
    g = dict(method="gptq", bits=4, group_size=128, calib="c4", nsamples=128)
    key = lambda cfg, calib=None, dtype="float32", ident=ident: qc.cache_key(ident, cfg.to_dict(), calib, dtype)[0]
    k0 = key(build_config(**g))
    variants = [build_config(**{**g, "bits": 3}), build_config(**{**g, "group_size": 64}),
                build_config(**{**g, "sym": True}), build_config(**{**g, "format": "fp"}),
                build_config(**{**g, "damp": 0.1}), build_config(**{**g, "act_order": True}),
                build_config(**{**g, "calib_seed": 1}), build_config(**{**g, "nsamples": 64}),
                build_config(**{**g, "skip": "none"}), build_config(method="rtn", bits=4, group_size=128)]
    keys = {key(c) for c in variants}
    assert len(keys) == len(variants) and k0 not in keys
    assert key(build_config(**g), calib={"file_sha256": "x"}) != k0
    assert key(build_config(**g), dtype="bfloat16") != k0
    assert key(build_config(**g), ident={"hub": "a/b", "revision": "main", "commit": "1"}) != \
        key(build_config(**g), ident={"hub": "a/b", "revision": "main", "commit": "2"})
    assert key(build_config(**g)) == k0                        # deterministic


def test_model_weights_change_changes_identity(model_dir, tmp_path, monkeypatch):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    calls = []
    real = qc._xxh_file
    monkeypatch.setattr(qc, "_xxh_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    i1 = qc.model_identity(str(d), cache_dir=tmp_path)
    assert "model.safetensors" in calls and (tmp_path / "file_hashes.json").exists()
    calls.clear()
    assert qc.model_identity(str(d), cache_dir=tmp_path) == i1 and calls == []     # memoised
    # rewrite one byte of the weights (same size): identity must change
    p = d / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[-10] ^= 0x01
    time.sleep(0.01)
    p.write_bytes(bytes(b))
    i2 = qc.model_identity(str(d), cache_dir=tmp_path)
    assert i2 != i1 and calls == ["model.safetensors"]
    # and the end-to-end lookup misses
    cfg = build_config(method="rtn", bits=4, group_size=32)
    assert qc.cache_key(i1, cfg.to_dict(), None, "float32") != qc.cache_key(i2, cfg.to_dict(), None, "float32")


def test_hub_identity_uses_commit():
    i = qc.model_identity("some-org/some-model", "v1")
    assert i["hub"] == "some-org/some-model" and i["revision"] == "v1" and "commit" in i


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LMQ_CACHE_DIR", str(tmp_path / "x"))
    assert qc.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LMQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert qc.default_cache_dir() == tmp_path / "xdg" / "lm_eval_quant"


# ------------------------------------------------------------------------------------------------
def test_fast_checksum_detects_flips_and_swaps(tmp_path):
    p = tmp_path / "f.bin"
    data = bytearray(os.urandom(8 * 70_000 + 5))          # > one 65,536-word chunk, and a 5-byte tail
    p.write_bytes(bytes(data))
    c0 = qc.fast_checksum(p)
    assert c0 == qc.fast_checksum(p)
    for pos in (0, 7, 8 * 65_536 + 3, len(data) - 8 - 5, len(data) - 1):
        d = bytearray(data)
        d[pos] ^= 0x10
        p.write_bytes(bytes(d))
        assert qc.fast_checksum(p) != c0, pos
    d = bytearray(data)
    d[0:8], d[8 * 65_540:8 * 65_541] = data[8 * 65_540:8 * 65_541], data[0:8]   # swap two words
    p.write_bytes(bytes(d))
    assert data[0:8] == data[8 * 65_540:8 * 65_541] or qc.fast_checksum(p) != c0
    p.write_bytes(bytes(data[:-1]))
    assert qc.fast_checksum(p) != c0


def test_fast_checksum_detects_block_swap_inside_a_chunk(tmp_path):
    """The fault the old position-weighted sums missed: two 4 KiB blocks swapped inside one
    512 KiB chunk (same words, same chunk sums). A real hash sees it."""
    p = tmp_path / "f.bin"
    data = bytearray(os.urandom(1 << 20))
    p.write_bytes(bytes(data))
    c0 = qc.fast_checksum(p)
    d = bytearray(data)
    d[4096:8192], d[65536:69632] = data[65536:69632], data[4096:8192]
    p.write_bytes(bytes(d))
    assert qc.fast_checksum(p) != c0


def _entry(tmp_path):
    (e,) = list((tmp_path / "entries").iterdir())
    return e


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "delete_tensors"])
def test_corrupt_entry_is_reported_and_recomputed(model_dir, tmp_path, damage):
    cfg = build_config(method="rtn", bits=4, group_size=32)
    m1, rep1, _, _ = _run(model_dir, tmp_path, cfg)
    good = _modified(m1, rep1)
    e = _entry(tmp_path)
    t = e / "tensors.safetensors"
    if damage == "flip":
        b = bytearray(t.read_bytes())
        b[len(b) // 2] ^= 0x40
        t.write_bytes(bytes(b))
    elif damage == "truncate":
        t.write_bytes(t.read_bytes()[:-100])
    elif damage == "manifest":
        (e / "manifest.json").write_text("{not json")
    else:
        t.unlink()
    with pytest.warns(RuntimeWarning, match="corrupt") as rec:
        m2, rep2, hit, calls = _run(model_dir, tmp_path, cfg)
    assert (hit, calls) == (False, 1)
    msgs = [str(w.message) for w in rec if "corrupt" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    b2 = _modified(m2, rep2)
    assert all(torch.equal(good[k], b2[k]) for k in good)
    # the entry was replaced by a good one: next run hits without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m3, rep3, hit3, calls3 = _run(model_dir, tmp_path, cfg)
    assert (hit3, calls3) == (True, 0)
    assert all(torch.equal(good[k], v) for k, v in _modified(m3, rep3).items())


def test_manifest_edit_is_corrupt(model_dir, tmp_path):
    """A manifest that is still valid JSON but was changed (here: a wrong layer name) fails its
    own checksum: one warning, discarded, recomputed -- not a KeyError on every run."""
    cfg = build_config(method="rtn", bits=4, group_size=32)
    _run(model_dir, tmp_path, cfg)
    e = _entry(tmp_path)
    man = json.loads((e / "manifest.json").read_text())
    man["report"]["modified"][0] = "model.layers.0.mlp.nope.weight"
    (e / "manifest.json").write_text(json.dumps(man))
    with pytest.warns(RuntimeWarning, match="manifest checksum mismatch"):
        assert _run(model_dir, tmp_path, cfg)[2] is False
    assert _run(model_dir, tmp_path, cfg)[2] is True


def test_wrong_layer_with_valid_checksum_is_corrupt(model_dir, tmp_path):
    """Even a consistent entry that names a layer the model lacks is discarded, and the model is
    left untouched by the failed apply (the recomputed weights equal a fresh quantization)."""
    cfg = build_config(method="rtn", bits=4, group_size=32)
    m1, rep1, _, _ = _run(model_dir, tmp_path, cfg)
    good = _modified(m1, rep1)
    e = _entry(tmp_path)
    man = json.loads((e / "manifest.json").read_text())
    man["report"]["modified"].append("model.layers.9.mlp.up_proj.weight")
    man["manifest_checksum"] = qc.manifest_checksum(man)
    (e / "manifest.json").write_text(json.dumps(man))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        m2, rep2, hit, calls = _run(model_dir, tmp_path, cfg)
    assert (hit, calls) == (False, 1)
    assert all(torch.equal(good[k], v) for k, v in _modified(m2, rep2).items())
    assert _run(model_dir, tmp_path, cfg)[2] is True


def test_identity_covers_subfolder_peft_delta_gguf(tmp_path, model_dir):
    import shutil

    root = tmp_path / "repo"
    for sub in ("a", "b"):
        shutil.copytree(model_dir, root / sub)
    b = bytearray((root / "b" / "model.safetensors").read_bytes())
    b[-10] ^= 0x01
    (root / "b" / "model.safetensors").write_bytes(bytes(b))
    (root / "config.json").write_text("{}")
    ia = qc.model_identity(str(root), subfolder="a", cache_dir=tmp_path)
    ib = qc.model_identity(str(root), subfolder="b", cache_dir=tmp_path)
    assert ia != ib
    base = qc.model_identity(str(model_dir), cache_dir=tmp_path)
    assert qc.model_identity(str(model_dir), peft=str(root / "a"), cache_dir=tmp_path) != base
    assert qc.model_identity(str(model_dir), delta=str(root / "a"), cache_dir=tmp_path) != base
    assert qc.model_identity(str(model_dir), gguf_file="m.gguf", cache_dir=tmp_path) != base
    assert qc.model_identity(str(model_dir), cache_dir=tmp_path) == base


def test_inplace_rewrite_with_same_size_mtime_inode_misses(tmp_path, model_dir):
    """The memo is keyed by ctime too: restoring size, mtime and inode after a rewrite in place
    does not bring back the old hash."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    p = d / "model.safetensors"
    i1 = qc.model_identity(str(d), cache_dir=tmp_path)
    st = p.stat()
    b = bytearray(p.read_bytes())
    b[-10] ^= 0x01
    time.sleep(0.02)
    with open(p, "r+b") as f:           # same inode, same size
        f.write(bytes(b))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))   # same mtime
    assert p.stat().st_ino == st.st_ino and p.stat().st_mtime_ns == st.st_mtime_ns
    assert qc.model_identity(str(d), cache_dir=tmp_path) != i1


def test_unwritable_cache_dir_warns_and_continues(model_dir, tmp_path):
    """A cache folder that cannot be created or written (here below a plain file, which fails
    for root too; a read-only mount fails the same way): one warning, evaluation goes on."""
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "cache"
    cfg = build_config(method="rtn", bits=4, group_size=32)
    with pytest.warns(RuntimeWarning, match="cannot use"):
        _, rep, hit, calls = _run(model_dir, bad, cfg)
    assert (hit, calls) == (False, 1) and rep.extra["cache"]["stored"] is False


def test_store_failure_warns_and_continues(model_dir, tmp_path, monkeypatch):
    """A full disk shows up as an OSError or safetensors' own error while writing: one warning,
    the quantized model is still returned."""
    from safetensors import SafetensorError

    def boom(*a, **k):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    cfg = build_config(method="rtn", bits=4, group_size=32)
    with pytest.warns(RuntimeWarning, match="could not store"):
        _, rep, hit, calls = _run(model_dir, tmp_path, cfg)
    assert (hit, calls) == (False, 1) and rep.extra["cache"]["stored"] is False
    assert not (tmp_path / "entries").exists() or not any((tmp_path / "entries").iterdir())


def test_qstate_is_cached(model_dir, tmp_path):
    """A method's integer state (GPTQ keep_qstate) is stored as tensors and comes back on a hit."""
    cfg = build_config(method="rtn", bits=4, group_size=32)
    m = _load(model_dir)

    def fn():
        rep = get_method("rtn").quantize(m, cfg, QuantContext(progress=False))
        rep.extra["qstate"] = {"model.layers.0.mlp.up_proj": {"codes": torch.arange(6, dtype=torch.uint8),
                                                              "group_size": 32}}
        rep.extra["note"] = "hello"
        return rep

    ident = qc.model_identity(str(model_dir), cache_dir=tmp_path)
    qc.load_or_quantize(m, cfg, ident, fn, cache_dir=tmp_path)
    m2 = _load(model_dir)
    rep, hit = qc.load_or_quantize(m2, cfg, ident, lambda: pytest.fail("quantized again"), cache_dir=tmp_path)
    assert hit and rep.extra["note"] == "hello"
    st = rep.extra["qstate"]["model.layers.0.mlp.up_proj"]
    assert torch.equal(st["codes"], torch.arange(6, dtype=torch.uint8)) and st["group_size"] == 32


# ------------------------------------------------------------------------------------------------
# several processes
# ------------------------------------------------------------------------------------------------
WORKER = textwrap.dedent("""
    import hashlib, json, os, sys, time
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM
    from lm_eval_quant import cache as qc
    from lm_eval_quant.methods import build_config, get_method
    from lm_eval_quant.methods.base import QuantContext
    model_dir, cache_dir, out, go = sys.argv[1:5]
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = build_config(method="rtn", bits=3, group_size=32)
    ident = qc.model_identity(model_dir, cache_dir=cache_dir)
    open(out + ".ready", "w").write("")
    while not os.path.exists(go):          # start line: both processes are ready
        time.sleep(0.02)
    calls = []
    def fn():
        calls.append(1)
        open(out + ".quantizing", "w").write(str(os.getpid()))
        time.sleep(float(os.environ.get("WORKER_SLOW", "0")))
        return get_method("rtn").quantize(m, cfg, QuantContext(progress=False))
    rep, hit = qc.load_or_quantize(m, cfg, ident, fn, cache_dir=cache_dir)
    h = hashlib.sha256()
    sd = dict(m.named_parameters())
    for n in sorted(rep.modified):
        h.update(sd[n].detach().numpy().tobytes())
    json.dump({"hit": hit, "calls": len(calls), "sha": h.hexdigest()}, open(out, "w"))
""")


def _spawn(tmp_path, model_dir, cache_dir, tag, env_extra=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    out = tmp_path / f"{tag}.json"
    p = subprocess.Popen([sys.executable, str(script), str(model_dir), str(cache_dir), str(out), str(tmp_path / "go")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, out


@pytest.mark.slow
def test_two_concurrent_writers(model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    procs = [_spawn(tmp_path, model_dir, cache_dir, t, {"WORKER_SLOW": "3"}) for t in ("a", "b")]
    deadline = time.time() + 180
    while not all(Path(str(out) + ".ready").exists() for _, out in procs):
        assert time.time() < deadline and all(p.poll() is None for p, _ in procs), "workers did not start"
        time.sleep(0.05)
    (tmp_path / "go").write_text("")
    res = []
    for p, out in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        res.append(json.loads(out.read_text()))
    assert sorted(r["calls"] for r in res) == [0, 1]          # exactly one quantized
    assert sorted(r["hit"] for r in res) == [False, True]     # the other waited and hit
    assert res[0]["sha"] == res[1]["sha"]
    assert len(list((cache_dir / "entries").iterdir())) == 1
    assert not list((cache_dir / "tmp").glob("*.*.*")) if (cache_dir / "tmp").exists() else True


@pytest.mark.slow
def test_interrupted_write_leaves_no_entry(model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    p, out = _spawn(tmp_path, model_dir, cache_dir, "k", {qc._PAUSE_ENV: "120"})
    (tmp_path / "go").write_text("")
    deadline = time.time() + 180
    tmpdir = cache_dir / "tmp"
    while time.time() < deadline:   # wait until the writer has written everything but not published
        if tmpdir.exists() and any((d / "manifest.json").exists() for d in tmpdir.iterdir()):
            break
        assert p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.1)
    else:
        pytest.fail("writer never reached the publish step")
    assert not (cache_dir / "entries").exists() or not any((cache_dir / "entries").iterdir())
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert not (cache_dir / "entries").exists() or not any((cache_dir / "entries").iterdir())
    # a new run does not see a partial entry: it quantizes, publishes, and sweeps the leftovers
    cfg = build_config(method="rtn", bits=3, group_size=32)
    m, rep, hit, calls = _run(model_dir, cache_dir, cfg)
    assert (hit, calls) == (False, 1)
    assert len(list((cache_dir / "entries").iterdir())) == 1
    assert not list(tmpdir.iterdir())
    assert _run(model_dir, cache_dir, cfg)[2] is True


# ------------------------------------------------------------------------------------------------
def test_hf_quant_wrapper_hits_cache(model_dir, tmp_path, monkeypatch):
    """Through the lm-eval model: the second construction loads from the cache (RTN not run)."""
    import lm_eval_quant
    from lm_eval_quant.methods.rtn import RTN

    lm_eval_quant.register()
    from lm_eval_quant.models.hf_quant import HFQuantLM

    calls = []
    real = RTN.quantize
    monkeypatch.setattr(RTN, "quantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    kw = dict(pretrained=str(model_dir), device="cpu", batch_size=1, method="rtn", bits=4, group_size=32,
              cache_dir=str(tmp_path))
    lm1 = HFQuantLM(**kw)
    lm2 = HFQuantLM(**kw)
    assert calls == [1]
    assert lm2._lmq_report.extra["cache"]["hit"] is True
    info = lm2.get_model_info()["quantization"]
    assert info["method_report"]["cache"]["hit"] is True
    for n in lm1._lmq_report.modified:
        assert torch.equal(lm1.model.get_parameter(n), lm2.model.get_parameter(n))
    HFQuantLM(**kw, cache=False)
    assert calls == [1, 1]

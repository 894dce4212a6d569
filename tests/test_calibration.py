"""Calibration data: sources, GPTQ-style sampling, determinism, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval_quant.errors import QuantArgError  # noqa: E402
from lm_eval_quant.methods import calibration as cal  # noqa: E402
from lm_eval_quant.methods.calibration import get_calibration, model_max_seqlen, validate_calib_args  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class CharTok:
    """Character-level tokenizer (id = ord(c) % 251): windows can be checked against the text."""

    name_or_path = "chartok"

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=False, verbose=False):
        return {"input_ids": [[ord(c) % 251 for c in t] for t in texts]}


def ids_of(text: str) -> list[int]:
    return [ord(c) % 251 for c in text]


def contains(hay: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """The hub is unreachable here; make load_dataset fail at once, as offline."""
    import datasets

    def boom(*a, **k):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.delenv("LMQ_DATA_DIR", raising=False)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------------------------ sampling
def test_txt_windows_are_slices_of_the_text_and_deterministic(tmp_path):
    text = "".join(chr(97 + (i * 7 + i // 26) % 26) for i in range(5000))
    p = tmp_path / "c.txt"
    p.write_text(text)
    ids, info = get_calibration(CharTok(), str(p), nsamples=6, seqlen=64, seed=3)
    assert ids.shape == (6, 64) and ids.dtype == torch.long
    full = ids_of(text)
    for row in ids.tolist():
        assert contains(full, row)
    ids2, info2 = get_calibration(CharTok(), str(p), nsamples=6, seqlen=64, seed=3)
    assert torch.equal(ids, ids2) and info == info2
    ids3, _ = get_calibration(CharTok(), str(p), nsamples=6, seqlen=64, seed=4)
    assert not torch.equal(ids, ids3)
    assert info["source"] == "local" and info["origin"] == str(p.resolve())
    assert info["nsamples"] == 6 and info["seqlen"] == 64 and info["seed"] == 3 and len(info["sha256"]) == 64
    # a different file content -> a different identity
    p.write_text(text[::-1])
    _, info4 = get_calibration(CharTok(), str(p), nsamples=6, seqlen=64, seed=3)
    assert info4["sha256"] != info["sha256"]


def test_jsonl_long_documents_each_window_inside_one_long_doc(tmp_path):
    docs = ["short doc"] * 20 + ["L" + str(i) * 300 for i in range(3)]  # 3 docs of 301 chars
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": d, "url": "x"}) for d in docs) + "\n")
    ids, _ = get_calibration(CharTok(), str(p), nsamples=10, seqlen=100, seed=0)
    long_ids = [ids_of(d) for d in docs if len(d) >= 100]
    for row in ids.tolist():
        assert any(contains(d, row) for d in long_ids)
    # the random documents differ between samples (3 candidates, 10 draws)
    assert len({row[-1] for row in ids.tolist()}) > 1


def test_short_documents_are_concatenated(tmp_path):
    docs = [f"story {i} " * 3 for i in range(50)]  # all shorter than seqlen
    p = tmp_path / "c.json"
    p.write_text(json.dumps([{"text": d} for d in docs]))
    ids, _ = get_calibration(CharTok(), str(p), nsamples=5, seqlen=80, seed=1)
    joined = ids_of("\n\n".join(docs))
    assert ids.shape == (5, 80)
    for row in ids.tolist():
        assert contains(joined, row)


@pytest.mark.parametrize("payload", [["aaaa bbbb " * 20, "cccc " * 40], {"text": ["aaaa bbbb " * 20, "cc " * 40]}, "x y " * 60])
def test_json_layouts(tmp_path, payload):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(payload))
    ids, _ = get_calibration(CharTok(), str(p), nsamples=2, seqlen=50, seed=0)
    assert ids.shape == (2, 50)


def test_seqlen_clipped_to_model_max(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("abc " * 1000)
    ids, info = get_calibration(CharTok(), str(p), nsamples=2, seqlen=2048, seed=0, max_seqlen=128)
    assert ids.shape == (2, 128) and info["seqlen"] == 128 and info["seqlen_requested"] == 2048

    class C:
        max_position_embeddings = 512

    class G:
        n_positions = 1024

    assert model_max_seqlen(C()) == 512 and model_max_seqlen(G()) == 1024 and model_max_seqlen(object()) is None


# -------------------------------------------------------------------------------------- errors
def test_bad_args_one_line(tmp_path):
    with pytest.raises(QuantArgError) as e:
        validate_calib_args("c5", 128, 2048)
    assert "unknown calib set 'c5'" in one_line(e) and "wikitext2" in str(e.value)
    with pytest.raises(QuantArgError) as e:
        validate_calib_args(str(tmp_path / "missing.jsonl"), 128, 2048)
    assert "does not exist" in one_line(e)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(QuantArgError) as e:
        validate_calib_args(str(tmp_path / "x.csv"), 128, 2048)
    assert ".jsonl" in one_line(e)
    for n in (0, -3):
        with pytest.raises(QuantArgError) as e:
            validate_calib_args("c4", n, 2048)
        assert "nsamples" in one_line(e)
    with pytest.raises(QuantArgError) as e:
        validate_calib_args("c4", 128, 0)
    assert "seqlen" in one_line(e)
    validate_calib_args("C4", "16", "512", "1")  # strings from model_args are fine


def test_seqlen_longer_than_data_one_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("tiny text")
    with pytest.raises(QuantArgError) as e:
        get_calibration(CharTok(), str(p), nsamples=2, seqlen=100)
    assert "longer than all the calibration data" in one_line(e)


def test_bad_file_contents_one_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(QuantArgError) as e:
        get_calibration(CharTok(), str(p), nsamples=1, seqlen=2)
    assert "no string \"text\" field" in one_line(e)
    p.write_text('{"text": "ok"\n')
    with pytest.raises(QuantArgError) as e:
        get_calibration(CharTok(), str(p), nsamples=1, seqlen=2)
    assert "not valid jsonl" in one_line(e)


def test_named_set_offline_without_local_data_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cal, "local_data_dir", lambda explicit_only=False: None)
    with pytest.raises(QuantArgError) as e:
        get_calibration(CharTok(), "pile", nsamples=2, seqlen=16)
    msg = one_line(e)
    assert "calib=PATH" in msg and "LMQ_DATA_DIR" in msg and "pile" in msg


def test_lmq_data_dir_used_directly(tmp_path, monkeypatch):
    d = tmp_path / "data"
    (d / "c4").mkdir(parents=True)
    docs = ["doc %d " % i + "w" * 200 for i in range(5)]
    (d / "c4" / "c4_validation_2k.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    monkeypatch.setenv("LMQ_DATA_DIR", str(d))
    ids, info = get_calibration(CharTok(), "c4", nsamples=3, seqlen=64, seed=0)
    assert ids.shape == (3, 64) and info["source"] == "local" and info["calib"] == "c4"
    assert info["origin"].endswith("c4_validation_2k.jsonl")
    with pytest.raises(QuantArgError) as e:
        get_calibration(CharTok(), "wikitext2", nsamples=3, seqlen=64)
    assert "LMQ_DATA_DIR" in one_line(e) and "wikitext2/wiki.test.raw" in str(e.value)


def test_hf_source_used_when_available(monkeypatch):
    import datasets

    seen = {}

    def fake_load(path, **kw):
        seen["path"], seen["kw"] = path, kw
        return {"text": ["hello world " * 30, "x"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ids, info = get_calibration(CharTok(), "c4", nsamples=2, seqlen=32, seed=0)
    assert seen["path"] == "allenai/c4" and "en/c4-train.00000-of-01024.json.gz" in str(seen["kw"])
    assert info["source"] == "hf" and ids.shape == (2, 32)
    get_calibration(CharTok(), "pile", nsamples=1, seqlen=32)
    assert seen["path"] == "mit-han-lab/pile-val-backup" and seen["kw"]["split"] == "validation"
    get_calibration(CharTok(), "wikitext2", nsamples=1, seqlen=32)
    assert seen["kw"]["name"] == "wikitext-2-raw-v1" and seen["kw"]["split"] == "train"


@pytest.mark.skipif(not (SHARED / "data" / "c4").is_dir(), reason="needs ../shared/data")
def test_offline_fallback_to_shared_files():
    """The fast twin of the real-tokenizer test below: the same fallback to ../shared/data files,
    its warning and its determinism, with the character tokenizer."""
    with pytest.warns(UserWarning, match="local file"):
        ids, info = get_calibration(CharTok(), "c4", nsamples=4, seqlen=256, seed=0)
    assert ids.shape == (4, 256) and info["source"] == "local" and "c4_validation_2k" in info["origin"]
    with pytest.warns(UserWarning):
        ids2, info2 = get_calibration(CharTok(), "wikitext2", nsamples=4, seqlen=256, seed=0)
    assert info2["origin"].endswith("wiki.test.raw") and ids2.shape == (4, 256)
    with pytest.warns(UserWarning):
        ids3, _ = get_calibration(CharTok(), "c4", nsamples=4, seqlen=256, seed=0)
    assert torch.equal(ids, ids3)


@pytest.mark.slow  # issue 10: the real stories260K tokenizer over the real C4/WikiText files; the fixture-file fallback tests run fast
@pytest.mark.skipif(not (SHARED / "data" / "c4").is_dir(), reason="needs ../shared/data")
def test_offline_fallback_to_shared_files_with_real_tokenizer():
    from transformers import AutoTokenizer

    tok_dir = SHARED / "models" / "stories260K"
    tok = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.is_dir() else CharTok()
    with pytest.warns(UserWarning, match="local file"):
        ids, info = get_calibration(tok, "c4", nsamples=4, seqlen=256, seed=0)
    assert ids.shape == (4, 256) and info["source"] == "local" and "c4_validation_2k" in info["origin"]
    with pytest.warns(UserWarning):
        ids2, info2 = get_calibration(tok, "wikitext2", nsamples=4, seqlen=256, seed=0)
    assert info2["origin"].endswith("wiki.test.raw") and ids2.shape == (4, 256)
    with pytest.warns(UserWarning):
        ids3, _ = get_calibration(tok, "c4", nsamples=4, seqlen=256, seed=0)
    assert torch.equal(ids, ids3)

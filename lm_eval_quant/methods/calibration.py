"""Calibration data for GPTQ / AWQ: ``calib=c4|wikitext2|pile|PATH``, ``nsamples``, ``seqlen``, ``calib_seed``.

API
---
``validate_calib_args(calib, nsamples, seqlen, seed=0)`` -- cheap checks (no download, no model):
    raises :class:`QuantArgError` (one line) for an unknown set, a missing/unsupported file,
    ``nsamples <= 0`` or ``seqlen <= 0``.  Call it from ``Method.validate``.

``get_calibration(tokenizer, calib="c4", nsamples=128, seqlen=2048, seed=0, max_seqlen=None)``
    -> ``(input_ids: LongTensor [nsamples, seqlen], info: dict)``.
    ``max_seqlen`` (the model's maximum positions) clips ``seqlen``.  ``info`` identifies the data for
    cache keys and results metadata: ``{"calib", "source", "origin", "sha256", "nsamples", "seqlen",
    "seed"}`` where ``source`` is ``"hf"`` (public data set via ``datasets``) or ``"local"`` (a file)
    and ``origin`` names the data set or the file path.

``model_max_seqlen(model_or_config)`` -> int | None: the model's maximum positions.

Sources
-------
* ``c4``: ``allenai/c4``, ``en/c4-train.00000-of-01024.json.gz`` (the shard GPTQ samples from).
  Local fallback: ``<data>/c4/c4_validation_2k.jsonl``.
* ``wikitext2``: ``Salesforce/wikitext`` ``wikitext-2-raw-v1`` train.  Local fallback:
  ``<data>/wikitext2/wiki.test.raw`` (the test split: state it when comparing numbers).
* ``pile``: ``mit-han-lab/pile-val-backup`` validation (what AWQ uses).  No local fallback unless
  ``<data>/pile/val.jsonl`` exists.
* ``PATH``: a ``.txt`` (one text), ``.json`` (list of strings, list of {"text": ...}, or {"text": [...]})
  or ``.jsonl`` (one {"text": ...} per line) file.

``<data>`` is ``$LMQ_DATA_DIR`` when set (then the local file is used directly, no download is
tried), else the ``data`` folder of ``$LMQ_SHARED`` or of the ``shared`` folder beside the checkout
(used only when the download fails, e.g. offline).

Sampling (GPTQ style, deterministic for a seed): with ``random.Random(seed)``, pick random documents
that have at least ``seqlen`` tokens and take a random ``seqlen`` window of each.  When the corpus
has no document that long (short-document sets, or a single ``.txt``), the documents are joined
with ``"\\n\\n"``, tokenized once, and random windows are cut from the whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

from lm_eval_quant.errors import QuantArgError

__all__ = ["NAMED_SETS", "validate_calib_args", "get_calibration", "model_max_seqlen", "local_data_dir"]

# name -> (hf loader spec, local relative path)
NAMED_SETS: dict[str, dict[str, Any]] = {
    "c4": {
        "hf": dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"),
        "origin": "hf:allenai/c4 en/c4-train.00000-of-01024.json.gz",
        "local": "c4/c4_validation_2k.jsonl",
    },
    "wikitext2": {
        "hf": dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", split="train"),
        "origin": "hf:Salesforce/wikitext wikitext-2-raw-v1 train",
        "local": "wikitext2/wiki.test.raw",
    },
    "pile": {
        "hf": dict(path="mit-han-lab/pile-val-backup", split="validation"),
        "origin": "hf:mit-han-lab/pile-val-backup validation",
        "local": "pile/val.jsonl",
    },
}
_FILE_EXTS = (".txt", ".json", ".jsonl")
# Upper bound on nsamples: GPTQ/AWQ use 128 (papers go to 1024). Beyond this the run would spend
# hours and many GB on calibration alone (nsamples=1e9 ran 600 s and 4.5 GB before a timeout).
MAX_NSAMPLES = 65_536
# Upper bound on the calibration tokens held at once (nsamples × seqlen): 2^27 token ids are 1 GiB
# as int64 before any activations.
MAX_CALIB_TOKENS = 1 << 27
# above this many documents, do not tokenize the whole corpus up front (GPTQ-style lazy draw instead)
_EAGER_DOCS = 50_000


def local_data_dir(explicit_only: bool = False) -> Path | None:
    """``$LMQ_DATA_DIR``; unless ``explicit_only``, else ``$LMQ_SHARED/data`` or ``<checkout>/../shared/data``."""
    env = os.environ.get("LMQ_DATA_DIR")
    if env:
        return Path(env)
    if explicit_only:
        return None
    env = os.environ.get("LMQ_SHARED")
    cands = [Path(env) / "data"] if env else []
    cands.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    for c in cands:
        if c.is_dir():
            return c
    return None


def _is_named(calib: str) -> bool:
    return calib.lower() in NAMED_SETS


def validate_calib_args(calib: Any, nsamples: Any, seqlen: Any, seed: Any = 0) -> None:
    """One-line :class:`QuantArgError` for bad calibration args; cheap (no model, no download)."""
    if not isinstance(calib, (str, os.PathLike)) or not str(calib).strip():
        raise QuantArgError(f"hf-quant: calib={calib!r} is not valid: use c4, wikitext2, pile or a .txt/.json/.jsonl file path")
    calib = str(calib)
    try:
        nsamples_i = int(nsamples)
    except (TypeError, ValueError):
        raise QuantArgError(f"hf-quant: nsamples={nsamples!r} is not an integer; use e.g. nsamples=128") from None
    if nsamples_i <= 0 or nsamples_i != nsamples and not isinstance(nsamples, str):
        raise QuantArgError(f"hf-quant: nsamples={nsamples} must be a positive integer, e.g. nsamples=128")
    try:
        seqlen_i = int(seqlen)
    except (TypeError, ValueError):
        raise QuantArgError(f"hf-quant: seqlen={seqlen!r} is not an integer; use e.g. seqlen=2048") from None
    if seqlen_i <= 0:
        raise QuantArgError(f"hf-quant: seqlen={seqlen} must be a positive integer, e.g. seqlen=2048")
    if nsamples_i > MAX_NSAMPLES:
        raise QuantArgError(
            f"hf-quant: nsamples={nsamples_i} is far beyond what calibration needs (GPTQ/AWQ use 128); "
            f"use at most {MAX_NSAMPLES}"
        )
    if nsamples_i * seqlen_i > MAX_CALIB_TOKENS:
        raise QuantArgError(
            f"hf-quant: nsamples×seqlen = {nsamples_i}×{seqlen_i} = {nsamples_i * seqlen_i:,} calibration tokens "
            f"(≥ {nsamples_i * seqlen_i * 8 / 2**30:.1f} GiB of token ids alone); keep it under {MAX_CALIB_TOKENS:,}"
        )
    try:
        int(seed)
    except (TypeError, ValueError):
        raise QuantArgError(f"hf-quant: calib_seed={seed!r} is not an integer") from None
    if _is_named(calib):
        return
    p = Path(calib).expanduser()
    if p.suffix.lower() not in _FILE_EXTS:
        if not p.exists() and os.sep not in calib and "." not in calib:
            raise QuantArgError(
                f"hf-quant: unknown calib set {calib!r}: use one of {', '.join(NAMED_SETS)} or a path to a .txt/.json/.jsonl file"
            )
        raise QuantArgError(f"hf-quant: calib file {calib} must end in .txt, .json or .jsonl (json/jsonl: a \"text\" field)")
    if not p.is_file():
        raise QuantArgError(f"hf-quant: calib file {calib} does not exist; give an existing .txt/.json/.jsonl path or one of {', '.join(NAMED_SETS)}")
    check_utf8_text(p)


def check_utf8_text(p: Path) -> None:
    """One line unless `p` is UTF-8 text (no NUL bytes): a binary file would otherwise calibrate
    on garbage (.txt) or end in a UnicodeDecodeError traceback (.json/.jsonl). Streams the file."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    try:
        with open(p, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    dec.decode(b"", final=True)
                    break
                if b"\x00" in b:
                    raise QuantArgError(
                        f"hf-quant: calib file {p} is not UTF-8 text (a NUL byte at offset {pos + b.index(bytes(1))}); "
                        f"give a text file"
                    )
                dec.decode(b)
                pos += len(b)
    except UnicodeDecodeError as e:
        raise QuantArgError(
            f"hf-quant: calib file {p} is not UTF-8 text (invalid byte near offset {pos + e.start}); give a text file"
        ) from None
    except OSError as e:
        raise QuantArgError(f"hf-quant: calib file {p} cannot be read ({e.strerror or e})") from None


def model_max_seqlen(model_or_config: Any) -> int | None:
    """The model's maximum number of positions, read from its config (None when unknown)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ----------------------------------------------------------------------------------------- loading
def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_file(p: Path) -> list[str]:
    suf = p.suffix.lower()
    try:
        if suf in (".txt", ".raw"):
            return [p.read_text(encoding="utf-8")]
        if suf == ".jsonl":
            docs = []
            with open(p, encoding="utf-8") as f:
                for ln, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    obj = json.loads(line)
                    docs.append(_text_of(obj, p, ln))
            return docs
        if suf == ".json":
            obj = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(obj, dict) and "text" in obj:
                obj = obj["text"]
            if isinstance(obj, str):
                return [obj]
            if isinstance(obj, list):
                return [_text_of(o, p, i + 1) for i, o in enumerate(obj)]
            raise QuantArgError(f"hf-quant: calib file {p}: expected a list of texts or of objects with a \"text\" field")
    except json.JSONDecodeError as e:
        raise QuantArgError(f"hf-quant: calib file {p} is not valid {suf[1:]}: {e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError as e:
        raise QuantArgError(f"hf-quant: calib file {p} is not UTF-8 text (invalid byte near offset {e.start})") from None
    raise QuantArgError(f"hf-quant: calib file {p} must end in .txt, .json or .jsonl")


def _text_of(obj: Any, p: Path, where: int) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    raise QuantArgError(f"hf-quant: calib file {p}: entry {where} has no string \"text\" field")


def _load_named(name: str) -> tuple[Sequence[str], dict]:
    spec = NAMED_SETS[name]
    explicit = local_data_dir(explicit_only=True)
    if explicit is not None:
        p = explicit / spec["local"]
        if not p.is_file():
            raise QuantArgError(
                f"hf-quant: calib={name}: LMQ_DATA_DIR={explicit} has no {spec['local']}; add it, unset LMQ_DATA_DIR, or use calib=PATH"
            )
        return _read_file(p), {"source": "local", "origin": str(p), "sha256": _sha256_file(p)}
    err = None
    try:
        import datasets

        kw = dict(spec["hf"])
        path = kw.pop("path")
        ds = datasets.load_dataset(path, **kw)
        texts = ds["text"]
        return texts, {"source": "hf", "origin": spec["origin"], "sha256": None}
    except Exception as e:  # offline, hub unreachable, ...
        err = e
    data = local_data_dir()
    if data is not None and (data / spec["local"]).is_file():
        p = data / spec["local"]
        import warnings

        warnings.warn(f"calib={name}: the public data set could not be loaded ({type(err).__name__}); using the local file {p}")
        return _read_file(p), {"source": "local", "origin": str(p), "sha256": _sha256_file(p)}
    raise QuantArgError(
        f"hf-quant: calib={name}: cannot load {spec['origin'][3:]} ({type(err).__name__}, offline?); "
        f"use calib=PATH to a local .txt/.json/.jsonl file or set LMQ_DATA_DIR to a folder with {spec['local']}"
    )


# ---------------------------------------------------------------------------------------- sampling
def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [list(x) for x in enc["input_ids"]]


def _windows_from_stream(ids: list[int], nsamples: int, seqlen: int, rng: random.Random, what: str) -> list[list[int]]:
    if len(ids) < seqlen:
        raise QuantArgError(
            f"hf-quant: seqlen={seqlen} is longer than all the calibration data {what} ({len(ids)} tokens); use a smaller seqlen or more data"
        )
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, len(ids) - seqlen)
        out.append(ids[i : i + seqlen])
    return out


def _sample(tokenizer, docs: Sequence[str], nsamples: int, seqlen: int, seed: int, what: str) -> list[list[int]]:
    rng = random.Random(seed)
    n = len(docs)
    if n == 0:
        raise QuantArgError(f"hf-quant: the calibration data {what} is empty")
    if n <= _EAGER_DOCS:
        docs = [d for d in docs]
        toks = []
        for s in range(0, n, 1000):
            toks.extend(_encode(tokenizer, docs[s : s + 1000]))
        long_idx = [i for i, t in enumerate(toks) if len(t) >= seqlen]
        if long_idx:
            out = []
            for _ in range(nsamples):
                t = toks[long_idx[rng.randrange(len(long_idx))]]
                i = rng.randint(0, len(t) - seqlen)
                out.append(t[i : i + seqlen])
            return out
        joined = _encode(tokenizer, ["\n\n".join(docs)])[0] if n > 1 else toks[0]
        return _windows_from_stream(joined, nsamples, seqlen, rng, what)
    # big corpus (a C4 shard): GPTQ's lazy draw of random documents until one is long enough
    out, tries, limit = [], 0, 200 * nsamples + 1000
    while len(out) < nsamples:
        tries += 1
        if tries > limit:
            raise QuantArgError(
                f"hf-quant: seqlen={seqlen} is longer than nearly all documents of the calibration data {what}; use a smaller seqlen"
            )
        t = _encode(tokenizer, [docs[rng.randrange(n)]])[0]
        if len(t) >= seqlen:
            i = rng.randint(0, len(t) - seqlen)
            out.append(t[i : i + seqlen])
    return out


def get_calibration(tokenizer, calib: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                    max_seqlen: int | None = None):
    """Token windows for calibration: ``(LongTensor [nsamples, seqlen], info dict)`` (see module doc)."""
    import torch

    validate_calib_args(calib, nsamples, seqlen, seed)
    nsamples, seqlen, seed = int(nsamples), int(seqlen), int(seed)
    requested = seqlen
    if max_seqlen is not None and seqlen > int(max_seqlen):
        seqlen = int(max_seqlen)
        import sys
        import warnings

        msg = (f"hf-quant: warning: seqlen={requested} is above the model's maximum of {seqlen} positions; "
               f"calibrating with seqlen={seqlen}")
        warnings.warn(msg, UserWarning, stacklevel=2)
        print(msg, file=sys.stderr)
    calib = str(calib)
    if _is_named(calib):
        name = calib.lower()
        docs, meta = _load_named(name)
    else:
        p = Path(calib).expanduser().resolve()
        name = "file"
        docs = _read_file(p)
        meta = {"source": "local", "origin": str(p), "sha256": _sha256_file(p)}
    what = f"({meta['origin']})"
    windows = _sample(tokenizer, docs, nsamples, seqlen, seed, what)
    ids = torch.tensor(windows, dtype=torch.long)
    info = {"calib": name, **meta, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "tokenizer": getattr(tokenizer, "name_or_path", None)}
    if requested != seqlen:
        info["seqlen_requested"] = requested
    return ids, info

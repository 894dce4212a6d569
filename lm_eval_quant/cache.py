"""Quantized-weights cache: quantize a (model, config) once, reload it in every later evaluation.

    report, hit = load_or_quantize(model, cfg, model_identity(pretrained, revision, model),
                                   lambda: method.quantize(model, cfg, ctx),
                                   cache_dir=None, enabled=True, calib=calibration_identity(cfg, tok))

Key = sha256 of the canonical JSON of {model identity, cfg.to_dict() (options included), the
calibration identity, lm_eval_quant.__version__, the model's dtype, the cache format version}.
The model identity covers everything that is loaded: for a hub model the id + revision +
resolved commit, for a local folder an xxh3-128 hash of every weight/config/tokenizer file's
*contents* -- of the folder, of the ``subfolder=`` actually loaded, of a ``gguf_file=``, and of
the ``peft=`` adapter / ``delta=`` weights applied on top. File hashes are memoised per
(path, size, mtime_ns, ctime_ns, inode) in ``<cache_dir>/file_hashes.json``, so a 14 GB model
is hashed once, and any rewrite of a file is noticed (an in-place rewrite that restores size,
mtime and inode still moves the ctime).

``keep_qstate`` is not part of the key: it does not change the weights, and callers quantize
with it on (:func:`keep_state_config`) so that every entry holds codes and an export can reuse an
evaluation's entry.

Entry = ``<cache_dir>/entries/<key>/`` holding
  ``tensors.safetensors``  (never pickle) every quantized linear of ``report.modified`` as its
                            integer codes packed at ``bits`` per weight (the export's bit packing
                            on the flattened codes) + scale + zero + g_idx -- the method's kept
                            state, else recovered from the weights (export.recover_qstate) -- used
                            only when ``(code − zero)·scale`` rebuilds the weight bit for bit;
                            every other modified tensor at the checkpoint's storage dtype when
                            that is lossless, else as it is; plus a method's other ``qstate``;
  ``manifest.json``         key fields, the modified parameters' shapes/dtypes (``tensors``), the
                            file's tensors (``stored``), how each parameter is rebuilt
                            (``report.layout``), file size, the xxh3-128 of the tensors file, the
                            report (modified, seconds, the JSON-able part of extra), the creation
                            time, and an xxh3-128 of the manifest itself. Its mtime is the entry's
                            last use (set on every hit).

Size cap: after each write, entries are removed least recently used first until the cache is at
most ``$LMQ_CACHE_MAX_GB`` (default 20 GB); ``lm-eval-quant cache list|size|clean`` (cache_cli.py)
does the same by hand. An entry whose lock a process holds is never removed.

Writes go to ``<cache_dir>/tmp/<key>.<pid>.<random>/`` and are published with one
``os.rename`` of the folder, so a reader sees a complete entry or none (a process killed
mid-write leaves only a tmp folder, swept on a later write). A per-key file lock
(``<cache_dir>/locks/<key>.lock``, filelock) serialises writers and readers: when two processes
quantize the same config at once, the second waits for the first and then loads its entry.

Loads are verified: the manifest's own checksum, its key, the file size, and xxh3-128 over every
byte of the tensors file (a real hash, at memory speed: a changed, moved, swapped or truncated
byte range is detected). Any error while reading or applying an entry (a damaged manifest that
still parses, a wrong layer name, a shape mismatch) means corrupt: one warning line, the entry is
deleted and recomputed; the model is only changed once the whole entry has been checked.
Dense tensors are memory-mapped from the verified file, not copied; packed ones are rebuilt. A cache folder that is read-only
or full costs one warning: the evaluation goes on without storing (an existing entry is still
used when it can be read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("lm_eval_quant.cache")

CACHE_FORMAT = 3  # 2: xxh3-128 checksums; 3: quantized linears stored as packed codes + scales
MAX_GB_ENV = "LMQ_CACHE_MAX_GB"  # size cap of the whole cache (GB); least recently used entries go first
DEFAULT_MAX_GB = 20.0
_HASHED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken", ".py")
_QSTATE_PREFIX = "__qstate__."
_INT_PREFIX = "__int__."
_DENSE_PREFIX = "__dense__."
_PAUSE_ENV = "LMQ_CACHE_TEST_PAUSE_BEFORE_PUBLISH"  # tests only: seconds to sleep before the rename


class CacheCorrupt(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# locations
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$LMQ_CACHE_DIR``, else the user cache dir: ``$XDG_CACHE_HOME/lm_eval_quant`` or
    ``~/.cache/lm_eval_quant`` (Linux), ``~/Library/Caches/lm_eval_quant`` (macOS),
    ``%LOCALAPPDATA%\\lm_eval_quant\\Cache`` (Windows)."""
    env = os.environ.get("LMQ_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "lm_eval_quant" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "lm_eval_quant"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lm_eval_quant"


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------
def _sha256_file(p: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 24)
            if not b:
                break
            h.update(b)
            if progress is not None:
                progress.update(len(b))
    return h.hexdigest()


def _xxh_file(p: Path, progress=None) -> str:
    """xxh3-128 of a file's contents (every byte; GB/s, so model files are fingerprinted fast)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 24)
            if not b:
                break
            h.update(b)
            if progress is not None:
                progress.update(len(b))
    return "xxh3_128:" + h.hexdigest()


def _hash_files(files: list[Path], side_file: Path | None, base: Path | None = None) -> dict[str, str]:
    """Contents hash of each file, memoised in `side_file` by (realpath, size, mtime_ns, ctime_ns,
    inode): a file rewritten in place keeps size, mtime and inode only if someone set them back,
    and then its ctime still moved. Keys are paths relative to `base` (else names)."""
    from tqdm.auto import tqdm

    memo: dict[str, str] = {}
    if side_file is not None and side_file.exists():
        try:
            memo = json.loads(side_file.read_text())
        except (OSError, ValueError):
            memo = {}
        if not isinstance(memo, dict):
            memo = {}
    out: dict[str, str] = {}
    todo = []
    for p in files:
        st = p.stat()
        name = str(p.relative_to(base)) if base is not None else p.name
        mk = f"xxh3|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        if mk in memo:
            out[name] = memo[mk]
        else:
            todo.append((p, name, mk, st.st_size))
    if todo:
        total = sum(s for *_, s in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc="hf-quant cache: hashing model files",
                  disable=total < (256 << 20)) as bar:
            for p, name, mk, _ in todo:
                out[name] = memo[mk] = _xxh_file(p, bar)
        if side_file is not None:
            try:
                side_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = side_file.with_name(f"{side_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
                tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
                os.replace(tmp, side_file)
            except OSError as e:  # read-only / full cache: the memo is an optimisation only
                logger.debug("hf-quant cache: file-hash memo not written (%s)", e)
    return out


def _folder_identity(d: Path, side: Path, extra_files: list[Path] = ()) -> dict:
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES)
    files += [p for p in extra_files if p.is_file() and p not in files]
    return {"local": True, "files": _hash_files(files, side, base=d)}


def _source_identity(src: Any, revision: str | None, side: Path, subfolder: str = "",
                     gguf_file: str | None = None, model: Any = None) -> dict:
    """Identity of one thing that is loaded: a local folder (its files' contents; with
    `subfolder`, the files of that folder too; with `gguf_file`, that file) or a hub id."""
    p = Path(str(src)).expanduser()
    if p.is_dir():
        d = p.resolve()
        ident = _folder_identity(d, side)
        if subfolder:
            sub = (d / subfolder).resolve()
            ident["subfolder"] = str(subfolder)
            if sub.is_dir():
                extra = [sub / gguf_file] if gguf_file else []
                ident["subfolder_files"] = _folder_identity(sub, side, extra)["files"]
        if gguf_file:
            ident["gguf_file"] = str(gguf_file)
            g = (d / subfolder / gguf_file) if subfolder else d / gguf_file
            if g.is_file() and g.suffix not in _HASHED_SUFFIXES:
                ident["gguf"] = _hash_files([g], side)
        return ident
    commit = None
    if model is not None:
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if commit is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            c = try_to_load_from_cache(str(src), "config.json", revision=revision)
            if isinstance(c, str) and "/snapshots/" in c:
                commit = c.split("/snapshots/")[1].split("/")[0]
        except Exception as e:  # noqa: BLE001  (no hub cache: the id and revision still key it)
            logger.debug("hub commit lookup failed: %s", e)
            commit = None
    ident = {"hub": str(src), "revision": revision or "main", "commit": commit}
    if subfolder:
        ident["subfolder"] = str(subfolder)
    if gguf_file:
        ident["gguf_file"] = str(gguf_file)
    return ident


def model_identity(pretrained: Any, revision: str | None = None, model: Any = None,
                   cache_dir: str | os.PathLike | None = None, subfolder: str = "",
                   peft: str | None = None, delta: str | None = None, gguf_file: str | None = None) -> dict:
    """What identifies the weights that were quantized: everything that is loaded.

    Local folder → a contents hash (xxh3-128) of each weight / config / tokenizer file there,
    and of the `subfolder` and `gguf_file` actually loaded (memoised). Hub id → {"hub", "revision",
    "commit"} (+ subfolder / gguf_file). A PEFT adapter (`peft=`) or delta weights (`delta=`)
    applied on top are identified the same way. An in-memory model object (no path) → a sha256
    over its state_dict bytes.
    """
    side = Path(cache_dir or default_cache_dir()) / "file_hashes.json"
    if isinstance(pretrained, (str, os.PathLike)) and str(pretrained):
        ident = _source_identity(pretrained, revision, side, subfolder or "", gguf_file, model)
        if peft:
            ident["peft"] = _source_identity(peft, None, side)
        if delta:
            ident["delta"] = _source_identity(delta, None, side)
        return ident
    if model is not None:
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
        return {"state_sha256": h.hexdigest()}
    raise ValueError("model_identity needs a path, a hub id or a model")


def calibration_identity(cfg, tokenizer=None) -> dict | None:
    """The calibration inputs' identity for methods that use data (None for RTN): the calib
    options (name/path, nsamples, seqlen, seed) already in cfg, plus the contents hash of a local
    calibration file, the local data folder's named file, and the tokenizer's vocabulary size."""
    try:
        from .methods import get_method

        m = get_method(cfg.method)
    except Exception:
        return None
    if not getattr(m, "needs_calibration", False):
        return None
    opts = dict(cfg.options or {})
    ident: dict[str, Any] = {"options": {k: opts[k] for k in sorted(opts) if "calib" in k or k in ("nsamples", "seqlen")}}
    calib = opts.get("calib")
    if isinstance(calib, str):
        p = Path(calib).expanduser()
        if p.is_file():
            ident["file_sha256"] = _sha256_file(p)
        else:
            ident["data_dir"] = os.environ.get("LMQ_DATA_DIR")
    if tokenizer is not None:
        ident["tokenizer"] = {"name": getattr(tokenizer, "name_or_path", None),
                              "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None}
    return ident


def cache_key(identity: dict, cfg_dict: dict, calib: dict | None, dtype: str) -> tuple[str, dict]:
    from . import __version__

    cfg_dict = dict(cfg_dict)
    if isinstance(cfg_dict.get("options"), dict) and "keep_qstate" in cfg_dict["options"]:
        # keeping the integer state does not change the weights; every entry stores it anyway
        cfg_dict["options"] = {k: v for k, v in cfg_dict["options"].items() if k != "keep_qstate"}
    fields = {"model": identity, "quant_config": cfg_dict, "calibration": calib,
              "lm_eval_quant_version": __version__, "dtype": dtype, "cache_format": CACHE_FORMAT}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest(), fields


# ---------------------------------------------------------------------------------------------
# checksum
# ---------------------------------------------------------------------------------------------
def fast_checksum(path: str | os.PathLike) -> str:
    """xxh3-128 over every byte of a file (a real hash: any changed, moved, swapped or truncated
    byte range changes it), at memory speed; the file is memory-mapped, not copied."""
    import xxhash

    size = os.path.getsize(path)
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                h.update(mm)
    return f"xxh3_128:{size}:{h.hexdigest()}"


def manifest_checksum(man: dict) -> str:
    """xxh3-128 of the manifest's canonical JSON without its own checksum field."""
    import xxhash

    body = {k: v for k, v in man.items() if k != "manifest_checksum"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return "xxh3_128:" + xxhash.xxh3_128(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
def _dtype_name(model) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:  # pragma: no cover
        return "none"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    import torch

    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else f"<tensor {tuple(v.shape)}>"
    return str(v)


def _describe(tensors: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                "bytes": v.numel() * v.element_size()} for k, v in tensors.items()}


def _model_label(ident: Any) -> str:
    if not isinstance(ident, dict):
        return "?"
    if ident.get("hub"):
        return str(ident["hub"]) + (f"@{ident['revision']}" if ident.get("revision") not in (None, "main") else "")
    if ident.get("local"):
        files = ident.get("files") or {}
        h = next((v for k, v in sorted(files.items()) if k.endswith(".safetensors") or k.endswith(".bin")), None)
        return f"local folder ({str(h).split(':')[-1][:12] if h else 'no weights'})"
    if ident.get("state_sha256"):
        return f"in-memory model ({ident['state_sha256'][:12]})"
    return "?"


def max_cache_bytes() -> int | None:
    """The size cap: ``$LMQ_CACHE_MAX_GB`` (GB, 1e9 bytes; 0 or "none" = no cap), default 20 GB."""
    v = os.environ.get(MAX_GB_ENV, "").strip().lower()
    if v in ("none", "off", "inf", "0"):
        return None
    if not v:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        gb = float(v)
    except ValueError:
        logger.warning("hf-quant cache: %s=%r is not a number of GB; using %g", MAX_GB_ENV, v, DEFAULT_MAX_GB)
        return int(DEFAULT_MAX_GB * 1e9)
    return None if gb <= 0 else int(gb * 1e9)


class QuantCache:
    """The on-disk store. Most callers want :func:`load_or_quantize`."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    def lock(self, key: str):
        from filelock import FileLock

        d = self.root / "locks"
        d.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d / f"{key}.lock"))

    # -- read -----------------------------------------------------------------------------------
    def read(self, key: str) -> tuple[dict, dict]:
        """(manifest, tensors) of a verified entry; FileNotFoundError if absent, CacheCorrupt if bad."""
        from safetensors.torch import load_file

        d = self.entry_dir(key)
        mpath, tpath = d / "manifest.json", d / "tensors.safetensors"
        if not d.exists():
            raise FileNotFoundError(d)
        try:
            man = json.loads(mpath.read_text())
        except Exception as e:
            raise CacheCorrupt(f"unreadable manifest ({type(e).__name__})") from None
        if not isinstance(man, dict) or man.get("manifest_checksum") != manifest_checksum(man):
            raise CacheCorrupt("manifest checksum mismatch")
        if man.get("key") != key or man.get("cache_format") != CACHE_FORMAT:
            raise CacheCorrupt("manifest does not match its key")
        try:
            size = tpath.stat().st_size
        except OSError:
            raise CacheCorrupt("tensors file missing") from None
        if size != man.get("file_size"):
            raise CacheCorrupt(f"tensors file has {size} bytes, manifest says {man.get('file_size')}")
        if fast_checksum(tpath) != man.get("checksum"):
            raise CacheCorrupt("checksum mismatch")
        try:
            tensors = load_file(str(tpath))
        except Exception as e:
            raise CacheCorrupt(f"unreadable tensors ({type(e).__name__})") from None
        stored = man.get("stored")
        if not isinstance(stored, dict) or set(stored) != set(tensors):
            raise CacheCorrupt("the tensors file does not hold the tensors the manifest lists")
        for name, meta in stored.items():
            t = tensors[name]
            if list(t.shape) != meta["shape"] or str(t.dtype).replace("torch.", "") != meta["dtype"]:
                raise CacheCorrupt(f"tensor {name} has the wrong shape/dtype")
        return man, tensors

    def discard(self, key: str) -> None:
        d = self.entry_dir(key)
        if d.exists():
            trash = self.root / "tmp" / f"{key}.trash.{os.getpid()}.{secrets.token_hex(4)}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(d, trash)
            except OSError:
                trash = d
            shutil.rmtree(trash, ignore_errors=True)

    # -- write ----------------------------------------------------------------------------------
    def write(self, key: str, fields: dict, tensors: dict, report_info: dict,
              described: dict | None = None) -> Path:
        """Publish an entry atomically (call with the key's lock held). `tensors` are the file's
        tensors; `described` (default: the same) the modified parameters they decode to."""
        from safetensors.torch import save_file

        tmproot = self.root / "tmp"
        tmproot.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp(tmproot, key)
        tmp = tmproot / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            tpath = tmp / "tensors.safetensors"
            save_file(tensors, str(tpath), metadata={"lm_eval_quant_cache": str(CACHE_FORMAT)})
            with open(tpath, "rb+") as f:
                os.fsync(f.fileno())
            man = {
                "cache_format": CACHE_FORMAT,
                "key": key,
                "fields": fields,
                "tensors": described if described is not None else _describe(tensors),
                "stored": _describe(tensors),
                "file_size": tpath.stat().st_size,
                "checksum": fast_checksum(tpath),
                "report": report_info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "created_by_pid": os.getpid(),
            }
            man["manifest_checksum"] = manifest_checksum(man)
            mp = tmp / "manifest.json"
            mp.write_text(json.dumps(man, indent=1, sort_keys=True, default=str))
            with open(mp, "rb+") as f:
                os.fsync(f.fileno())
            pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
            if pause > 0:  # test hook: a window to kill -9 the writer before publishing
                time.sleep(pause)
            final = self.entry_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                self.discard(key)
            os.rename(tmp, final)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- housekeeping: list, last use, size cap ---------------------------------------------------
    def entries(self) -> list[dict]:
        """Every published entry: key, dir, size (bytes), last use and creation (epoch s), and
        what it holds (model, method, bits, group_size, format) read from its manifest."""
        out = []
        root = self.root / "entries"
        if not root.is_dir():
            return out
        for d in sorted(root.iterdir()):
            if not d.is_dir():
                continue
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            mp = d / "manifest.json"
            try:
                st = mp.stat()
                last, man = st.st_mtime, json.loads(mp.read_text())
            except (OSError, ValueError):
                last, man = d.stat().st_mtime, {}
            fields = man.get("fields") if isinstance(man, dict) else None
            fields = fields if isinstance(fields, dict) else {}
            qc = fields.get("quant_config") if isinstance(fields.get("quant_config"), dict) else {}
            out.append({"key": d.name, "dir": str(d), "size": size, "last_used": last,
                        "created": man.get("created") if isinstance(man, dict) else None,
                        "model": _model_label(fields.get("model")), "method": qc.get("method"),
                        "bits": qc.get("bits"), "group_size": qc.get("group_size"), "format": qc.get("format"),
                        "dtype": fields.get("dtype")})
        return out

    def touch(self, key: str) -> None:
        """Record a use (the manifest's mtime; its contents and checksum are unchanged)."""
        try:
            os.utime(self.entry_dir(key) / "manifest.json")
        except OSError as e:  # read-only cache: last use is only a hint for eviction
            logger.debug("hf-quant cache: cannot record last use of %s (%s)", key[:12], e)

    def remove(self, key: str) -> bool:
        """Delete an entry unless a process holds its lock (is reading or writing it)."""
        from filelock import Timeout

        lock = self.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            self.discard(key)
            return True
        finally:
            lock.release()

    def clean(self, older_than_days: float | None = None, max_bytes: int | None = None,
              keep: tuple[str, ...] = ()) -> list[dict]:
        """Remove entries unused for more than `older_than_days`, then least recently used ones
        until the total is at most `max_bytes`; never those in `keep`. Returns what was removed."""
        ents = sorted(self.entries(), key=lambda e: e["last_used"])
        removed = []
        if older_than_days is not None:
            cut = time.time() - float(older_than_days) * 86400
            for e in list(ents):
                if e["last_used"] < cut and e["key"] not in keep and self.remove(e["key"]):
                    removed.append(e)
                    ents.remove(e)
        if max_bytes is not None:
            total = sum(e["size"] for e in ents)
            for e in list(ents):
                if total <= max_bytes:
                    break
                if e["key"] in keep or not self.remove(e["key"]):
                    continue
                removed.append(e)
                total -= e["size"]
        return removed

    @staticmethod
    def _sweep_tmp(tmproot: Path, key: str) -> None:
        """Remove leftovers of writers of `key` that died (we hold the key's lock)."""
        for p in tmproot.glob(f"{key}.*"):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the function the model wrapper calls
# ---------------------------------------------------------------------------------------------
def _split_extra(extra: dict) -> tuple[dict, dict]:
    """(JSON-able extra without qstate, qstate tensors flattened for safetensors)."""
    import torch

    extra = dict(extra or {})
    qstate = extra.pop("qstate", None) or {}
    flat: dict[str, Any] = {}
    qmeta: dict[str, dict] = {}
    for lin, st in qstate.items():
        qmeta[lin] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                flat[f"{_QSTATE_PREFIX}{lin}.{k}"] = v.detach().cpu().contiguous()
            else:
                qmeta[lin][k] = _jsonable(v)
    return _jsonable(extra), {"tensors": flat, "meta": qmeta}


def _join_qstate(tensors: dict, qmeta: dict) -> dict:
    qstate: dict[str, dict] = {lin: dict(meta) for lin, meta in qmeta.items()}
    for k, v in tensors.items():
        if k.startswith(_QSTATE_PREFIX):
            lin, field = k[len(_QSTATE_PREFIX):].rsplit(".", 1)
            qstate.setdefault(lin, {})[field] = v
    return qstate


def _bits_equal(a, b) -> bool:
    """Same shape, dtype and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)) if a.numel() else True
    return torch.equal(a, b)


def _int_weight(codes, scale, zero, g_idx, dtype):
    """W[o, i] = (code − zero[o, g(i)]) · scale[o, g(i)], in float32 then cast: the int formats'
    own dequantization (formats.base.Format.fake), so a stored entry reproduces the weights bit
    for bit (checked when it is written)."""
    import torch

    out_f, in_f = codes.shape
    n_g = scale.shape[1]
    g = -(-in_f // n_g) if n_g else in_f
    if n_g and in_f == n_g * g and torch.equal(g_idx.long(), torch.arange(in_f) // g):
        # contiguous groups: broadcast per group instead of gathering (same values, elementwise)
        w = (codes.view(out_f, n_g, g).float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
        return w.view(out_f, in_f).to(dtype)
    gi = g_idx.long()
    return ((codes.float() - zero.float()[:, gi]) * scale.float()[:, gi]).to(dtype)


def _pack_codes(codes, bits: int):
    """uint8 codes (any shape) → int32 words: the export's bit packing on the flattened codes."""
    import torch

    from .export import pack_rows

    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 32
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return pack_rows(flat.view(-1, 1), bits).view(-1)


def _unpack_codes(words, bits: int, shape) -> Any:
    import math

    import torch

    from .export import unpack_rows

    n = math.prod(shape)
    flat = unpack_rows(words.view(-1, 1), bits, n + (-n) % 32, dtype=torch.uint8).view(-1)[:n]
    return flat.view(*shape)


def _encode_int(model, name: str, t, cfg, qstate: dict, q: dict) -> tuple[dict, dict] | None:
    """(file tensors, layout) storing quantized weight `name` as packed codes + scale + zero +
    g_idx, or None when that does not reproduce `t` bit for bit (not an int format, codes not
    recoverable, another dequantization order): the caller stores it densely then."""
    import torch

    from .errors import QuantArgError
    from .methods.base import is_conv1d

    if str(getattr(cfg, "format", "")) != "int" or not name.endswith(".weight") or t.dim() != 2:
        return None
    bits = int(cfg.bits)
    if not 1 <= bits <= 8:
        return None
    lin = name[: -len(".weight")]
    try:
        mod = model.get_submodule(lin)
    except AttributeError:
        return None
    transposed = is_conv1d(mod)
    W = t.t() if transposed else t
    qs = qstate.get(lin)
    fields = ("codes", "scale", "zero", "g_idx")
    from_method = (isinstance(qs, dict) and all(isinstance(qs.get(k), torch.Tensor) for k in fields)
                   and tuple(qs["codes"].shape) == tuple(W.shape) and not qs["codes"].is_floating_point())
    if from_method:
        codes, scale, zero, g_idx = (qs[k].detach().cpu() for k in fields)
    else:
        from .export import recover_qstate

        try:
            r = recover_qstate(W, bits, int(cfg.group_size), bool(cfg.sym), name=lin)
        except (QuantArgError, ValueError, RuntimeError):
            return None
        codes, scale, zero, g_idx = r["codes"], r["scale"], r["zero"], r["g_idx"]
    if int(codes.max()) >= (1 << bits) or int(codes.min()) < 0:
        return None
    try:
        if not _bits_equal(_int_weight(codes, scale, zero, g_idx, t.dtype), W.contiguous()):
            return None
    except (RuntimeError, IndexError):
        return None
    base = f"{_INT_PREFIX}{name}."
    files = {base + "codes": _pack_codes(codes, bits)}
    lay = {"enc": "int", "bits": bits, "shape": list(W.shape), "dtype": str(t.dtype).replace("torch.", ""),
           "transposed": bool(transposed), "codes": base + "codes"}
    s16 = scale.to(torch.float16)
    sc = s16 if _bits_equal(s16.to(scale.dtype), scale) else scale.float()
    in_range = bool(((zero >= 0) & (zero < 256)).all())
    zi = zero.to(torch.uint8)
    zz = zi if in_range and _bits_equal(zi.to(zero.dtype), zero) else zero.float()
    files.update({base + "scale": sc.contiguous(), base + "zero": zz.contiguous()})
    lay.update(scale=base + "scale", zero=base + "zero")
    if from_method:
        # the method's own state is stored once: its codes, scale and zero are the compact
        # tensors above and come back under their qstate names at their dtypes on a hit;
        # its g_idx (and perm) stay qstate tensors
        qk = f"{_QSTATE_PREFIX}{lin}."
        back = {}
        for f in ("codes", "scale", "zero"):
            q["tensors"].pop(qk + f, None)
            back[f] = [qk + f, str(qs[f].dtype).replace("torch.", "")]
        lay.update(g_idx=qk + "g_idx", qstate=back)
    else:
        files[base + "g_idx"] = g_idx.to(torch.int32).contiguous()
        lay["g_idx"] = base + "g_idx"
    return files, lay


def _encode(model, rep, cfg, storage_dtype=None) -> tuple[dict, dict, dict, dict]:
    """(file tensors, modified-parameter descriptions, layout, JSON-able report info) of a
    quantized model: quantized linears as packed codes, other modified tensors at the
    checkpoint's storage dtype when that is lossless, else as they are."""
    import torch

    from .accounting import as_dtype

    extra = getattr(rep, "extra", {}) or {}
    qstate = extra.get("qstate") or {}
    extra_json, q = _split_extra(extra)
    sd = dict(model.named_parameters(remove_duplicate=False))
    sd.update(dict(model.named_buffers(remove_duplicate=False)))
    sdt = as_dtype(storage_dtype)
    files: dict[str, Any] = {}
    layout: dict[str, dict] = {}
    described: dict[str, dict] = {}
    quantized = set(getattr(rep, "quantized", []) or [])
    for name in rep.modified:
        t = sd[name].detach().to("cpu").contiguous()
        described[name] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                           "bytes": t.numel() * t.element_size()}
        enc = None
        if cfg is not None and name[: -len(".weight")] in quantized:
            enc = _encode_int(model, name, t, cfg, qstate, q)
        if enc is not None:
            files.update(enc[0])
            layout[name] = enc[1]
            continue
        key = _DENSE_PREFIX + name
        if (sdt is not None and t.is_floating_point() and sdt != t.dtype
                and _bits_equal(t.to(sdt).to(t.dtype), t)):
            files[key] = t.to(sdt)
            layout[name] = {"enc": "cast", "key": key, "dtype": described[name]["dtype"]}
        else:
            files[key] = t
            layout[name] = {"enc": "dense", "key": key}
    files.update(q["tensors"])
    info = {"modified": list(rep.modified), "quantized": list(getattr(rep, "quantized", [])),
            "seconds": float(getattr(rep, "seconds", 0.0)), "extra": extra_json,
            "qstate_meta": q["meta"], "layout": layout}
    return _dedupe(files), described, layout, info


def _decode(man: dict, stored: dict) -> dict:
    """The modified parameters of an entry, rebuilt from its file tensors (and, for a method's
    kept state, its codes put back into `stored` under their qstate name)."""
    import torch

    layout = (man.get("report") or {}).get("layout")
    if not isinstance(layout, dict):
        raise CacheCorrupt("manifest has no tensor layout")
    out = {}
    for name, lay in layout.items():
        enc = lay.get("enc")
        if enc == "dense":
            out[name] = stored[lay["key"]]
        elif enc == "cast":
            out[name] = stored[lay["key"]].to(getattr(torch, lay["dtype"]))
        elif enc == "int":
            codes = _unpack_codes(stored[lay["codes"]], int(lay["bits"]), tuple(lay["shape"]))
            w = _int_weight(codes, stored[lay["scale"]], stored[lay["zero"]], stored[lay["g_idx"]],
                            getattr(torch, lay["dtype"]))
            out[name] = w.t().contiguous() if lay.get("transposed") else w
            parts = {"codes": codes, "scale": stored[lay["scale"]], "zero": stored[lay["zero"]]}
            for f, (k, dt) in (lay.get("qstate") or {}).items():
                stored[k] = parts[f].to(getattr(torch, dt))
        else:
            raise CacheCorrupt(f"unknown encoding {enc!r} for {name}")
        want = (man.get("tensors") or {}).get(name) or {}
        if list(out[name].shape) != want.get("shape") or str(out[name].dtype).replace("torch.", "") != want.get("dtype"):
            raise CacheCorrupt(f"{name} decodes to the wrong shape/dtype")
    return out


def _apply(model, man: dict, tensors: dict) -> None:
    """Point the model's modified parameters at the cached tensors (no copy on CPU). Every name,
    shape and dtype is checked before anything is changed, so a bad entry leaves the model as
    it was (CacheCorrupt) and can be recomputed."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    bufs = dict(model.named_buffers(remove_duplicate=False))
    modified = (man.get("report") or {}).get("modified")
    if not isinstance(modified, list):
        raise CacheCorrupt("manifest has no list of modified parameters")
    plan = []
    for name in modified:
        t = tensors.get(name) if isinstance(name, str) else None
        if t is None:
            raise CacheCorrupt(f"no cached tensor for {name!r}")
        p = params.get(name)
        if p is None and name in bufs:
            target = bufs[name]
        elif p is None:
            raise CacheCorrupt(f"the model has no parameter {name}")
        else:
            target = p
        if tuple(target.shape) != tuple(t.shape) or target.dtype != t.dtype:
            raise CacheCorrupt(f"{name}: cached {tuple(t.shape)} {t.dtype} vs model {tuple(target.shape)} {target.dtype}")
        plan.append((name, t, p))
    with torch.no_grad():
        for name, t, p in plan:
            if p is None:
                bufs[name].copy_(t)
                continue
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            shared = [n for n, q in params.items() if q is p and n != name]
            if shared:
                # tied to another parameter the method did not change: give this one its own
                new = torch.nn.Parameter(t.to(p.device), requires_grad=p.requires_grad)
                setattr(mod, attr, new)
                params[name] = new
                conf = getattr(model, "config", None)
                if getattr(conf, "tie_word_embeddings", False):
                    conf.tie_word_embeddings = False  # as the method's untie did on the miss
            else:
                p.data = t if p.device.type == "cpu" else t.to(p.device)


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    logger.warning(msg)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def keep_state_config(cfg, method) -> tuple[Any, bool]:
    """(config to quantize with, forced): the method keeps its integer state (``keep_qstate``,
    when it declares that option) so the cache can store codes instead of weights and an export
    can reuse the entry; `forced` says the caller did not ask for it (pass it to
    :func:`load_or_quantize` as ``drop_qstate`` so the report stays as it would have been)."""
    import dataclasses

    opts = dict(getattr(cfg, "options", None) or {})
    if "keep_qstate" not in (getattr(method, "OPTIONS", None) or {}) or opts.get("keep_qstate") not in (None, False):
        return cfg, False
    opts["keep_qstate"] = True
    return dataclasses.replace(cfg, options=opts), True


def load_or_quantize(model, cfg, identity: dict, quantize_fn: Callable[[], Any],
                     cache_dir: str | os.PathLike | None = None, enabled: bool = True,
                     calib: dict | None = None, storage_dtype: Any = None,
                     drop_qstate: bool = False) -> tuple[Any, bool]:
    """Return (QuantReport, hit). On a hit the model's modified parameters are replaced by the
    cached ones and `quantize_fn` is not called; on a miss `quantize_fn()` runs (it quantizes the
    model in place and returns its QuantReport) and the result is stored. With
    ``enabled=False`` this is just ``(quantize_fn(), False)``.

    ``report.extra["cache"]`` says what happened: {"hit", "key", "dir"}. `storage_dtype` (the
    checkpoint's dtype) is what tensors that are not stored as codes are kept at when that is
    lossless. ``drop_qstate``: remove ``extra["qstate"]`` from the report returned (it was kept
    for the cache only, see :func:`keep_state_config`). After a write the cache is trimmed to
    its size cap (:func:`max_cache_bytes`), least recently used entries first.
    """
    if not enabled:
        rep = quantize_fn()
        _set_cache_info(rep, {"hit": False, "enabled": False})
        return _drop(rep, drop_qstate), False
    store = QuantCache(cache_dir)
    key, fields = cache_key(identity, cfg.to_dict(), calib, _dtype_name(model))
    from filelock import Timeout

    try:
        lock = store.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.warning("hf-quant cache: another process is quantizing this config; waiting for it (%s)", key[:12])
            print(f"hf-quant cache: waiting for another process quantizing the same config ({key[:12]})",
                  file=sys.stderr)
            lock.acquire()
    except OSError as e:  # read-only or full cache folder: no lock, no store; a hit is still used
        _warn(f"hf-quant cache: cannot use {store.root} ({_one_line(e)}); continuing without storing in the cache")
        hit = _try_hit(store, key, model, discard=False)
        if hit is not None:
            return _drop(hit, drop_qstate), True
        rep = quantize_fn()
        _set_cache_info(rep, {"hit": False, "key": key, "stored": False})
        return _drop(rep, drop_qstate), False
    try:
        hit = _try_hit(store, key, model, discard=True)
        if hit is not None:
            return _drop(hit, drop_qstate), True
        rep = quantize_fn()
        try:
            files, described, _layout, info = _encode(model, rep, cfg, storage_dtype)
            d = store.write(key, fields, files, info, described=described)
            _set_cache_info(rep, {"hit": False, "key": key, "dir": str(d), "stored": True})
            _enforce_cap(store, key)
        except Exception as e:  # noqa: BLE001  (no space, read-only, safetensors' own errors: keep going)
            _warn(f"hf-quant cache: could not store the quantized weights in {store.root} ({_one_line(e)}); "
                  f"continuing without cache")
            _set_cache_info(rep, {"hit": False, "key": key, "stored": False})
        return _drop(rep, drop_qstate), False
    finally:
        lock.release()


def _drop(rep, drop: bool):
    if drop and isinstance(getattr(rep, "extra", None), dict):
        rep.extra.pop("qstate", None)
    return rep


def _enforce_cap(store: "QuantCache", key: str) -> None:
    cap = max_cache_bytes()
    if cap is None:
        return
    try:
        removed = store.clean(max_bytes=cap, keep=(key,))
    except OSError as e:
        logger.warning("hf-quant cache: size cap not enforced (%s)", _one_line(e))
        return
    if removed:
        freed = sum(e["size"] for e in removed)
        msg = (f"hf-quant cache: removed {len(removed)} least recently used entr{'y' if len(removed) == 1 else 'ies'} "
               f"({freed / 1e9:.2f} GB) to stay under the {cap / 1e9:g} GB cap ({MAX_GB_ENV})")
        logger.info(msg)
        print(msg, file=sys.stderr)


def _try_hit(store: "QuantCache", key: str, model, discard: bool):
    """The report of a verified entry applied to `model`, or None (absent, or corrupt: one
    warning, discarded when `discard`). Any error while reading or applying means corrupt."""
    try:
        man, stored = store.read(key)
        tensors = _decode(man, stored)
        _apply(model, man, tensors)
        rep = _report_from_manifest(man, stored)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001  (CacheCorrupt, or anything a damaged entry provokes)
        why = str(e) if isinstance(e, CacheCorrupt) else _one_line(e)
        what = "discarding it and re-quantizing" if discard else "re-quantizing"
        _warn(f"hf-quant cache: entry {store.entry_dir(key)} is corrupt ({why}); {what}")
        if discard:
            try:
                store.discard(key)
            except OSError as e2:
                logger.warning("hf-quant cache: could not remove %s (%s)", store.entry_dir(key), e2)
        return None
    store.touch(key)
    _set_cache_info(rep, {"hit": True, "key": key, "dir": str(store.entry_dir(key))})
    return rep


def _dedupe(tensors: dict) -> dict:
    """safetensors refuses tensors sharing memory: clone any that alias an earlier one."""
    seen = set()
    out = {}
    for k, v in tensors.items():
        ptr = (v.data_ptr(), v.numel(), v.dtype) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def _report_from_manifest(man: dict, tensors: dict):
    from .methods.base import QuantReport

    r = man["report"]
    extra = dict(r.get("extra") or {})
    qstate = _join_qstate(tensors, r.get("qstate_meta") or {})
    if qstate:
        extra["qstate"] = qstate
    rep = QuantReport(quantized=list(r.get("quantized", [])), modified=list(r["modified"]),
                      seconds=float(r.get("seconds", 0.0)), extra=extra)
    return rep


def _set_cache_info(rep, info: dict) -> None:
    extra = getattr(rep, "extra", None)
    if isinstance(extra, dict):
        extra["cache"] = info

"""Paper-comparable perplexity tasks ``wikitext2_gptq`` and ``c4_gptq`` (the GPTQ/AWQ protocol).

Protocol (what the GPTQ and AWQ papers report):

* **wikitext2_gptq** — the WikiText-2 raw *test* rows joined with ``"\\n\\n"``, tokenized ONCE with
  the model's tokenizer (``tokenizer(text)``, i.e. with its special tokens: Llama gets one BOS at
  the very start), cut into disjoint windows of ``seqlen`` tokens, the tail dropped.
* **c4_gptq** — GPTQ's ``c4-new`` evaluation (the one used for LLaMA in the GPTQ code and by AWQ):
  the first 1100 documents of the C4 English validation shard ``en/c4-validation.00000-of-00008``
  joined with ``" "``, tokenized once, the first ``256 * seqlen`` tokens kept and cut into 256
  disjoint windows.  With the local 2,000-document subset (``$LMQ_DATA_DIR/c4/c4_validation_2k.jsonl``)
  the first 1100 documents of *that file* are used: the number is C4-like but NOT the exact shard
  the papers use (the task says so in a warning).  If the text holds fewer than 256 windows, all
  complete windows are used (also warned).
* Perplexity = ``exp(mean NLL)`` over every token of every window except the window's first, each
  predicted from the tokens before it *in its window*.  Reported as ``token_perplexity`` (lower is
  better); ``word_perplexity`` and ``byte_perplexity`` use the same summed log-likelihood divided by
  the words / UTF-8 bytes of the decoded predicted tokens.

``seqlen`` defaults to 2048, clipped to the model's maximum length (``max_length`` in model_args,
else the config's ``n_positions``/``max_position_embeddings``/``n_ctx``, as lm-eval's HFLM does).
Options come through lm-eval's task metadata (``--metadata '{"ppl_seqlen": 512}'``; the CLI also
merges ``--model_args`` into it, which is how the task learns ``pretrained``/``tokenizer``):
``ppl_seqlen``, ``ppl_windows`` (c4 only, default 256).  Keys are prefixed so that a quantization
method's own ``seqlen`` (calibration length) in model_args does not change the evaluation.

How the exact token windows reach the model through the stock evaluator
------------------------------------------------------------------------
lm-eval tasks hand the model *strings*; re-tokenizing a decoded window does not give the same ids
in general (SentencePiece dummy prefix, windows that start inside a word, special tokens).  Each
request is therefore a ``loglikelihood`` request whose context and continuation are
:class:`TokenText` strings: ``str`` subclasses that carry their exact token ids (the context is the
window's first token, the continuation the rest).  :func:`install_token_text_support` wraps
``lm_eval.models.huggingface.HFLM.tok_encode`` once so that a ``TokenText`` encodes to its carried
ids (every other string goes through unchanged).  ``--model hf`` and ``--model hf-quant`` (an HFLM
subclass) both tokenize through that method, so the model scores exactly ``window[1:]`` given
``window[:-1]``: the GPTQ number.  Other lm-eval backends would see only the decoded text (an
approximation); they are not supported by these tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

log = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048
C4_DOCS = 1100
C4_WINDOWS = 256
_HF_DEFAULT_MAX_LENGTH = 2048  # lm-eval HFLM._DEFAULT_MAX_LENGTH
_HUGE = 1_000_000_000_000_000_019_884_624_838_656  # transformers' "no limit" model_max_length


def _error(msg: str) -> Exception:
    try:
        from lm_eval_quant.errors import QuantArgError

        return QuantArgError(msg)
    except Exception:  # pragma: no cover - package always importable in practice
        return ValueError(" ".join(msg.split()))


# ----------------------------------------------------------------------------- token-carrying text
class TokenText(str):
    """A string that stands for an exact list of token ids.

    ``str(t)`` is the decoded text (for logs and samples); ``t.ids`` (attribute ``lmq_token_ids``) the ids the model must see.
    Concatenating two TokenTexts concatenates the ids; ``rstrip`` returns the text unchanged
    (lm-eval moves trailing spaces of a context into the continuation, which would split the ids).
    """

    lmq_token_ids: tuple[int, ...]

    def __new__(cls, text: str, ids):
        obj = str.__new__(cls, text)
        obj.lmq_token_ids = tuple(int(i) for i in ids)
        return obj

    @property
    def ids(self) -> tuple[int, ...]:
        return self.lmq_token_ids

    def __add__(self, other):
        other_ids = getattr(other, "lmq_token_ids", None)
        if other_ids is not None:
            return TokenText(str.__add__(self, other), self.lmq_token_ids + tuple(other_ids))
        return str.__add__(self, other)

    def rstrip(self, chars=None):  # noqa: D102 - atomic: see class docstring
        return self

    def __reduce__(self):  # pickle (lm-eval's request cache) keeps the ids
        return (TokenText, (str(self), self.lmq_token_ids))


def install_token_text_support() -> None:
    """Make lm-eval's HF backend encode a :class:`TokenText` to its carried ids. Idempotent."""
    from lm_eval.models.huggingface import HFLM

    orig = HFLM.tok_encode
    if getattr(orig, "_lmq_token_text", False):
        return

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        # duck-typed: lm-eval may import this file more than once (as different module objects)
        ids = getattr(string, "lmq_token_ids", None) if isinstance(string, str) else None
        if ids is not None:
            ids = list(ids)
            return ids[-left_truncate_len:] if left_truncate_len else ids
        return orig(
            self, string, add_special_tokens=add_special_tokens,
            left_truncate_len=left_truncate_len, **kwargs,
        )

    tok_encode._lmq_token_text = True  # type: ignore[attr-defined]
    tok_encode.__wrapped__ = orig  # type: ignore[attr-defined]
    tok_encode.__doc__ = orig.__doc__
    HFLM.tok_encode = tok_encode


install_token_text_support()


# ----------------------------------------------------------------------------- data
def _data_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("LMQ_DATA_DIR")
    if env:
        dirs.append(Path(env))
    return dirs


def _shared_data_dir() -> Path | None:
    """``$LMQ_SHARED/data``, else a ``shared/data`` beside a folder above this file (the checkout's
    ``../shared``). Plain paths: shipped task code never imports the test-fixture module ``toy``."""
    env = os.environ.get("LMQ_SHARED")
    if env and (Path(env) / "data").is_dir():
        return Path(env) / "data"
    here = Path(__file__).resolve()
    for up in here.parents:
        cand = up.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def _wikitext_rows_local(root: Path) -> list[str] | None:
    d = root / "wikitext2"
    f = d / "wikitext-2-raw-v1.test.rows.json"
    if f.is_file():
        rows = json.loads(f.read_text(encoding="utf-8"))
        return [r["text"] if isinstance(r, dict) else r for r in rows]
    f = d / "wiki.test.raw"
    if f.is_file():  # the HF dataset's rows are the raw file's lines, blank ones as ""
        with open(f, encoding="utf-8") as fh:
            return [line if line.strip() else "" for line in fh]
    return None


def wikitext2_text() -> str:
    """WikiText-2 raw test rows joined with "\\n\\n" (GPTQ protocol)."""
    for root in _data_dirs():
        rows = _wikitext_rows_local(root)
        if rows is not None:
            return "\n\n".join(rows)
        f = root / "wikitext2" / "wikitext2_test_joined_gptq_style.txt"
        if f.is_file():  # text mode: universal newlines (the copy may have CRLF)
            return f.read_text(encoding="utf-8")
        raise _error(
            f"wikitext2_gptq: LMQ_DATA_DIR={root} has no wikitext2/wikitext-2-raw-v1.test.rows.json, "
            "wikitext2/wiki.test.raw or wikitext2/wikitext2_test_joined_gptq_style.txt"
        )
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(ds["text"])
    except Exception as exc:  # offline / hub unreachable
        shared = _shared_data_dir()
        if shared is not None and (rows := _wikitext_rows_local(shared)) is not None:
            log.warning("wikitext2_gptq: hub dataset unavailable; using the local copy in %s", shared)
            return "\n\n".join(rows)
        raise _error(
            "wikitext2_gptq: cannot load the dataset wikitext/wikitext-2-raw-v1 (test) "
            f"({type(exc).__name__}); offline, set LMQ_DATA_DIR to a folder holding "
            "wikitext2/wiki.test.raw (or wikitext2/wikitext-2-raw-v1.test.rows.json)"
        ) from None


def _c4_docs_local(root: Path) -> list[str] | None:
    d = root / "c4"
    if not d.is_dir():
        return None
    files = sorted(d.glob("*.jsonl")) + sorted(d.glob("*.json"))
    if not files:
        return None
    docs: list[str] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            if f.suffix == ".json":
                data = json.load(fh)
                docs += [r["text"] if isinstance(r, dict) else r for r in data]
            else:
                docs += [json.loads(line)["text"] for line in fh if line.strip()]
        if len(docs) >= C4_DOCS:
            break
    return docs


def c4_text() -> tuple[str, bool]:
    """First 1100 C4 validation documents joined with " ". Returns (text, exact_shard)."""
    for root in _data_dirs():
        docs = _c4_docs_local(root)
        if docs is None:
            raise _error(f"c4_gptq: LMQ_DATA_DIR={root} has no c4/*.jsonl (objects with a 'text' field)")
        return " ".join(docs[:C4_DOCS]), False
    try:
        import datasets

        ds = datasets.load_dataset(
            "allenai/c4",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation",
        )
        return " ".join(ds[:C4_DOCS]["text"]), True
    except Exception as exc:
        shared = _shared_data_dir()
        if shared is not None and (docs := _c4_docs_local(shared)) is not None:
            log.warning("c4_gptq: hub dataset unavailable; using the local copy in %s", shared)
            return " ".join(docs[:C4_DOCS]), False
        raise _error(
            "c4_gptq: cannot load allenai/c4 en/c4-validation.00000-of-00008.json.gz "
            f"({type(exc).__name__}); offline, set LMQ_DATA_DIR to a folder holding "
            "c4/c4_validation_2k.jsonl (json lines with a 'text' field)"
        ) from None


# ----------------------------------------------------------------------------- tokenizer / length
def _model_ref(meta: dict) -> tuple[Any, dict]:
    ref = meta.get("tokenizer") or meta.get("pretrained")
    if ref is None:
        raise _error(
            "wikitext2_gptq/c4_gptq: the task needs the model's tokenizer: pass pretrained=... "
            "(or tokenizer=...) in --model_args, or --metadata '{\"pretrained\": ...}'"
        )
    kw = {}
    if meta.get("revision"):
        kw["revision"] = meta["revision"]
    if str(meta.get("trust_remote_code", "")).lower() in ("true", "1"):
        kw["trust_remote_code"] = True
    return ref, kw


def load_tokenizer(meta: dict):
    import transformers

    ref, kw = _model_ref(meta)
    if not isinstance(ref, str) and hasattr(ref, "encode"):
        return ref  # a tokenizer object passed through the python API
    if not isinstance(ref, str):
        ref = getattr(getattr(ref, "config", None), "name_or_path", None) or ref
    use_fast = str(meta.get("use_fast_tokenizer", True)).lower() not in ("false", "0")
    return transformers.AutoTokenizer.from_pretrained(ref, use_fast=use_fast, **kw)


def model_max_length(meta: dict, tokenizer) -> int:
    """The model's maximum length as lm-eval's HFLM computes it."""
    if meta.get("max_length"):
        return int(meta["max_length"])
    ref = meta.get("pretrained")
    cfg = None
    try:
        if isinstance(ref, str):
            import transformers

            _, kw = _model_ref(meta)
            cfg = transformers.AutoConfig.from_pretrained(ref, **kw)
        elif ref is not None:
            cfg = getattr(ref, "config", None)
    except Exception:
        cfg = None
    if cfg is not None:
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
    mml = getattr(tokenizer, "model_max_length", None)
    if mml and mml != _HUGE and mml < 10**9:
        return int(mml)
    return _HF_DEFAULT_MAX_LENGTH


def encode_once(tokenizer, text: str) -> list[int]:
    """Tokenize the whole text at once, with the tokenizer's special tokens (GPTQ: tokenizer(text))."""
    old = getattr(tokenizer, "model_max_length", None)
    try:
        if old is not None:
            tokenizer.model_max_length = _HUGE  # no "sequence too long" warning
        return list(tokenizer(text)["input_ids"])
    finally:
        if old is not None:
            tokenizer.model_max_length = old


def make_windows(ids: list[int], seqlen: int, max_windows: int | None = None) -> list[list[int]]:
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


def build_docs(name: str, meta: dict) -> list[dict]:
    """The task's documents: one per window, with the exact token ids."""
    seqlen_req = int(meta.get("ppl_seqlen") or DEFAULT_SEQLEN)
    if seqlen_req < 2:
        raise _error(f"{name}: ppl_seqlen={seqlen_req} must be at least 2")
    tok = load_tokenizer(meta)
    seqlen = min(seqlen_req, model_max_length(meta, tok))
    if seqlen != seqlen_req:
        log.warning("%s: seqlen %d clipped to the model's maximum length %d", name, seqlen_req, seqlen)
    if name.startswith("wikitext2"):
        ids = encode_once(tok, wikitext2_text())
        windows = make_windows(ids, seqlen)
    else:
        n_win = int(meta.get("ppl_windows") or C4_WINDOWS)
        text, exact = c4_text()
        if not exact:
            log.warning(
                "c4_gptq: using a local C4 validation subset, not the exact shard "
                "en/c4-validation.00000-of-00008 the GPTQ/AWQ papers use"
            )
        ids = encode_once(tok, text)[: n_win * seqlen]
        windows = make_windows(ids, seqlen, n_win)
        if len(windows) < n_win:
            log.warning("c4_gptq: the text holds only %d windows of %d tokens (wanted %d)",
                        len(windows), seqlen, n_win)
    if not windows:
        raise _error(f"{name}: the text is shorter than one window of {seqlen} tokens")
    docs = []
    for i, w in enumerate(windows):
        docs.append({"window": i, "seqlen": seqlen, "input_ids": w})
    return docs


# ----------------------------------------------------------------------------- the task
class GPTQPerplexityTask(ConfigurableTask):
    """Token-window perplexity through lm-eval's stock evaluator (see the module docstring)."""

    VERSION = 1

    def __init__(self, config: dict | None = None, **kwargs):
        config = dict(config or {})
        config.pop("class", None)
        install_token_text_support()
        self._tokenizer = None
        super().__init__(config=config, **kwargs)

    # data
    def download(self, dataset_kwargs=None, **kwargs) -> None:
        import datasets

        meta = dict(self.config.metadata or {})
        docs = build_docs(self.config.task or "wikitext2_gptq", meta)
        self._tokenizer = load_tokenizer(meta)
        self.dataset = {"test": datasets.Dataset.from_list(docs)}

    def has_training_docs(self) -> bool:
        return False

    def has_validation_docs(self) -> bool:
        return False

    def has_test_docs(self) -> bool:
        return True

    def test_docs(self):
        return self.dataset["test"]

    # text (for logs / samples only; the ids are what is scored)
    def _decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def doc_to_text(self, doc, doc_to_text=None):
        ids = doc["input_ids"]
        return TokenText(self._decode(ids[:1]) or f"<token {ids[0]}>", ids[:1])

    def doc_to_target(self, doc, doc_to_target=None):
        ids = doc["input_ids"]
        return TokenText(self._decode(ids[1:]), ids[1:])

    def fewshot_context(self, doc, num_fewshot, *args, **kwargs):
        if num_fewshot:
            raise _error(f"{self.config.task}: perplexity windows take no few-shot examples (num_fewshot=0)")
        return self.doc_to_text(doc)

    def construct_requests(self, doc, ctx, **kwargs):
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        ctx = self.doc_to_text(doc)  # always the id-carrying context
        return Instance(
            request_type="loglikelihood", doc=doc, arguments=(ctx, self.doc_to_target(doc)),
            idx=0, **kwargs,
        )

    def process_results(self, doc, results):
        ll = float(results[0][0]) if isinstance(results[0], (tuple, list)) else float(results[0])
        pred = doc["input_ids"][1:]
        text = self._decode(pred)
        n_words = len(re.split(r"\s+", text.strip())) if text.strip() else 0
        n_bytes = len(text.encode("utf-8"))
        return {
            "token_perplexity": (ll, len(pred)),
            "word_perplexity": (ll, max(n_words, 1)),
            "byte_perplexity": (ll, max(n_bytes, 1)),
        }

    def aggregation(self) -> dict:
        return {k: weighted_perplexity for k in ("token_perplexity", "word_perplexity", "byte_perplexity")}

    def higher_is_better(self) -> dict:
        return {k: False for k in ("token_perplexity", "word_perplexity", "byte_perplexity")}


def weighted_perplexity(items) -> float:
    """exp(-sum(loglikelihood) / sum(count))."""
    lls, ns = zip(*items)
    return math.exp(-sum(lls) / sum(ns))

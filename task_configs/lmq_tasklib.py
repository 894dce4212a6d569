"""Shared code for the lm-eval-quant task YAMLs (data loading, metrics).

Loaded by the ``utils.py`` next to each group of YAMLs (``!function utils.…``); it must work with
stock ``lm_eval --include_path task_configs`` too, so it imports nothing from lm_eval_quant except,
optionally, its error class.

Data sources
------------
Every task names its canonical public dataset in ``dataset_path`` and loads it through
``custom_dataset`` (a loader made by :func:`make_loader`):

* ``LMQ_DATA_DIR`` set: read the original-format files below that folder (laid out like
  ``shared/data``: ``liar/test.tsv``, ``halueval/qa_data.jsonl``, ...). Missing file: one line.
* unset: ``datasets.load_dataset`` of the canonical hub dataset; if that fails (offline), one line
  that names ``LMQ_DATA_DIR`` and the file it would read.

Every loader returns a ``DatasetDict`` holding the split the YAML evaluates on, with rows already
normalised to the fields the YAML's prompt uses (``label`` = index into ``doc_to_choice``).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

try:  # one-line user error, the same class the rest of lm-eval-quant raises
    from lm_eval_quant.errors import QuantArgError as _ErrorBase
except Exception:  # pragma: no cover - stock lm_eval without lm_eval_quant installed
    _ErrorBase = ValueError

ENV_VAR = "LMQ_DATA_DIR"


class TaskDataError(_ErrorBase):
    """A task's data cannot be found; the message is one line and names the override."""

    def __init__(self, msg: str):
        ValueError.__init__(self, " ".join(str(msg).split()))


# --------------------------------------------------------------------------- label maps
# LIAR (Wang 2017) six PolitiFact ratings, ordered from least to most truthful.
LIAR6_RAW = ["pants-fire", "false", "barely-true", "half-true", "mostly-true", "true"]
LIAR6_CHOICES = ["pants on fire", "false", "barely true", "half true", "mostly true", "true"]
# Binary variant: true / mostly-true / half-true -> "true" (1); barely-true / false / pants-fire -> "false" (0)
LIAR_BINARY = {"pants-fire": 0, "false": 0, "barely-true": 0, "half-true": 1, "mostly-true": 1, "true": 1}
LIAR_BINARY_CHOICES = ["false", "true"]

COVID_RAW = ["real", "fake"]

# FEVER-style verdicts (Climate-FEVER writes NOT_ENOUGH_INFO, FEVER writes NOT ENOUGH INFO)
VERDICT_RAW = ["SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO"]
VERDICT_CHOICES = ["supported", "refuted", "not enough information"]

HALU_CHOICES = ["No", "Yes"]  # label 1 = "Yes, the response is hallucinated"


def _norm_verdict(raw: str) -> str:
    return str(raw).strip().upper().replace(" ", "_")


# --------------------------------------------------------------------------- file readers
def data_dir() -> Path | None:
    v = os.environ.get(ENV_VAR, "").strip()
    return Path(v).expanduser() if v else None


def read_json_records(path: Path) -> list[dict]:
    """A JSON array, or JSON lines (HaluEval's ``*.json`` files are JSON lines)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(stripped)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def read_liar_tsv(path: Path) -> list[dict]:
    cols = ["id", "label", "statement", "subject", "speaker", "job_title", "state_info",
            "party_affiliation", "barely_true_counts", "false_counts", "half_true_counts",
            "mostly_true_counts", "pants_on_fire_counts", "context"]
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        for rec in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if not rec or not "".join(rec).strip():
                continue
            rows.append(dict(zip(cols, rec + [""] * (len(cols) - len(rec)))))
    return rows


def read_csv_dicts(path: Path, delimiter: str = ",") -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


# --------------------------------------------------------------------------- normalisers
# Each takes the list of raw rows (local file or hub) and returns the task's docs.
def norm_liar(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        raw = str(r["label"]).strip()
        if raw not in LIAR6_RAW:
            raise TaskDataError(f"LIAR: unknown label {raw!r} in row id={r.get('id')!r}; expected one of {LIAR6_RAW}")
        out.append({
            "id": str(r.get("id", "")),
            "statement": str(r["statement"]).strip(),
            "speaker": str(r.get("speaker") or "").replace("-", " ").strip() or "unknown",
            "context": str(r.get("context") or "").strip(),
            "label_raw": raw,
            "label": LIAR6_RAW.index(raw),
            "label_binary": LIAR_BINARY[raw],
        })
    return out


def norm_covid(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if "label" not in r or r["label"] is None:
            raise TaskDataError("covid_constraint: the data has no 'label' column (the unlabelled Constraint_Test.csv?); "
                                f"use the labelled test file, e.g. {ENV_VAR}/covid_constraint/english_test_with_labels.csv")
        raw = str(r["label"]).strip().lower()
        if raw not in COVID_RAW:
            raise TaskDataError(f"covid_constraint: unknown label {raw!r}; expected real/fake")
        out.append({"id": str(r.get("id", "")), "tweet": str(r["tweet"]).strip(), "label_raw": raw,
                    "label": COVID_RAW.index(raw)})
    return out


def norm_verdicts(rows: list[dict], claim_key="claim", label_key="label", id_key="id") -> list[dict]:
    """SUPPORTS / REFUTES / NOT ENOUGH INFO; other labels (Climate-FEVER's DISPUTED) are dropped."""
    out = []
    for r in rows:
        raw = _norm_verdict(r[label_key])
        if raw not in VERDICT_RAW:
            continue
        out.append({"id": str(r.get(id_key, "")), "claim": str(r[claim_key]).strip(), "label_raw": raw,
                    "label": VERDICT_RAW.index(raw)})
    return out


def _pairs(rows, make):
    """HaluEval protocol: each source row gives a hallucinated item (label 1, "Yes") followed by
    the faithful one (label 0, "No")."""
    out = []
    for i, r in enumerate(rows):
        for label in (1, 0):
            d = make(r, label)
            d.update({"source_index": i, "label": label})
            out.append(d)
    return out


def norm_halueval_qa(rows):
    return _pairs(rows, lambda r, y: {
        "knowledge": str(r["knowledge"]).strip(), "question": str(r["question"]).strip(),
        "answer": str(r["hallucinated_answer"] if y else r["right_answer"]).strip()})


def norm_halueval_dialogue(rows):
    return _pairs(rows, lambda r, y: {
        "knowledge": str(r["knowledge"]).strip(), "dialogue_history": str(r["dialogue_history"]).strip(),
        "response": str(r["hallucinated_response"] if y else r["right_response"]).strip()})


def norm_halueval_summarization(rows):
    return _pairs(rows, lambda r, y: {
        "document": str(r["document"]).strip(),
        "summary": str(r["hallucinated_summary"] if y else r["right_summary"]).strip()})


def _targets(t) -> dict:
    """TruthfulQA's original mc_task.json maps answer -> 0/1; the hub has {choices, labels}."""
    if isinstance(t, dict) and "choices" in t:
        return {"choices": list(t["choices"]), "labels": [int(x) for x in t["labels"]]}
    return {"choices": list(t.keys()), "labels": [int(v) for v in t.values()]}


def norm_truthfulqa_mc(rows):
    return [{"question": r["question"], "mc1_targets": _targets(r["mc1_targets"]),
             "mc2_targets": _targets(r["mc2_targets"])} for r in rows]


def norm_arc(rows):
    out = []
    for r in rows:
        q = r["question"]
        if isinstance(q, dict):  # original AI2 jsonl: question.stem + question.choices[]
            choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
            q = q["stem"]
        else:
            choices = r["choices"]
        out.append({"id": r.get("id", ""), "question": q, "choices": choices, "answerKey": r["answerKey"]})
    return out


# --------------------------------------------------------------------------- local readers
def _local_liar(d: Path, files):
    return read_liar_tsv(d / files[0])


def _local_csv(d: Path, files):
    return read_csv_dicts(d / files[0])


def _local_json(d: Path, files):
    return read_json_records(d / files[0])


def _local_with_labels(label_key: str, cast: Callable):
    def read(d: Path, files):
        rows = read_json_records(d / files[0])
        labels = read_lines(d / files[1])
        if len(labels) != len(rows):
            raise TaskDataError(f"{d / files[1]} has {len(labels)} labels for {len(rows)} rows in {d / files[0]}")
        return [{**r, label_key: cast(y)} for r, y in zip(rows, labels)]
    return read


def _local_boolq(d: Path, files):
    rows = read_json_records(d / files[0])
    return [{"question": r["question"], "passage": r["passage"], "label": int(bool(r["answer"]))} for r in rows]


def _local_rte(d: Path, files):
    rows = read_csv_dicts(d / files[0], delimiter="\t")
    names = ["entailment", "not_entailment"]
    return [{"idx": int(r.get("index", i)), "sentence1": r["sentence1"], "sentence2": r["sentence2"],
             "label": names.index(r["label"].strip())} for i, r in enumerate(rows)]


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    key: str
    hub_path: str
    hub_name: str | None
    hub_split: str | None          # split to take from the hub (None: keep the whole DatasetDict)
    split: str                     # split name the YAML evaluates on
    local_files: tuple             # alternatives: tuple of tuples, each a set of files read together
    read_local: Callable
    normalize: Callable | None     # raw rows -> docs (None: rows already in the YAML's schema)
    hub_revisions: tuple = (None,)
    hub_label_names: tuple | None = None  # names of an int "label" column whose features say nothing
    # built-in tasks name other splits too (training_split: train, ...): locally those are empty, so
    # the built-in config works unchanged (zero-shot; few-shot offline has nothing to draw from)
    empty_splits: tuple = ()


def _alts(*names):
    return tuple(n if isinstance(n, tuple) else (n,) for n in names)


SOURCES: dict[str, Source] = {s.key: s for s in [
    # ---- misinformation
    Source("liar", "ucsbnlp/liar", None, "test", "test", _alts("liar/test.tsv"), _local_liar, norm_liar,
           hub_revisions=(None, "refs/convert/parquet")),
    Source("covid_constraint", "nanyy1025/covid_fake_news", None, "test", "test",
           _alts("covid_constraint/english_test_with_labels.csv"), _local_csv, norm_covid),
    Source("climate_fever", "tdiggelm/climate_fever", None, "test", "test",
           _alts("climate_fever/climate-fever.jsonl"), _local_json,
           lambda rows: norm_verdicts(rows, label_key="claim_label", id_key="claim_id")),
    # lucadiliello/fever card: label 0 SUPPORTS, 1 NOT ENOUGH INFO, 2 REFUTES (int64, no ClassLabel)
    Source("fever", "lucadiliello/fever", None, "dev", "test", _alts("fever/paper_dev.jsonl"), _local_json,
           norm_verdicts, hub_label_names=("SUPPORTS", "NOT ENOUGH INFO", "REFUTES")),
    # ---- hallucination
    Source("halueval_qa", "pminervini/HaluEval", "qa", "data", "test",
           _alts("halueval/qa_data.jsonl", "halueval/qa_data.json"), _local_json, norm_halueval_qa),
    Source("halueval_dialogue", "pminervini/HaluEval", "dialogue", "data", "test",
           _alts("halueval/dialogue_data.jsonl", "halueval/dialogue_data.json"), _local_json,
           norm_halueval_dialogue),
    Source("halueval_summarization", "pminervini/HaluEval", "summarization", "data", "test",
           _alts("halueval/summarization_data.jsonl", "halueval/summarization_data.json"), _local_json,
           norm_halueval_summarization),
    # ---- built-in harness tasks (group overrides; hub path = the built-in YAML's)
    Source("truthfulqa_mc", "truthfulqa/truthful_qa", "multiple_choice", None, "validation",
           _alts("truthfulqa/mc_task.json"), _local_json, norm_truthfulqa_mc),
    Source("piqa", "baber/piqa", None, None, "validation", _alts(("piqa/valid.jsonl", "piqa/valid-labels.lst")),
           _local_with_labels("label", int), None, empty_splits=("train",)),
    Source("winogrande", "allenai/winogrande", "winogrande_xl", None, "validation",
           _alts(("winogrande/dev.jsonl", "winogrande/dev-labels.lst")), _local_with_labels("answer", str), None,
           empty_splits=("train",)),
    Source("hellaswag", "Rowan/hellaswag", None, None, "validation",
           _alts("hellaswag/hellaswag_val.llamacpp_format.jsonl"), _local_json, None, empty_splits=("train",)),
    Source("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", None, "test", _alts("arc/ARC-Challenge-Test.jsonl"),
           _local_json, None, empty_splits=("train", "validation")),
    Source("lambada_openai", "EleutherAI/lambada_openai", "default", None, "test",
           _alts("lambada_openai/lambada_test.jsonl"), _local_json, None),
    Source("boolq", "aps/super_glue", "boolq", None, "validation", _alts("boolq/dev.jsonl"), _local_boolq, None,
           empty_splits=("train",)),
    Source("rte", "nyu-mll/glue", "rte", None, "validation", _alts("rte/dev.tsv"), _local_rte, None,
           empty_splits=("train",)),
]}
# ARC local rows need the question/choices reshaped even though hub rows do not
_LOCAL_ONLY_NORMALIZE = {"arc_challenge": norm_arc}


def _to_dataset(docs: list[dict]):
    import datasets

    if not docs:
        raise TaskDataError("no documents after loading (empty file?)")
    return datasets.Dataset.from_list(docs)


def load_local(src: Source, root: Path):
    import datasets

    for files in src.local_files:
        if all((root / f).is_file() for f in files):
            rows = src.read_local(root, files)
            norm = src.normalize or _LOCAL_ONLY_NORMALIZE.get(src.key)
            docs = norm(rows) if norm else rows
            ds = _to_dataset(docs)
            return datasets.DatasetDict({src.split: ds, **{k: ds.select([]) for k in src.empty_splits}})
    want = " or ".join("+".join(str(root / f) for f in files) for files in src.local_files)
    raise TaskDataError(f"{src.key}: missing data file {want} ({ENV_VAR}={root}); add it there, "
                        f"or unset {ENV_VAR} to load {src.hub_path} from the Hugging Face Hub")


def load_hub(src: Source):
    import datasets

    last: Exception | None = None
    for rev in src.hub_revisions:
        try:
            kw = {"revision": rev} if rev else {}
            ds = datasets.load_dataset(src.hub_path, src.hub_name, **kw)
            break
        except Exception as e:  # offline, missing repo, script dataset ...
            last = e
    else:
        first = "+".join(src.local_files[0])
        raise TaskDataError(
            f"{src.key}: cannot load {src.hub_path!r} from the Hugging Face Hub "
            f"({type(last).__name__}: {str(last).splitlines()[0][:120] if str(last) else ''}); "
            f"offline, set {ENV_VAR} to a folder holding {first}") from None
    if src.normalize is None and src.hub_split is None:
        return ds  # built-in task: exactly what its own YAML would have loaded
    part = ds[src.hub_split] if src.hub_split else ds[src.split]
    rows = [_decode_classlabels(part, r, src.hub_label_names) for r in part]
    docs = src.normalize(rows) if src.normalize else rows
    return datasets.DatasetDict({src.split: _to_dataset(docs)})


def _decode_classlabels(part, row: dict, label_names=None) -> dict:
    """Hub datasets store labels as ClassLabel ints; turn them back into the names."""
    import datasets

    out = dict(row)
    for k, feat in getattr(part, "features", {}).items():
        if isinstance(feat, datasets.ClassLabel) and isinstance(out.get(k), int) and out[k] >= 0:
            out[k] = feat.int2str(out[k])
    if label_names and isinstance(out.get("label"), int):
        out["label"] = label_names[out["label"]]
    return out


def load(key: str):
    src = SOURCES[key]
    root = data_dir()
    if root is not None:
        return load_local(src, root)
    return load_hub(src)


def make_loader(key: str) -> Callable[..., Any]:
    if key not in SOURCES:
        raise KeyError(key)

    def loader(**_metadata):  # lm-eval passes the task metadata + dataset_kwargs; unused
        return load(key)

    loader.__name__ = f"load_{key}"
    return loader


# --------------------------------------------------------------------------- metrics
def make_process_results(label_field: str = "label") -> Callable[[dict, Any], dict]:
    """Multiple choice by loglikelihood: prediction = argmax over the choices' loglikelihoods
    (ties: the first choice); gold = ``doc[label_field]``. Returns acc and the (gold, pred) pair
    that :func:`macro_f1` aggregates."""

    def process_results(doc: dict, results) -> dict:
        lls = [float(r[0]) for r in results]
        pred = max(range(len(lls)), key=lambda i: lls[i])
        gold = int(doc[label_field])
        return {"acc": 1.0 if pred == gold else 0.0, "macro_f1": (gold, pred)}

    return process_results


process_results_mc = make_process_results("label")


def macro_f1(items) -> float:
    """Unweighted mean over classes of per-class F1, from (gold, pred) pairs.

    Classes are those that occur as gold or as prediction (scikit-learn's default label set);
    a class's F1 is 0 when it has no true positives.
    """
    items = [(int(g), int(p)) for g, p in items]
    if not items:
        return float("nan")
    classes = sorted({g for g, _ in items} | {p for _, p in items})
    f1s = []
    for c in classes:
        tp = sum(1 for g, p in items if g == c and p == c)
        fp = sum(1 for g, p in items if g != c and p == c)
        fn = sum(1 for g, p in items if g == c and p != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


# --------------------------------------------------------------------------- built-in helpers
def hellaswag_process_docs(dataset):
    """HellaSwag docs for both the hub rows (ctx_a/ctx_b, as the built-in task) and the local
    llama.cpp-format rows (activity_label, ctx, endings, label)."""
    import re

    def pre(text: str) -> str:  # the built-in task's cleaning
        text = text.strip().replace(" [title]", ". ")
        text = re.sub("\\[.*?\\]", "", text)
        return text.replace("  ", " ")

    def one(doc):
        if "ctx_a" in doc:
            ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        else:
            ctx = doc["ctx"]
        return {"query": pre(doc["activity_label"] + ": " + ctx),
                "choices": [pre(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


# --------------------------------------------------------------------------- YAML hooks
def yaml_hooks() -> dict[str, Any]:
    """Every name the YAMLs use as ``!function utils.<name>``: the metrics, and ``load_<key>``
    for every :data:`SOURCES` entry, so a new task adds its ``Source`` here and nothing in the
    ``utils.py`` shims (which only load this file by path and publish these names)."""
    hooks: dict[str, Any] = {
        "process_results": process_results_mc,
        "process_results_binary": make_process_results("label_binary"),
        "macro_f1": macro_f1,
        "hellaswag_process_docs": hellaswag_process_docs,
    }
    hooks.update({f"load_{key}": make_loader(key) for key in SOURCES})
    return hooks

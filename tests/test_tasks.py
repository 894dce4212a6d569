"""Task YAMLs in task_configs/ (issue 5): misinformation, hallucination, suites.

* metrics: macro-F1 and the multiple-choice scorer against hand-computed values;
* every YAML loads with lm-eval's TaskManager and builds its documents from small original-format
  fixture files written here (LMQ_DATA_DIR=tmp), with hand-written expected prompts and labels;
* hub-format rows (ClassLabel ints etc.) are normalised the same way (datasets.load_dataset faked);
* missing data: one line that names LMQ_DATA_DIR and the file;
* with ../shared/data: real files load and the per-class counts match counts made independently
  here; a full `lm_eval --limit 20` run on a tiny model completes for every group.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "task_configs"
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

OUR_TASKS = ["liar", "liar_binary", "covid_constraint", "climate_fever", "fever",
             "halueval_qa", "halueval_dialogue", "halueval_summarization"]
OUR_GROUPS = ["misinformation", "hallucination", "kbit_zeroshot", "capabilities",
              "capabilities_nlu", "capabilities_reasoning"]


def _lib():
    sys.path.insert(0, str(TASK_DIR / "misinformation"))
    try:
        import importlib

        utils = importlib.import_module("utils")
        return utils.lib
    finally:
        sys.path.pop(0)
        sys.modules.pop("utils", None)


lib = _lib()


# ----------------------------------------------------------------------------- fixtures
def _jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_fixture_data(root: Path, only: set[str] | None = None) -> Path:
    """Small files in each data set's original format (the layout of shared/data)."""
    def want(k):
        return only is None or k in only

    if want("liar"):
        (root / "liar").mkdir(parents=True, exist_ok=True)
        labels = ["true", "false", "half-true", "pants-fire", "barely-true", "mostly-true", "false"]
        lines = []
        for i, lab in enumerate(labels):
            stmt = f'Statement number {i} says "taxes" went up.' if i == 0 else f"Statement number {i}."
            cols = [f"{i}.json", lab, stmt, "taxes", "jane-doe", "Senator", "Ohio", "democrat",
                    "1", "2", "3", "4", "5", "a speech"]
            lines.append("\t".join(cols))
        (root / "liar" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if want("covid_constraint"):
        (root / "covid_constraint").mkdir(parents=True, exist_ok=True)
        with (root / "covid_constraint" / "english_test_with_labels.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "tweet", "label"])
            w.writerow([1, "Masks reduce spread, says CDC, in new study.", "real"])
            w.writerow([2, "Garlic cures COVID-19.", "fake"])
            w.writerow([3, "Cases rose 3% this week.", "real"])
    if want("climate_fever"):
        _jsonl(root / "climate_fever" / "climate-fever.jsonl", [
            {"claim_id": "0", "claim": "CO2 warms the planet.", "claim_label": "SUPPORTS", "evidences": []},
            {"claim_id": "1", "claim": "The sun explains all warming.", "claim_label": "REFUTES", "evidences": []},
            {"claim_id": "2", "claim": "Sea ice is disputed.", "claim_label": "DISPUTED", "evidences": []},
            {"claim_id": "3", "claim": "Clouds are odd.", "claim_label": "NOT_ENOUGH_INFO", "evidences": []},
        ])
    if want("fever"):
        _jsonl(root / "fever" / "paper_dev.jsonl", [
            {"id": 1, "verifiable": "VERIFIABLE", "label": "SUPPORTS", "claim": "Paris is in France.", "evidence": []},
            {"id": 2, "verifiable": "VERIFIABLE", "label": "REFUTES", "claim": "Paris is in Peru.", "evidence": []},
            {"id": 3, "verifiable": "NOT VERIFIABLE", "label": "NOT ENOUGH INFO", "claim": "Tilda likes tea.",
             "evidence": []},
        ])
    if want("halueval"):
        _jsonl(root / "halueval" / "qa_data.jsonl", [
            {"knowledge": "K0.", "question": "Q0?", "right_answer": "R0", "hallucinated_answer": "H0"},
            {"knowledge": "K1.", "question": "Q1?", "right_answer": "R1", "hallucinated_answer": "H1"},
        ])
        _jsonl(root / "halueval" / "dialogue_data.jsonl", [
            {"knowledge": "K.", "dialogue_history": "[Human]: hi", "right_response": "R", "hallucinated_response": "H"},
        ])
    if want("halueval") or want("halueval_summarization"):
        # the HaluEval repo's file name, JSON lines despite the .json suffix
        _jsonl(root / "halueval" / "summarization_data.json", [
            {"document": "Doc 0.", "right_summary": "S0", "hallucinated_summary": "X0"},
            {"document": "Doc 1.", "right_summary": "S1", "hallucinated_summary": "X1"},
        ])
    if want("truthfulqa"):
        (root / "truthfulqa").mkdir(parents=True, exist_ok=True)
        (root / "truthfulqa" / "mc_task.json").write_text(json.dumps([
            {"question": "Is the earth flat?", "mc1_targets": {"No.": 1, "Yes.": 0},
             "mc2_targets": {"No.": 1, "It is round.": 1, "Yes.": 0}},
            {"question": "Can pigs fly?", "mc1_targets": {"No.": 1, "Yes.": 0, "Sometimes.": 0},
             "mc2_targets": {"No.": 1, "Yes.": 0}},
        ]), encoding="utf-8")
    if want("piqa"):
        _jsonl(root / "piqa" / "valid.jsonl", [
            {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
            {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"},
        ])
        (root / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    if want("winogrande"):
        _jsonl(root / "winogrande" / "dev.jsonl", [
            {"qID": "a", "sentence": "Ann helped Bea because _ was kind.", "option1": "Ann", "option2": "Bea",
             "answer": "1"},
            {"qID": "b", "sentence": "The cup fell off the table because _ was tilted.", "option1": "cup",
             "option2": "table", "answer": "2"},
        ])
        (root / "winogrande" / "dev-labels.lst").write_text("1\n2\n")
    if want("hellaswag"):
        _jsonl(root / "hellaswag" / "hellaswag_val.llamacpp_format.jsonl", [
            {"ind": 0, "activity_label": "Baking", "ctx": "A man mixes flour. he",
             "query": "Baking: A man mixes flour. he", "endings": ["adds eggs.", "flies.", "sleeps.", "sings [title] loud."],
             "label": 0},
        ])
    if want("arc"):
        _jsonl(root / "arc" / "ARC-Challenge-Test.jsonl", [
            {"id": "x1", "question": {"stem": "What melts ice?", "choices": [
                {"text": "heat", "label": "A"}, {"text": "cold", "label": "B"}]}, "answerKey": "A"},
        ])
    if want("lambada_openai"):
        _jsonl(root / "lambada_openai" / "lambada_test.jsonl", [
            {"text": "the cat sat on the mat"}, {"text": "she opened the door and saw her friend"}])
    if want("boolq"):
        _jsonl(root / "boolq" / "dev.jsonl", [
            {"question": "is water wet", "title": "Water", "answer": True, "passage": "Water is wet."},
            {"question": "is fire cold", "title": "Fire", "answer": False, "passage": "Fire is hot."}])
    if want("rte"):
        (root / "rte").mkdir(parents=True, exist_ok=True)
        (root / "rte" / "dev.tsv").write_text(
            "index\tsentence1\tsentence2\tlabel\n0\tA dog runs.\tAn animal runs.\tentailment\n"
            "1\tA dog runs.\tA cat sleeps.\tnot_entailment\n")
    return root


@pytest.fixture(scope="module")
def tm():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR))


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("lmqdata"))


def _load(tm, names):
    """TaskManager.load -> {task_name: task} over all leaves."""
    return dict(tm.load(list(names))["tasks"])


def _docs(task):
    return list(task.eval_docs)


# ----------------------------------------------------------------------------- metrics
def test_macro_f1_hand_computed():
    # classes 0,1,2. class0: tp1 fp1 fn1 -> 0.5; class1: tp2 fp1 fn0 -> 0.8; class2: tp0 -> 0
    items = [(0, 0), (0, 1), (1, 1), (1, 1), (2, 0)]
    assert lib.macro_f1(items) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert lib.macro_f1([(0, 0), (1, 1), (1, 1)]) == 1.0
    # always predicting the majority class of a 3:1 binary set: F1 = (2*3/(6+1), 0) -> 0.4286
    assert lib.macro_f1([(0, 0)] * 3 + [(1, 0)]) == pytest.approx((6 / 7) / 2)
    # a class only predicted, never gold, still counts (scikit-learn's label set)
    assert lib.macro_f1([(0, 0), (0, 2)]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_macro_f1_matches_sklearn_if_available():
    skm = pytest.importorskip("sklearn.metrics")
    import random

    rnd = random.Random(0)
    for k in (2, 3, 6):
        items = [(rnd.randrange(k), rnd.randrange(k)) for _ in range(200)]
        g, p = zip(*items)
        assert lib.macro_f1(items) == pytest.approx(skm.f1_score(g, p, average="macro"))


def test_process_results_argmax_and_gold_field():
    pr = lib.make_process_results("label")
    out = pr({"label": 2}, [(-3.0, False), (-1.0, False), (-0.5, True)])
    assert out == {"acc": 1.0, "macro_f1": (2, 2)}
    out = pr({"label": 0}, [(-3.0, False), (-1.0, False), (-0.5, True)])
    assert out == {"acc": 0.0, "macro_f1": (0, 2)}
    prb = lib.make_process_results("label_binary")
    assert prb({"label": 5, "label_binary": 1}, [(-2.0, False), (-1.0, False)])["acc"] == 1.0


# ----------------------------------------------------------------------------- discovery
def test_every_yaml_is_indexed(tm):
    names = set(tm.all_tasks)
    for n in OUR_TASKS + OUR_GROUPS:
        assert n in names, n
    yamls = [p for p in TASK_DIR.rglob("*.yaml") if "perplexity" not in p.parts]
    assert len(yamls) == len(OUR_TASKS) + len(OUR_GROUPS)


def test_yaml_dataset_path_matches_loader_source():
    import yaml

    key_of = {"liar": "liar", "liar_binary": "liar", "covid_constraint": "covid_constraint",
              "climate_fever": "climate_fever", "fever": "fever", "halueval_qa": "halueval_qa",
              "halueval_dialogue": "halueval_dialogue", "halueval_summarization": "halueval_summarization"}
    for p in TASK_DIR.rglob("*.yaml"):
        text = p.read_text()
        if "dataset_path:" not in text or "perplexity" in p.parts:
            continue
        cfg = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)
        src = lib.SOURCES[key_of[cfg["task"]]]
        assert cfg["dataset_path"] == src.hub_path, p
        assert cfg.get("dataset_name") == src.hub_name, p


def test_builtin_overrides_point_at_builtin_hub_datasets(tm):
    """The group overrides of built-in tasks keep the built-in's dataset: the loader's hub path must
    equal the built-in YAML's dataset_path/dataset_name (else online runs would change data)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    pairs = {"truthfulqa_mc1": "truthfulqa_mc", "piqa": "piqa", "winogrande": "winogrande",
             "hellaswag": "hellaswag", "arc_challenge": "arc_challenge", "lambada_openai": "lambada_openai",
             "boolq": "boolq", "rte": "rte"}
    index = tm.task_index
    for task, key in pairs.items():
        cfg = load_yaml(index[task].yaml_path, resolve_func=False)
        src = lib.SOURCES[key]
        assert cfg["dataset_path"] == src.hub_path, task
        assert (cfg.get("dataset_name") or None) == src.hub_name, task
        split = cfg.get("test_split") or cfg.get("validation_split")
        assert split == src.split, task


# ----------------------------------------------------------------------------- fixture data
def test_misinformation_tasks_from_fixture_files(tm, fixture_dir, monkeypatch):
    monkeypatch.setenv("LMQ_DATA_DIR", str(fixture_dir))
    tasks = _load(tm, ["misinformation"])
    assert set(tasks) == {"liar", "liar_binary", "covid_constraint", "climate_fever", "fever"}

    liar = tasks["liar"]
    docs = _docs(liar)
    # fixture labels: true false half-true pants-fire barely-true mostly-true false
    assert [liar.doc_to_target(d) for d in docs] == [5, 1, 3, 0, 2, 4, 1]
    assert liar.doc_to_choice(docs[0]) == ["pants on fire", "false", "barely true", "half true", "mostly true",
                                           "true"]
    assert liar.doc_to_text(docs[0]) == (
        'Statement: "Statement number 0 says "taxes" went up."\nSpeaker: jane doe\n'
        "Question: How accurate is this statement? Choose one of: true, mostly true, half true, barely true, "
        "false, pants on fire.\nAnswer:")
    lb = tasks["liar_binary"]
    # true/mostly-true/half-true -> 1 ; barely-true/false/pants-fire -> 0
    assert [lb.doc_to_target(d) for d in _docs(lb)] == [1, 0, 1, 0, 0, 1, 0]
    assert lb.doc_to_choice(docs[0]) == ["false", "true"]

    cv = tasks["covid_constraint"]
    assert [cv.doc_to_target(d) for d in _docs(cv)] == [0, 1, 0]
    assert cv.doc_to_text(_docs(cv)[0]) == ("Social media post about COVID-19: Masks reduce spread, says CDC, in new "
                                            "study.\nQuestion: Is this post real news or fake news?\nAnswer:")

    cf = tasks["climate_fever"]
    cdocs = _docs(cf)
    assert [d["claim"] for d in cdocs] == ["CO2 warms the planet.", "The sun explains all warming.",
                                           "Clouds are odd."]  # DISPUTED dropped
    assert [cf.doc_to_target(d) for d in cdocs] == [0, 1, 2]
    assert cf.doc_to_choice(cdocs[0]) == ["supported", "refuted", "not enough information"]

    fv = tasks["fever"]
    assert [fv.doc_to_target(d) for d in _docs(fv)] == [0, 1, 2]
    assert fv.doc_to_text(_docs(fv)[1]).startswith("Claim: Paris is in Peru.\nQuestion:")


def test_hallucination_tasks_from_fixture_files(tm, fixture_dir, monkeypatch):
    monkeypatch.setenv("LMQ_DATA_DIR", str(fixture_dir))
    tasks = _load(tm, ["hallucination"])
    assert set(tasks) == {"halueval_qa", "halueval_dialogue", "halueval_summarization", "truthfulqa_mc1",
                          "truthfulqa_mc2"}
    qa = tasks["halueval_qa"]
    docs = _docs(qa)
    # each source row -> hallucinated ("Yes", 1) then right ("No", 0)
    assert [(d["answer"], qa.doc_to_target(d)) for d in docs] == [("H0", 1), ("R0", 0), ("H1", 1), ("R1", 0)]
    assert qa.doc_to_choice(docs[0]) == ["No", "Yes"]
    assert qa.doc_to_text(docs[0]) == (
        "Knowledge: K0.\nQuestion: Q0?\nAnswer: H0\nIs this answer hallucinated, that is, not supported by the "
        "knowledge or factually wrong? Reply Yes or No.\nReply:")
    dl = tasks["halueval_dialogue"]
    assert [(d["response"], dl.doc_to_target(d)) for d in _docs(dl)] == [("H", 1), ("R", 0)]
    sm = tasks["halueval_summarization"]
    assert [(d["summary"], sm.doc_to_target(d)) for d in _docs(sm)] == [("X0", 1), ("S0", 0), ("X1", 1), ("S1", 0)]

    mc1, mc2 = tasks["truthfulqa_mc1"], tasks["truthfulqa_mc2"]
    d1 = _docs(mc1)
    assert len(d1) == 2
    assert mc1.doc_to_choice(d1[1]) == ["No.", "Yes.", "Sometimes."]
    assert mc1.doc_to_target(d1[1]) == 0  # built-in convention: first choice is the right one
    assert mc1.doc_to_text(d1[0]).endswith("Q: Is the earth flat?\nA:")  # built-in prompt reused
    assert _docs(mc2)[0]["mc2_targets"] == {"choices": ["No.", "It is round.", "Yes."], "labels": [1, 1, 0]}
    # the built-in mc2 scorer still applies: mass on true answers
    res = mc2.process_results(_docs(mc2)[0], [(0.0, True), (0.0, False), (float("-inf"), False)])
    assert res["acc"] == pytest.approx(1.0)


def test_suites_from_fixture_files(tm, fixture_dir, monkeypatch):
    monkeypatch.setenv("LMQ_DATA_DIR", str(fixture_dir))
    tasks = _load(tm, ["kbit_zeroshot", "capabilities_nlu"])
    assert set(tasks) == {"lambada_openai", "winogrande", "hellaswag", "piqa", "boolq", "rte"}
    lam = tasks["lambada_openai"]
    assert lam.doc_to_text(_docs(lam)[0]) == "the cat sat on the"
    assert lam.doc_to_target(_docs(lam)[0]) == " mat"
    pq = tasks["piqa"]
    assert [pq.doc_to_target(d) for d in _docs(pq)] == [0, 1]
    assert pq.doc_to_text(_docs(pq)[0]) == "Question: Open a jar\nAnswer:"
    wg = tasks["winogrande"]
    wd = _docs(wg)
    assert [wg.doc_to_text(d) for d in wd] == [0, 1]  # built-in: gold index from 'answer'
    assert wg.doc_to_choice(wd[0]) == ["Ann helped Bea because Ann", "Ann helped Bea because Bea"]
    assert wg.doc_to_target(wd[0]) == "was kind."
    hs = tasks["hellaswag"]
    hd = _docs(hs)[0]
    assert hs.doc_to_text(hd) == "Baking: A man mixes flour. he"
    assert hs.doc_to_choice(hd) == ["adds eggs.", "flies.", "sleeps.", "sings. loud."]
    assert str(hs.doc_to_target(hd)) == "0"
    bq = tasks["boolq"]
    assert [bq.doc_to_target(d) for d in _docs(bq)] == [1, 0]
    rte = tasks["rte"]
    assert [rte.doc_to_target(d) for d in _docs(rte)] == [0, 1]
    assert rte.doc_to_choice(_docs(rte)[0]) == ["True", "False"]

    # the built-in configs are unchanged: their train split is there (empty locally)
    assert pq.config.training_split == "train" and len(pq.dataset["train"]) == 0

    tasks = _load(tm, ["capabilities_reasoning"])
    arc = tasks["arc_challenge"]
    ad = _docs(arc)[0]
    assert arc.doc_to_text(ad) == "Question: What melts ice?\nAnswer:"
    assert arc.doc_to_choice(ad) == ["heat", "cold"] and arc.doc_to_target(ad) == 0


def test_group_structure(tm, fixture_dir, monkeypatch):
    monkeypatch.setenv("LMQ_DATA_DIR", str(fixture_dir))
    gm = tm.load(["capabilities"])["group_map"]
    assert gm["capabilities"] == ["capabilities_nlu", "capabilities_reasoning", "misinformation", "hallucination"]
    assert gm["capabilities_reasoning"] == ["arc_challenge", "hellaswag", "winogrande", "piqa"]
    gm = tm.load(["kbit_zeroshot"])["group_map"]
    assert gm["kbit_zeroshot"] == ["lambada_openai", "winogrande", "hellaswag", "piqa"]


# ----------------------------------------------------------------------------- hub format
class _FakeHub:
    def __init__(self, table):
        self.table = table

    def __call__(self, path, name=None, **kw):
        key = (path, name)
        if key not in self.table:
            raise ConnectionError(f"no fake for {key}")
        return self.table[key]


def test_hub_rows_are_normalised(monkeypatch):
    import datasets

    monkeypatch.delenv("LMQ_DATA_DIR", raising=False)
    liar_names = ["false", "half-true", "mostly-true", "true", "barely-true", "pants-fire"]  # ucsbnlp/liar order
    liar = datasets.Dataset.from_dict(
        {"id": ["a", "b", "c"], "label": [3, 5, 4], "statement": ["s1", "s2", "s3"], "speaker": ["x", "y", "z"]},
        features=datasets.Features({"id": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=liar_names),
                                    "statement": datasets.Value("string"), "speaker": datasets.Value("string")}))
    fever = datasets.Dataset.from_dict({"claim": ["c0", "c1", "c2"], "label": [0, 1, 2], "evidence": [[], [], []],
                                        "key": [1, 2, 3]})
    cf_names = ["SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO", "DISPUTED"]
    cf = datasets.Dataset.from_dict(
        {"claim_id": ["0", "1"], "claim": ["a", "b"], "claim_label": [3, 1]},
        features=datasets.Features({"claim_id": datasets.Value("string"), "claim": datasets.Value("string"),
                                    "claim_label": datasets.ClassLabel(names=cf_names)}))
    halu = datasets.Dataset.from_dict({"knowledge": ["k"], "question": ["q"], "right_answer": ["r"],
                                       "hallucinated_answer": ["h"]})  # pminervini/HaluEval qa, split "data"
    fake = _FakeHub({("ucsbnlp/liar", None): datasets.DatasetDict({"test": liar}),
                     ("pminervini/HaluEval", "qa"): datasets.DatasetDict({"data": halu}),
                     ("lucadiliello/fever", None): datasets.DatasetDict({"dev": fever}),
                     ("tdiggelm/climate_fever", None): datasets.DatasetDict({"test": cf})})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = lib.load("liar")["test"]
    assert ds["label_raw"] == ["true", "pants-fire", "barely-true"]
    assert ds["label"] == [5, 0, 2] and ds["label_binary"] == [1, 0, 0]
    ds = lib.load("fever")["test"]
    assert ds["label_raw"] == ["SUPPORTS", "NOT_ENOUGH_INFO", "REFUTES"] and ds["label"] == [0, 2, 1]
    ds = lib.load("climate_fever")["test"]
    assert ds["claim"] == ["b"] and ds["label"] == [1]  # DISPUTED dropped
    ds = lib.load("halueval_qa")["test"]
    assert ds["answer"] == ["h", "r"] and ds["label"] == [1, 0]


# ----------------------------------------------------------------------------- missing data
def test_missing_local_file_is_one_line_naming_override(tm, tmp_path, monkeypatch):
    monkeypatch.setenv("LMQ_DATA_DIR", str(tmp_path))
    with pytest.raises(lib.TaskDataError) as ei:
        _load(tm, ["liar"])
    msg = str(ei.value)
    assert "\n" not in msg and "LMQ_DATA_DIR" in msg and "liar/test.tsv" in msg
    assert isinstance(ei.value, ValueError)


def test_hub_unreachable_is_one_line_naming_override(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'pminervini/HaluEval' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.delenv("LMQ_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(lib.TaskDataError) as ei:
        lib.load("halueval_summarization")
    msg = str(ei.value)
    assert "\n" not in msg and "LMQ_DATA_DIR" in msg and "halueval/summarization_data.jsonl" in msg
    assert "pminervini/HaluEval" in msg


# ----------------------------------------------------------------------------- real shared data
def _count_tsv_col(path, col):
    c = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            c[line.split("\t")[col]] += 1
    return c


@needs_shared
@pytest.mark.slow  # issue 10: every row of the real data sets in ../shared (20,000 HaluEval items, 10,042
# HellaSwag, ...); the *_from_fixture_files tests run the same loaders fast
def test_real_files_label_counts(tm, monkeypatch):
    monkeypatch.setenv("LMQ_DATA_DIR", str(SHARED_DATA))
    tasks = _load(tm, ["liar", "liar_binary", "covid_constraint", "climate_fever", "fever", "halueval_qa",
                       "halueval_dialogue"])

    raw = _count_tsv_col(SHARED_DATA / "liar" / "test.tsv", 1)
    assert sum(raw.values()) == 1283
    liar = tasks["liar"]
    got = Counter(liar.doc_to_choice(d)[liar.doc_to_target(d)] for d in _docs(liar))
    assert got == Counter({k.replace("pants-fire", "pants on fire").replace("-", " "): v for k, v in raw.items()})
    lb = tasks["liar_binary"]
    got = Counter(lb.doc_to_target(d) for d in _docs(lb))
    assert got[1] == raw["true"] + raw["mostly-true"] + raw["half-true"]
    assert got[0] == raw["false"] + raw["barely-true"] + raw["pants-fire"]

    with (SHARED_DATA / "covid_constraint" / "english_test_with_labels.csv").open(newline="") as fh:
        raw = Counter(r["label"] for r in csv.DictReader(fh))
    cv = tasks["covid_constraint"]
    got = Counter(cv.doc_to_choice(d)[cv.doc_to_target(d)] for d in _docs(cv))
    assert got == raw and sum(raw.values()) == 2140

    raw = Counter(json.loads(l)["claim_label"] for l in
                  (SHARED_DATA / "climate_fever" / "climate-fever.jsonl").read_text().splitlines() if l.strip())
    assert sum(raw.values()) == 1535
    cf = tasks["climate_fever"]
    got = Counter(cf.doc_to_target(d) for d in _docs(cf))
    assert got == Counter({0: raw["SUPPORTS"], 1: raw["REFUTES"], 2: raw["NOT_ENOUGH_INFO"]})
    assert len(_docs(cf)) == 1535 - raw["DISPUTED"]

    raw = Counter(json.loads(l)["label"] for l in
                  (SHARED_DATA / "fever" / "paper_dev.jsonl").read_text().splitlines() if l.strip())
    fv = tasks["fever"]
    got = Counter(fv.doc_to_target(d) for d in _docs(fv))
    assert got == Counter({0: raw["SUPPORTS"], 1: raw["REFUTES"], 2: raw["NOT ENOUGH INFO"]})

    for name, fn, hal_key in [("halueval_qa", "qa_data.jsonl", "hallucinated_answer"),
                              ("halueval_dialogue", "dialogue_data.jsonl", "hallucinated_response")]:
        rows = [json.loads(l) for l in (SHARED_DATA / "halueval" / fn).read_text().splitlines() if l.strip()]
        t = tasks[name]
        docs = _docs(t)
        assert len(docs) == 2 * len(rows) == 20000
        assert Counter(t.doc_to_target(d) for d in docs) == Counter({1: len(rows), 0: len(rows)})
        # spot-check the pairing on real rows: item 2i is row i's hallucinated response
        field = "answer" if name == "halueval_qa" else "response"
        for i in (0, 4321, len(rows) - 1):
            assert docs[2 * i][field] == rows[i][hal_key].strip() and t.doc_to_target(docs[2 * i]) == 1


@needs_shared
@pytest.mark.slow  # issue 10: every row of the real data sets in ../shared (20,000 HaluEval items, 10,042
# HellaSwag, ...); the *_from_fixture_files tests run the same loaders fast
def test_real_files_builtin_overrides(tm, monkeypatch):
    monkeypatch.setenv("LMQ_DATA_DIR", str(SHARED_DATA))
    tasks = _load(tm, ["capabilities_reasoning"])
    expect = {"arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267, "piqa": 1838}
    for name, n in expect.items():
        assert len(_docs(tasks[name])) == n, name
    piqa_labels = Counter((SHARED_DATA / "piqa" / "valid-labels.lst").read_text().split())
    assert Counter(str(tasks["piqa"].doc_to_target(d)) for d in _docs(tasks["piqa"])) == piqa_labels
    wg_labels = (SHARED_DATA / "winogrande" / "dev-labels.lst").read_text().split()
    wg_rows = [json.loads(l) for l in (SHARED_DATA / "winogrande" / "dev.jsonl").read_text().splitlines() if l]
    assert [r["answer"] for r in wg_rows] == wg_labels  # the two local files agree
    # TruthfulQA local json in the hub schema; mc1's right answer first (built-in doc_to_target 0)
    docs = lib.load("truthfulqa_mc")["validation"]
    assert len(docs) == 817
    assert all(t["labels"][0] == 1 and sum(t["labels"]) == 1 for t in docs["mc1_targets"])


def _mirror_with_fixtures(tmp: Path) -> Path:
    """shared/data (symlinked) + fixture files for what it lacks: HaluEval summarization,
    LAMBADA, BoolQ, RTE."""
    root = tmp / "data"
    root.mkdir()
    for sub in SHARED_DATA.iterdir():
        if sub.is_dir() and sub.name != "halueval":
            (root / sub.name).symlink_to(sub)
    (root / "halueval").mkdir()
    for f in (SHARED_DATA / "halueval").iterdir():
        (root / "halueval" / f.name).symlink_to(f)
    write_fixture_data(root, only={"halueval_summarization", "lambada_openai", "boolq", "rte"})
    return root


@needs_shared
@pytest.mark.slow
def test_lm_eval_limit20_every_group(tm, tmp_path, monkeypatch):
    """--limit 20 on a tiny random Llama, real shared data (+ fixtures for the files it lacks).
    A task may sit in only one group per run, so: the stock `lm_eval` CLI with --include_path for
    `capabilities` (= capabilities_nlu, capabilities_reasoning, misinformation, hallucination), and
    lm_eval.simple_evaluate in-process for `kbit_zeroshot` (saves a second CLI start-up)."""
    from lm_eval_quant import toy

    model_dir = toy.make_tiny_model(tmp_path / "tiny", arch="llama", hidden=32, layers=1, heads=2, max_pos=2048)
    data = _mirror_with_fixtures(tmp_path)
    env = dict(os.environ, LMQ_DATA_DIR=str(data), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={model_dir},dtype=float32", "--tasks", "capabilities", "--limit", "20",
           "--include_path", str(TASK_DIR), "--batch_size", "16", "--output_path", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    results = dict(res["results"])
    for name, n in res["n-samples"].items():
        assert n["effective"] == min(20, n["original"]), name

    import lm_eval

    monkeypatch.setenv("LMQ_DATA_DIR", str(data))
    res2 = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                   tasks=["kbit_zeroshot"], limit=20, batch_size=16, device="cpu", task_manager=tm,
                                   bootstrap_iters=0, log_samples=False)
    results.update(res2["results"])

    for g in OUR_GROUPS:
        assert 0.0 <= results[g]["acc,none"] <= 1.0, g
    assert 0.0 <= results["misinformation"]["macro_f1,none"] <= 1.0
    leaves = {"capabilities_nlu": ["boolq", "rte"],
              "capabilities_reasoning": ["arc_challenge", "hellaswag", "winogrande", "piqa"],
              "misinformation": ["liar", "liar_binary", "covid_constraint", "climate_fever", "fever"],
              "hallucination": ["halueval_qa", "halueval_dialogue", "halueval_summarization", "truthfulqa_mc1",
                                "truthfulqa_mc2"],
              "kbit_zeroshot": ["lambada_openai", "winogrande", "hellaswag", "piqa"]}
    for t in leaves["misinformation"] + leaves["hallucination"][:3]:
        assert 0.0 <= results[t]["acc,none"] <= 1.0 and 0.0 <= results[t]["macro_f1,none"] <= 1.0, t
    # groups report the unweighted mean of their tasks' acc; `capabilities` the mean over all 16 leaves
    for g, ts in leaves.items():
        assert results[g]["acc,none"] == pytest.approx(sum(results[t]["acc,none"] for t in ts) / len(ts)), g
    mis = leaves["misinformation"]
    assert results["misinformation"]["macro_f1,none"] == pytest.approx(
        sum(results[t]["macro_f1,none"] for t in mis) / len(mis))
    cap = [t for g in ["capabilities_nlu", "capabilities_reasoning", "misinformation", "hallucination"]
           for t in leaves[g]]
    assert results["capabilities"]["acc,none"] == pytest.approx(sum(results[t]["acc,none"] for t in cap) / 16)

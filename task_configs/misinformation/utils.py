"""Hooks referenced by the YAMLs in this folder (``!function utils.<name>``).

The code lives in ``task_configs/lmq_tasklib.py``; this file loads it by path so the YAMLs work
both from the lm_eval_quant package and with stock ``lm_eval --include_path task_configs``.
"""

import hashlib as _hashlib
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

_LIB = _Path(__file__).resolve().parent.parent / "lmq_tasklib.py"
_NAME = "lmq_tasklib_" + _hashlib.md5(str(_LIB).encode()).hexdigest()[:12]
if _NAME not in _sys.modules:
    _spec = _ilu.spec_from_file_location(_NAME, _LIB)
    _mod = _ilu.module_from_spec(_spec)
    _sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)
lib = _sys.modules[_NAME]

process_results = lib.process_results_mc
process_results_binary = lib.make_process_results("label_binary")
macro_f1 = lib.macro_f1
hellaswag_process_docs = lib.hellaswag_process_docs

load_liar = lib.make_loader("liar")
load_covid_constraint = lib.make_loader("covid_constraint")
load_climate_fever = lib.make_loader("climate_fever")
load_fever = lib.make_loader("fever")
load_halueval_qa = lib.make_loader("halueval_qa")
load_halueval_dialogue = lib.make_loader("halueval_dialogue")
load_halueval_summarization = lib.make_loader("halueval_summarization")
load_truthfulqa_mc = lib.make_loader("truthfulqa_mc")
load_piqa = lib.make_loader("piqa")
load_winogrande = lib.make_loader("winogrande")
load_hellaswag = lib.make_loader("hellaswag")
load_arc_challenge = lib.make_loader("arc_challenge")
load_lambada_openai = lib.make_loader("lambada_openai")
load_boolq = lib.make_loader("boolq")
load_rte = lib.make_loader("rte")

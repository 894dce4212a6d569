"""``!function utils.<name>`` for the YAMLs in this folder: the hooks of task_configs/lmq_tasklib.py
(``yaml_hooks``). lm-eval resolves ``utils`` next to each YAML, so each task folder has this same
small loader; it loads the library by path (once per process) so the YAMLs work from the installed
package and with stock ``lm_eval --include_path task_configs`` alike. Add tasks in lmq_tasklib.py.
"""

import hashlib as _hashlib
import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

_LIB = _Path(__file__).resolve().parent.parent / "lmq_tasklib.py"
_NAME = "lmq_tasklib_" + _hashlib.md5(str(_LIB).encode()).hexdigest()[:12]
if _NAME not in _sys.modules:
    _spec = _ilu.spec_from_file_location(_NAME, _LIB)
    _sys.modules[_NAME] = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules[_NAME])
lib = _sys.modules[_NAME]
globals().update(lib.yaml_hooks())

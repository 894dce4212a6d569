"""lm-eval-quant: evaluate any causal LM quantized on the fly inside lm-evaluation-harness.

Layers (lower never imports higher): ``formats`` → ``methods`` / ``accounting`` →
``models`` (the ``hf-quant`` lm-eval model), ``cache``, ``export`` → ``sweep`` / ``report`` → ``cli``.
Importing this package is cheap: nothing heavy (torch, lm_eval) is imported here.
"""

from __future__ import annotations

__version__ = "0.2.0"

_REGISTERED = False


def register() -> None:
    """Register the ``hf-quant`` model with lm-eval's registry.

    lm-eval 0.4.13 loads its built-in models only while the registry is empty, so the built-ins
    are imported first (``lm_eval.models``) and ours is added after them: ``--model hf`` keeps
    working. Idempotent.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import lm_eval.models  # noqa: F401  (built-in models register here)

    from lm_eval_quant.models import hf_quant  # noqa: F401  (@register_model("hf-quant"))
    from lm_eval_quant.models import hf_quant_vllm  # noqa: F401  (issue 14: "hf-quant-vllm")

    _REGISTERED = True


def add_tasks() -> None:
    """Make every lm-eval ``TaskManager`` in this process also search :func:`task_dir` (what the
    ``lm-eval-quant`` command does), so a Python caller needs no ``include_path`` and can let
    ``lm_eval.simple_evaluate`` build its own TaskManager, which hands ``model_args`` to the
    tasks (the perplexity tasks read ``pretrained`` there to find the tokenizer). Idempotent."""
    from lm_eval_quant.cli import add_task_dir

    add_task_dir(task_dir())


def task_dir():
    """Folder of the task YAMLs shipped with the package (wheel) or beside it (checkout).

    Returns a :class:`pathlib.Path`; pathlib is imported here, not at module level, so the
    interpreter start-up hook (which imports this package) stays under its 5 ms budget.
    """
    from pathlib import Path

    here = Path(__file__).resolve().parent
    packaged = here / "task_configs"
    if packaged.is_dir():
        return packaged
    return here.parent / "task_configs"

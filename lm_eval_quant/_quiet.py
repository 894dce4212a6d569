"""Known-harmless noise, silenced in our command-line programs (``lm-eval-quant …``).

Only exact, known messages are dropped; everything else from the same loggers still shows:

* ``torchao`` — "Failed to load …/torchao/_C….so: …": transformers imports torchao (when it is
  installed) while loading any model, and torchao tries its optional compiled kernels, which
  do not exist for every Python/CUDA build. Nothing of ours uses them.
* ``torch.utils._pytree`` — "<enum …> is an Enum subclass and is now natively supported by
  torch.compile …": a deprecation notice about torchao's own registrations.
* ``transformers.tokenization_utils_base`` — "Token indices sequence length is longer than the
  specified maximum sequence length …": lm-eval tokenizes a whole document first and then cuts
  it into windows (rolling perplexity) or truncates it to the model's length itself, so the
  tokenizer's warning about the untruncated list never means a wrong score.
* lm-eval's ``git describe`` call, which prints "fatal: not a git repository" to the terminal when
  run outside a git checkout: :func:`quiet_git_hash` runs the same command with its error output
  discarded (the results file still records the hash when there is one, None otherwise).
"""

from __future__ import annotations

import logging
import subprocess

#: logger name -> predicates on the formatted message; a record matching one is dropped
KNOWN_NOISE = {
    "torchao": (lambda m: m.startswith("Failed to load ") and "torchao" in m and ".so" in m,),
    "torch.utils._pytree": (
        lambda m: "is an Enum subclass and is now natively supported by torch.compile" in m,),
    "transformers.tokenization_utils_base": (
        lambda m: m.startswith("Token indices sequence length is longer than the specified maximum"),),
}


class DropKnown(logging.Filter):
    """Drops the records whose message matches one of ``predicates``."""

    def __init__(self, predicates):
        super().__init__()
        self.predicates = tuple(predicates)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record: let logging handle it as usual
            return True
        return not any(p(msg) for p in self.predicates)


def _add(name: str, predicates) -> None:
    lg = logging.getLogger(name)
    if not any(isinstance(f, DropKnown) and f.predicates == tuple(predicates) for f in lg.filters):
        lg.addFilter(DropKnown(predicates))


def quiet_git_hash():
    """lm-eval's ``get_git_commit_hash`` without git's "fatal: not a git repository" line."""
    try:
        out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
        return out.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError, OSError):
        return None


def install() -> None:
    """Add the filters (idempotent; imports nothing but ``logging``)."""
    for name, preds in KNOWN_NOISE.items():
        _add(name, preds)


def quiet_git() -> None:
    """Make lm-eval's evaluator use :func:`quiet_git_hash` (imports lm_eval; idempotent)."""
    try:
        import lm_eval.evaluator as ev

        if getattr(ev, "get_git_commit_hash", None) is not quiet_git_hash:
            ev.get_git_commit_hash = quiet_git_hash
    except (ImportError, AttributeError) as e:  # lm-eval missing or reorganised: keep its own behaviour
        logging.getLogger(__name__).debug("quiet_git: lm-eval's git hash left as it is: %s", e)

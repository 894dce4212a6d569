"""``lm-eval-quant`` console script (dispatch only).

    lm-eval-quant [lm_eval arguments ...]     # = stock lm_eval + hf-quant + our task_configs
    lm-eval-quant export|cache|sweep|report|demo ... # the package's own tools

Everything that is not one of our subcommands goes to lm-eval's own CLI entry
(``lm_eval.__main__.cli_evaluate``), so every lm_eval flag and subcommand (run, ls, validate)
works. Before that, ``hf-quant`` is registered and the package's ``task_configs`` folder is added
to every TaskManager's search path, merged with a user-given ``--include_path`` (which may also
list several folders separated by ``os.pathsep``; the user's folders win over ours on a name
clash). A :class:`~lm_eval_quant.errors.QuantArgError` anywhere is printed as one line,
``lm-eval-quant: error: <msg>``, exit status 2.
"""

from __future__ import annotations

import os
import sys

PROG = "lm-eval-quant"

SUBCOMMANDS = {
    "export": ("lm_eval_quant.export_cli", "main", "write a quantized model in the GPTQ checkpoint format"),
    "cache": ("lm_eval_quant.cache_cli", "main", "list, measure and trim the quantized-weights cache"),
    "sweep": ("lm_eval_quant.sweep.cli", "main", "run a precision x model-size sweep"),
    "report": ("lm_eval_quant.report.cli", "main", "tables and plots from sweep results"),
    "demo": ("lm_eval_quant.demo", "main", "train tiny offline models, sweep methods × 16/8/4/3/2 bits, write the report"),
}

USAGE = f"""usage: {PROG} [lm_eval arguments ...]
       {PROG} {{{",".join(SUBCOMMANDS)}}} [arguments ...]

{PROG} with lm_eval arguments is the stock `lm_eval` command with the `hf-quant` model
registered and the package's tasks on the task search path (no --include_path needed), e.g.
  {PROG} --model hf-quant --model_args pretrained=PATH,method=rtn,bits=4,group_size=128 --tasks TASK

subcommands:
""" + "".join(f"  {name:<8} {desc}\n" for name, (_, _, desc) in SUBCOMMANDS.items()) + \
    f"(`{PROG} SUBCOMMAND -h` for its options)\n\nlm_eval arguments:\n"


class CliError(Exception):
    """A one-line CLI failure (exit 2)."""


def _quant_error(exc: BaseException | None):
    """The QuantArgError in ``exc``'s cause/context chain, or None (lm_eval may wrap it)."""
    from lm_eval_quant.errors import QuantArgError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, QuantArgError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(msg: object) -> int:
    sys.stdout.flush()
    line = " ".join(str(msg).split())
    sys.stderr.write(f"{PROG}: error: {line}\n")
    sys.stderr.flush()
    return 2


# --- task search path -------------------------------------------------------------------------

def merge_include_paths(include_path, extra) -> list[str]:
    """Our folder(s) ``extra`` first, then the user's (later paths override earlier ones in
    lm-eval's TaskManager). A string may hold several folders separated by ``os.pathsep``."""
    def as_list(p):
        if p is None or p == "":
            return []
        if isinstance(p, (list, tuple)):
            out = []
            for q in p:
                out += as_list(q)
            return out
        p = os.fspath(p)
        return [q for q in p.split(os.pathsep) if q] if isinstance(p, str) else [p]

    merged: list[str] = []
    seen = set()
    for p in as_list(extra) + as_list(include_path):
        key = os.path.realpath(os.path.expanduser(p))
        if key not in seen:
            seen.add(key)
            merged.append(p)
    return merged


def add_task_dir(extra) -> None:
    """Make every lm-eval TaskManager in this process also search ``extra`` (idempotent)."""
    from lm_eval.tasks.manager import TaskManager

    orig = TaskManager.__init__
    if getattr(orig, "_lmq_extra", None) is not None:
        orig._lmq_extra[:] = merge_include_paths(None, [*orig._lmq_extra, os.fspath(extra)])
        return
    extras = [os.fspath(extra)]

    def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
        orig(self, verbosity, merge_include_paths(include_path, extras) or None, *args, **kwargs)

    __init__.__doc__ = orig.__doc__
    __init__.__wrapped__ = orig
    __init__._lmq_extra = extras
    TaskManager.__init__ = __init__


# --- routes -----------------------------------------------------------------------------------

def run_subcommand(name: str, argv: list[str]) -> int:
    modname, attr, _ = SUBCOMMANDS[name]
    try:
        import importlib

        module = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            raise CliError(f"subcommand '{name}' is not available in this installation "
                           f"(module {modname} is missing)") from None
        raise CliError(f"subcommand '{name}' needs the Python package '{e.name}', which is not "
                       f"installed (try: pip install 'lm-eval-quant[all]')") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise CliError(f"subcommand '{name}' is not available ({modname} has no {attr}())")
    rc = fn(list(argv))
    return int(rc or 0)


def run_lm_eval(argv: list[str]) -> int:
    """Stock lm_eval CLI in this process, with hf-quant registered and task_configs added."""
    import lm_eval_quant

    lm_eval_quant.register()
    from lm_eval_quant.models.hf_quant import precheck_command_line

    precheck_command_line(list(argv))  # bad hf-quant arguments: one line before the task index
    add_task_dir(lm_eval_quant.task_dir())
    from lm_eval_quant import _quiet

    _quiet.quiet_git()  # no "fatal: not a git repository" outside a checkout
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = [PROG, *argv]
    try:
        rc = cli_evaluate()
    finally:
        sys.argv = saved
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lm_eval_quant import _quiet

    _quiet.install()  # known-harmless library noise (see lm_eval_quant/_quiet.py)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return run_subcommand(argv[0], argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            sys.stdout.write(USAGE)
            sys.stdout.flush()
            return run_lm_eval(["run", "--help"]) if argv else run_lm_eval([])
        return run_lm_eval(argv)
    except CliError as e:
        return _fail(e)
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - only QuantArgError is turned into one line
        q = _quant_error(e)
        if q is None:
            raise
        return _fail(q)


if __name__ == "__main__":
    sys.exit(main())

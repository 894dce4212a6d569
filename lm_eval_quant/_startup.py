"""Interpreter start-up hook: register ``hf-quant`` with the stock ``lm_eval`` CLI.

The wheel ships ``lm_eval_quant_startup.pth`` at the site-packages root. Python's ``site`` runs
its one ``import`` line at every interpreter start; that line calls :func:`install` unless the
environment variable ``LMQ_NO_AUTOREGISTER`` is set to a true value (``1``, ``true``, ``yes``, ``on``),
in which case nothing at all is imported.

:func:`install` only puts a tiny finder at the front of ``sys.meta_path`` (this module imports
nothing but ``sys``: no torch, no lm_eval, no importlib.util). The finder does nothing for any
module except ``lm_eval.models``: for that one it lets the normal finders locate the module and
wraps its loader, so that right after lm-eval's built-in models have registered themselves it
calls :func:`lm_eval_quant.register`, which adds ``hf-quant`` *after* them (lm-eval 0.4.13 only
imports its built-ins while the model registry is empty, so registering earlier would hide ``hf``).
The finder then removes itself. A failure to register is reported in one line and never breaks
lm_eval itself.
"""

import sys

TARGET = "lm_eval.models"
ENV_OFF = "LMQ_NO_AUTOREGISTER"
_TRUE = ("1", "true", "yes", "on")


def disabled(environ=None) -> bool:
    """True when ``LMQ_NO_AUTOREGISTER`` asks for no auto-registration."""
    if environ is None:
        import os  # already imported by ``site``: free

        environ = os.environ
    return environ.get(ENV_OFF, "").strip().lower() in _TRUE


class _LoaderProxy:
    """Delegates to the real loader; runs the callback after the module body has executed."""

    def __init__(self, loader, callback):
        self._lmq_loader = loader
        self._lmq_callback = callback

    def create_module(self, spec):
        create = getattr(self._lmq_loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        real = self._lmq_loader
        real.exec_module(module)
        # leave no trace of the proxy on the finished module
        try:
            module.__loader__ = real
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = real
        except (AttributeError, TypeError):
            pass
        self._lmq_callback(module)

    def __getattr__(self, name):  # get_code, get_source, is_package, get_resource_reader, ...
        return getattr(self._lmq_loader, name)


class PostImportFinder:
    """Meta-path finder that calls ``callback(module)`` once ``TARGET`` has finished importing."""

    def __init__(self, target, callback):
        self.target = target
        self.callback = callback
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderProxy(spec.loader, self._fire)
        return spec

    def _fire(self, module):
        self.uninstall()
        self.callback(module)

    def uninstall(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def on_lm_eval_models(module=None) -> None:
    """Callback: register hf-quant now that lm-eval's built-in models are registered."""
    try:
        import lm_eval_quant

        lm_eval_quant.register()
    except Exception as e:  # never break lm_eval for the user: say it in one line
        msg = " ".join(str(e).split())
        sys.stderr.write(
            f"lm-eval-quant: warning: could not register model 'hf-quant' "
            f"({type(e).__name__}: {msg}); set {ENV_OFF}=1 to silence\n"
        )


def install() -> bool:
    """Install the hook (idempotent; a no-op when ``LMQ_NO_AUTOREGISTER`` is set). Returns True
    when a finder was added or the callback ran."""
    if disabled():
        return False
    if TARGET in sys.modules:  # lm_eval.models already imported: register right away
        on_lm_eval_models(sys.modules[TARGET])
        return True
    for f in sys.meta_path:
        if isinstance(f, PostImportFinder) or getattr(f, "_lmq_hook", False):
            return False
    finder = PostImportFinder(TARGET, on_lm_eval_models)
    finder._lmq_hook = True
    sys.meta_path.insert(0, finder)
    return True

"""Hatchling build hook: editable installs ship only the start-up .pth.

A regular wheel force-includes ``task_configs/`` (as ``lm_eval_quant/task_configs``) and the
``lm_eval_quant_startup.pth``. An editable install imports the package from the checkout, where
``lm_eval_quant.task_dir()`` finds ``task_configs/`` beside it, so copying the tasks into
site-packages would only leave a stale half-package there; the .pth is still wanted so that the
stock ``lm_eval`` command sees ``hf-quant`` in a development install too.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name == "wheel" and version == "editable":
            build_data["force_include_editable"] = {
                "lm_eval_quant_startup.pth": "lm_eval_quant_startup.pth",
            }

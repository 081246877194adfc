"""The export extra, checked before any stage imports it.

Imported first by the modules that drive torch (``pipeline`` and, through it, the switchable and add-adapter
stages), so that an install without ``peft_export[export]`` gets one MissingDependencyError (an ImportError)
naming the extra, chained to the real ImportError, instead of a ModuleNotFoundError from deep inside a stage.
"""

from __future__ import annotations

import importlib.util

from ..errors import require

EXPORT_MODULES = ("torch", "transformers", "peft")

for _module in EXPORT_MODULES:
    # Only a missing module is imported here (its import fails at once, and the error chains to it): an installed
    # one is left to the stage that needs it, so that an adapter config refused before the merge imports nothing.
    if importlib.util.find_spec(_module) is None:
        require(_module, "export")

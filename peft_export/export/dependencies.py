"""The export extra, checked before any stage imports it.

Imported first by the modules that drive torch (``pipeline`` and, through it, the switchable and add-adapter
stages), so that an install without ``peft_export[export]`` gets one MissingDependencyError (an ImportError)
naming the extra, chained to the real ImportError, instead of a ModuleNotFoundError from deep inside a stage.
"""

from __future__ import annotations

from ..errors import require

EXPORT_MODULES = ("torch", "transformers", "peft")

for _module in EXPORT_MODULES:
    require(_module, "export")

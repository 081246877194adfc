"""``peft_export.load``: open any export with the runtime class of the task its manifest names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runtime.config import read_manifest
from ..runtime.exported_model import ExportedModel
from . import task_of_manifest
from .base import load_reference


def load(path: str | Path, **options: Any) -> ExportedModel:
    """Open the export at ``path`` with the class its task runs on (``EmbeddingModel`` for an embedding export),
    passing ``options`` on (``device``, ``backend``, ``intra_op_threads``, ... as that class takes them).

    >>> model = peft_export.load("out/")   # doctest: +SKIP
    """
    task = task_of_manifest(read_manifest(path))
    runtime_class = load_reference(task.runtime_class)
    return runtime_class(path, **options)

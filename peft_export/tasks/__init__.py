"""Model types (tasks): one module each, registered here. See tasks/base.py and docs/layout.md."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import GraphOutput, Task, load_reference
from .embedding import EMBEDDING
from .reranker import RERANKER

TASKS: dict[str, Task] = {task.name: task for task in (EMBEDDING, RERANKER)}

__all__ = ["EMBEDDING", "RERANKER", "TASKS", "GraphOutput", "Task", "load_reference", "task_named", "task_of_manifest"]


def task_named(name: str) -> Task:
    if isinstance(name, str) and name in TASKS:
        return TASKS[name]
    raise ConfigError(f"Unknown task {name!r}; this version of peft_export knows {', '.join(sorted(TASKS))}. "
                      "Upgrade peft_export to open this export.")


def task_of_manifest(manifest: dict[str, Any]) -> Task:
    """The task an export was made for: its manifest's "task" (exports without one are embedding exports)."""
    return task_named(manifest.get("task", EMBEDDING.name))

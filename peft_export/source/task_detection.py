"""Which model type (task) a model folder holds, read from its files, never by importing anything.

A Sentence Transformers folder names its class in config_sentence_transformers.json ("model_type":
"SentenceTransformer", "CrossEncoder"); a plain transformers folder names its architecture in config.json
(``BertForSequenceClassification`` is a reranker's). A task is matched by what it declares
(``Task.sentence_transformers_class``, ``Task.architecture_suffix``); a folder that names neither is an embedder,
as every folder was before tasks were detected.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..tasks import EMBEDDING, TASKS, Task
from .st_config import read_json

ST_CONFIG_FILE = "config_sentence_transformers.json"


def _by_st_class(path: Path) -> Task | None:
    model_type = read_json(path).get("model_type")
    if model_type is None:
        return None
    for task in TASKS.values():
        if task.sentence_transformers_class == model_type:
            return task
    known = ", ".join(sorted(t.sentence_transformers_class for t in TASKS.values()))
    raise ConfigError(f"{path}: model_type {model_type!r} is not a model type peft_export exports ({known})")


def _by_architecture(path: Path) -> Task | None:
    architectures = read_json(path).get("architectures") or []
    if not isinstance(architectures, list):
        return None
    for task in TASKS.values():
        suffix = task.architecture_suffix
        if suffix and any(isinstance(a, str) and a.endswith(suffix) for a in architectures):
            return task
    return None


def detect_task(pipeline_folder: Path, base_folder: Path, encoder_folder: Path) -> Task:
    """The task of a model: the Sentence Transformers class its folders name (an adapter-only folder's own
    config first, then its base's), else its transformers architecture, else the embedding task."""
    for folder in dict.fromkeys((pipeline_folder, base_folder)):
        if (folder / ST_CONFIG_FILE).is_file():
            task = _by_st_class(folder / ST_CONFIG_FILE)
            if task is not None:
                return task
    if (encoder_folder / "config.json").is_file():
        return _by_architecture(encoder_folder / "config.json") or EMBEDDING
    return EMBEDDING

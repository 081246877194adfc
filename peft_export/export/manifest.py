"""What every export's manifest (peft_export.json) records besides its own entries: the sha256 of each file and
the versions of the libraries that made it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..runtime.config import MANIFEST_FILE, RuntimeConfig
from ..source.resolve import ResolvedModel, recorded_base, recorded_source
from ..tasks import EMBEDDING


def record_file_hashes(manifest: dict[str, Any], folder: Path) -> None:
    """``manifest["export"]["sha256"]``: the sha256 of every file of the finished export folder (graph, external
    data, tokenizer files, runtime config with its prompts) but the manifest itself and the adapter files, which
    have their own entries. The runtime checks them at load and refuses a file the manifest does not cover."""
    from ..runtime.export_files import sha256_of

    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                   if path.is_file() and path.name != MANIFEST_FILE and path.relative_to(folder).parts[0] != "adapters")
    manifest["export"]["sha256"] = {name: sha256_of(folder / name) for name in names}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("peft_export", "torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "tokenizers", "safetensors", "openvino", "sentence-transformers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def export_manifest(resolved: ResolvedModel, export_entry: dict[str, Any], config: RuntimeConfig, parity: dict,
              seconds: float) -> dict[str, Any]:
    """The manifest of an export of ``resolved``: base, adapters, the format's entry, pipeline, measured parity."""
    # An export records its task unless it is an embedding export: exports without a "task" are embedding exports
    # (every export before tasks were recorded), and theirs stay as they were.
    task = {} if resolved.task is EMBEDDING else {"task": resolved.task.name}
    return {
        "format": "peft_export",
        "format_version": 1,
        **task,
        "created_unix": int(time.time()),
        "base": recorded_base(resolved),
        "adapters": [
            {"name": a.name, "source": recorded_source(a.source), "sha256": {a.weights.name: a.sha256},
             **a.config.summary()}
            for a in resolved.adapters
        ],
        "merge_mode": "merged" if resolved.adapters else "none",
        "export": export_entry,
        "pipeline": _pipeline_entry(resolved, config),
        "validation": parity,
        "library_versions": library_versions(),
        "export_seconds": round(seconds, 2),
    }


def _pipeline_entry(resolved: ResolvedModel, config: RuntimeConfig) -> dict[str, Any]:
    """What runs around the encoder: pooling, Dense layers and normalisation for an embedder; a task with settings
    of its own (``RuntimeConfig.task_config``: a reranker's num_labels and activation) records those instead."""
    if config.task_config:
        return {**config.task_config, "dimension": config.dimension, "max_seq_length": config.max_seq_length}
    return {
        "pooling": config.pooling_modes, "dense_layers": len(resolved.pipeline.dense),
        "normalize": config.normalize, "dimension": config.dimension, "max_seq_length": config.max_seq_length,
    }

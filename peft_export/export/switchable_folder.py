"""The torch-free part of a switchable export's folder: which files it holds, the lock and the one manifest rename
that every add/remove-adapter goes through, and ``remove_adapter`` itself, which rewrites the adapter list, the
manifest and its file list and never touches a graph, so ``peft-export remove-adapter`` runs without the export
extra (see switchable_changes.py for the atomicity these steps give)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import AdapterNotFoundError, ConfigError, PeftExportError
from ..runtime.backends import detect_backend
from ..runtime.config import MANIFEST_FILE, RuntimeConfig, read_manifest
from ..runtime.export_files import confined
from ..runtime.atomic_file import write_json
from ..tasks import task_of_manifest
from .output_folder import crash_point, folder_size, locked

logger = logging.getLogger(__name__)

MERGE_MODE = "switchable"
ADAPTERS_DIR = "adapters"

def adapter_suffix(backend: str) -> str:
    """The file suffix of the adapter files the runtime ``backend`` reads."""
    from ..runtime import onnxruntime_adapters, openvino_adapters

    return (openvino_adapters if backend == "openvino" else onnxruntime_adapters).ADAPTER_SUFFIX


def adapter_file(name: str, suffix: str) -> str:
    return f"{ADAPTERS_DIR}/{name}{suffix}"


def graph_files(config: RuntimeConfig) -> list[str]:
    """The graph's files: ``model.onnx``, or an OpenVINO IR's ``.xml`` and ``.bin``."""
    if Path(config.model_file).suffix == ".xml":
        return [config.model_file, str(Path(config.model_file).with_suffix(".bin"))]
    return [config.model_file]


def load_switchable(folder: Path) -> tuple[RuntimeConfig, dict[str, Any]]:
    if not folder.is_dir():
        raise ConfigError(f"Export folder not found: {folder}")
    manifest = read_manifest(folder)
    # The manifest says which adapters the export holds, and its task which runtime config file is the export's.
    config = RuntimeConfig.load(folder, manifest, task_of_manifest(manifest).runtime_config_file)
    if manifest.get("merge_mode") != MERGE_MODE or not config.lora_slots:
        found = (f"{folder} is a {manifest.get('merge_mode', 'merged')!r} export; adapters can only be added to or "
                 "removed from a switchable export")
        raise ConfigError(f'{found} (export_onnx_model(BASE, OUTPUT, adapters=["NAME=PATH"], switchable=True))'
                          ).in_cli_words(f"{found} (peft-export merge-onnx BASE --adapter NAME=PATH --switchable)")
    return config, manifest


def check_writable(folder: Path) -> None:
    """Refuse a read-only export before minutes of validation, with one line instead of an OSError traceback."""
    for place in (folder, folder / ADAPTERS_DIR):
        if place.is_dir() and not os.access(place, os.W_OK):
            raise PeftExportError(f"{place} is not writable (read-only file system or permissions); the export "
                                  "was not changed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_leftovers(folder: Path, config: RuntimeConfig, suffix: str) -> None:
    """Called under the folder lock, which every add/remove-adapter holds while it writes: remove what a killed
    one left behind. Candidate files of dead processes, adapter files that the manifest does not list (written,
    never committed; or replaced, never deleted) and temporary files of interrupted writes. Best effort: a
    read-only folder keeps them."""
    listed = {entry["file"] for entry in config.adapters.values()}
    adapters_dir = folder / ADAPTERS_DIR
    doomed = [p for p in adapters_dir.glob(".*.candidate")
              if not (p.name.split(".")[-2].isdigit() and _alive(int(p.name.split(".")[-2])))]
    doomed += [p for p in adapters_dir.glob(f"*{suffix}") if f"{ADAPTERS_DIR}/{p.name}" not in listed]
    doomed += [*adapters_dir.glob(".*.tmp"), *folder.glob(".*.tmp"), *folder.glob("*.json.tmp")]
    for path in doomed:
        try:
            path.unlink()
        except OSError:
            continue


def commit_manifest(folder: Path, manifest: dict[str, Any], step: str) -> None:
    """The one switch of an add/remove-adapter: rename the new manifest into place. It keeps the export's file
    hashes (``export.sha256``: no other file changes) and records the adapter files' own."""
    write_json(folder / MANIFEST_FILE, manifest)
    crash_point(f"{step}-committed")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def remove_adapter(output: str | Path, name: str, log: Callable[[str], None] = logger.info) -> None:
    """Remove an adapter's entry (one rename of the manifest), then its weight file; the graph is never modified."""
    folder = Path(output)
    load_switchable(folder)
    check_writable(folder)
    with locked(folder):
        config, manifest = load_switchable(folder)
        suffix = adapter_suffix(detect_backend(config))
        clean_leftovers(folder, config, suffix)
        if name not in config.adapters:
            raise AdapterNotFoundError(f"{folder} has no adapter named {name!r}; it has {sorted(config.adapters)}")
        removed = config.adapters.pop(name)["file"]
        if config.default_adapter == name:
            config.default_adapter = None
            log(f"{name!r} was the default adapter; the export now loads with no adapter active")
        manifest["adapters"] = [a for a in manifest.get("adapters", []) if a["name"] != name]
        manifest["default_adapter"] = config.default_adapter
        manifest["export"]["files"] = graph_files(config) + [e["file"] for e in config.adapters.values()]
        pairs = manifest.get("validation", {}).get("adapter_pair_max_abs_diff", {})
        for key in [k for k in pairs if name in k.split(" vs ")]:
            del pairs[key]
        manifest["size_bytes"] = folder_size(folder) - file_size(folder / removed)
        try:
            commit_manifest(folder, manifest, "remove-adapter")
        except OSError as err:
            raise PeftExportError(f"Removing adapter {name!r} from {folder} failed: {err.strerror or err}; the "
                                  "export was not changed") from err
        with contextlib.suppress(OSError):  # a leftover file is removed by the next change
            confined(folder, removed, f"adapter {name!r}'s file").unlink()
    log(f"removed adapter {name!r} from {folder}")

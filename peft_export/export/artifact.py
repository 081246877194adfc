"""Atomic export folders: build in a temporary folder beside the target, write the manifest last, rename.

A kill at any moment leaves either no folder at the target or a complete one; stale temporary folders carry a
recognisable prefix and are removed by the next export to the same target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import OutputExistsError, PeftExportError
from ..runtime.config import MANIFEST_FILE

_TMP_PREFIX = ".peft-export-tmp-"
_STALE_SECONDS = 3600


def _clean_stale(parent: Path, name: str) -> None:
    for leftover in parent.glob(f"{_TMP_PREFIX}{name}-*"):
        try:
            if time.time() - leftover.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def check_output_target(target: str | Path, force: bool = False) -> Path:
    """Refuse an existing output unless ``force``; called before the slow stages and again when writing."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not force:
        raise OutputExistsError(f"Output folder {target} already exists; pass --force (force=True) to overwrite it")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"Output path {target} exists and is not a folder")
    return target


@contextmanager
def atomic_output_folder(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit it replaces ``target``. On error nothing is left behind."""
    target = check_output_target(target, force)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=parent))
    except OSError as err:
        raise PeftExportError(f"Cannot write to {parent}: {err.strerror or err}") from err
    try:
        yield tmp
        if not (tmp / MANIFEST_FILE).is_file():
            raise PeftExportError("internal error: the export finished without writing its manifest")
        _make_readable(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-old-", dir=parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PeftExportError(f"Writing {target} failed: {err.strerror or err}; nothing was written") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """Give every file and folder of the export the modes the user's umask gives new files (usually 0644 and
    0755): mkdtemp and tools that write through temporary files (ONNX's external data writer) create them 0600 or
    0700, which a server running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

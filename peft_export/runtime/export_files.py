"""The files an export folder lists: where they may be, and that they hold what the manifest recorded.

Paths are confined by what is *written* (no absolute path, no ``..``), never by where symlinks resolve: the Hugging
Face cache stores every file of a snapshot as a symlink into its ``blobs/`` folder, so an export or adapter downloaded
from a hub is made of symlinks by design. What a file holds is then checked by its sha256 against the manifest, so a
symlink (or a copy) that holds anything else is refused by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import ConfigError, UnsafeModelError


def confined(folder: Path, relative: object, what: str) -> Path:
    """``folder / relative`` for a path written in an export's files; refuses absolute paths, ``..`` and anything
    that is not a plain relative path, naming ``what`` (e.g. "embedding_config.json's model_file")."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UnsafeModelError(f"{folder}: {what} must be a relative path inside the folder, found {relative!r}")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise UnsafeModelError(
            f"{folder}: {what} {relative!r} points outside the export folder (absolute path or '..'); refused"
        )
    return folder / relative


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: object, what: str) -> None:
    """Refuse ``path`` unless its sha256 is ``expected`` (as the manifest records it), naming the file."""
    if not isinstance(expected, str) or len(expected) != 64:
        raise ConfigError(f"{path}: peft_export.json records no valid sha256 for {what} ({expected!r}); the manifest "
                          "was modified. Export the folder again.")
    try:
        found = sha256_of(path)
    except FileNotFoundError as err:
        raise ConfigError(f"{path} is missing: peft_export.json lists it as {what}. Export the folder again, or "
                          "re-add the adapter with `peft-export add-adapter --force`.") from err
    except OSError as err:
        raise ConfigError(f"{path} ({what}) cannot be read: {err.strerror or err}") from err
    if found != expected:
        raise ConfigError(
            f"{path} does not hold what peft_export.json records for {what}: sha256 {found[:16]}... instead of "
            f"{expected[:16]}... The file was modified, corrupted or replaced (an interrupted change?); refused. "
            "Export the folder again, or re-add the adapter with `peft-export add-adapter --force`."
        )


def verify_graph_files(folder: Path, manifest: dict) -> None:
    """Check every graph file the manifest records a hash for (``export.sha256``: model.onnx and its external data,
    or an OpenVINO IR's .xml and .bin). Exports made before hashes were recorded have none to check."""
    recorded = ((manifest.get("export") or {}).get("sha256")) or {}
    if not isinstance(recorded, dict):
        raise ConfigError(f"{folder}: peft_export.json's export.sha256 must map file names to hashes")
    for relative, expected in sorted(recorded.items()):
        path = confined(folder, relative, "a graph file in peft_export.json")
        verify_sha256(path, expected, f"graph file {relative!r}")

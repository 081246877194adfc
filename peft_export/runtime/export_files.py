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


# Exports written before every file was hashed (only the graph and adapters were) get this advice.
REEXPORT = ("Export the folder again with this version of peft_export (earlier versions hashed only the graph and "
            "adapters, so their tokenizer and runtime config cannot be checked)")


def recorded_hashes(folder: Path, manifest: dict) -> dict[str, str]:
    """``export.sha256``: relative path -> sha256 of every file of the export but the manifest and the adapter files
    (which have their own ``file_sha256``). A manifest without it cannot vouch for anything: refused."""
    export = manifest.get("export")
    recorded = export.get("sha256") if isinstance(export, dict) else None
    if recorded is None:
        raise ConfigError(f"{folder}: peft_export.json records no file hashes (export.sha256), so nothing the "
                          f"runtime would read can be checked; refused. {REEXPORT}.")
    if not isinstance(recorded, dict):
        raise ConfigError(f"{folder}: peft_export.json's export.sha256 must map file names to hashes, found "
                          f"{type(recorded).__name__}. {REEXPORT}.")
    return recorded


def expected_sha256(folder: Path, manifest: dict, relative: str) -> str:
    """The hash the manifest records for ``relative``; a file the runtime reads without one is refused."""
    recorded = recorded_hashes(folder, manifest)
    if relative not in recorded:
        raise ConfigError(f"{folder}: peft_export.json records no sha256 for {relative}, which the runtime reads; "
                          f"refused. {REEXPORT}.")
    return recorded[relative]


def verified_bytes(folder: Path, manifest: dict, relative: str) -> bytes:
    """The bytes of ``folder / relative``, read once and checked against the manifest: what is parsed is what
    was hashed."""
    expected = expected_sha256(folder, manifest, relative)
    path = confined(folder, relative, "a file in peft_export.json")
    data = _read(path, Path.read_bytes)
    _compare(path, hashlib.sha256(data).hexdigest(), expected, relative)
    return data


def _read(path: Path, read):
    try:
        return read(path)
    except FileNotFoundError as err:
        raise ConfigError(f"{path} not found: peft_export.json lists it as part of the export; export the folder "
                          "again") from err
    except OSError as err:
        raise ConfigError(f"{path} cannot be read: {err.strerror or err}") from err


def _compare(path: Path, found: str, expected: object, relative: str) -> None:
    if not isinstance(expected, str) or len(expected) != 64:
        raise ConfigError(f"{path}: peft_export.json records no valid sha256 for {relative} ({expected!r}); the "
                          f"manifest was modified. {REEXPORT}.")
    if found != expected:
        raise ConfigError(f"{path} does not hold what peft_export.json records for {relative}: sha256 {found[:16]}... "
                          f"instead of {expected[:16]}... The file was modified, corrupted or replaced; refused. "
                          f"{REEXPORT}.")


def changed_file_error(folder: Path, manifest: dict, names: list[str], cause: Exception) -> ConfigError | None:
    """Where a backend could not read the graph (``cause``): the error naming the first of ``names`` that is there
    but does not hold what the manifest records, with what the backend said; None where each one present does (a
    missing or truncated file is left to the backend's own error, which says more)."""
    try:
        recorded = recorded_hashes(folder, manifest)
    except ConfigError:
        return None
    for relative in names:
        path = confined(folder, relative, "a file in peft_export.json")
        if relative not in recorded or not path.is_file():
            continue
        try:
            _compare(path, _read(path, sha256_of), recorded[relative], relative)
        except ConfigError as err:
            return ConfigError(f"{err} (The backend could not read it either: {cause})")
    return None


def graph_files(model_file: str) -> list[str]:
    """The files of a graph: ``model.onnx`` (its external data is listed beside it in the manifest), or an OpenVINO
    IR's ``.xml`` and ``.bin``."""
    if PurePosixPath(model_file).suffix == ".xml":
        return [model_file, str(PurePosixPath(model_file).with_suffix(".bin"))]
    return [model_file]


def verify_export_files(folder: Path, manifest: dict, required: list[str]) -> None:
    """Check every file ``export.sha256`` lists (graph, external data, tokenizer, runtime config, tokenizer
    configs); each of ``required`` (what the runtime reads) must be listed."""
    recorded = recorded_hashes(folder, manifest)
    for relative in required:
        expected_sha256(folder, manifest, relative)
    for relative, expected in sorted(recorded.items()):
        path = confined(folder, relative, "a file in peft_export.json")
        _compare(path, _read(path, sha256_of), expected, relative)

"""Write a file so that a reader never sees half of it: a temporary file in the same folder, then a rename; and
the renames that put a finished folder in place in one step (export folders, ``embed --ray`` outputs)."""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then rename the result onto ``path`` (readable like the rest of the export).
    The temporary file is flushed to disk before the rename and removed when anything fails (a full disk, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the new content is on disk before any name points to it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the system or the file system does not offer it (the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl: no wrapper
        return False
    at_fdcwd = -100
    if call(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(destination), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(destination))


def rename_no_replace(source: Path, destination: Path) -> bool:
    """Rename ``source`` to ``destination``, failing (``FileExistsError``) if something is there, even an empty
    folder (which ``os.rename`` would replace); False when this system cannot (nothing was changed then)."""
    return _renameat2(source, destination, _RENAME_NOREPLACE)


def exchange_folders(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step; False when this system cannot (nothing was changed then)."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and rename, so a reader never sees half a file (and a failed write,
    a full disk say, leaves no temporary file behind)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

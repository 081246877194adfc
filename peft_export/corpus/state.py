"""The state file of an embed job (which job, which parts are done and their hashes) and the lock on its output.

The job is identified by the input (its absolute path and format), the export (path and the SHA-256 of its
manifest) and every option that changes the vectors or the layout (column, ids, kept columns, adapter, prompt,
batch size, rows per part, output kind). Batch size and rows per part are in it because they decide which texts
share a padded batch, which moves the last bits of a vector; the thread and process counts are not (measured:
the same vectors with 1 and 2 ONNX Runtime threads), so a job may resume with other parallelism.

The input's *content* decides what can be kept: each finished part records the SHA-256 of the input rows it holds
and of its own file. A re-run keeps the parts up to the first one whose input rows or file changed (fixing a bad
line in place keeps the parts before it) and redoes the rest; nothing on disk is trusted without its hash.

The file is replaced atomically after each part is on disk: a kill between the two leaves a part that the next
run rewrites, never a state that counts a part that is not there.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError
from ..runtime.atomic_file import write_atomically
from ..runtime.config import MANIFEST_FILE
from .writers import STATE_FILE, OutputTarget, file_sha256

STATE_VERSION = 2


@dataclass
class JobState:
    job: dict[str, Any]
    total_rows: int
    dimension: int
    parts_done: int = 0
    rows_done: int = 0
    complete: bool = False
    part_sha256: list[str] = field(default_factory=list)  # of each finished part's file
    input_sha256: list[str] = field(default_factory=list)  # of the input rows each finished part holds
    output_sha256: str | None = None  # of the final file of a one-file output, once complete
    version: int = STATE_VERSION

    def keep_parts(self, parts: int, part_rows: int) -> None:
        """Forget every part from ``parts`` on (they are redone)."""
        self.parts_done = parts
        self.rows_done = min(parts * part_rows, self.total_rows)
        del self.part_sha256[parts:]
        del self.input_sha256[parts:]
        self.complete = False
        self.output_sha256 = None


def describe_job(input_path: Path, export_path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the parts (the input's content is checked per part)."""
    manifest = export_path / MANIFEST_FILE
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {
        "input": {"path": str(input_path.absolute())},
        "export": {"path": str(export_path.absolute()), "manifest_sha256": digest},
        "options": options,
    }


def load_state(work_dir: Path) -> JobState | None:
    path = work_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
        return JobState(**data)
    except (OSError, ValueError, TypeError) as err:
        raise OutputExistsError(f"{path} cannot be read ({err}); pass --force to start the job again") from err


def save_state(work_dir: Path, state: JobState) -> None:
    text = json.dumps(asdict(state), indent=1) + "\n"
    write_atomically(work_dir / STATE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def first_changed_part(target: OutputTarget, state: JobState, input_sha256: list[str]) -> tuple[int, str] | None:
    """``(index, why)`` of the first finished part that is missing, changed on disk or made from input rows that
    have changed since; None when every finished part checks out."""
    for i in range(state.parts_done):
        path = target.part_path(i)
        if i >= len(input_sha256) or state.input_sha256[i] != input_sha256[i]:
            return i, f"the input rows of {path.name} changed since it was written"
        if not path.is_file():
            return i, f"{path.name} is missing"
        if file_sha256(path) != state.part_sha256[i]:
            return i, f"{path.name} does not match the hash recorded when it was written"
    return None


def job_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``what: was -> now`` for each field that differs between two job descriptions."""
    found = []
    for key in sorted(set(saved) | set(current)):
        was, now = saved.get(key), current.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            found += job_differences(was, now, f"{prefix}{key}.")
        elif was != now:
            found.append(f"{prefix}{key}: {was!r} -> {now!r}")
    return found


def check_same_job(saved: JobState, job: dict[str, Any], work_dir: Path) -> None:
    differences = job_differences(saved.job, job)
    if differences:
        raise OutputExistsError(
            f"{work_dir} holds parts of another embed job, so it cannot be resumed: "
            + "; ".join(differences)
            + ". Pass --force to discard them and start again, or choose another output path"
        )


class OutputLock:
    """An exclusive ``flock`` on the output's lock file (``.NAME.embed.lock`` beside it) for the job's life, taken
    by a local job and by ``--ray`` alike: a second job of either kind on the same output is refused while this one
    runs, and the kernel releases the lock when this process dies (kill -9 included). The file is removed on
    release; one left by a killed job is simply locked again by the next."""

    def __init__(self, target: OutputTarget):
        self.path = target.lock_path
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:  # named by the output, which the user chose, not by our lock file's name
                raise OSError(err.errno, err.strerror, str(target.path)) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputExistsError(
                        f"{target.path} is in use by another embed job (process {holder or 'unknown'}); wait for "
                        f"it to finish or choose another output path") from err
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it on release after we opened it: lock the file now at the path
        else:
            raise OutputExistsError(f"Cannot lock {self.path}: it is replaced as fast as it is locked; is another "
                                    f"program deleting it?")
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)  # while still locked: a job that opened it meanwhile sees it gone
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def _same_file(fd: int, path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)

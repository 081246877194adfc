"""The state file of an embed job: which job it is and how many parts are done, written after each part.

The job is identified by the input (absolute path, size, modification time), the export (path and the SHA-256 of
its manifest) and every option that changes the vectors or the layout (column, ids, kept columns, adapter, prompt,
batch size, rows per part, output kind). Batch size and rows per part are in it because they decide which texts
share a padded batch, which moves the last bits of a vector; the thread and process counts are not (measured:
the same vectors with 1 and 2 ONNX Runtime threads), so a job may resume with other parallelism.

The file is replaced atomically after each part is on disk: a kill between the two leaves a part that the next
run rewrites, never a state that counts a part that is not there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError
from ..runtime.atomic_file import write_atomically
from ..runtime.config import MANIFEST_FILE
from .writers import STATE_FILE

STATE_VERSION = 1


@dataclass
class JobState:
    job: dict[str, Any]
    total_rows: int
    dimension: int
    parts_done: int = 0
    rows_done: int = 0
    complete: bool = False
    version: int = STATE_VERSION


def describe_job(input_path: Path, export_path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the parts."""
    stat = input_path.stat()
    manifest = export_path / MANIFEST_FILE
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {
        "input": {"path": str(input_path.absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
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

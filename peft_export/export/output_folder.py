"""Atomic export folders: build in a temporary folder beside the target, write the manifest last, then switch.

At every instant the target path holds the old export or the new one, never nothing and never a mix:

* a new target is one ``rename`` of the finished temporary folder;
* ``--force`` over an existing export swaps the two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
  the old export ends up in the temporary folder and is deleted from there. Where the exchange is not available
  (another OS, a file system without it) the old export is renamed aside first; a kill in the moment before the new
  one is renamed in leaves the old one aside, and the next export to that folder puts it back.

Each temporary folder has an owner file beside it (``<folder>.owner``), locked (``flock``) by the process that
builds it for as long as it lives. The next export into the same parent removes every temporary folder whose owner
is gone (a killed run), at once, and leaves those of live processes alone. ``crash_point`` lets tests kill the
process at a named moment (``PEFT_EXPORT_CRASH_AT=NAME``) to check exactly that.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError, OutputExistsError, PeftExportError
from ..runtime.atomic_file import exchange_folders, rename_no_replace
from ..runtime.config import MANIFEST_FILE, read_json_object

_TMP_PREFIX = ".peft-export-tmp-"
_OWNER_SUFFIX = ".owner"
_CLAIM_PREFIX = ".peft-export-claim-"
_PREVIOUS_SUFFIX = "-previous"  # the old export, renamed aside where folders cannot be exchanged
_UNOWNED_STALE_SECONDS = 3600  # temporary folders without an owner file (older versions): removed after an hour
CRASH_ENV = "PEFT_EXPORT_CRASH_AT"


def crash_point(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup runs) when ``PEFT_EXPORT_CRASH_AT`` names this moment; for tests."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _try_lock(fd: int) -> bool:
    """Take the owner lock without waiting; False when a live process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the caller falls back to the file's age
        raise NotImplementedError from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def owned_by_live_process(owner: Path) -> bool:
    """True while the process that created ``owner`` (an owner file) still runs: it holds the file's flock."""
    try:
        fd = os.open(owner, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell (permissions): leave it alone
    try:
        return not _try_lock(fd)
    except NotImplementedError:
        return time.time() - os.fstat(fd).st_mtime < _UNOWNED_STALE_SECONDS
    finally:
        os.close(fd)


def _claim(parent: Path, stem: str) -> int:
    """Create ``parent/stem.owner`` already locked (made under another name, locked, then renamed, so no cleaner
    ever sees it unlocked); return its descriptor, which holds the lock until closed or the process dies."""
    fd, made = tempfile.mkstemp(prefix=_CLAIM_PREFIX, dir=parent)
    try:
        try:
            _try_lock(fd)
        except NotImplementedError:
            pass
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(made, parent / f"{stem}{_OWNER_SUFFIX}")
    except BaseException:
        os.close(fd)
        Path(made).unlink(missing_ok=True)
        raise
    return fd


def _release(parent: Path, stem: str, fd: int) -> None:
    (parent / f"{stem}{_OWNER_SUFFIX}").unlink(missing_ok=True)
    os.close(fd)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an export folder for one change: an add-adapter or remove-adapter, or the switch of an export written
    over it with force (an flock on the folder itself, so no file is created; the kernel drops it when the process
    dies). A folder another change holds is refused, never waited for: two changes are never interleaved, and
    neither runs on an export the other has just replaced."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; callers must not run two changes at once
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(f"{folder} is being changed by another peft-export process (add-adapter, "
                                    "remove-adapter or an export with --force); wait for it to finish, then run "
                                    "this again") from None
        yield
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a temporary folder; a symlink (an output path that was a link to a folder, swapped out) is unlinked,
    never followed."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _restore_previous(entry: Path, parent: Path) -> None:
    """An old export that a killed ``--force`` had renamed aside goes back to its path if nothing is there."""
    if not entry.name.endswith(_PREVIOUS_SUFFIX) or not (entry / "export" / MANIFEST_FILE).is_file():
        return
    name = (entry / "target_name").read_text(encoding="utf-8").strip()
    if name and Path(name).name == name and not (parent / name).exists():
        os.rename(entry / "export", parent / name)


def clean_dead_temporaries(parent: Path) -> None:
    """Remove the temporary folders in ``parent`` whose owner died, and their owner files. An old export left aside
    by a killed ``--force`` (see the module docstring) is put back at its path if nothing is there."""
    try:
        entries = list(parent.glob(f"{_TMP_PREFIX}*"))
    except OSError:
        return
    for entry in entries:
        if entry.name.endswith(_OWNER_SUFFIX) or not (entry.is_dir() or entry.is_symlink()):
            continue
        owner = entry.with_name(entry.name + _OWNER_SUFFIX)
        try:
            if owner.exists():
                if owned_by_live_process(owner):
                    continue
            elif time.time() - entry.stat().st_mtime < _UNOWNED_STALE_SECONDS:
                continue  # no owner file: maybe an older version's export in progress
            _restore_previous(entry, parent)
            _remove(entry)
            owner.unlink(missing_ok=True)
        except OSError:
            continue
    for claim in parent.glob(f"{_CLAIM_PREFIX}*"):  # killed between creating an owner file and naming it
        try:
            if time.time() - claim.stat().st_mtime > 60 and not owned_by_live_process(claim):
                claim.unlink()
        except OSError:
            continue
    for owner in parent.glob(f"{_TMP_PREFIX}*{_OWNER_SUFFIX}"):
        if not owner.with_name(owner.name[: -len(_OWNER_SUFFIX)]).exists() and not owned_by_live_process(owner):
            owner.unlink(missing_ok=True)


def check_output_target(target: str | Path, force: bool = False) -> Path:
    """Refuse an existing output unless ``force``, and even with ``force`` one that holds anything an export did not
    write (:func:`foreign_entries`); called before the slow stages and again when writing."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not force:
        raise OutputExistsError(f"Output folder {target} already exists; pass force=True to overwrite it").in_cli_words(
            f"Output folder {target} already exists; pass --force to overwrite it")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"Output path {target} exists and is not a folder")
    if target.exists():
        foreign = foreign_entries(target)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputExistsError(
                f"Output folder {target} holds files that no export wrote ({shown}); not replacing it even with "
                "force=True, which only replaces an earlier export. Move them away or choose another output path"
            ).in_cli_words(f"Output folder {target} holds files that no export wrote ({shown}); not replacing it "
                           "even with --force, which only replaces an earlier export. Move them away or choose "
                           "another output path")
    return target


def _leftover_of_a_change(relative: Path) -> bool:
    """A file an interrupted write or add-adapter of this package leaves (``.NAME.*.tmp``, an adapter candidate, an
    adapter file written but never listed), which the next change removes."""
    name, top = relative.name, relative.parts[0]
    if len(relative.parts) > 2 or (len(relative.parts) == 2 and top != "adapters"):
        return False
    if name.startswith(".") and name.endswith((".tmp", ".candidate")):
        return True
    return top == "adapters" and len(relative.parts) == 2 and name.endswith((".onnx_adapter", ".safetensors"))


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` (an existing output) no export wrote: everything, where it has no manifest of this
    package (its marker); else every file, link or folder that its manifest does not list (``export.sha256``,
    ``export.files``) and that is not a leftover of an interrupted change. An empty folder holds nothing foreign."""
    try:
        manifest = read_json_object(folder / MANIFEST_FILE)
    except (OSError, ConfigError):
        manifest = {}
    export = manifest.get("export") if manifest.get("format") == "peft_export" else None
    if not isinstance(export, dict):  # not an export: all of it (its top level named; a home folder is not walked)
        return sorted(path.name for path in folder.iterdir())
    entries = sorted(folder.rglob("*"))
    hashes, files = export.get("sha256"), export.get("files")
    listed = [*(hashes if isinstance(hashes, dict) else ()), *(files if isinstance(files, list) else ())]
    known = {str(name) for name in listed} | {MANIFEST_FILE}
    folders = {parent.as_posix() for name in known for parent in Path(name).parents} | {"adapters"}
    foreign = []
    for path in entries:
        relative = path.relative_to(folder)
        name = relative.as_posix()
        if path.is_symlink() or not (name in known or (path.is_dir() and name in folders)
                                      or (path.is_file() and _leftover_of_a_change(relative))):
            foreign.append(name)
    return foreign


def _switch_into_place(tmp: Path, target: Path, parent: Path) -> None:
    """Make the finished ``tmp`` the export at ``target``; the old export (if any) is deleted afterwards."""
    if not target.exists():
        if not rename_no_replace(tmp, target):
            os.rename(tmp, target)
        return
    with locked(target):  # no add/remove-adapter is changing the old export while it is replaced
        if exchange_folders(tmp, target):  # target: the new export; tmp: the old one
            crash_point("export-swapped")
            _remove(tmp)
            return
        _rename_aside_then_in(tmp, target, parent)


def _rename_aside_then_in(tmp: Path, target: Path, parent: Path) -> None:
    """Without a folder exchange: rename the old export aside (into an owned folder, so that a kill right now leaves
    it restorable: the next export puts it back), then the new one into place."""
    stem = f"{_TMP_PREFIX}{target.name}-{secrets.token_hex(6)}{_PREVIOUS_SUFFIX}"
    fd = _claim(parent, stem)
    try:
        aside = parent / stem
        aside.mkdir()
        (aside / "target_name").write_text(target.name, encoding="utf-8")
        os.rename(target, aside / "export")
        crash_point("export-old-aside")
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(aside / "export", target)  # the old export back where it was
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        _release(parent, stem, fd)


@contextmanager
def atomic_output_folder(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit it replaces ``target``. On error nothing is left behind."""
    target = check_output_target(target, force)
    parent = target.parent
    stem = f"{_TMP_PREFIX}{target.name}-{secrets.token_hex(6)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_dead_temporaries(parent)
        fd = _claim(parent, stem)
    except OSError as err:
        raise PeftExportError(f"Cannot write to {parent}: {err.strerror or err}") from err
    tmp = parent / stem
    try:
        try:
            tmp.mkdir()
        except OSError as err:
            raise PeftExportError(f"Cannot write to {parent}: {err.strerror or err}") from err
        yield tmp
        if not (tmp / MANIFEST_FILE).is_file():
            raise PeftExportError("internal error: the export finished without writing its manifest")
        _make_readable(tmp)
        crash_point("export-before-switch")
        check_output_target(target, force)
        _switch_into_place(tmp, target, parent)
    except PeftExportError:  # ours already say what happened (OutputExistsError is an OSError too)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PeftExportError(f"Writing {target} failed: {err.strerror or err}; nothing was written") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(parent, stem, fd)


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


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

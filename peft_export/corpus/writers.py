"""Corpus outputs: numbered part files, each written atomically, and the final one-file Parquet or ``.npy``.

Three output kinds, chosen by the output path:

* ``DIR`` (no ``.parquet`` / ``.npy`` suffix): a folder of ``part-000000.parquet``, ... plus the job's state file;
  the parts are the result (readable by pyarrow, pandas, Spark, Ray Data, DuckDB as one dataset).
* ``FILE.parquet``: parts go to ``FILE.parquet.parts/``, then are copied into one file, part by part.
* ``FILE.npy``: one ``(rows, dimension)`` float32 array in input order, written part by part (plain writes, so a
  full disk is an error, never a SIGBUS from a memory map); parts in ``FILE.npy.parts/``. Vectors only: ids and
  kept columns need Parquet.

The final file of a one-file output appears by one rename. Its ``.parts`` folder then keeps only the state file
(embed's marker, with the file's hash), so a re-run says "already complete" and ``--force`` knows the file is
embed's.

``embed --ray`` writes a folder of Ray's Parquet files marked by ``_embed_ray.json``; it builds it in a temporary
folder beside the output (``.NAME.embed-tmp-XXXXXXXX``, marked from the start) that becomes the output by one
rename. Either kind of job locks the output through ``.NAME.embed.lock`` beside it (see ``state.OutputLock``) and
removes the temporary folders a killed ``--ray`` run left (:func:`remove_leftovers`).

Parquet rows hold the id column under its input name, then the kept columns, then ``embedding`` as a fixed-size
list of float32.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError, OutputExistsError, PeftExportError, require
from ..runtime.atomic_file import write_atomically

EMBEDDING_COLUMN = "embedding"
PARTS_SUFFIX = ".parts"
STATE_FILE = "_embed_state.json"  # embed's marker: a folder without it (or RAY_MARKER) is not embed's
RAY_MARKER = "_embed_ray.json"  # the marker of an ``embed --ray`` output: its Parquet files are Ray's
LOCK_FILE = "_embed.lock"  # where earlier versions locked the output (inside it); still recognised as embed's
LEFTOVER_INFIX = ".embed-tmp-"  # ``.NAME.embed-tmp-XXXXXXXX``: a --ray output being built, or an old one going
KINDS = ("parquet-folder", "parquet-file", "npy")
# Suffixes of files that are not an output embed writes: "-o v2.csv" is refused, not made a folder of Parquet.
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".txt", ".text", ".npz", ".pkl", ".pickle",
                 ".arrow", ".feather", ".h5", ".hdf5", ".pt", ".safetensors", ".gz", ".zip", ".xlsx", ".avro",
                 ".orc")
_PART_NAME = re.compile(r"part-\d{6}\.(parquet|npy)")


@dataclass(frozen=True)
class OutputTarget:
    """Where the result goes (``path``) and where its parts and state file live (``work_dir``)."""

    path: Path
    kind: str

    @classmethod
    def for_path(cls, path: str | Path) -> OutputTarget:
        path = Path(path).expanduser().absolute()
        suffix = path.suffix.lower()
        if suffix in FILE_SUFFIXES:
            raise InputError(f"Output {path.name}: embed writes a folder of Parquet parts (no suffix), FILE.parquet "
                             f"or FILE.npy, not {suffix}; name the output accordingly")
        kind = "npy" if suffix == ".npy" else "parquet-file" if suffix in (".parquet", ".pq") else "parquet-folder"
        return cls(path, kind)

    @property
    def work_dir(self) -> Path:
        return self.path if self.kind == "parquet-folder" else self.path.with_name(self.path.name + PARTS_SUFFIX)

    @property
    def part_suffix(self) -> str:
        return ".npy" if self.kind == "npy" else ".parquet"

    def part_path(self, index: int) -> Path:
        return self.work_dir / f"part-{index:06d}{self.part_suffix}"

    def part_paths(self) -> list[Path]:
        return sorted(self.work_dir.glob(f"part-*{self.part_suffix}")) if self.work_dir.is_dir() else []

    def state_path(self) -> Path:
        return self.work_dir / STATE_FILE

    def temporary_files(self) -> list[Path]:
        """Temporary files a killed run of this writer can leave (write_atomically's ``.NAME.XXXX.tmp``)."""
        found = list(self.work_dir.glob(".*.tmp")) if self.work_dir.is_dir() else []
        if self.kind != "parquet-folder" and self.path.parent.is_dir():
            found += self.path.parent.glob(f".{glob_escape(self.path.name)}.*.tmp")
        return found

    def make_parent(self) -> None:
        """Create the folder the output goes in (and its lock file); part of the path being a file is ENOTDIR."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as err:  # mkdir says EEXIST when the path is a file
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.path.parent)) from err

    @property
    def lock_path(self) -> Path:
        """The lock file of this output, beside it (a --ray output is replaced by a rename, so not inside it)."""
        return self.path.with_name(f".{self.path.name}.embed.lock")

    def marker(self) -> str | None:
        """Which embed wrote ``work_dir``: STATE_FILE (a local job), RAY_MARKER (``--ray``), or None (not embed)."""
        for name in (STATE_FILE, RAY_MARKER):
            if (self.work_dir / name).is_file():
                return name
        return None

    def foreign_entries(self) -> list[str]:
        """Names in ``work_dir`` that embed did not write: anything but its parts, state, lock and temporary files
        (a local job) or the Parquet files, their temporary files and the marker (``--ray``), dotfiles and folders
        included. Everything
        counts as foreign in a folder without one of embed's markers."""
        if not self.work_dir.is_dir():
            return []
        marker = self.marker()
        foreign = []
        for entry in sorted(self.work_dir.iterdir()):
            name = entry.name
            if marker == RAY_MARKER:
                mine = (name == RAY_MARKER or (name.endswith(".parquet") and not name.startswith("."))
                        or (name.startswith(".part-") and name.endswith(".tmp")))  # a killed write task's
            else:
                mine = (name in (STATE_FILE, LOCK_FILE) or _PART_NAME.fullmatch(name)
                        or (name.startswith(("._embed_state.json.", ".part-")) and name.endswith(".tmp")))
            if not (marker and mine and entry.is_file() and not entry.is_symlink()):
                if name != LOCK_FILE:  # a lock file alone: left by an earlier version's job refused at the start
                    foreign.append(name)
        return foreign

    def clear(self) -> None:
        """Delete a previous result, its parts and state (``--force``), or a ``--ray`` output's files. The caller has
        checked that everything here is embed's (:meth:`foreign_entries`)."""
        if self.kind != "parquet-folder":
            self.path.unlink(missing_ok=True)
        for path in self.temporary_files():
            path.unlink(missing_ok=True)
        if self.work_dir.is_dir():
            for entry in self.work_dir.iterdir():
                entry.unlink()

    def new_leftover_path(self) -> Path:
        """A fresh ``.NAME.embed-tmp-XXXXXXXX`` beside the output (see :func:`remove_leftovers`)."""
        return self.path.with_name(f".{self.path.name}{LEFTOVER_INFIX}{secrets.token_hex(4)}")


def remove_leftovers(target: OutputTarget) -> None:
    """Delete the temporary folders that a killed ``embed --ray`` run left beside ``target``: one being built
    (marked by RAY_MARKER from the start), an old output moved aside to be replaced, or an empty one (killed before
    its marker was written). Call it with the output locked, so that no live job owns them. A folder of that name
    holding anything embed did not write is not deleted: the error names it."""
    parent = target.path.parent
    if not parent.is_dir():
        return
    for folder in sorted(parent.glob(f".{glob_escape(target.path.name)}{LEFTOVER_INFIX}*")):
        if folder.is_symlink() or not folder.is_dir():  # an old output that was a link to a folder, moved aside
            folder.unlink()
            continue
        foreign = OutputTarget(folder, "parquet-folder").foreign_entries()
        if foreign:
            raise OutputExistsError(f"{folder} is named like a temporary folder of embed --ray but holds files "
                                    f"embed did not write ({', '.join(foreign[:5])}); move it away or delete it, "
                                    f"then run again")
        shutil.rmtree(folder)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def arrow_type(pa: Any, kind: str) -> Any:
    return {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
            "json": pa.string()}[kind]


def write_part(target: OutputTarget, index: int, embeddings: np.ndarray, columns: dict[str, Any],
               kinds: dict[str, str]) -> None:
    """Write part ``index`` (through a temporary file and a rename, so a kill never leaves half a part)."""
    path = target.part_path(index)
    if target.kind == "npy":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, embeddings, allow_pickle=False)
        write_atomically(path, write)
        return
    table = embeddings_table(embeddings, columns, kinds)
    pq = require("pyarrow.parquet", "corpus")
    write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def embeddings_table(embeddings: np.ndarray, columns: dict[str, Any], kinds: dict[str, str]):
    """A pyarrow table: the given columns (lists typed by ``kinds``, or pyarrow arrays), then ``embedding``."""
    pa = require("pyarrow", "corpus")
    rows, dim = embeddings.shape  # (rows, dimension)
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    return columns_table({**columns, EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(flat, dim)}, kinds)


def columns_table(columns: dict[str, Any], kinds: dict[str, str]):
    """A pyarrow table of ``columns`` (lists typed by ``kinds``, or pyarrow arrays), as every output writes them."""
    pa = require("pyarrow", "corpus")
    arrays = []
    for name, values in columns.items():
        if isinstance(values, list):
            try:
                values = pa.array(values, type=arrow_type(pa, kinds.get(name, "string")))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
                raise InputError(f"Column {name!r} cannot be written to Parquet: {err}") from err
        arrays.append(values)
    return pa.Table.from_arrays(arrays, names=list(columns))


def assemble(target: OutputTarget, parts: int, rows: int, dimension: int, job: dict,
             after_part: Callable[[int], None] | None = None) -> None:
    """Turn the parts into the final output (nothing to do for a folder of parts): written to a temporary file
    and renamed once, so a kill leaves the parts and the state to finish from. ``after_part(i)``: called after
    part ``i`` is copied (tests kill the process there)."""
    paths = [target.part_path(i) for i in range(parts)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PeftExportError(f"{target.work_dir} lacks {', '.join(missing[:3])}; run the same command again to "
                              f"redo them")
    if target.kind == "parquet-folder":
        return
    step = after_part or (lambda i: None)
    if target.kind == "npy":
        def write_npy(tmp: str) -> None:
            with open(tmp, "wb") as out:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": (rows, dimension)}
                np.lib.format.write_array_header_1_0(out, header)
                for i, path in enumerate(paths):
                    out.write(np.ascontiguousarray(np.load(path), dtype=np.float32).tobytes())
                    step(i)
        write_atomically(target.path, write_npy)
        return
    pq = require("pyarrow.parquet", "corpus")

    def write_parquet(tmp: str) -> None:
        schema = pq.read_schema(paths[0]).with_metadata({b"peft_export.embed": json.dumps(job).encode()})
        with pq.ParquetWriter(tmp, schema) as writer:
            for i, path in enumerate(paths):
                writer.write_table(pq.read_table(path).replace_schema_metadata(schema.metadata))
                step(i)
    write_atomically(target.path, write_parquet)


def finish(target: OutputTarget) -> None:
    """After :func:`assemble` and the final state: drop the parts of a one-file output (its state stays)."""
    if target.kind != "parquet-folder":
        for path in target.part_paths():
            path.unlink()
def remove_parts_from(target: OutputTarget, first: int) -> None:
    """Delete parts numbered ``first`` and above: written after the last saved state, redone on resume."""
    for path in target.part_paths():
        try:
            number = int(path.name[len("part-"):].split(".")[0])
        except ValueError:
            continue
        if number >= first:
            os.unlink(path)

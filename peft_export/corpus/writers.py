"""Corpus outputs: numbered part files, each written atomically, and the final one-file Parquet or ``.npy``.

Three output kinds, chosen by the output path:

* ``DIR`` (no ``.parquet`` / ``.npy`` suffix): a folder of ``part-000000.parquet``, ... plus the job's state file;
  the parts are the result (readable by pyarrow, pandas, Spark, Ray Data, DuckDB as one dataset).
* ``FILE.parquet``: parts go to ``FILE.parquet.parts/``, then are copied into one file, part by part.
* ``FILE.npy``: one ``(rows, dimension)`` float32 array in input order, assembled through a memory map; parts in
  ``FILE.npy.parts/``. Vectors only: ids and kept columns need Parquet.

Parquet rows hold the id column under its input name, then the kept columns, then ``embedding`` as a fixed-size
list of float32.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OutputExistsError, PeftExportError, require
from ..runtime.atomic_file import write_atomically

EMBEDDING_COLUMN = "embedding"
PARTS_SUFFIX = ".parts"
STATE_FILE = "_embed_state.json"
KINDS = ("parquet-folder", "parquet-file", "npy")


@dataclass(frozen=True)
class OutputTarget:
    """Where the result goes (``path``) and where its parts and state file live (``work_dir``)."""

    path: Path
    kind: str

    @classmethod
    def for_path(cls, path: str | Path) -> OutputTarget:
        path = Path(path).expanduser().absolute()
        suffix = path.suffix.lower()
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

    def looks_like_ours(self) -> bool:
        """True when ``work_dir`` holds nothing but parts, a state file and temporary files of this writer, so
        --force may delete it without taking a user's other files with it."""
        if not self.work_dir.is_dir():
            return True
        for entry in self.work_dir.iterdir():
            name = entry.name
            if entry.is_dir() or not (name == STATE_FILE or name.startswith("part-") or name.startswith(".")):
                return False
        return True

    def remove(self) -> None:
        """Delete a previous result and its parts (``--force``)."""
        if self.kind != "parquet-folder" and self.path.is_dir():
            raise OutputExistsError(f"Output {self.path} is a folder; a {self.kind} output must be a file")
        if self.kind == "parquet-folder" and self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"Output {self.path} is a file; name a folder (or FILE.parquet, FILE.npy)")
        if not self.looks_like_ours():
            raise OutputExistsError(f"{self.work_dir} holds files that are not embed output; not deleting it even "
                                    f"with --force. Choose another output path")
        if self.kind != "parquet-folder":
            self.path.unlink(missing_ok=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)


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
    arrays, names = [], []
    for name, values in columns.items():
        if isinstance(values, list):
            try:
                values = pa.array(values, type=arrow_type(pa, kinds.get(name, "string")))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
                raise InputError(f"Column {name!r} cannot be written to Parquet: {err}") from err
        arrays.append(values)
        names.append(name)
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
    names.append(EMBEDDING_COLUMN)
    return pa.Table.from_arrays(arrays, names=names)


def assemble(target: OutputTarget, parts: int, rows: int, dimension: int, job: dict) -> None:
    """Turn the parts into the final output (nothing to do for a folder of parts); atomic, so a kill leaves the
    parts and the state to finish from."""
    paths = [target.part_path(i) for i in range(parts)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PeftExportError(f"{target.work_dir} lacks {', '.join(missing[:3])}; run again with --force")
    if target.kind == "parquet-folder":
        return
    if target.kind == "npy":
        def write_npy(tmp: str) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dimension))
            at = 0
            for path in paths:
                part = np.load(path, mmap_mode="r")
                out[at:at + len(part)] = part
                at += len(part)
            out.flush()
            del out
        write_atomically(target.path, write_npy)
        return
    pq = require("pyarrow.parquet", "corpus")

    def write_parquet(tmp: str) -> None:
        schema = pq.read_schema(paths[0]).with_metadata({b"peft_export.embed": json.dumps(job).encode()})
        with pq.ParquetWriter(tmp, schema) as writer:
            for path in paths:
                writer.write_table(pq.read_table(path).replace_schema_metadata(schema.metadata))
    write_atomically(target.path, write_parquet)


def finish(target: OutputTarget) -> None:
    """After :func:`assemble`: drop the parts folder of a one-file output."""
    if target.kind != "parquet-folder":
        shutil.rmtree(target.work_dir, ignore_errors=True)


def remove_parts_from(target: OutputTarget, first: int) -> None:
    """Delete parts numbered ``first`` and above: written after the last saved state, redone on resume."""
    for path in target.part_paths():
        try:
            number = int(path.name[len("part-"):].split(".")[0])
        except ValueError:
            continue
        if number >= first:
            os.unlink(path)

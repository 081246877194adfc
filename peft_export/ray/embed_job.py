"""``peft-export embed --ray``: Ray Data reads the input, :func:`peft_export.ray.embed_dataset` embeds it, Ray
writes Parquet. Thin on purpose: sizing the actor pool and keeping workers torch-free is ``peft_export.ray``'s job.

The output keeps the promises of the local job. It is locked for the job's life (the same lock, so a local job
and a ``--ray`` job on one output refuse each other). Ray writes into a temporary folder beside the output that
carries embed's marker (``_embed_ray.json``) from the start and becomes the output by one rename once Ray has
finished: at every instant the output is absent, the old one, or complete. A run killed before that leaves only the
temporary folder, which the next run of either kind recognises by its name and marker and deletes. Not resumable:
a re-run starts from scratch (Ray retries failed tasks itself). ``--force`` replaces only an output embed wrote,
and only once the new one is complete.

Rows come out in input order by construction, not by Ray's ``preserve_order``: that option orders blocks between
Ray's operators, and with it set rows were still written out of order (about 1 run in 10 of the 70-row test job
wrote rows 64-69 before rows 32-63 in its one Parquet file). So every input row carries its row number (the
staged copy of the input adds it), the rows are embedded wherever and in whatever order Ray runs them, and the last
stage writes each run of consecutive row numbers, sorted, as ``part-<first row, 12 digits>.parquet`` (the row
number column dropped): the files, read in name order, are the input order. Before the output is put in place the
driver checks that the files' names and row counts tile rows 0 to n - 1 exactly, no gap and no overlap.

What can be checked here is checked before Ray starts: the output is not the input and holds nothing else, every
input row is read and checked (named by line, as without Ray), and the adapter and prompt exist in the export."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..corpus.job import check_existing_output, check_output_outside_input, kill_if_asked, output_in_use
from ..corpus.readers import CorpusReader
from ..corpus.state import describe_job
from ..corpus.workers import EncodeSettings, check_settings
from ..corpus.writers import EMBEDDING_COLUMN, LEFTOVER_INFIX, RAY_MARKER, OutputTarget, columns_table
from ..errors import InputError, OutputExistsError, PeftExportError, require
from ..runtime.atomic_file import exchange_folders, rename_no_replace


STAGE_ROWS = 65536  # rows per staged Parquet file
WRITE_ROWS = 16384  # rows a write task takes: at most this many per output file
ROW_COLUMN = "__peft_export_row"  # the input row number, carried from the staged input to the writer
PART_PATTERN = "part-*.parquet"


def _stage_as_parquet(reader: CorpusReader, target: OutputTarget) -> Path:
    """The input rewritten as Parquet files by the local job's own reader, with each row's number in ROW_COLUMN (the
    key the writer orders by), so that Ray reads the rows, texts, ids and column types the local job reads (Ray's
    own readers differ: its text reader drops blank lines and splits at every Unicode line break, its JSON and CSV
    readers turned the id "007" into 7 and stopped at a newline inside a quoted CSV field). A Parquet input is
    staged too (its text, id and kept columns only), for the row numbers. One streaming pass; the folder is named
    like the job's other temporary folders and carries embed's marker first, so a killed run's copy is removed by
    the next (remove_leftovers)."""
    pa = require("pyarrow", "corpus")
    pq = require("pyarrow.parquet", "corpus")
    stage = target.path.parent / f".{target.path.name}{LEFTOVER_INFIX}input"
    stage.mkdir()
    (stage / RAY_MARKER).write_text("{}\n", encoding="utf-8")
    for index, chunk in enumerate(reader.chunks(STAGE_ROWS)):
        rows = pa.array(range(chunk.first_row, chunk.first_row + len(chunk.texts)), pa.int64())
        table = columns_table({**chunk.columns, reader.column: chunk.texts, ROW_COLUMN: rows},
                              {**reader.kinds, reader.column: "string"})
        pq.write_table(table, stage / f"input-{index:06d}.parquet")
    return stage


def write_runs_in_order(batch, folder: str):
    """A write task of the Ray job: ``batch``'s rows sorted by ROW_COLUMN, each run of consecutive row numbers
    written (without ROW_COLUMN) as ``folder/part-<its first row, 12 digits>.parquet``: a temporary file renamed
    into place, so a retried or killed task leaves whole files only, under the same names. Returns one row per
    file: its first row and its row count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    batch = batch.sort_by(ROW_COLUMN)
    rows = batch.column(ROW_COLUMN).to_numpy()
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # where a run of consecutive row numbers ends
    starts, written = ([0, *breaks.tolist()] if len(rows) else []), []
    for start, stop in zip(starts, [*breaks.tolist(), len(rows)]):
        first = int(rows[start])
        path = Path(folder) / f"part-{first:012d}.parquet"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(batch.slice(start, stop - start).drop_columns([ROW_COLUMN]), tmp)
        os.replace(tmp, path)
        written.append((first, stop - start))
    return pa.table({"first_row": pa.array([w[0] for w in written], pa.int64()),
                     "rows": pa.array([w[1] for w in written], pa.int64())})


def check_parts_tile(folder: Path, expected_rows: int) -> int:
    """The number of rows in ``folder``'s part files, after checking that their names and row counts cover rows 0
    to ``expected_rows`` - 1 exactly once, in name order (else PeftExportError naming the first gap or overlap)."""
    pq = require("pyarrow.parquet", "corpus")
    position = 0
    for path in sorted(folder.glob(PART_PATTERN)):
        first = int(path.stem.removeprefix("part-"))
        if first != position:
            raise PeftExportError(f"the Ray job wrote {path.name} where row {position} was due ("
                                  f"{'a gap' if first > position else 'rows written twice'}); run it again")
        position += pq.ParquetFile(path).metadata.num_rows
    if position != expected_rows:
        raise PeftExportError(f"the Ray job wrote {position} rows of {expected_rows}; run it again")
    return position


def _check_target(target: OutputTarget, force: bool) -> None:
    """Refuse what the local job refuses (a file, a folder embed did not write, even with ``force``), and any
    existing output without ``force``: a --ray job does not continue an earlier one."""
    if not force and target.path.is_dir() and not target.foreign_entries():
        raise OutputExistsError(f"Output {target.path} already exists; pass --force to replace it (embed --ray "
                                f"starts from scratch, it does not resume)")
    check_existing_output(target, force)


def embed_with_ray(export: str, input: str, output: str, *, address: str = "local", column: str = "text",
                   id_column: str | None = None, keep_columns: list[str] | tuple[str, ...] = (),
                   adapter: str | None = None, prompt_name: str | None = None, batch_size: int = 32,
                   input_format: str | None = None, force: bool = False) -> int:
    """Embed ``input`` on Ray into the folder ``output``; returns the number of rows written. ``address``: "local"
    starts a Ray instance on this machine (or joins the one RAY_ADDRESS names), else a cluster's address."""
    target = OutputTarget.for_path(output)
    if target.kind != "parquet-folder":
        raise InputError(f"--ray writes a folder of Parquet files; name a folder, not {target.path.name}")
    if EMBEDDING_COLUMN in (id_column, *keep_columns):
        raise InputError("'embedding' is the name of the output's vector column; it cannot be kept or be the id")
    if ROW_COLUMN in (column, id_column, *keep_columns):
        raise InputError(f"{ROW_COLUMN!r} is the name embed --ray gives the row numbers; rename that column")
    if not Path(export).is_dir():
        raise PeftExportError(f"Export folder not found: {export}")
    reader = CorpusReader(input, column, id_column, tuple(keep_columns), input_format)
    source, fmt = reader.path, reader.format
    check_output_outside_input(source, target)
    _check_target(target, force)
    total_rows = reader.scan()  # a bad row is named by its line here, not in Ray tracebacks from a worker
    settings = EncodeSettings(str(export), adapter, prompt_name, batch_size, threads=1)
    check_settings(settings.open_model(), settings)  # an adapter name on a merged export, an unknown prompt
    try:
        from . import embed_dataset
    except ImportError as err:
        raise InputError("--ray needs peft_export.ray and Ray Data: pip install 'peft_export[ray]'") from err
    ray = require("ray", "ray")
    ray_data = require("ray.data", "ray")
    options = {"format": fmt, "column": column, "id_column": id_column, "keep_columns": list(keep_columns),
               "adapter": adapter, "prompt_name": prompt_name, "batch_size": batch_size, "output_kind": "ray"}
    marker = {"job": describe_job(source, Path(export), options)}

    def write(folder: Path) -> None:
        """Start Ray (or join it) and write the embedded dataset into ``folder``."""
        if not ray.is_initialized():
            from .local import init_ray

            init_ray(None if address == "local" else address)  # a local instance listens on loopback only
        ds = ray_data.read_parquet(str(staged))
        # Not what keeps the order (the row numbers do): fewer, longer runs of consecutive rows, so fewer files.
        # Set on this dataset's own context, not on the caller's current one.
        ds.context.execution_options.preserve_order = True
        ds = embed_dataset(ds, export, column=column, adapter=adapter, prompt_name=prompt_name,
                           batch_size=batch_size, id_column=id_column)
        keep = [name for name in dict.fromkeys(([id_column] if id_column else []) + list(keep_columns))]
        ds = ds.select_columns([*keep, ROW_COLUMN, EMBEDDING_COLUMN])
        try:
            ds.map_batches(write_runs_in_order, batch_size=WRITE_ROWS, batch_format="pyarrow",
                           fn_kwargs={"folder": str(folder)}).materialize()
            for leftover in folder.glob(".part-*.tmp"):  # of a write task that died and was run again
                leftover.unlink()
            shutil.rmtree(staged, ignore_errors=True)  # read in full: its disk space back before the output moves
        except Exception as err:  # a RayTaskError wraps the worker's error: its last line, not Ray's traceback
            cause = getattr(err, "cause", None) or err
            last = (str(cause).strip().splitlines() or [""])[-1]
            raise PeftExportError(f"the Ray job failed: {type(cause).__name__}: {last}") from err

    with output_in_use(target):
        _check_target(target, force)  # again, locked: another job may have finished meanwhile
        staged = _stage_as_parquet(reader, target)
        try:
            return _build_and_put_in_place(target, marker, write, total_rows)
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def _build_and_put_in_place(target: OutputTarget, marker: dict, write: Callable[[Path], None],
                            expected_rows: int) -> int:
    """``write`` the output into a temporary folder beside it, marked as embed's before anything else is in it,
    check that its parts hold the ``expected_rows`` rows in order, then put it in place; the number of rows."""
    building = target.new_leftover_path()
    building.mkdir()
    try:
        (building / RAY_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        write(building)
        kill_if_asked("ray-written")
        rows = check_parts_tile(building, expected_rows)
        _put_in_place(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)  # what a kill leaves goes at the next run
        raise
    return rows


def _put_in_place(building: Path, target: OutputTarget) -> None:
    """Make the finished folder ``building`` the output in one step. An old output (checked to be embed's, and
    locked) is exchanged with it in one step where the system can, else renamed aside first (the output is absent
    for that moment, never partial); either way the old one ends in a temporary folder and is deleted from there."""
    path = target.path
    if not (path.exists() or path.is_symlink()):
        if not rename_no_replace(building, path):
            os.rename(building, path)
        return
    if exchange_folders(building, path):  # path: the new output; building: the old one
        old = building
    else:
        old = target.new_leftover_path()
        os.rename(path, old)
        try:
            os.rename(building, path)
        except OSError:
            os.rename(old, path)  # the old output back where it was
            raise
    kill_if_asked("ray-swapped")
    if old.is_symlink():  # the output was a link to a folder: the link goes, never what it points to
        old.unlink()
    else:
        shutil.rmtree(old)

"""``peft-export embed --ray``: Ray Data reads the input, :func:`peft_export.ray.embed_dataset` embeds it, Ray
writes Parquet. Thin on purpose: sizing the actor pool and keeping workers torch-free is ``peft_export.ray``'s job.

The output keeps the promises of the local job. It is locked for the job's life (the same lock, so a local job
and a ``--ray`` job on one output refuse each other). Ray writes into a temporary folder beside the output that
carries embed's marker (``_embed_ray.json``) from the start and becomes the output by one rename once Ray has
finished: at every instant the output is absent, the old one, or complete. A run killed before that leaves only the
temporary folder, which the next run of either kind recognises by its name and marker and deletes. Not resumable:
a re-run starts from scratch (Ray retries failed tasks itself). ``--force`` replaces only an output embed wrote,
and only once the new one is complete.

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


def _stage_as_parquet(reader: CorpusReader, target: OutputTarget) -> Path:
    """A JSONL, CSV or text input rewritten as Parquet files by the local job's own reader, so that Ray reads the
    rows, texts, ids and column types the local job reads (Ray's own readers differ: its text reader drops blank
    lines and splits at every Unicode line break, its JSON and CSV readers turned the id "007" into 7 and stopped at
    a newline inside a quoted CSV field). One streaming pass; the folder is named like the job's other temporary
    folders and carries embed's marker first, so a killed run's copy is removed by the next (remove_leftovers)."""
    pq = require("pyarrow.parquet", "corpus")
    stage = target.path.parent / f".{target.path.name}{LEFTOVER_INFIX}input"
    stage.mkdir()
    (stage / RAY_MARKER).write_text("{}\n", encoding="utf-8")
    for index, chunk in enumerate(reader.chunks(STAGE_ROWS)):
        table = columns_table({**chunk.columns, reader.column: chunk.texts}, {**reader.kinds, reader.column: "string"})
        pq.write_table(table, stage / f"input-{index:06d}.parquet")
    return stage


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
    if not Path(export).is_dir():
        raise PeftExportError(f"Export folder not found: {export}")
    reader = CorpusReader(input, column, id_column, tuple(keep_columns), input_format)
    source, fmt = reader.path, reader.format
    check_output_outside_input(source, target)
    _check_target(target, force)
    reader.scan()  # a bad row is named by its line here, not in Ray tracebacks from a worker
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
        ray_data.DataContext.get_current().execution_options.preserve_order = True  # rows come out in input order
        ds = ray_data.read_parquet(str(staged or source))
        ds = embed_dataset(ds, export, column=column, adapter=adapter, prompt_name=prompt_name,
                           batch_size=batch_size, id_column=id_column)
        keep = [name for name in dict.fromkeys(([id_column] if id_column else []) + list(keep_columns))]
        ds = ds.select_columns([*keep, EMBEDDING_COLUMN])
        try:
            ds.write_parquet(str(folder))  # into a folder that exists: Ray's default mode adds its files
        except Exception as err:  # a RayTaskError wraps the worker's error: its last line, not Ray's traceback
            cause = getattr(err, "cause", None) or err
            last = (str(cause).strip().splitlines() or [""])[-1]
            raise PeftExportError(f"the Ray job failed: {type(cause).__name__}: {last}") from err

    with output_in_use(target):
        _check_target(target, force)  # again, locked: another job may have finished meanwhile
        staged = _stage_as_parquet(reader, target) if fmt != "parquet" else None
        try:
            return _build_and_put_in_place(target, marker, write)
        finally:
            if staged:
                shutil.rmtree(staged, ignore_errors=True)


def _build_and_put_in_place(target: OutputTarget, marker: dict, write: Callable[[Path], None]) -> int:
    """``write`` the output into a temporary folder beside it, marked as embed's before anything else is in it,
    then put it in place; the number of rows written."""
    building = target.new_leftover_path()
    building.mkdir()
    try:
        (building / RAY_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        write(building)
        kill_if_asked("ray-written")
        pq = require("pyarrow.parquet", "corpus")
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in building.glob("*.parquet"))
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

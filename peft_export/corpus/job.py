"""embed_corpus: read a corpus in chunks, embed each chunk, write it as a numbered part, record progress.

A reader thread fills a bounded queue with chunks (so reading and parsing overlap with the model, and memory stays
at a few chunks whatever the input size); the model runs in this process or in worker processes; parts are written
in input order, each followed by the state file. The model's unit of work is a slice of at most ``WORK_ROWS`` rows
of a part (so with several worker processes the last part is shared too, not left to one worker while the others
idle); a longer part is cut into slices of similar lengths (its rows ordered by length, longest first, as
``encode`` orders a batch), so that slicing adds little padding. A part is ``encode`` of its slices, put back in
input order, whichever process ran them. A re-run of the same job
skips the parts already written, and as each part is ``encode`` of the same slices, the result equals an
uninterrupted run bit for bit, with any number of processes.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import InputError, OutputError, OutputExistsError, PeftExportError
from .readers import Chunk, CorpusReader
from .state import (JobState, OutputLock, check_same_job, describe_job, first_changed_part, load_state,
                    save_state)
from .workers import EncodeSettings, InProcessEncoder, ProcessPoolEncoder
from .writers import (EMBEDDING_COLUMN, RAY_MARKER, OutputTarget, assemble, file_sha256, finish, remove_leftovers,
                      remove_parts_from, write_part)

DEFAULT_PART_ROWS = 4096
MAX_DEFAULT_PROCESSES = 8
QUEUE_CHUNKS = 2  # chunks read ahead of the model
WORK_ROWS = 512  # rows per encode() call: the unit a worker takes
# Tests only: kill this process (SIGKILL, as kill -9) right after part N is written, before ("N:before-state") or
# after ("N") its state file; after the last part ("last"), during assembly ("assembly": one part into the final
# file, or before the complete state of a folder) or after the complete state, before the parts go ("complete").
# embed --ray: after Ray wrote its files, before the rename ("ray-written"); with --force, between putting the new
# output in place and deleting the old one ("ray-swapped").
KILL_ENV = "PEFT_EXPORT_EMBED_KILL_AFTER_PART"
KILL_PHASES = ("last", "assembly", "complete", "ray-written", "ray-swapped")


@dataclass
class EmbedResult:
    output: Path
    rows: int
    parts: int
    resumed_rows: int  # rows found done by an earlier run
    seconds: float
    startup_seconds: float = 0.0  # of ``seconds``: checking the input and opening the model (or its workers)
    empty_rows: int = 0  # texts that were "" (embedded like any other text)

    @property
    def texts_per_second(self) -> float:
        return (self.rows - self.resumed_rows) / self.seconds if self.seconds else 0.0


def default_parallelism(export: Path, parts: int, cores: int | None = None,
                        available_bytes: int | None = None) -> tuple[int, int]:
    """``(processes, threads per process)`` when not given: one single-threaded worker process per core, as 2 x 1
    measured faster than 1 x 2 on 2 cores (docs/scaling.md, "One machine"); but no more processes than ``parts``
    (the slices of work left), than :data:`MAX_DEFAULT_PROCESSES`, or than a third of the available memory holds
    at three times the export's size each (a session, its arena and the read-ahead); one process gets every core
    as threads."""
    cores = cores or os.cpu_count() or 1
    available = available_bytes if available_bytes is not None else _available_memory()
    model_bytes = sum(p.stat().st_size for p in export.glob("*") if p.is_file()) or 1
    fit = max(1, available // 3 // (3 * model_bytes)) if available else cores
    processes = max(1, min(cores, parts, MAX_DEFAULT_PROCESSES, fit))
    return processes, max(1, cores // processes)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def embed_corpus(
    export: str | Path | Any,
    input: str | Path,
    output: str | Path,
    *,
    column: str = "text",
    id_column: str | None = None,
    keep_columns: tuple[str, ...] | list[str] = (),
    adapter: str | None = None,
    prompt_name: str | None = None,
    batch_size: int = 32,
    part_rows: int = DEFAULT_PART_ROWS,
    processes: int | None = None,
    threads: int | None = None,
    input_format: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> EmbedResult:
    """Embed column ``column`` of ``input`` (JSONL, CSV, Parquet or text) with the export ``export`` (a folder,
    or an open ``EmbeddingModel`` to run in this process) into ``output`` (a folder of Parquet parts,
    ``FILE.parquet`` or ``FILE.npy``).

    Resumable: a run killed at any point continues when started again with the same arguments; ``force`` discards
    earlier output instead. ``processes`` x ``threads``: worker processes and ONNX Runtime threads each (default:
    :func:`default_parallelism`). ``progress``: a bar on stderr (None: when stderr is a terminal).
    """
    started = time.perf_counter()
    for name, value in (("batch_size", batch_size), ("part_rows", part_rows), ("processes", processes or 1),
                        ("threads", threads or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, found {value!r}")
    target = OutputTarget.for_path(output)
    keep_columns = tuple(keep_columns)
    if target.kind == "npy" and (id_column or keep_columns):
        raise InputError(f"{target.path.name}: a .npy output holds only the vectors (in input order); "
                         f"--id-column and --keep-columns need a Parquet output (FILE.parquet or a folder)")
    if EMBEDDING_COLUMN in (id_column, *keep_columns):
        raise InputError("'embedding' is the name of the output's vector column; it cannot be kept or be the id")
    model = None if isinstance(export, (str, Path)) else export
    export_path = Path(export) if model is None else Path(model.path)
    if model is None and not export_path.is_dir():
        raise PeftExportError(f"Export folder not found: {export_path}")
    reader = CorpusReader(input, column, id_column, keep_columns, input_format)
    check_output_outside_input(reader.path, target)
    options = {"format": reader.format, "column": column, "id_column": id_column, "keep_columns": list(keep_columns),
               "adapter": adapter, "prompt_name": prompt_name, "batch_size": batch_size, "part_rows": part_rows,
               "work_rows": WORK_ROWS, "output_kind": target.kind}
    job = describe_job(reader.path, export_path, options)
    settings = EncodeSettings(str(export_path), adapter, prompt_name, batch_size, threads)
    check_existing_output(target, force)
    reader.scan(part_rows)  # every row checked (and each part's rows hashed) before anything is written
    try:
        with output_in_use(target):
            check_existing_output(target, force)  # again, locked: a --ray job may have finished meanwhile
            created = not target.work_dir.exists()
            target.work_dir.mkdir(exist_ok=True)
            try:
                return _embed_locked(reader, model, settings, target, job, part_rows, processes, force, progress,
                                     log or (lambda msg: None), started)
            finally:
                if created and not any(target.work_dir.iterdir()):
                    target.work_dir.rmdir()  # a job refused before its first write leaves nothing behind
    except BrokenProcessPool as err:
        raise PeftExportError("A worker process died (killed, or out of memory); the parts written so far are "
                              "kept: run the same command again to resume, with fewer --processes if memory is "
                              "short") from err


@contextmanager
def output_in_use(target: OutputTarget) -> Iterator[None]:
    """For the block, by a local job or a ``--ray`` job alike: the output's parent exists, the output's lock is held
    (a second job on it is refused) and what a killed ``--ray`` run left beside it is removed; an OSError on the way
    or in the block (a full disk, a read-only file system) becomes one line naming the output."""
    try:
        target.make_parent()
        lock = OutputLock(target)
        try:
            remove_leftovers(target)  # of a killed --ray run: no live job owns them while the lock is held
            yield
        finally:
            lock.release()
    except PeftExportError:
        raise
    except OSError as err:
        raise output_error(err, target) from err


def _embed_locked(reader: CorpusReader, model: Any, settings: EncodeSettings, target: OutputTarget, job: dict,
                  part_rows: int, processes: int | None, force: bool, progress: bool | None,
                  log: Callable[[str], None], started: float) -> EmbedResult:
    """The job, with the output locked: check what is there, embed what is missing, assemble, mark complete."""
    if force:
        target.clear()
    for path in target.temporary_files():  # left by a run killed while writing
        path.unlink(missing_ok=True)
    state = load_state(target.work_dir)
    if state is not None:
        check_same_job(state, job, target.work_dir)
    total = reader.total_rows
    if state is not None:
        state.total_rows = total
        why = _check_done(target, state, reader.part_sha256, part_rows)
        if why:
            log(why)
        if state.complete:
            finish(target)
            return EmbedResult(target.path, total, state.parts_done, total, 0.0, empty_rows=reader.empty_rows)
    kill = _kill_point()
    resumed = state.rows_done if state is not None else 0
    ready = time.perf_counter()
    if resumed < total:
        processes, threads = _parallelism(model, settings, processes, total - resumed, part_rows)
        settings = replace(settings, threads=threads)
        encoder = (ProcessPoolEncoder(settings, processes) if processes > 1
                   else InProcessEncoder(settings, model))
        try:
            if state is None:
                state = JobState(job=job, total_rows=total, dimension=encoder.dimension)
                save_state(target.work_dir, state)
            remove_parts_from(target, state.parts_done)
            ready = time.perf_counter()
            if resumed:
                log(f"resuming: {resumed:,} of {total:,} rows done in {state.parts_done} parts")
            _run(reader, encoder, target, state, part_rows, _progress_bar(progress, total, resumed), kill)
        finally:
            encoder.close()
    remove_parts_from(target, state.parts_done)
    _maybe_kill(kill, "last")

    def after_part(i: int) -> None:
        if i == 0:
            _maybe_kill(kill, "assembly")
    assemble(target, state.parts_done, state.rows_done, state.dimension, job, after_part)
    if target.kind == "parquet-folder":
        _maybe_kill(kill, "assembly")
    state.complete = True
    state.output_sha256 = file_sha256(target.path) if target.kind != "parquet-folder" else None
    save_state(target.work_dir, state)
    _maybe_kill(kill, "complete")
    finish(target)
    return EmbedResult(target.path, state.rows_done, state.parts_done, resumed, time.perf_counter() - started,
                       ready - started, reader.empty_rows)


def _parallelism(model: Any, settings: EncodeSettings, processes: int | None, remaining: int,
                 part_rows: int) -> tuple[int, int | None]:
    threads = settings.threads
    if model is not None:
        if processes not in (None, 1):
            raise InputError("An open EmbeddingModel runs in this process: processes must be 1")
        return 1, threads
    if not processes:
        processes, default_threads = default_parallelism(Path(settings.export),
                                                         -(-remaining // min(part_rows, WORK_ROWS)))
        threads = threads or default_threads
    return processes, threads or max(1, (os.cpu_count() or 1) // processes)


def _check_done(target: OutputTarget, state: JobState, input_sha256: list[str], part_rows: int) -> str | None:
    """Check the finished parts (or the final file) against their hashes and the input's rows; forget those that
    do not match, from the first one on, and say why (None when everything matches)."""
    if state.complete and target.kind != "parquet-folder":
        if state.input_sha256 != input_sha256:
            why = "the input changed since the job finished"
        elif not target.path.is_file():
            why = f"{target.path.name} is missing"
        elif file_sha256(target.path) != state.output_sha256:
            why = f"{target.path.name} does not match the hash recorded when it was written"
        else:
            return None
        state.keep_parts(0, part_rows)
        return f"{why}: embedding the input again"
    changed = first_changed_part(target, state, input_sha256)
    if changed is None:
        if len(input_sha256) != state.parts_done:  # rows added after the last full part
            state.complete = False
        return None
    index, why = changed
    state.keep_parts(index, part_rows)
    return f"{why}: redoing the job from part {index} (row {state.rows_done:,})"


def check_output_outside_input(input_path: Path, target: OutputTarget) -> None:
    """Refuse an output that is the input or a folder holding it, before anything is written or deleted."""
    source = input_path.resolve()
    for path in dict.fromkeys((target.path, target.work_dir)):
        resolved = path.resolve()
        if resolved == source or resolved in source.parents:
            raise InputError(f"Output {path} is or holds the input {input_path}; embed would overwrite or delete "
                             f"it. Choose an output path outside the input")


def check_existing_output(target: OutputTarget, force: bool) -> None:
    """Refuse, before touching anything, an output that embed did not write (recognised by its state file or the
    marker of ``--ray``): a user's folder, dotfiles or other files beside the parts, a file of the same name.
    ``force`` does not change that; it only lets embed discard its own earlier output (a --ray output included)."""
    if target.kind != "parquet-folder" and target.path.is_dir():
        raise OutputExistsError(f"Output {target.path} is a folder; a {target.kind} output must be a file")
    if target.kind == "parquet-folder" and target.path.exists() and not target.path.is_dir():
        raise OutputExistsError(f"Output {target.path} is a file; name a folder (or FILE.parquet, FILE.npy)")
    if target.kind == "parquet-folder" and target.marker() == RAY_MARKER and not force:
        raise OutputExistsError(f"Output {target.path} holds the output of embed --ray, which a job without --ray "
                                f"does not continue; pass --force to replace it, or choose another output path")
    foreign = target.foreign_entries()
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        if force:
            raise OutputExistsError(f"{target.work_dir} holds files that are not embed output ({shown}); not "
                                    f"deleting it even with --force. Choose another output path")
        raise OutputExistsError(f"Output {target.work_dir} exists and is not an embed job's folder (it holds "
                                f"{shown}); choose another output path")
    if target.kind != "parquet-folder" and target.path.exists() and not target.state_path().is_file():
        raise OutputExistsError(f"Output {target.path} already exists and was not written by embed (there is no "
                                f"{target.state_path()}); not replacing it{' even with --force' if force else ''}. "
                                f"Delete it yourself or choose another output path")


def output_error(err: OSError, target: OutputTarget) -> OutputError:
    """One line for an OS error while writing: the path, what happened, how to go on."""
    fixes = {errno.ENOSPC: "free some space (or choose another output path) and run the same command again to "
                           "resume",
             errno.EDQUOT: "free some space (or choose another output path) and run the same command again to "
                           "resume",
             errno.EROFS: "the file system is read-only; choose another output path",
             errno.EACCES: "no permission to write there; choose another output path",
             errno.EPERM: "no permission to write there; choose another output path",
             errno.ENOTDIR: "part of the path is a file, not a folder; choose another output path",
             errno.ENOENT: "a folder on the path cannot be created there; choose another output path"}
    fix = fixes.get(err.errno, "fix the cause and run the same command again to resume")
    where = err.filename or target.path
    return OutputError(f"Cannot write {where}: {err.strerror or err}; {fix}")


def _read_ahead(reader: CorpusReader, part_rows: int, start_row: int) -> Iterator[Chunk]:
    """The reader's chunks, read by a thread into a bounded queue; its errors are raised here."""
    chunks: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
    stop = threading.Event()
    end = object()

    def fill() -> None:
        try:
            for chunk in reader.chunks(part_rows, start_row):
                while not stop.is_set():
                    try:
                        chunks.put(chunk, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            chunks.put(end)
        except BaseException as err:  # handed to the consumer, raised there
            chunks.put(err)

    thread = threading.Thread(target=fill, name="embed-reader", daemon=True)
    thread.start()
    try:
        while (item := chunks.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _run(reader: CorpusReader, encoder: Any, target: OutputTarget, state: JobState, part_rows: int,
         progress: Callable[[int], None], kill_after: tuple[int, bool] | str | None) -> None:
    in_flight: deque = deque()
    window = encoder.processes + 1  # chunks at the workers: each busy, and one waiting
    chunks = _read_ahead(reader, part_rows, state.rows_done)
    try:
        for chunk in chunks:
            slices = [(rows, encoder.submit([chunk.texts[i] for i in rows])) for rows in work_slices(chunk.texts)]
            in_flight.append((chunk, slices))
            if len(in_flight) >= window or encoder.processes == 1:
                _write_next(in_flight, target, state, reader, progress, kill_after)
        while in_flight:
            _write_next(in_flight, target, state, reader, progress, kill_after)
    finally:
        chunks.close()
        progress(-1)


def work_slices(texts: list[str]) -> list[np.ndarray]:
    """Row indices of ``texts`` in slices of at most WORK_ROWS: the rows in order when they fit in one, otherwise
    ordered by length (characters, longest first, ties in input order) so each slice holds similar lengths."""
    if len(texts) <= WORK_ROWS:
        return [np.arange(len(texts))]
    order = np.argsort([-len(text) for text in texts], kind="stable")
    return [order[i:i + WORK_ROWS] for i in range(0, len(order), WORK_ROWS)]


def _write_next(in_flight: deque, target: OutputTarget, state: JobState, reader: CorpusReader,
                progress: Callable[[int], None], kill_after: tuple[int, bool] | str | None) -> None:
    chunk, slices = in_flight.popleft()
    results = [(rows, future.result()) for rows, future in slices]
    embeddings = np.empty((len(chunk.texts), results[0][1].shape[1]), np.float32)  # (rows, dimension)
    for rows, vectors in results:
        embeddings[rows] = vectors
    if chunk.first_row != state.rows_done:
        raise PeftExportError(f"internal error: chunk at row {chunk.first_row}, expected {state.rows_done}")
    write_part(target, state.parts_done, embeddings, chunk.columns, reader.kinds)
    if kill_after == (state.parts_done, True):
        os.kill(os.getpid(), signal.SIGKILL)
    state.part_sha256.append(file_sha256(target.part_path(state.parts_done)))
    state.input_sha256.append(reader.part_sha256[state.parts_done])
    state.parts_done += 1
    state.rows_done += len(chunk.texts)
    save_state(target.work_dir, state)
    if kill_after == (state.parts_done - 1, False):
        os.kill(os.getpid(), signal.SIGKILL)
    progress(len(chunk.texts))


def _kill_point() -> tuple[int, bool] | str | None:
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    if value in KILL_PHASES:
        return value
    part, _, when = value.partition(":")
    return int(part), when == "before-state"


def _maybe_kill(point: tuple[int, bool] | str | None, phase: str) -> None:
    if point == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_if_asked(phase: str) -> None:
    """Tests only: kill this process (SIGKILL) when KILL_ENV names ``phase``, one of KILL_PHASES."""
    _maybe_kill(_kill_point(), phase)


def _progress_bar(show: bool | None, total: int, done: int) -> Callable[[int], None]:
    """``update(rows)``; ``update(-1)`` closes. tqdm on stderr with texts/s and the ETA; off when not a terminal."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return lambda n: None
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda n: None
    bar = tqdm(total=total, initial=done, unit=" texts", unit_scale=True, file=sys.stderr, smoothing=0.1,
               dynamic_ncols=True, desc="embed")

    def update(n: int) -> None:
        if n < 0:
            bar.close()
        else:
            bar.update(n)

    return update

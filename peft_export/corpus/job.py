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

import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import InputError, OutputExistsError, PeftExportError
from .readers import Chunk, CorpusReader
from .state import JobState, check_same_job, describe_job, load_state, save_state
from .workers import EncodeSettings, InProcessEncoder, ProcessPoolEncoder
from .writers import EMBEDDING_COLUMN, OutputTarget, assemble, finish, remove_parts_from, write_part

DEFAULT_PART_ROWS = 4096
MAX_DEFAULT_PROCESSES = 8
QUEUE_CHUNKS = 2  # chunks read ahead of the model
WORK_ROWS = 512  # rows per encode() call: the unit a worker takes
# Tests only: kill this process (SIGKILL, as kill -9) right after part N is written, before ("N:before-state") or
# after ("N") its state file.
KILL_ENV = "PEFT_EXPORT_EMBED_KILL_AFTER_PART"


@dataclass
class EmbedResult:
    output: Path
    rows: int
    parts: int
    resumed_rows: int  # rows found done by an earlier run
    seconds: float
    startup_seconds: float = 0.0  # of ``seconds``: checking the input and opening the model (or its workers)

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
    options = {"format": reader.format, "column": column, "id_column": id_column, "keep_columns": list(keep_columns),
               "adapter": adapter, "prompt_name": prompt_name, "batch_size": batch_size, "part_rows": part_rows,
               "work_rows": WORK_ROWS, "output_kind": target.kind}
    job = describe_job(reader.path, export_path, options)
    state = _prepare_output(target, job, force)
    if state is not None and state.complete:
        if target.kind != "parquet-folder" and not target.path.exists():
            assemble(target, state.parts_done, state.rows_done, state.dimension, job)
        finish(target)
        return EmbedResult(target.path, state.total_rows, state.parts_done, state.total_rows, 0.0)
    total = reader.scan()  # every row checked before anything is embedded

    if model is not None:
        processes = processes or 1
    elif not processes:
        remaining = total - (state.rows_done if state is not None else 0)
        processes, default_threads = default_parallelism(export_path, -(-remaining // min(part_rows, WORK_ROWS)))
        threads = threads or default_threads
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    settings = EncodeSettings(str(export_path), adapter, prompt_name, batch_size, threads)
    if model is not None and processes != 1:
        raise InputError("An open EmbeddingModel runs in this process: processes must be 1")
    encoder = (ProcessPoolEncoder(settings, processes) if processes > 1
               else InProcessEncoder(settings, model))
    try:
        if state is None:
            state = JobState(job=job, total_rows=total, dimension=encoder.dimension)
            target.work_dir.mkdir(parents=True, exist_ok=True)
            save_state(target.work_dir, state)
        remove_parts_from(target, state.parts_done)
        ready = time.perf_counter()
        resumed = state.rows_done
        if log and resumed:
            log(f"resuming: {resumed:,} of {total:,} rows done in {state.parts_done} parts")
        _run(reader, encoder, target, state, part_rows, _progress_bar(progress, total, resumed))
    finally:
        encoder.close()
    assemble(target, state.parts_done, state.rows_done, state.dimension, job)
    state.complete = True
    save_state(target.work_dir, state)
    finish(target)
    return EmbedResult(target.path, state.rows_done, state.parts_done, resumed, time.perf_counter() - started,
                       ready - started)


def _prepare_output(target: OutputTarget, job: dict, force: bool) -> JobState | None:
    """The state to resume from, or None to start afresh; refuses output that is not a run of this job."""
    if force:
        target.remove()
        return None
    state = load_state(target.work_dir)
    if state is not None:
        check_same_job(state, job, target.work_dir)
        return state
    if target.kind == "parquet-folder":
        if target.path.exists() and (not target.path.is_dir() or any(target.path.iterdir())):
            raise OutputExistsError(f"Output {target.path} exists and is not an embed job's folder; pass --force "
                                    f"to replace it or choose another path")
    elif target.path.exists():
        raise OutputExistsError(f"Output {target.path} already exists; pass --force to replace it")
    return None


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
         progress: Callable[[int], None]) -> None:
    in_flight: deque = deque()
    window = encoder.processes + 1  # chunks at the workers: each busy, and one waiting
    kill_after = _kill_point()
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
                progress: Callable[[int], None], kill_after: tuple[int, bool] | None) -> None:
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
    state.parts_done += 1
    state.rows_done += len(chunk.texts)
    save_state(target.work_dir, state)
    if kill_after == (state.parts_done - 1, False):
        os.kill(os.getpid(), signal.SIGKILL)
    progress(len(chunk.texts))


def _kill_point() -> tuple[int, bool] | None:
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    part, _, when = value.partition(":")
    return int(part), when == "before-state"


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

"""Corpus readers: JSONL, CSV, Parquet and plain text, streamed in fixed-size chunks with every row checked.

Each reader yields blocks of rows (the texts, plus the id and kept columns); :meth:`CorpusReader.chunks` cuts them
into chunks of exactly ``rows`` rows (the last one shorter), so the same input always gives the same chunks and a
resumed job starts at a chunk boundary. :meth:`CorpusReader.scan` reads the whole input once before any embedding,
so a missing column, a value that is not text or an empty file is reported at once, with its row, not hours in.
JSONL, CSV and text need only the standard library; Parquet needs pyarrow (the ``corpus`` extra).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, require

FORMATS = ("jsonl", "csv", "parquet", "text")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
                  ".txt": "text", ".text": "text"}
BLOCK_ROWS = 8192  # rows per block read from JSONL, CSV and text files


@dataclass
class Chunk:
    """``texts`` of the rows ``first_row .. first_row + len(texts) - 1`` (0-based) and their id and kept columns
    (each a list or a pyarrow array, in input order)."""

    first_row: int
    texts: list[str]
    columns: dict[str, Any] = field(default_factory=dict)


def input_format(path: Path, given: str | None) -> str:
    if given:
        if given not in FORMATS:
            raise InputError(f"--input-format must be one of {', '.join(FORMATS)}, found {given!r}")
        return given
    found = SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        raise InputError(f"Cannot tell the format of {path} from its suffix {path.suffix!r}; name it with "
                         f"--input-format ({', '.join(FORMATS)}) or use one of {', '.join(SUFFIX_FORMATS)}")
    return found


def _json_kind(kinds: set[type]) -> str:
    """The Parquet type of a JSONL column from the Python types seen in it (nulls aside); mixed or nested -> JSON
    text, so every part of the output gets the same schema."""
    if not kinds:
        return "string"
    if kinds == {bool}:
        return "bool"
    if kinds == {int}:
        return "int64"
    if kinds <= {int, float}:
        return "float64"
    if kinds == {str}:
        return "string"
    return "json"


class CorpusReader:
    """Read ``column`` (the texts) and the ``extra_columns`` (an id column and kept columns) of one input file."""

    def __init__(self, path: str | Path, column: str = "text", id_column: str | None = None,
                 keep_columns: tuple[str, ...] = (), input_format_name: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"Input file not found: {self.path}")
        if not self.path.is_file():
            raise InputError(f"Input {self.path} is not a file")
        self.format = input_format(self.path, input_format_name)
        self.column = column
        self.id_column = id_column
        self.extra_columns = tuple(dict.fromkeys(([id_column] if id_column else []) + list(keep_columns)))
        if self.format == "text" and self.extra_columns:
            raise InputError(f"A plain text input has one text per line and no other columns; "
                             f"--id-column and --keep-columns need JSONL, CSV or Parquet (got {self.extra_columns})")
        self.total_rows: int | None = None
        self.kinds: dict[str, str] = {}  # column -> "string", "int64", ... (JSONL and CSV; Parquet keeps its own)

    # ----- public -----
    def scan(self) -> int:
        """Read every row once, check it, and return the number of rows (InputError for an empty input)."""
        seen: dict[str, set[type]] = {name: set() for name in self.extra_columns}
        rows = 0
        for texts, columns in self._blocks(scanning=True):
            rows += len(texts)
            if self.format == "jsonl":
                for name, values in columns.items():
                    seen[name].update(type(v) for v in values if v is not None)
        if rows == 0:
            raise InputError(f"Input {self.path} has no rows to embed (empty {self.format} file)")
        if self.format == "jsonl":
            self.kinds = {name: _json_kind(kinds) for name, kinds in seen.items()}
        elif self.format == "csv":
            self.kinds = {name: "string" for name in self.extra_columns}
        self.total_rows = rows
        return rows

    def chunks(self, rows: int, start_row: int = 0) -> Iterator[Chunk]:
        """Chunks of ``rows`` rows from row ``start_row`` (a multiple of ``rows``) to the end."""
        if start_row % rows:
            raise ValueError(f"start_row {start_row} is not a multiple of the chunk size {rows}")
        texts: list[str] = []
        columns: dict[str, list] = {name: [] for name in self.extra_columns}
        position = start_row
        for block_texts, block_columns, block_start in self._blocks_from(start_row):
            skip = max(0, start_row - block_start)
            texts.extend(block_texts[skip:])
            for name in self.extra_columns:
                columns[name].append(self._convert(name, block_columns[name])[skip:])
            while len(texts) >= rows:
                yield Chunk(position, texts[:rows], {n: _take(parts, 0, rows) for n, parts in columns.items()})
                texts = texts[rows:]
                columns = {n: [_take(parts, rows, None)] for n, parts in columns.items()}
                position += rows
        if texts:
            yield Chunk(position, texts, {n: _take(parts, 0, None) for n, parts in columns.items()})

    # ----- per format -----
    def _blocks_from(self, start_row: int) -> Iterator[tuple[list[str], dict[str, Any], int]]:
        if self.format == "parquet":
            yield from self._parquet_blocks(start_row)
            return
        row = 0
        for texts, columns in self._blocks():
            if row + len(texts) > start_row:
                yield texts, columns, row
            row += len(texts)

    def _blocks(self, scanning: bool = False) -> Iterator[tuple[list[str], dict[str, Any]]]:
        try:
            if self.format == "parquet":
                for texts, columns, _ in self._parquet_blocks(0, text_only=scanning):
                    yield texts, columns
            else:
                yield from {"jsonl": self._jsonl_blocks, "csv": self._csv_blocks, "text": self._text_blocks}[
                    self.format]()
        except OSError as err:
            raise InputError(f"Cannot read {self.path}: {err.strerror or err}") from err

    def _text_blocks(self) -> Iterator[tuple[list[str], dict]]:
        texts: list[str] = []
        with open(self.path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                texts.append(_decode(raw, self.path, f"line {line_number}").rstrip("\r\n"))
                if len(texts) == BLOCK_ROWS:
                    yield texts, {}
                    texts = []
        if texts:
            yield texts, {}

    def _jsonl_blocks(self) -> Iterator[tuple[list[str], dict]]:
        texts: list[str] = []
        columns: dict[str, list] = {name: [] for name in self.extra_columns}
        with open(self.path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                line = _decode(raw, self.path, f"line {line_number}")
                if not line.strip():
                    continue  # blank lines (a trailing one, say) hold no record
                where = f"{self.path} line {line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{where} is not valid JSON: {err.msg} (column {err.colno})") from err
                if not isinstance(record, dict):
                    raise InputError(f"{where} is a JSON {type(record).__name__}, expected an object with a "
                                     f"{self.column!r} field")
                texts.append(_text_value(record, self.column, where, "field"))
                for name in self.extra_columns:
                    if name == self.id_column and name not in record:
                        raise InputError(f"{where} has no id field {name!r}; its fields are "
                                         f"{', '.join(map(repr, record)) or 'none'}")
                    columns[name].append(record.get(name))
                if len(texts) == BLOCK_ROWS:
                    yield texts, columns
                    texts, columns = [], {name: [] for name in self.extra_columns}
        if texts:
            yield texts, columns

    def _csv_blocks(self) -> Iterator[tuple[list[str], dict]]:
        texts: list[str] = []
        columns: dict[str, list] = {name: [] for name in self.extra_columns}
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    return
                positions = {name: i for i, name in enumerate(header)}
                for name in (self.column, *self.extra_columns):
                    if name not in positions:
                        raise InputError(f"{self.path} has no column {name!r}; its columns are "
                                         f"{', '.join(map(repr, header))}. Pick the text with --column")
                text_at = positions[self.column]
                for row_number, row in enumerate(reader, 1):
                    if not row:
                        continue  # csv gives [] for a blank line
                    if len(row) != len(header):
                        raise InputError(f"{self.path} row {row_number} has {len(row)} fields, the header has "
                                         f"{len(header)}")
                    texts.append(row[text_at])
                    for name in self.extra_columns:
                        columns[name].append(row[positions[name]])
                    if len(texts) == BLOCK_ROWS:
                        yield texts, columns
                        texts, columns = [], {name: [] for name in self.extra_columns}
        except UnicodeDecodeError as err:
            raise InputError(f"{self.path} is not UTF-8 text ({err.reason} at byte {err.start} of a block)") from err
        except csv.Error as err:
            raise InputError(f"{self.path} is not valid CSV: {err}") from err
        if texts:
            yield texts, columns

    def _parquet_file(self):
        pq = require("pyarrow.parquet", "corpus")
        try:
            return pq.ParquetFile(self.path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
            raise InputError(f"Cannot read {self.path} as Parquet: {err}") from err

    def _parquet_blocks(self, start_row: int, text_only: bool = False
                        ) -> Iterator[tuple[list[str], dict[str, Any], int]]:
        pa = require("pyarrow", "corpus")
        pf = self._parquet_file()
        names = pf.schema_arrow.names
        for name in (self.column, *self.extra_columns):
            if name not in names:
                raise InputError(f"{self.path} has no column {name!r}; its columns are "
                                 f"{', '.join(map(repr, names))}. Pick the text with --column")
        text_type = pf.schema_arrow.field(self.column).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or pa.types.is_string_view(text_type)):
            raise InputError(f"{self.path} column {self.column!r} holds {text_type} values, expected strings; "
                             f"pick the text column with --column")
        # Start at the row group that holds start_row: a resumed job does not read what it has done.
        groups, first = [], 0
        for i in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(i).num_rows
            if first + size > start_row or groups:
                groups.append(i)
            else:
                first += size
        wanted = [self.column] if text_only else [self.column, *self.extra_columns]
        row = first
        try:
            for batch in pf.iter_batches(batch_size=BLOCK_ROWS, row_groups=groups, columns=wanted):
                text = batch.column(self.column)
                if text.null_count:
                    bad = next(i for i, valid in enumerate(text.is_valid().to_pylist()) if not valid)
                    raise InputError(f"{self.path} row {row + bad + 1}: {self.column!r} is null, expected a string")
                columns = {} if text_only else {name: batch.column(name) for name in self.extra_columns}
                yield text.to_pylist(), columns, row
                row += batch.num_rows
        except InputError:
            raise
        except Exception as err:  # a truncated or corrupt file fails while reading, not when opened
            raise InputError(f"Cannot read {self.path} as Parquet: {err}") from err

    # ----- helpers -----
    def _convert(self, name: str, values: Any) -> Any:
        """JSONL values of a mixed or nested column become JSON text, the rest stay as they are."""
        if self.kinds.get(name) == "json":
            return [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values]
        if self.kinds.get(name) == "float64":
            return [None if v is None else float(v) for v in values]
        return values


def _decode(raw: bytes, path: Path, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} {where} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def _text_value(record: dict, column: str, where: str, noun: str) -> str:
    if column not in record:
        raise InputError(f"{where} has no {noun} {column!r}; its {noun}s are "
                         f"{', '.join(map(repr, record)) or 'none'}. Pick the text with --column")
    value = record[column]
    if not isinstance(value, str):
        shown = "null" if value is None else type(value).__name__
        raise InputError(f"{where}: {column!r} is {shown}, expected a string")
    return value


def _take(parts: list, start: int, stop: int | None) -> Any:
    """Rows ``start:stop`` of the concatenation of ``parts`` (lists, or pyarrow arrays from Parquet)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return []
    if isinstance(parts[0], list):
        joined: Any = [v for p in parts for v in p] if len(parts) > 1 else parts[0]
        return joined[start:stop]
    import pyarrow as pa

    joined = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
    return joined.slice(start, None if stop is None else stop - start)

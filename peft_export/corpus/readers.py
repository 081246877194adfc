"""Corpus readers: JSONL, CSV, Parquet and plain text, streamed in fixed-size chunks with every row checked.

Each reader yields blocks of rows (the texts, plus the id and kept columns); :meth:`CorpusReader.chunks` cuts them
into chunks of exactly ``rows`` rows (the last one shorter), so the same input always gives the same chunks and a
resumed job starts at a chunk boundary. :meth:`CorpusReader.scan` reads the whole input once before any embedding,
so a missing column, a value that is not text or an empty file is reported at once, with its row, not hours in.
JSONL, CSV and text need only the standard library; Parquet needs pyarrow (the ``corpus`` extra).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, require

FORMATS = ("jsonl", "csv", "parquet", "text")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
                  ".txt": "text", ".text": "text"}
BLOCK_ROWS = 8192  # rows per block read from JSONL, CSV and text files
INT64 = (-(2 ** 63), 2 ** 63 - 1)


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
        self.empty_rows = 0  # texts that are "" (embedded like any other; counted for the summary)
        self.part_sha256: list[str] = []  # per part of scan()'s part_rows: SHA-256 of its rows (texts and columns)

    # ----- public -----
    def scan(self, part_rows: int | None = None) -> int:
        """Read every row once, check it, and return the number of rows (InputError for an empty input). With
        ``part_rows``, also hash the rows of each part (``part_sha256``): a resumed job keeps a part only when its
        input rows are the same."""
        seen: dict[str, dict[type, int]] = {name: {} for name in self.extra_columns}  # type -> first line
        too_big: dict[str, int] = {}  # column -> first line with an integer outside int64
        rows = self.empty_rows = 0
        digest, in_part = hashlib.sha256(), 0
        self.part_sha256 = []
        for texts, columns, lines in self._blocks():
            if part_rows:
                values = [_plain(columns[name]) for name in self.extra_columns]
                for i, text in enumerate(texts):
                    digest.update(json.dumps([text, *(v[i] for v in values)], ensure_ascii=False,
                                             default=str).encode("utf-8", "surrogatepass"))
                    digest.update(b"\n")
                    in_part += 1
                    if in_part == part_rows:
                        self.part_sha256.append(digest.hexdigest())
                        digest, in_part = hashlib.sha256(), 0
            rows += len(texts)
            self.empty_rows += sum(1 for t in texts if not t)
            if self.format == "jsonl":
                for name, values in columns.items():
                    kinds = seen[name]
                    for value, line in zip(values, lines):
                        if value is None:
                            continue
                        kinds.setdefault(type(value), line)
                        if type(value) is int and not INT64[0] <= value <= INT64[1] and name not in too_big:
                            too_big[name] = line
        if part_rows and in_part:
            self.part_sha256.append(digest.hexdigest())
        if rows == 0:
            raise InputError(f"Input {self.path} has no rows to embed (empty {self.format} file)")
        if self.format == "jsonl":
            self.kinds = {name: _json_kind(set(kinds)) for name, kinds in seen.items()}
            self._check_json_kinds(seen, too_big)
        elif self.format == "csv":
            self.kinds = {name: "string" for name in self.extra_columns}
        self.total_rows = rows
        return rows

    def _check_json_kinds(self, seen: dict[str, dict[type, int]], too_big: dict[str, int]) -> None:
        """Refuse, naming the line, what would fail or change when written: integers beyond 64 bits in a number
        column, and an id column that is not all integers or all strings (1.5 among integer ids)."""
        for name, kind in self.kinds.items():
            if name in too_big and kind in ("int64", "float64"):
                raise InputError(f"{self.path} line {too_big[name]}: {name!r} holds an integer that does not fit in "
                                 f"64 bits; write it as a string (\"...\") to keep it exactly")
            if name == self.id_column and kind not in ("int64", "string"):
                found = ", ".join(f"{t.__name__} (first at line {line})" for t, line in seen[name].items())
                raise InputError(f"{self.path}: the id column {name!r} (--id-column) must hold all integers or all "
                                 f"strings, found {found}; make the ids one type or pick another --id-column")

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
        for texts, columns, _ in self._blocks():
            if row + len(texts) > start_row:
                yield texts, columns, row
            row += len(texts)

    def _blocks(self) -> Iterator[tuple[list[str], dict[str, Any], list[int]]]:
        """Blocks of ``(texts, columns, line or row number of each)``."""
        try:
            if self.format == "parquet":
                for texts, columns, first in self._parquet_blocks(0):
                    yield texts, columns, range(first + 1, first + 1 + len(texts))
            else:
                yield from {"jsonl": self._jsonl_blocks, "csv": self._csv_blocks, "text": self._text_blocks}[
                    self.format]()
        except OSError as err:
            raise InputError(f"Cannot read {self.path}: {err.strerror or err}") from err

    def _text_blocks(self) -> Iterator[tuple[list[str], dict, list[int]]]:
        texts: list[str] = []
        first = 1
        with open(self.path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                texts.append(_decode(raw, self.path, f"line {line_number}").rstrip("\r\n"))
                if len(texts) == BLOCK_ROWS:
                    yield texts, {}, range(first, line_number + 1)
                    texts, first = [], line_number + 1
        if texts:
            yield texts, {}, range(first, first + len(texts))

    def _jsonl_blocks(self) -> Iterator[tuple[list[str], dict, list[int]]]:
        texts: list[str] = []
        lines: list[int] = []
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
                lines.append(line_number)
                for name in self.extra_columns:
                    if name == self.id_column and name not in record:
                        raise InputError(f"{where} has no id field {name!r}; its fields are "
                                         f"{', '.join(map(repr, record)) or 'none'}. Name the id field with "
                                         f"--id-column")
                    value = record.get(name)
                    if isinstance(value, (dict, list, str)):
                        _check_unicode(value, where, name)
                    columns[name].append(value)
                if len(texts) == BLOCK_ROWS:
                    yield texts, columns, lines
                    texts, lines, columns = [], [], {name: [] for name in self.extra_columns}
        if texts:
            yield texts, columns, lines

    def _csv_blocks(self) -> Iterator[tuple[list[str], dict, list[int]]]:
        texts: list[str] = []
        lines: list[int] = []
        columns: dict[str, list] = {name: [] for name in self.extra_columns}
        # Fields of any size (the csv module refuses those over 128 KiB by default; encode caps long texts).
        csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2 ** 31 - 1)))
        line = 1
        try:
            # utf-8-sig: a byte order mark (as Excel writes) is not part of the first column's name. strict: a quote
            # left open is an error, not a field that swallows every row after it.
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f, strict=True)
                header = next(reader, None)
                if header is None:
                    return
                positions = {name: i for i, name in enumerate(header)}
                for name in (self.column, *self.extra_columns):
                    if name not in positions:
                        raise InputError(f"{self.path} has no column {name!r}; its columns are "
                                         f"{', '.join(map(repr, header))}. Pick the text with --column")
                text_at = positions[self.column]
                line = reader.line_num + 1  # where the next record starts
                for row_number, row in enumerate(reader, 1):
                    if not row:
                        line = reader.line_num + 1
                        continue  # csv gives [] for a blank line
                    if len(row) != len(header):
                        raise InputError(f"{self.path} row {row_number} (line {line}) has {len(row)} fields, the "
                                         f"header has {len(header)}")
                    texts.append(row[text_at])
                    lines.append(line)
                    line = reader.line_num + 1
                    for name in self.extra_columns:
                        columns[name].append(row[positions[name]])
                    if len(texts) == BLOCK_ROWS:
                        yield texts, columns, lines
                        texts, lines, columns = [], [], {name: [] for name in self.extra_columns}
        except UnicodeDecodeError as err:
            raise InputError(f"{self.path} is not UTF-8 text ({err.reason} at byte {err.start} of a block)") from err
        except csv.Error as err:
            open_quote = "unexpected end of data" in str(err)
            raise InputError(f"{self.path} is not valid CSV: {err} at line {reader.line_num}"
                             + (f" (a quoted field opened at line {line} is never closed; close the quote or "
                                f"double a quote inside the field as \"\")" if open_quote else "")) from err
        if texts:
            yield texts, columns, lines

    def _parquet_file(self):
        pq = require("pyarrow.parquet", "corpus")
        try:
            return pq.ParquetFile(self.path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
            raise InputError(f"Cannot read {self.path} as Parquet: {err}") from err

    def _parquet_blocks(self, start_row: int) -> Iterator[tuple[list[str], dict[str, Any], int]]:
        pa = require("pyarrow", "corpus")
        pf = self._parquet_file()
        names = pf.schema_arrow.names
        for name in (self.column, *self.extra_columns):
            if names.count(name) > 1:
                raise InputError(f"{self.path} has {names.count(name)} columns named {name!r}, so it is ambiguous "
                                 f"which to read; rename them in the file")
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
        wanted = [self.column, *self.extra_columns]
        row = first
        try:
            for batch in pf.iter_batches(batch_size=BLOCK_ROWS, row_groups=groups, columns=wanted):
                text = batch.column(self.column)
                if text.null_count:
                    bad = next(i for i, valid in enumerate(text.is_valid().to_pylist()) if not valid)
                    raise InputError(f"{self.path} row {row + bad + 1}: {self.column!r} is null, expected a string")
                columns = {name: batch.column(name) for name in self.extra_columns}
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
    _check_unicode(value, where, column)
    return value


def _check_unicode(value: Any, where: str, name: str) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer or Parquet file takes: refuse them here,
    with the line, not after hours of work as an index inside a batch."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{where}: {name!r} holds {err.object[err.start:err.end]!r} at character {err.start}, a lone "
                         f"surrogate that is not valid Unicode; fix or remove it in the file") from err


def _plain(values: Any) -> list:
    """A column's values as Python values (pyarrow arrays from Parquet are converted)."""
    return values if isinstance(values, list) else values.to_pylist()


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

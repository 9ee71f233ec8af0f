"""Uploads in JSON Lines and Parquet, read into the same rows as CSV.

Each reader turns its format into a header and records of text values, one per header column,
and hands them to ``ingest.load_rows``: the same ``COPY``, the same per-row bounds (document,
extra columns, rows, stored size) and the same stored rows as a CSV with those columns.

- **Which format.** ``format`` when given, else the file name's extension, else the content
  (Parquet's ``PAR1`` magic; a first character ``{``: JSON Lines; anything else: CSV).
- **JSON Lines.** One object per line; its keys are the columns, those of the first object
  in their order. A later object may leave a key out (an empty value) but may not add one.
  Strings are taken as they are; numbers and booleans as their JSON text; null is empty;
  arrays and objects as JSON text (only in columns other than text and id). Lines are split
  from 64 KiB blocks and parsed whole (``orjson``), so a line is bounded
  (``max_jsonl_line_bytes``): one still open past it is refused before more of it is read.
- **Parquet.** Random access, so it is read from the upload itself, never copied. Before any
  data: the footer's length (``max_parquet_metadata_bytes``), then from the metadata the number
  of columns (leaves, ``max_columns``), of rows (``max_rows``), every row group's uncompressed
  size (``max_parquet_row_group_bytes``: what a row group costs in memory) and every column's
  type. Data is read a batch at a time, in the loading thread. A column whose dictionary holds
  values long enough that a batch of their repeats would be large is read as a dictionary, so a
  few large values repeated by a million tiny indexes stay a few values in memory (the
  stored-size bound, four times the file, stops such a file on disk); every other column is
  read plainly, which is five times cheaper.
"""

from __future__ import annotations

import codecs
import io
import json
import operator
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn

import orjson

from service.errors import InvalidFileError, InvalidParameterError, clip
from service.jobs.ingest import (
    _SHOW_NAME_CHARS,
    IngestOptions,
    IngestResult,
    RowSink,
    _Progress,
    ingest_csv,
    load_rows,
)

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("csv", "jsonl", "parquet")
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_SNIFF_BYTES = 4096
_PARQUET_MAGIC = b"PAR1"
# Rows per Parquet batch: a batch's values are Python strings at once (bounded by its row
# group's size, which is bounded itself).
_PARQUET_BATCH_ROWS = 8192
# A column whose batch of repeats of its longest dictionary value would pass this is read as a
# dictionary (its repeats share one value in memory); below it, plainly, which is faster.
_PLAIN_BATCH_BYTES = 64 * 1024 * 1024
# Row groups x columns whose dictionaries are looked at before reading; past it, every column
# with a dictionary page is read as a dictionary.
_MAX_DICTIONARY_PROBES = 1024
_READ_BYTES = 1 << 16


def parse_format(raw: str | None) -> str | None:
    """``csv``, ``jsonl`` or ``parquet`` (any case); None: from the file name or content."""
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value == "ndjson":
        value = "jsonl"
    if value not in FORMATS:
        raise InvalidParameterError(f"format must be one of: {', '.join(FORMATS)}", field="format")
    return value


def format_of_name(name: str | None) -> str | None:
    """The format a file name's extension says, if it says one."""
    if not name:
        return None
    return _SUFFIXES.get(os.path.splitext(name)[1].lower())


def sniff_format(head: bytes) -> str:
    """Parquet by its magic; JSON Lines when the first character (after a BOM and blanks) is
    ``{``; CSV otherwise."""
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    text = head.removeprefix(codecs.BOM_UTF8).lstrip()
    return "jsonl" if text.startswith(b"{") else "csv"


def declared_format(explicit: str | None, file_name: str | None) -> str | None:
    """The format the request names (``format``, else the file name); None: the content's."""
    return explicit or format_of_name(file_name)


def resolve_format(upload: IO[bytes], explicit: str | None, file_name: str | None) -> str:
    """The upload's format: the one the request names, else its first bytes' (peeked from the
    seekable upload, which is left where it was; a stream that cannot seek is CSV)."""
    fmt = declared_format(explicit, file_name)
    seekable = getattr(upload, "seekable", None)
    if fmt is None and not (seekable and seekable()):
        fmt = "csv"
    if fmt is None:
        start = upload.tell()
        fmt = sniff_format(upload.read(_SNIFF_BYTES))
        upload.seek(start)
    return fmt


def ingest_upload(
    sink: RowSink, upload: IO[bytes], stream: IO[bytes], opts: IngestOptions
) -> IngestResult:
    """Loads an upload in any format into ``sink`` (the job's documents).

    ``stream`` is the upload read once from its start (CSV and JSON Lines read it; the caller
    may hash it on the way); ``upload`` the seekable file itself, which the format is peeked
    from and Parquet is read from, left at its start again.
    """
    fmt = resolve_format(upload, opts.format, opts.file_name)
    if fmt == "parquet":
        try:
            return ingest_parquet(sink, upload, opts)
        finally:
            upload.seek(0)
    if fmt == "jsonl":
        return ingest_jsonl(sink, stream, opts)
    return ingest_csv(sink, stream, opts)


# --- JSON Lines --------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


class JsonlReader:
    """An upload's JSON Lines as records in the first object's key order, checked as read.

    Lines are split from blocks of ``_READ_BYTES``; a line still open past
    ``max_jsonl_line_bytes`` is refused before more of it is read. ``progress.line`` is the
    line of the last record read, ``count`` the bytes read; every fault is an
    ``InvalidFileError`` naming the row (objects, 1-based) and the line.
    """

    def __init__(self, binary: IO[bytes], opts: IngestOptions) -> None:
        self.opts = opts
        self.progress = _Progress()
        self.count = 0
        self.row = 0
        self.header: list[str] = []
        self._binary = binary
        self._records = self._read()
        self._first = next(self._records, None)
        if self._first is None:
            raise InvalidFileError(
                "the file is empty: expected JSON Lines, one object per line, at least one"
            )

    def _fail(self, message: str, **where: Any) -> NoReturn:
        line = self.progress.line
        raise InvalidFileError(
            f"line {line} (row {self.row}): {message}", row=self.row, line=line, **where
        )

    def __iter__(self) -> Iterator[Sequence[str]]:
        first, self._first = self._first, None
        if first is not None:
            yield first
        yield from self._records

    def _read(self) -> Iterator[Sequence[str]]:
        """The records; the first object found sets the header. One loop, locals only: this
        is the per-row cost of a JSON Lines upload."""
        loads, read, limit, progress = (
            orjson.loads,
            self._binary.read,
            self.opts.max_jsonl_line_bytes,
            self.progress,
        )
        convert, rekey = self._convert, self._rekey
        header: list[str] = []
        pick: Callable[[dict[str, Any]], Sequence[Any]] = _picker(["-"])
        width = line = row = 0
        carry = b""
        while True:
            block = read(_READ_BYTES)
            self.count += len(block)
            if block:
                if line == 0 and not carry:
                    block = block.removeprefix(codecs.BOM_UTF8)
                data = carry + block if carry else block
                lines = data.split(b"\n")
                carry = lines.pop()
            else:
                data, lines, carry = carry, ([carry] if carry else []), b""
            # Per block, not per line: may a line in it pass the limit, or hold a NUL?
            long, nul = len(data) > limit, b"\\u0000" in data
            for raw in lines:
                line += 1
                if long and len(raw) > limit:
                    self.row, progress.line = row + 1, line
                    self._too_long(limit)
                try:
                    obj = loads(raw)
                except ValueError as exc:
                    if not raw.strip():
                        continue  # a blank line
                    self.row, progress.line = row + 1, line
                    self._invalid(exc)
                row += 1
                progress.line = line
                if nul and b"\\u0000" in raw:  # PostgreSQL text cannot hold NUL; CSV drops it
                    obj = _no_nul(obj)
                try:
                    if len(obj) != width:
                        raise KeyError
                    record = pick(obj)  # TypeError for anything but an object
                except (KeyError, TypeError):
                    self.row = row
                    if obj.__class__ is not dict:
                        self._fail(
                            f"expected a JSON object, found {_kind(obj)} (JSON Lines: one "
                            "object per line)"
                        )
                    if header:
                        record = rekey(obj)
                    else:
                        header = self.header = self._first_keys(obj)
                        width, pick = len(header), _picker(header)
                        record = pick(obj)
                for value in record:
                    if value.__class__ is not str:
                        self.row = row
                        record = convert(record)
                        break
                yield record
            if not block:
                return
            if len(carry) > limit:  # a line still open: refused before more of it is read
                self.row, progress.line = row + 1, line + 1
                self._too_long(limit)

    def _first_keys(self, obj: dict[str, Any]) -> list[str]:
        header = list(obj)
        if not header:
            self._fail("the first object has no keys: it names the columns")
        if len(header) > self.opts.max_columns:
            self._fail(
                f"the first object has {len(header)} keys; the limit is "
                f"{self.opts.max_columns} columns per file"
            )
        return header

    def _too_long(self, limit: int) -> NoReturn:
        self._fail(
            f"the line is longer than {limit} bytes, the limit per line "
            "(DOCQUEUE_MAX_JSONL_LINE_BYTES)"
        )

    def _invalid(self, exc: ValueError) -> NoReturn:
        if not isinstance(exc, json.JSONDecodeError):  # pragma: no cover - orjson raises these
            self._fail(f"invalid JSON: {exc}")
        if "UTF-8" in exc.msg:
            self._fail(f"invalid UTF-8 (the file must be UTF-8 encoded): {exc.msg}")
        self._fail(f"invalid JSON at column {exc.colno}: {exc.msg}", column_number=exc.colno)

    def _rekey(self, obj: dict[str, Any]) -> list[Any]:
        """The rare path: an object with keys left out, or one the first object lacks."""
        known = set(self.header)
        for key in obj:
            if key not in known:
                self._fail(
                    f"key {clip(key, _SHOW_NAME_CHARS)!r} is not one of the first line's keys; "
                    "every object must use the first line's keys (one may be left out: empty)",
                    column=key,
                )
        return [obj.get(k) for k in self.header]

    def _convert(self, record: Sequence[Any]) -> list[str]:
        """Values other than strings as text; a document or an id must be a string (an id may
        also be an integer)."""
        out: list[str] = []
        text_column, id_column = self.opts.text_column, self.opts.id_column
        for name, value in zip(self.header, record, strict=True):
            if value.__class__ is str:
                out.append(value)
            elif value is None:
                out.append("")
            elif name == text_column:
                self._fail(
                    f"column {clip(name, _SHOW_NAME_CHARS)!r} is {_kind(value)}; a document "
                    "must be a JSON string",
                    column=name,
                )
            elif name == id_column and (isinstance(value, bool) or not isinstance(value, int)):
                self._fail(
                    f"id column {clip(name, _SHOW_NAME_CHARS)!r} is {_kind(value)}; an id must "
                    "be a string or an integer",
                    column=name,
                )
            elif isinstance(value, str):
                out.append(value)
            else:
                out.append(json.dumps(value, ensure_ascii=False))
        return out


def _picker(header: list[str]) -> Callable[[dict[str, Any]], Sequence[Any]]:
    """The header's values of an object in C (``itemgetter``: half a list comprehension's
    cost); KeyError for a key left out."""
    if len(header) == 1:
        key = header[0]
        return lambda obj: (obj[key],)
    return operator.itemgetter(*header)


def _no_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    if isinstance(value, dict):
        return {k: _no_nul(v) for k, v in value.items()}
    return value


def ingest_jsonl(sink: RowSink, binary: IO[bytes], opts: IngestOptions) -> IngestResult:
    """JSON Lines into ``sink`` (the job's documents)."""
    reader = JsonlReader(binary, opts)
    rows, extra = load_rows(sink, reader.header, reader, opts, reader.progress, reader)
    return IngestResult(
        rows=rows, columns=reader.header, delimiter="", extra_columns=extra, format="jsonl"
    )


# --- Parquet -----------------------------------------------------------------------------------


class _FileSize:
    """The stored-size bound's "bytes read" for Parquet: the whole file, known up front."""

    def __init__(self, count: int) -> None:
        self.count = count


def _arrow_source(upload: IO[bytes]) -> Any:
    """The upload as arrow reads it best: a file on disk memory-mapped (no Python call, so no
    GIL, per read), anything else (an upload still spooled in memory) as the file object."""
    import pyarrow as pa

    if isinstance(upload, io.BufferedReader | io.FileIO):
        try:
            return pa.memory_map(f"/proc/self/fd/{upload.fileno()}")
        except (OSError, pa.ArrowException):  # pragma: no cover - no /proc: read it through
            pass
    return upload


def _variable_width(t: pa.DataType) -> bool:
    """Strings or bytes: the types whose dictionary values may be long."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return False  # read as a dictionary whatever is asked (the file's own arrow schema)
    return bool(
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _value_kind(t: pa.DataType) -> str | None:
    """How a column of type ``t`` becomes text: "str", "cast" (numbers, booleans, dates,
    times, decimals, binary checked as UTF-8), "null"; None for types that have no text form
    (lists, structs, maps ...)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _value_kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_null(t):
        return "null"
    if (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_temporal(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    ):
        return "cast"
    return None


def _parquet_fail(message: str, **where: Any) -> NoReturn:
    raise InvalidFileError(message, **where)


def _check_footer(upload: IO[bytes], opts: IngestOptions) -> int:
    """The file's size, after its footer was found and its metadata's length checked."""
    size = upload.seek(0, os.SEEK_END)
    if size < 12:
        _parquet_fail(f"not a Parquet file: {size} bytes, shorter than any Parquet file")
    upload.seek(size - 8)
    tail = upload.read(8)
    upload.seek(0)
    if tail[4:] != _PARQUET_MAGIC:
        _parquet_fail("not a Parquet file: it does not end with PAR1 (cut short?)")
    (meta_len,) = struct.unpack("<I", tail[:4])
    limit = opts.max_parquet_metadata_bytes
    if meta_len > limit:
        _parquet_fail(
            f"the Parquet metadata (footer) is {meta_len} bytes; the limit is {limit} "
            "(DOCQUEUE_MAX_PARQUET_METADATA_BYTES): fewer row groups or columns"
        )
    if meta_len + 12 > size:
        _parquet_fail("not a valid Parquet file: its footer is longer than the file")
    return size


class ParquetReader:
    """A Parquet upload's columns and its rows as text, every bound checked from the metadata
    before any data is read."""

    def __init__(self, upload: IO[bytes], opts: IngestOptions) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.opts = opts
        self.progress = _Progress()  # no lines: errors name rows and columns
        self.source = _FileSize(_check_footer(upload, opts))
        try:
            meta = pq.read_metadata(upload)
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError, ValueError) as exc:
            _parquet_fail(f"not a valid Parquet file: {clip(str(exc), 300)}")
        if meta.num_columns > opts.max_columns:
            _parquet_fail(
                f"the file has {meta.num_columns} columns; the limit is {opts.max_columns} "
                "columns per file"
            )
        if meta.num_rows > opts.max_rows:
            _parquet_fail(
                f"the file has {meta.num_rows} rows; the limit per job is {opts.max_rows}",
                row=opts.max_rows + 1,
            )
        limit = opts.max_parquet_row_group_bytes
        dictionary: dict[int, list[int]] = {}  # row group: its columns with a dictionary page
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if group.total_byte_size > limit:
                _parquet_fail(
                    f"row group {g + 1} of {meta.num_row_groups} ({group.num_rows} rows) is "
                    f"{group.total_byte_size} bytes uncompressed; the limit is {limit} "
                    "(DOCQUEUE_MAX_PARQUET_ROW_GROUP_BYTES): write the file with smaller row "
                    "groups (pyarrow: row_group_size=)",
                    row_group=g + 1,
                )
            dictionary[g] = [
                c for c in range(group.num_columns) if group.column(c).has_dictionary_page
            ]
        self.header = [f.name for f in schema]
        self._kinds = self._check_schema(schema)
        # Leaves and top-level fields are the same columns here: nested types were refused.
        variable = {
            c for c, f in enumerate(schema) if _variable_width(f.type) and self._kinds[c] != "null"
        }
        source = _arrow_source(upload)
        try:
            read_dictionary = self._risky(pq, source, meta, dictionary, variable)
            self._file = pq.ParquetFile(
                source, metadata=meta, read_dictionary=read_dictionary, pre_buffer=False
            )
        except (pa.ArrowException, OSError, ValueError) as exc:
            _parquet_fail(f"not a valid Parquet file: {clip(str(exc), 300)}")

    def _risky(
        self,
        pq: Any,
        source: Any,
        meta: Any,
        dictionary: dict[int, list[int]],
        variable: set[int],
    ) -> list[str]:
        """The columns to read as dictionaries: those of strings or bytes whose dictionary
        holds a value long enough that a batch of its repeats would pass
        ``_PLAIN_BATCH_BYTES``. Every other column is read plainly (a dictionary read hashes
        every value of a column's plain pages: five times the cost of decoding it).

        Each row group's dictionaries are read first (a one-row batch reads a column's whole
        dictionary page and its first data page); with too many to read, every such column
        is read as a dictionary."""
        import pyarrow as pa
        import pyarrow.compute as pc

        names = self.header
        wanted = {g: [c for c in cols if c in variable] for g, cols in dictionary.items()}
        wanted = {g: cols for g, cols in wanted.items() if cols}
        columns = sorted({c for cols in wanted.values() for c in cols})
        if sum(len(cols) for cols in wanted.values()) > _MAX_DICTIONARY_PROBES:
            return [names[c] for c in columns]
        probe = pq.ParquetFile(
            source, metadata=meta, read_dictionary=[names[c] for c in columns], pre_buffer=False
        )
        longest = dict.fromkeys(columns, 0)
        for g, cols in wanted.items():
            batch = next(
                probe.iter_batches(
                    batch_size=1,
                    row_groups=[g],
                    columns=[names[c] for c in cols],
                    use_threads=False,
                ),
                None,
            )
            if batch is None:
                continue
            for i, c in enumerate(cols):
                arr = batch.column(i)
                if isinstance(arr, pa.DictionaryArray) and len(arr.dictionary):
                    size = pc.max(pc.binary_length(arr.dictionary)).as_py() or 0
                    longest[c] = max(longest[c], size)
        return [names[c] for c in columns if longest[c] * _PARQUET_BATCH_ROWS > _PLAIN_BATCH_BYTES]

    def _check_schema(self, schema: pa.Schema) -> list[str]:
        import pyarrow as pa

        opts, kinds, seen = self.opts, [], set()
        for f in schema:
            name = f.name
            shown = clip(name, _SHOW_NAME_CHARS)
            if name in seen:
                _parquet_fail(f"duplicate column name {shown!r}", column=name)
            seen.add(name)
            kind = _value_kind(f.type)
            t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
            if name == opts.text_column and kind not in ("str", "null"):
                _parquet_fail(
                    f"text column {shown!r} has type {t}; the text column must be strings",
                    column=name,
                )
            if name == opts.id_column and not (
                kind == "str" or pa.types.is_integer(t) or kind == "null"
            ):
                _parquet_fail(
                    f"id column {shown!r} has type {t}; an id must be a string or an integer",
                    column=name,
                )
            if kind is None:
                _parquet_fail(
                    f"column {shown!r} has type {t}; columns must be strings, numbers, "
                    "booleans, dates or times (flatten or drop it)",
                    column=name,
                )
            kinds.append(kind)
        return kinds

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        """The rows, a batch at a time, decoded in this thread: a decode thread beside the
        ``COPY`` writer made the served upload slower (the two traded the GIL), though not the
        reader alone (BENCHMARKS.md, ingest by format)."""
        import pyarrow as pa

        batches = self._file.iter_batches(batch_size=_PARQUET_BATCH_ROWS, use_threads=False)
        first = 1
        it = iter(batches)
        while True:
            try:
                batch = next(it, None)
            except (pa.ArrowException, OSError, ValueError) as exc:
                _parquet_fail(
                    f"row {first} and after: the Parquet data cannot be read: "
                    f"{clip(str(exc), 300)}",
                    row=first,
                )
            if batch is None:
                return
            columns = [self._texts(batch.column(i), i, first) for i in range(batch.num_columns)]
            first += batch.num_rows
            yield from zip(*columns, strict=True)

    def _texts(self, arr: pa.Array, i: int, first: int) -> list[str]:
        """A batch's column as text: nulls empty, NUL characters dropped; a dictionary's
        values converted once, its rows sharing them."""
        import pyarrow as pa

        kind = self._kinds[i]
        if kind == "null":
            return [""] * len(arr)
        dictionary = isinstance(arr, pa.DictionaryArray)
        try:
            if dictionary:
                return _dictionary_texts(arr, kind)
            return _plain_texts(arr, kind)
        except (pa.ArrowException, UnicodeDecodeError):
            pass
        # The rare path: which row is not text.
        plain = arr.dictionary if dictionary else arr
        bad = next(n for n in range(len(plain)) if not _is_text(plain.slice(n, 1), kind))
        offset = arr.indices.to_pylist().index(bad) if dictionary else bad
        name = self.header[i]
        _parquet_fail(
            f"row {first + offset}: column {clip(name, _SHOW_NAME_CHARS)!r} is not valid UTF-8",
            row=first + offset,
            column=name,
        )


def _dictionary_texts(arr: pa.DictionaryArray, kind: str) -> list[str]:
    """A dictionary column's batch: only the values its rows use are converted, once each
    (a batch carries its column chunk's whole dictionary, often many times its rows), and
    the rows share them."""
    import pyarrow.compute as pc

    indices = pc.fill_null(arr.indices, -1) if arr.indices.null_count else arr.indices
    used = pc.unique(indices)
    valid = pc.filter(used, pc.greater_equal(used, 0))
    texts = _plain_texts(arr.dictionary.take(valid), kind)
    lookup = dict(zip(valid.to_numpy().tolist(), texts, strict=True))
    lookup[-1] = ""
    return [lookup[k] for k in indices.to_numpy(zero_copy_only=False).tolist()]


def _is_text(arr: pa.Array, kind: str) -> bool:
    import pyarrow as pa

    try:
        _plain_texts(arr, kind)
    except (pa.ArrowException, UnicodeDecodeError):
        return False
    return True


def _plain_texts(arr: pa.Array, kind: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if kind == "cast":
        binary = pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)
        # Binary is checked as UTF-8 by the cast (ArrowInvalid); numbers cannot hold a NUL.
        arr = pc.cast(arr, pa.large_string() if pa.types.is_large_binary(arr.type) else pa.string())
        if not binary:
            return _pylist(pc.fill_null(arr, "") if arr.null_count else arr)
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    if pc.any(pc.match_substring(arr, "\x00")).as_py():
        arr = pc.replace_substring(arr, "\x00", "")
    return _pylist(arr)


def _pylist(arr: pa.Array) -> list[str]:
    """Strings as Python ``str``s, converted in C (``to_pylist`` makes a scalar per value,
    five times slower)."""
    values: list[str] = arr.to_numpy(zero_copy_only=False).tolist()
    return values


def ingest_parquet(sink: RowSink, upload: IO[bytes], opts: IngestOptions) -> IngestResult:
    """A Parquet upload (seekable; read from its start) into ``sink`` (the job's documents)."""
    reader = ParquetReader(upload, opts)
    rows, extra = load_rows(sink, reader.header, reader, opts, reader.progress, reader.source)
    return IngestResult(
        rows=rows, columns=reader.header, delimiter="", extra_columns=extra, format="parquet"
    )

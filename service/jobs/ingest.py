"""Streamed CSV ingest: parse rows as they are read and bulk-load them with PostgreSQL ``COPY``.

The upload is never held whole in memory: rows flow from the (spooled) file through
``csv.reader`` into COPY buffers of a few thousand rows. Every fault is reported with the row
(1-based data row, header not counted) and the physical line where it was found, and the caller
rolls the transaction back so nothing half-ingested stays behind.

What an upload may cost is bounded before it is stored:

- **Memory.** The bytes reach the text layer through ``_Source``, which counts them and refuses
  a row (one CSV record, which quoted fields may spread over several lines) once more than
  ``IngestOptions.max_row_bytes`` were read for it: the longest row that can legitimately be
  stored. Lines are read with a bounded ``readline`` that the source always stops first. The
  delimiter is sniffed from the first 16 KiB, peeked from the read buffer (parsed once per
  candidate delimiter, never read again).
- **Disk.** At most ``max_columns`` columns per file and ``max_extra_bytes`` of extra columns
  per row; a row must have exactly the header's fields (a short row is an error, not padded);
  and what the rows store (text, id, ``extra``) stays within ``_STORED_FACTOR`` times the bytes
  read, plus ``_STORED_PER_ROW`` per row and ``_STORED_SLACK`` per file: the column names in
  every row's ``extra`` are the one thing a file could otherwise repeat without paying for it.
- **Dialect traps.** The reader is strict. A quoted field that never closes is an error naming
  the line where its row (and so, almost always, the quote) began, instead of swallowing every
  later row; so is text after a closing quote (``"abc"def``). A quote inside an unquoted field
  is kept as a literal character, as Excel and RFC 4180-lenient readers do (``5" screen``).
  Rows may end in ``\n`` or ``\r\n``, mixed (files are often concatenated); a lone ``\r``
  outside quotes is an error naming its line, not a row break that would silently split its
  row (in a classic-Mac file, whose rows end in ``\r``, the same goes for ``\n``). A row with
  more or fewer fields than the header is an error that says which delimiter was used.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import IO, TYPE_CHECKING, Any, NoReturn, Protocol

from service.errors import InvalidFileError, InvalidParameterError, clip

if TYPE_CHECKING:
    import psycopg

    from service.settings import Settings

DELIMITERS = (",", ";", "\t")
_DELIM_NAMES = {",": "','", ";": "';'", "\t": "tab"}
# The delimiter is sniffed from at most this much of the file's start (peeked, not re-read).
_SNIFF_BYTES = 16 * 1024
_BUFFER_BYTES = 64 * 1024
# What the text layer decodes at a time (its default, 8 KiB, costs a tenth more CPU per row).
_TEXT_CHUNK_BYTES = 64 * 1024
# What the text layer may have read beyond the row it hands the csv reader: its buffer and
# a decoded chunk, with room to spare. A row is bounded at max_row_bytes plus this.
_READ_AHEAD_BYTES = 2 * (_BUFFER_BYTES + _TEXT_CHUNK_BYTES)
# An unclosed quote's line is found in at most this much of its row's start (kept in memory).
_KEEP_BYTES = 256 * 1024
_COPY_BATCH_ROWS = 4000
_COPY_BATCH_CHARS = 8 * 1024 * 1024
# COPY text format escapes: backslash first so the others are not escaped twice.
_COPY_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))
# A row's id, delimiters and quotes, beyond its document and extra columns (max_row_bytes).
_ROW_SLACK_BYTES = 64 * 1024
# What rows store (text, id and extra as JSON, counted in characters, the column names in
# bytes) may reach this many times the bytes read, plus a little per row (the JSON braces and
# quotes of a row's few extra columns) and per file. PostgreSQL's own per-row overhead (tuple
# header, job id, idx: about 60 bytes) comes on top, bounded by max_rows.
_STORED_FACTOR = 4
_STORED_PER_ROW = 64
_STORED_SLACK = 64 * 1024
# Column names an error lists, and the characters it shows of each.
_SHOW_NAMES = 20
_SHOW_NAME_CHARS = 64


def parse_delimiter(raw: str | None) -> str | None:
    """``,``, ``;`` or a tab (``\t`` or ``tab``); None lets the reader sniff it. Anything else
    is a 422 naming the field."""
    if raw is None:
        return None
    value = "\t" if raw == "tab" else raw
    if value not in DELIMITERS:
        raise InvalidParameterError(
            "delimiter must be ',', ';' or tab ('\\t' or 'tab')", field="delimiter"
        )
    return value


@dataclass(frozen=True)
class IngestOptions:
    """How to read one upload. The limits' defaults are the settings' defaults
    (``service.settings.JobSettings``); callers build them with ``from_settings``."""

    text_column: str = "text"
    id_column: str | None = None
    delimiter: str | None = None  # None: sniffed from the first lines
    template_fields: frozenset[str] = frozenset()  # fields the prompt template needs
    max_rows: int = 2_000_000
    max_document_bytes: int = 1024 * 1024
    max_columns: int = 256
    max_extra_bytes: int = 64 * 1024
    # Other formats (service.jobs.formats): None reads the format from the file name, else
    # from the content.
    format: str | None = None
    file_name: str | None = None
    max_jsonl_line_bytes: int = 8 * 1024 * 1024
    max_parquet_row_group_bytes: int = 256 * 1024 * 1024
    max_parquet_metadata_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings, **fields: Any) -> IngestOptions:
        """The options with every limit from ``settings.jobs``; ``fields`` set the rest."""
        jobs = settings.jobs
        limits: dict[str, Any] = {
            "max_rows": jobs.max_rows_per_job,
            "max_document_bytes": jobs.max_document_bytes,
            "max_columns": jobs.max_columns,
            "max_extra_bytes": jobs.max_extra_bytes,
            "max_jsonl_line_bytes": jobs.max_jsonl_line_bytes,
            "max_parquet_row_group_bytes": jobs.max_parquet_row_group_bytes,
            "max_parquet_metadata_bytes": jobs.max_parquet_metadata_bytes,
        }
        return cls(**{**limits, **fields})

    @property
    def max_row_bytes(self) -> int:
        """The longest row (CSV record, one line or several) the reader accepts, in bytes of
        the file; the reader never holds more of one row than that.

        It is the longest row that can be stored: a document of ``max_document_bytes`` and
        extra columns of ``max_extra_bytes``, each possibly doubled by CSV quoting (``""``),
        plus 64 KiB for the id, the delimiters and the quotes.
        """
        return 2 * (self.max_document_bytes + self.max_extra_bytes) + _ROW_SLACK_BYTES


@dataclass
class IngestResult:
    rows: int
    columns: list[str]
    delimiter: str  # "" for formats other than CSV
    extra_columns: list[str] = field(default_factory=list)
    format: str = "csv"


def _copy_escape(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        for old, new in _COPY_ESCAPES:
            value = value.replace(old, new)
    return value


def _names(names: list[str]) -> str:
    """Column names for an error: the first few, each cut short, and how many more."""
    shown = ", ".join(repr(clip(n, _SHOW_NAME_CHARS)) for n in names[:_SHOW_NAMES])
    more = len(names) - _SHOW_NAMES
    return f"{shown}, ... ({more} more)" if more > 0 else shown


class _RowTooLong(Exception):
    """Raised by ``_Source`` through the text layer and the csv reader: the row being read has
    passed ``max_row_bytes``."""


class _Progress:
    """Where the csv reader is: the line where its last row ended. Written once per row by
    the reader, read once per block by the source (a slot: the cheapest attribute there is)."""

    __slots__ = ("line",)

    def __init__(self) -> None:
        self.line = 0


class _Source(io.RawIOBase):
    """The upload's bytes as the text layer reads them, in blocks: NUL bytes dropped
    (PostgreSQL text cannot hold them, and UTF-8 has no other 0x00 byte), counted, and the row
    being read bounded, so that no line or multi-line row is ever held beyond that bound.

    A row is refused once more than ``max_row_bytes`` were read since the block at which the
    previous row was seen done (``progress``): those bytes all belong to the row, so no row
    within the bound is ever refused, and no more than ``_READ_AHEAD_BYTES`` (what the text
    layer reads ahead) beyond it is ever held. The blocks where the current row begins are
    kept, up to ``_KEEP_BYTES``, for an error to say on which line an unclosed quote opened.
    """

    def __init__(self, binary: IO[bytes], max_row_bytes: int, progress: _Progress) -> None:
        super().__init__()
        self._binary = binary
        self._max = max_row_bytes
        self._progress = progress
        self._row_line = 0  # progress.line as last seen
        self._row_bytes = 0  # bytes read since then
        self.count = 0  # bytes handed to the text layer
        self.newline = b""  # b"\n", or b"\r" in a classic-Mac file: decided on the first block
        self._newlines = 0  # line ends in the blocks read so far
        self._kept: list[tuple[int, int, bytes]] = []  # (offset, first line, block)
        self._kept_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            try:
                data = self._binary.read(len(buffer))
            except OSError as exc:  # pragma: no cover - a broken upload stream
                raise InvalidFileError(f"could not read the upload: {exc}") from exc
            if not data:
                return 0
            if b"\x00" in data:
                data = data.replace(b"\x00", b"")
                if not data:
                    continue
            if not self.newline:
                self.newline = _newline_of(data[:_SNIFF_BYTES])
            n, offset = len(data), self.count
            buffer[:n] = data
            self.count += n
            if self._progress.line != self._row_line:  # rows were read since the last block
                self._row_line = self._progress.line
                self._row_bytes = 0
                self._drop_kept(offset - _READ_AHEAD_BYTES)
            if self._kept_bytes < _KEEP_BYTES:
                self._kept.append((offset, self._newlines + 1, data))
                self._kept_bytes += n
            self._newlines += data.count(self.newline)
            self._row_bytes += n
            if self._row_bytes > self._max:
                raise _RowTooLong
            return n

    def _drop_kept(self, before: int) -> None:
        """Forgets the kept blocks that end before offset ``before``."""
        kept = self._kept
        while kept and kept[0][0] + len(kept[0][2]) < before:
            self._kept_bytes -= len(kept.pop(0)[2])

    def text_from(self, line: int) -> str | None:
        """The file from the start of ``line``, as far as the kept blocks go; None if they
        do not hold it."""
        nl, kept = self.newline, self._kept
        for i, (offset, first, data) in enumerate(kept):
            if first <= line <= first + data.count(nl):
                pos = 0
                for _ in range(line - first):
                    pos = data.index(nl, pos) + 1
                chunks, end = [data[pos:]], offset + len(data)
                for next_offset, _, more in kept[i + 1 :]:
                    if next_offset != end:
                        break
                    chunks.append(more)
                    end += len(more)
                return b"".join(chunks).decode("utf-8", "replace")
        return None


def _newline_of(head: bytes) -> bytes:
    """Rows end in \n or \r\n, or in a classic-Mac file in \r: whichever ends more lines."""
    lone_cr = head.count(b"\r") - head.count(b"\r\n")
    return b"\r" if lone_cr > head.count(b"\n") else b"\n"


def _sniff_delimiter(sample: list[str], complete: bool = True) -> str:
    """The delimiter that splits the header, then under which every sampled row has the
    header's width, then most rows do, then the widest header; ',' when nothing tells.

    ``complete``: the sample is the whole file (otherwise its last row may be cut, and is
    not counted). A file that no delimiter splits has one column: the delimiter that splits
    none of its rows either is the one that keeps its texts whole.
    """
    best, best_score = ",", (False, False, -1, -1)
    for delim in DELIMITERS:
        rows: list[list[str]] = []
        cut = not complete
        try:
            for row in csv.reader(sample, delimiter=delim):
                if row:
                    rows.append(row)
        except csv.Error:  # a field past the size limit: the row it is in was not read
            cut = False
        if cut and len(rows) > 1:
            rows.pop()
        if not rows:
            continue
        width = len(rows[0])
        matching = sum(1 for r in rows[1:] if len(r) == width)
        score = (width > 1, matching == len(rows) - 1, matching, width)
        if score > best_score:
            best, best_score = delim, score
    return best


def _first_bad_utf8(value: str) -> int | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


class CsvReader:
    """An upload's header and its data rows, checked as they are read.

    Iterating yields the data rows, each a list of exactly ``width`` fields; ``line`` is the
    physical line where the last one read ends (rows are counted by the caller: 1-based, the
    header not counted). Every fault is an ``InvalidFileError`` naming the row and the line.
    """

    def __init__(self, binary: IO[bytes], opts: IngestOptions) -> None:
        csv.field_size_limit(max(opts.max_document_bytes, 1024))
        self.opts = opts
        self.progress = _Progress()
        self.source = _Source(binary, opts.max_row_bytes, self.progress)
        buffered = io.BufferedReader(self.source, _BUFFER_BYTES)
        # The first block, peeked: it stays in the buffer for the reader.
        block = buffered.peek(_BUFFER_BYTES)
        head = block[:_SNIFF_BYTES].removeprefix(codecs.BOM_UTF8)
        self.newline = (self.source.newline or b"\n").decode()
        self.sniffed = opts.delimiter is None
        if opts.delimiter is None:
            whole = len(block) < _BUFFER_BYTES and len(block) <= _SNIFF_BYTES
            sample = _split_lines(head.decode("utf-8", "replace"), self.newline)
            self.delimiter = _sniff_delimiter(sample, complete=whole)
        else:
            self.delimiter = opts.delimiter
        # newline="\n" (or "\r"): lines split there only and are passed on untranslated, so a
        # stray line break of the other kind inside an unquoted field is a csv.Error (reported
        # with its row), never a silent split of that row. Outside quotes, csv reads \r\n as
        # one line end, so \n and \r\n may mix.
        text = io.TextIOWrapper(
            buffered, encoding="utf-8-sig", errors="surrogateescape", newline=self.newline
        )
        text._CHUNK_SIZE = _TEXT_CHUNK_BYTES  # type: ignore[attr-defined]
        # A line this long has had more than max_row_bytes read since its row began, so the
        # source has refused it already: readline never returns a line cut at this limit.
        line_limit = opts.max_row_bytes + 2 * _READ_AHEAD_BYTES + 1
        lines = iter(functools.partial(text.readline, line_limit), "")
        self.reader = csv.reader(lines, delimiter=self.delimiter, strict=True)
        self.row = 0
        self.header: list[str] = []  # empty while it is being read
        self.header = self._read_header()
        self.width = len(self.header)

    def _read_header(self) -> list[str]:
        reader = self.reader
        record: list[str] = []
        while not record:
            try:
                record = next(reader)
            except StopIteration:
                raise InvalidFileError(
                    "the file is empty: expected a header row and at least one data row"
                ) from None
            except csv.Error as exc:
                self._malformed(str(exc), self.line + 1)
            except _RowTooLong:
                self._too_long(self.line + 1)
            self.progress.line = reader.line_num
        if len(record) > self.opts.max_columns:
            raise InvalidFileError(
                f"the header has {len(record)} columns; the limit is {self.opts.max_columns} "
                f"columns per file{self.hint()}",
                line=self.line,
            )
        if _first_bad_utf8("".join(record)) is not None:
            raise InvalidFileError("invalid UTF-8 in the header row", row=0, line=self.line)
        header = [h.strip() for h in record]
        seen: set[str] = set()
        for name in header:
            if name in seen:
                raise InvalidFileError(
                    f"duplicate column name {clip(name, _SHOW_NAME_CHARS)!r} in the header",
                    line=self.line,
                )
            seen.add(name)
        return header

    @property
    def line(self) -> int:
        """The line where the last row read ends."""
        return self.progress.line

    def hint(self) -> str:
        """Which delimiter the file was read with, and how to choose another."""
        name = _DELIM_NAMES[self.delimiter]
        if self.sniffed:
            return (
                f" (read with delimiter {name}, sniffed from the first lines; if the file uses "
                "another, set the delimiter field to ',', ';' or 'tab')"
            )
        return f" (read with delimiter {name}, as given)"

    def __iter__(self) -> Iterator[list[str]]:
        reader, progress, width = self.reader, self.progress, self.width
        next_record = reader.__next__
        line, row = progress.line, self.row
        while True:
            try:
                record = next_record()
            except StopIteration:
                return
            except csv.Error as exc:
                self.row = row
                self._malformed(str(exc), line + 1)
            except _RowTooLong:
                self.row = row
                self._too_long(line + 1)
            line = progress.line = reader.line_num
            if not record:
                continue  # a blank line
            row += 1
            if len(record) != width:
                self.row = row
                self._wrong_width(record)
            yield record

    # --- errors: the rare path -----------------------------------------------------------------

    def _fail(self, message: str, line: int) -> NoReturn:
        if self.header:
            raise InvalidFileError(f"row {self.row + 1}: {message}", row=self.row + 1, line=line)
        raise InvalidFileError(f"the header: {message}", line=line)

    def _open_line(self, start: int, through: int) -> int:
        """The line where the quote still open at the end of line ``through`` opened, in the
        row that began on line ``start``, read again from the kept blocks as the csv reader
        read it; ``start`` where those no longer hold the row's start."""
        text = self.source.text_from(start) if through > start else None
        if text is None:
            return start
        nl, delim = self.newline, self.delimiter
        line, open_at, in_quotes, field_start = start, start, False, True
        i, n = 0, len(text)
        while i < n and line <= through:
            c = text[i]
            i += 1
            if in_quotes:
                if c == '"':
                    if i < n and text[i] == '"':
                        i += 1  # an escaped quote
                    else:
                        in_quotes = False
                elif c == nl:
                    line += 1
            elif c == '"' and field_start:
                in_quotes, open_at = True, line
            elif c == nl:
                line += 1
                field_start = True
                continue
            field_start = c == delim
        return open_at if in_quotes else start

    def _malformed(self, msg: str, start: int) -> NoReturn:
        """A csv.Error while reading the row that began on line ``start``."""
        now = max(self.reader.line_num, start)
        lines = f"line {start}" if now == start else f"lines {start}-{now}"
        if msg == "unexpected end of data":
            at = self._open_line(start, now)
            self._fail(
                f"the quoted field opened on line {at} is never closed (a quote inside a "
                'quoted field is written twice: "")',
                at,
            )
        if "field larger than field limit" in msg:
            if now > start:  # a quoted field ran on over lines: it most likely never closes
                at = self._open_line(start, now)
                self._fail(
                    f"the quoted field opened on line {at} is still open after "
                    f"{self.opts.max_document_bytes} characters (at line {now}); is its closing "
                    "quote missing?",
                    at,
                )
            what = "a field" if self.header else "a column name"
            self._fail(
                f"{what} on line {now} exceeds the limit of {self.opts.max_document_bytes} bytes",
                now,
            )
        if "expected after" in msg:
            if now > start:  # most likely the quote that opened the row's field never closed
                at = self._open_line(start, now - 1)
                self._fail(
                    f"the quoted field opened on line {at} is likely never closed: a quote "
                    f"on line {now} ends it, but text follows that quote (a quote inside a "
                    'quoted field is written twice: "")',
                    at,
                )
            self._fail(
                f"text follows the closing quote of a quoted field on line {now} (a quote "
                'inside a quoted field is written twice: "")',
                now,
            )
        if "new-line character seen in unquoted field" in msg:
            stray, usual = ("\\r", "\\n or \\r\\n") if self.newline == "\n" else ("\\n", "\\r")
            self._fail(
                f"a line break ({stray}) inside an unquoted field on line {now}, in a file whose "
                f"rows end with {usual}; quote that field or remove the stray line break",
                now,
            )
        self._fail(f"malformed CSV on {lines}: {msg}", now)

    def _too_long(self, start: int) -> NoReturn:
        """The source refused the row that began on line ``start``: it passed max_row_bytes."""
        now = self.reader.line_num + 1  # the line being read
        limit = self.opts.max_row_bytes
        if now > start:
            at = self._open_line(start, now)
            self._fail(
                f"the row that begins on line {start} is longer than {limit} bytes by line "
                f"{now}: is the quoted field opened on line {at} missing its closing quote?",
                start,
            )
        self._fail(
            f"line {now} is longer than {limit} bytes, more than any row may be "
            f"({self.opts.max_document_bytes} bytes of text and {self.opts.max_extra_bytes} "
            "of other columns)",
            now,
        )

    def _wrong_width(self, record: list[str]) -> NoReturn:
        n, width = len(record), self.width
        fix = (
            "every row needs a value, empty or not, for each column"
            if n < width
            else "a field that contains the delimiter must be quoted"
        )
        raise InvalidFileError(
            f"row {self.row}: {n} fields, but the header has {width}; {fix}{self.hint()}",
            row=self.row,
            line=self.line,
        )


def _split_lines(text: str, newline: str) -> list[str]:
    """``text`` split after each ``newline`` (str.splitlines also splits at \\x0b, \\x1c ...)."""
    parts = text.split(newline)
    lines = [part + newline for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def read_rows(binary: IO[bytes], opts: IngestOptions) -> tuple[list[str], str, Iterator[list[str]]]:
    """Header, delimiter and an iterator of data rows; raises on an empty file or bad header."""
    reader = CsvReader(binary, opts)
    return reader.header, reader.delimiter, iter(reader)


def ingest_csv(sink: RowSink, binary: IO[bytes], opts: IngestOptions) -> IngestResult:
    """Loads the upload's rows into ``sink`` (the job's documents)."""
    reader = CsvReader(binary, opts)
    rows, extra_columns = load_rows(
        sink, reader.header, reader, opts, reader.progress, reader.source, reader.hint()
    )
    return IngestResult(
        rows=rows, columns=reader.header, delimiter=reader.delimiter, extra_columns=extra_columns
    )


class Counted(Protocol):
    """What a reader has read of the upload so far, in bytes (the stored-size bound)."""

    count: int


class RowSink(Protocol):
    """Where checked rows go: PostgreSQL's ``COPY`` (``PgCopySink``) for the service, the
    embedded store for ``docqueue run``. ``load_rows`` has checked every bound before ``add``.
    ``extra`` is the row's other columns as a JSON object's text; ``line`` where the row ends
    (0 where the format has no lines), for errors the sink finds (bad UTF-8, a duplicate id)."""

    def add(
        self, idx: int, external_id: str | None, text: str, extra: str | None, line: int
    ) -> None: ...

    def flush(self) -> None:
        """Sends what was added so far (``load_rows`` calls it every few thousand rows)."""


class PgCopySink:
    """Rows into ``documents`` for ``job_id`` with one ``COPY``, in the caller's transaction.
    A context manager: the ``COPY`` ends on exit, where a duplicate id becomes the file's error
    (with its row)."""

    def __init__(self, conn: psycopg.Connection[Any], job_id: uuid.UUID, id_column: str | None):
        self._conn, self._id_column = conn, id_column
        self._prefix = f"{job_id}\t"
        self._batch: list[str] = []
        self._where: list[int] = []  # the line of each row in the batch
        self._first = 1  # idx of the batch's first row
        self._copy: Any = None

    def __enter__(self) -> PgCopySink:
        self._cm = self._conn.cursor().copy(
            "COPY documents (job_id, idx, external_id, text, extra) FROM STDIN"
        )
        self._copy = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        from psycopg import errors as pg_errors

        try:
            if exc[0] is None:
                self.flush()
            self._cm.__exit__(*exc)
        except pg_errors.UniqueViolation as err:
            raise _duplicate_error(err, self._id_column) from err

    def add(
        self, idx: int, external_id: str | None, text: str, extra: str | None, line: int
    ) -> None:
        ext = "\\N" if external_id is None else _copy_escape(external_id)
        ext_json = "\\N" if extra is None else _copy_escape(extra)
        if not self._batch:
            self._first = idx
        self._batch.append(f"{self._prefix}{idx}\t{ext}\t{_copy_escape(text)}\t{ext_json}\n")
        self._where.append(line)

    def flush(self) -> None:
        if self._batch:
            from psycopg import errors as pg_errors

            data = encode_rows(self._batch, self._first, self._where)
            try:
                self._copy.write(data)
            except pg_errors.UniqueViolation as err:
                raise _duplicate_error(err, self._id_column) from err
            self._batch.clear()
            self._where.clear()


def load_rows(
    sink: RowSink,
    header: list[str],
    records: Iterable[Sequence[str]],
    opts: IngestOptions,
    progress: _Progress,
    source: Counted,
    hint: str = "",
) -> tuple[int, list[str]]:
    """Checks ``records`` (each a value per ``header`` column, as text) against every per-row
    bound and hands them to ``sink``; returns (rows, extra columns). Every format's reader ends
    here, so the limits and the stored rows are the same whatever the upload's format.
    ``progress.line`` is the line where the last record ends (0 where a format has no lines),
    ``source.count`` the bytes read so far."""
    found = _names(header)
    if opts.text_column not in header:
        raise InvalidFileError(
            f"text column {clip(opts.text_column, _SHOW_NAME_CHARS)!r} not found; "
            f"columns found: {found}{hint}",
            column=opts.text_column,
        )
    if opts.id_column is not None and opts.id_column not in header:
        raise InvalidFileError(
            f"id column {clip(opts.id_column, _SHOW_NAME_CHARS)!r} not found; "
            f"columns found: {found}{hint}",
            column=opts.id_column,
        )
    known = set(header) | {"text", "id"}
    unknown = sorted(opts.template_fields - known)
    if unknown:
        raise InvalidParameterError(
            f"prompt template field {{{clip(unknown[0], _SHOW_NAME_CHARS)}}} is not a column; "
            f"use {{text}}, {{id}} or one of: {found}",
            field="prompt",
        )

    text_pos = header.index(opts.text_column)
    id_pos = header.index(opts.id_column) if opts.id_column is not None else None
    extra_cols = [
        (i, name) for i, name in enumerate(header) if i != text_pos and i != id_pos and name
    ]
    extra_keys = [(i, encode_basestring(name) + ": ") for i, name in extra_cols]
    max_extra = opts.max_extra_bytes
    # The JSON of a row's extra columns with every value empty: what the names alone take.
    keys_json = "{" + ", ".join(k + '""' for _, k in extra_keys) + "}" if extra_keys else ""
    keys_bytes = len(keys_json.encode("utf-8", "surrogateescape"))
    if keys_bytes > max_extra:
        raise InvalidFileError(
            f"the names of the {len(extra_keys)} columns besides text and id take {keys_bytes} "
            f"bytes in every row; the limit is {max_extra} bytes of other columns per row: "
            "drop the columns the job does not need or shorten their names",
            line=progress.line or None,
        )
    # Stored sizes are counted in characters, cheaply; the names, repeated in every row, in
    # bytes: this many more per row.
    names_extra_bytes = keys_bytes - len(keys_json)
    limit = opts.max_document_bytes
    char_guard = limit // 4  # below this many characters a field cannot exceed `limit` bytes
    extra_guard = max_extra // 4
    stored = 0  # text, id and extra JSON of the rows so far
    flush_at = _COPY_BATCH_CHARS
    pending = 0  # rows added since the last flush

    idx = 0
    for row in records:
        idx += 1
        if idx > opts.max_rows:
            raise InvalidFileError(
                f"more than {opts.max_rows} rows: the limit per job is {opts.max_rows}",
                row=idx,
                line=progress.line or None,
            )
        text = row[text_pos]
        if len(text) > char_guard and len(text.encode("utf-8", "surrogateescape")) > limit:
            raise InvalidFileError(
                f"row {idx}: column {clip(opts.text_column, _SHOW_NAME_CHARS)!r} is "
                f"{len(text.encode('utf-8', 'surrogateescape'))} bytes; "
                f"the limit is {limit} bytes per document",
                row=idx,
                line=progress.line or None,
                column=opts.text_column,
            )
        stored += len(text)
        ext: str | None = None
        if id_pos is not None:
            ext = row[id_pos].strip()
            if not ext:
                raise InvalidFileError(
                    f"row {idx}: empty id in column "
                    f"{clip(opts.id_column or '', _SHOW_NAME_CHARS)!r}",
                    row=idx,
                    line=progress.line or None,
                    column=opts.id_column,
                )
            stored += len(ext)
        extra: str | None = None
        if extra_keys:
            # The JSON object built by hand with pre-encoded keys: the same text as
            # json.dumps(..., ensure_ascii=False), at a twentieth of its per-row cost.
            extra = "{" + ", ".join([k + encode_basestring(row[i]) for i, k in extra_keys]) + "}"
            if len(extra) > extra_guard:
                _check_extra(extra, max_extra, idx, progress.line or None)
            stored += len(extra) + names_extra_bytes
        sink.add(idx, ext, text, extra, progress.line)
        pending += 1
        if stored >= flush_at or pending >= _COPY_BATCH_ROWS:
            _check_stored(stored, source.count, idx, progress.line or None)
            sink.flush()
            pending = 0
            flush_at = stored + _COPY_BATCH_CHARS
    if pending:
        _check_stored(stored, source.count, idx, progress.line or None)
        sink.flush()
    rows = idx
    if rows == 0:
        raise InvalidFileError("no data rows: the file has a header but no documents")
    return rows, [name for _, name in extra_cols]


def _check_extra(extra: str, limit: int, idx: int, line: int | None) -> None:
    size = len(extra.encode("utf-8", "surrogateescape"))
    if size > limit:
        raise InvalidFileError(
            f"row {idx}: its columns besides text and id take {size} bytes (as JSON, names "
            f"included); the limit is {limit} bytes per row",
            row=idx,
            line=line,
        )


def _check_stored(stored: int, read: int, rows: int, line: int | None) -> None:
    """What the rows so far store against what was read: a file that repeats long column
    names in every short row must not make PostgreSQL store many times its size."""
    if stored > _STORED_FACTOR * read + _STORED_PER_ROW * rows + _STORED_SLACK:
        raise InvalidFileError(
            f"row {rows}: the {rows} rows so far would store {stored} bytes for the {read} "
            f"read, more than {_STORED_FACTOR} times the file: every row stores the names of "
            "its columns besides text and id; drop the columns the job does not need or "
            "shorten their names",
            row=rows,
            line=line,
        )


def encode_rows(batch: list[str], first_idx: int, where: list[int]) -> bytes:
    """The rows' text as UTF-8; a row with undecodable bytes from the file (held as
    surrogates) is the file's error, with its row and line."""
    try:
        return "".join(batch).encode("utf-8")
    except UnicodeEncodeError:
        # Rare path: find the row that carries the undecodable bytes.
        for i, (data, line) in enumerate(zip(batch, where, strict=True)):
            if _first_bad_utf8(data) is not None:
                idx = first_idx + i
                raise InvalidFileError(
                    f"row {idx}: invalid UTF-8 (the file must be UTF-8 encoded)",
                    row=idx,
                    line=line or None,
                ) from None
        raise


_DUP_DETAIL = re.compile(r"Key \(job_id, external_id\)=\([^,]+, (?P<id>.*)\) already exists")
_COPY_LINE = re.compile(r"COPY documents, line (?P<line>\d+)")


def _duplicate_error(exc: Any, id_column: str | None) -> InvalidFileError:
    """A ``psycopg.errors.UniqueViolation`` from the ``COPY`` as the file's error."""
    detail = exc.diag.message_detail or ""
    context = exc.diag.context or ""
    m_id, m_line = _DUP_DETAIL.search(detail), _COPY_LINE.search(context)
    dup = clip(m_id.group("id"), _SHOW_NAME_CHARS) if m_id else "?"
    # Each COPY line is one data row, so the COPY line number is the row number.
    row = int(m_line.group("line")) if m_line else None
    at = f"row {row}: " if row else ""
    return InvalidFileError(
        f"{at}duplicate id {dup!r} in column {clip(id_column or '', _SHOW_NAME_CHARS)!r} "
        "(ids must be unique within a job)",
        row=row,
        column=id_column,
    )

"""Streamed CSV ingest: parse rows as they are read and bulk-load them with PostgreSQL ``COPY``.

The upload is never held whole in memory: rows flow from the (spooled) file through
``csv.reader`` into COPY buffers of a few thousand rows. Every fault is reported with the row
(1-based data row, header not counted) and the physical line where it was found, and the caller
rolls the transaction back so nothing half-ingested stays behind.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import IO, Any

import psycopg
from psycopg import errors as pg_errors

from service.errors import InvalidFileError, InvalidParameterError

DELIMITERS = (",", ";", "\t")
_SNIFF_LINES = 50
_COPY_BATCH_ROWS = 4000
# COPY text format escapes: backslash first so the others are not escaped twice.
_COPY_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))
_DELIM_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}


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
    text_column: str = "text"
    id_column: str | None = None
    delimiter: str | None = None  # None: sniffed from the first lines
    template_fields: frozenset[str] = frozenset()  # fields the prompt template needs
    max_rows: int = 2_000_000
    max_document_bytes: int = 1024 * 1024


@dataclass
class IngestResult:
    rows: int
    columns: list[str]
    delimiter: str
    extra_columns: list[str] = field(default_factory=list)


def _copy_escape(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        for old, new in _COPY_ESCAPES:
            value = value.replace(old, new)
    return value


def _lines(binary: IO[bytes]) -> Iterator[str]:
    """Decoded lines with NUL bytes stripped (Postgres text cannot hold them).

    Invalid UTF-8 is decoded with ``surrogateescape`` so it can be reported later with the row it
    sits in, instead of failing somewhere inside an 8 KiB decode block.
    """
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
    for line in text:
        yield line.replace("\x00", "") if "\x00" in line else line


def _sniff_delimiter(sample: list[str]) -> str:
    """The delimiter that splits the first lines into the most, and equally many, columns."""
    best, best_score = ",", (-1, -1)
    for delim in DELIMITERS:
        try:
            rows = [r for r in csv.reader(sample, delimiter=delim) if r]
        except csv.Error:
            continue
        if not rows:
            continue
        width = len(rows[0])
        # The last sampled row may be cut in the middle of a multi-line field; ignore it.
        consistent = sum(1 for r in rows[:-1] if len(r) == width) if len(rows) > 1 else 1
        score = (consistent if width > 1 else 0, width)
        if score > best_score:
            best, best_score = delim, score
    return best


def _first_bad_utf8(value: str) -> int | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def read_rows(binary: IO[bytes], opts: IngestOptions) -> tuple[list[str], str, Iterator[list[str]]]:
    """Header, delimiter and an iterator of data rows; raises on an empty file or bad header."""
    lines = _lines(binary)
    try:
        sample = list(itertools.islice(lines, _SNIFF_LINES))
    except OSError as exc:  # pragma: no cover - a broken upload stream
        raise InvalidFileError(f"could not read the upload: {exc}") from exc
    if not any(line.strip() for line in sample):
        raise InvalidFileError("the file is empty: expected a header row and at least one data row")
    delimiter = opts.delimiter or _sniff_delimiter(sample)
    reader = csv.reader(itertools.chain(sample, lines), delimiter=delimiter, strict=False)
    header = next((row for row in reader if row), None)
    if header is None:
        raise InvalidFileError("the file is empty: expected a header row and at least one data row")
    header = [h.strip() for h in header]
    if _first_bad_utf8("".join(header)) is not None:
        raise InvalidFileError("invalid UTF-8 in the header row", row=0, line=1)
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InvalidFileError(f"duplicate column name {name!r} in the header", line=1)
        seen.add(name)
    return header, delimiter, reader


def ingest_csv(
    conn: psycopg.Connection[Any], job_id: uuid.UUID, binary: IO[bytes], opts: IngestOptions
) -> IngestResult:
    """Loads the upload's rows into ``documents`` for ``job_id`` inside the caller's transaction."""
    csv.field_size_limit(max(opts.max_document_bytes, 1024))
    header, delimiter, reader = read_rows(binary, opts)
    found = ", ".join(repr(h) for h in header)
    hint = f" (delimiter: {_DELIM_NAMES[delimiter]})" if delimiter in _DELIM_NAMES else ""
    if opts.text_column not in header:
        raise InvalidFileError(
            f"text column {opts.text_column!r} not found; columns found: {found}{hint}",
            column=opts.text_column,
        )
    if opts.id_column is not None and opts.id_column not in header:
        raise InvalidFileError(
            f"id column {opts.id_column!r} not found; columns found: {found}{hint}",
            column=opts.id_column,
        )
    known = set(header) | {"text", "id"}
    unknown = sorted(opts.template_fields - known)
    if unknown:
        raise InvalidParameterError(
            f"prompt template field {{{unknown[0]}}} is not a column; "
            f"use {{text}}, {{id}} or one of: {found}",
            field="prompt",
        )

    text_pos = header.index(opts.text_column)
    id_pos = header.index(opts.id_column) if opts.id_column is not None else None
    extra_cols = [
        (i, name) for i, name in enumerate(header) if i != text_pos and i != id_pos and name
    ]
    extra_keys = [(i, encode_basestring(name) + ": ") for i, name in extra_cols]
    width = len(header)
    prefix = f"{job_id}\t"
    limit = opts.max_document_bytes
    char_guard = limit // 4  # below this many characters a field cannot exceed `limit` bytes

    def copy_lines() -> Iterator[tuple[int, int, str]]:
        idx = 0
        rows: Iterable[list[str]] = reader
        while True:
            try:
                row = next(rows)  # type: ignore[call-overload]
            except StopIteration:
                return
            except csv.Error as exc:
                line = reader.line_num  # type: ignore[attr-defined]
                msg = str(exc)
                if "field larger than field limit" in msg:
                    raise InvalidFileError(
                        f"row {idx + 1}: a field exceeds the {limit}-byte limit per document",
                        row=idx + 1,
                        line=line,
                    ) from exc
                raise InvalidFileError(
                    f"row {idx + 1}: malformed CSV: {msg}", row=idx + 1, line=line
                ) from exc
            if not row:
                continue  # blank line
            idx += 1
            line = reader.line_num  # type: ignore[attr-defined]
            if idx > opts.max_rows:
                raise InvalidFileError(
                    f"more than {opts.max_rows} rows: the limit per job is {opts.max_rows}",
                    row=idx,
                    line=line,
                )
            if len(row) != width:
                if len(row) > width:
                    raise InvalidFileError(
                        f"row {idx}: {len(row)} fields, but the header has {width}",
                        row=idx,
                        line=line,
                    )
                row.extend([""] * (width - len(row)))
            text = row[text_pos]
            if len(text) > char_guard and len(text.encode("utf-8", "surrogateescape")) > limit:
                raise InvalidFileError(
                    f"row {idx}: column {opts.text_column!r} is "
                    f"{len(text.encode('utf-8', 'surrogateescape'))} bytes; "
                    f"the limit is {limit} bytes per document",
                    row=idx,
                    line=line,
                    column=opts.text_column,
                )
            if id_pos is not None:
                ext = row[id_pos].strip()
                if not ext:
                    raise InvalidFileError(
                        f"row {idx}: empty id in column {opts.id_column!r}",
                        row=idx,
                        line=line,
                        column=opts.id_column,
                    )
                ext = _copy_escape(ext)
            else:
                ext = "\\N"
            if extra_keys:
                # The JSON object built by hand with pre-encoded keys: the same text as
                # json.dumps(..., ensure_ascii=False), at a twentieth of its per-row cost.
                extra = _copy_escape(
                    "{" + ", ".join([k + encode_basestring(row[i]) for i, k in extra_keys]) + "}"
                )
            else:
                extra = "\\N"
            yield idx, line, f"{prefix}{idx}\t{ext}\t{_copy_escape(text)}\t{extra}\n"

    rows = 0
    cur = conn.cursor()
    try:
        with cur.copy("COPY documents (job_id, idx, external_id, text, extra) FROM STDIN") as cp:
            batch: list[str] = []
            where: list[tuple[int, int]] = []
            for idx, line, data in copy_lines():
                batch.append(data)
                where.append((idx, line))
                if len(batch) >= _COPY_BATCH_ROWS:
                    cp.write(_encode_batch(batch, where, header))
                    rows += len(batch)
                    batch.clear()
                    where.clear()
            if batch:
                cp.write(_encode_batch(batch, where, header))
                rows += len(batch)
    except pg_errors.UniqueViolation as exc:
        raise _duplicate_error(exc, opts.id_column) from exc
    if rows == 0:
        raise InvalidFileError("no data rows: the file has a header but no documents")
    return IngestResult(
        rows=rows,
        columns=header,
        delimiter=delimiter,
        extra_columns=[name for _, name in extra_cols],
    )


def _encode_batch(batch: list[str], where: list[tuple[int, int]], header: list[str]) -> bytes:
    try:
        return "".join(batch).encode("utf-8")
    except UnicodeEncodeError:
        # Rare path: find the row (and column) that carries the undecodable bytes.
        for data, (idx, line) in zip(batch, where, strict=True):
            pos = _first_bad_utf8(data)
            if pos is not None:
                raise InvalidFileError(
                    f"row {idx}: invalid UTF-8 (the file must be UTF-8 encoded)",
                    row=idx,
                    line=line,
                ) from None
        raise


_DUP_DETAIL = re.compile(r"Key \(job_id, external_id\)=\([^,]+, (?P<id>.*)\) already exists")
_COPY_LINE = re.compile(r"COPY documents, line (?P<line>\d+)")


def _duplicate_error(exc: pg_errors.UniqueViolation, id_column: str | None) -> InvalidFileError:
    detail = exc.diag.message_detail or ""
    context = exc.diag.context or ""
    m_id, m_line = _DUP_DETAIL.search(detail), _COPY_LINE.search(context)
    dup = m_id.group("id") if m_id else "?"
    # Each COPY line is one data row, so the COPY line number is the row number.
    row = int(m_line.group("line")) if m_line else None
    at = f"row {row}: " if row else ""
    return InvalidFileError(
        f"{at}duplicate id {dup!r} in column {id_column!r} (ids must be unique within a job)",
        row=row,
        column=id_column,
    )

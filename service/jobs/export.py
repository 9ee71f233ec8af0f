"""Results export, streamed in input order straight out of PostgreSQL ``COPY ... TO STDOUT``.

PostgreSQL formats every row (CSV quoting, JSON escaping) in C, and this module only batches the
bytes, so the export runs at COPY speed. Rows that are not done yet are simply absent, so a
running job downloads what is finished so far.

The export is read in pages of input order (``idx`` ranges), each whole, in its own short
transaction, at PostgreSQL's speed: the connection goes back to the pool before the client is
sent a byte of the page, so a slow reader holds neither a connection nor a snapshot, and the
next page is read while this one is sent. Pages are sized to about ``_PAGE_BYTES`` from the bytes
per row seen so far, so a download holds two pages of memory; a page that passes
``_MAX_BUFFER_BYTES`` anyway (rows much longer than before) is read again in a shorter range.
Results of a finished job never change, so the pages add up to exactly what one snapshot would
give; for a running job each page shows the rows done when it is read (every row at most once,
in order). A purge by retention during the download (it marks the job before deleting a row)
aborts the transfer instead of ending it short.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine

from service.errors import ResultsExpiredError

Format = Literal["csv", "jsonl", "parquet"]
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
_FLUSH_BYTES = 256 * 1024
_PAGE_BYTES = 8 * 1024 * 1024  # what a page aims at (one is sent while the next is read)
_MAX_BUFFER_BYTES = 16 * 1024 * 1024  # a page past this is read again in a shorter range
_FIRST_PAGE_ROWS = 5_000
_MAX_PAGE_ROWS = 200_000
# Characters a spreadsheet reads as the start of a formula (OWASP "CSV injection"): = + - @,
# and tab and carriage return, which some spreadsheets skip before looking for one.
_FORMULA_STARTS = r"'=', '+', '-', '@', E'\t', E'\r'"  # as SQL literals

_FROM = (
    "FROM results r JOIN documents d ON d.job_id = r.job_id AND d.idx = r.idx "
    "WHERE r.job_id = %(job)s AND r.idx > %(lo)s AND r.idx <= %(hi)s "
    # The same range on documents: PostgreSQL does not carry range conditions across the join.
    "AND d.job_id = %(job)s AND d.idx > %(lo)s AND d.idx <= %(hi)s ORDER BY r.idx"
)
_ID = "coalesce(d.external_id, d.idx::text)"
# A page is two ordered index range scans merged, like the whole export in one query. With a
# range on both sides the planner misjudges the join as a few hundred rows and hashes and sorts
# the page instead (about a third slower), so this transaction rules that out.
_PLAN = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_sort = off"


def _safe_cell(expr: str) -> str:
    """Spreadsheet formula neutralisation: a cell starting with = + - @ tab or carriage return
    gets a leading quote."""
    return f"CASE WHEN left({expr}, 1) IN ({_FORMULA_STARTS}) THEN '''' || {expr} ELSE {expr} END"


def _csv_query(header: bool) -> str:
    cols = [
        f"{_safe_cell(_ID)} AS id",
        f"{_safe_cell('r.output')} AS output",
        f"{_safe_cell('r.label')} AS label",
        "r.confidence",
        "r.finish_reason",
        "r.prompt_tokens",
        "r.completion_tokens",
        "CASE WHEN r.truncated THEN 'true' ELSE 'false' END AS truncated",
        f"{_safe_cell('r.error')} AS error",
    ]
    return (
        f"COPY (SELECT {', '.join(cols)} {_FROM}) TO STDOUT "
        f"WITH (FORMAT csv, HEADER {'true' if header else 'false'})"
    )


def _jsonl_query() -> str:
    obj = (
        f"json_build_object('id', {_ID}, 'output', r.output, 'label', r.label, "
        "'confidence', r.confidence, 'finish_reason', r.finish_reason, "
        "'prompt_tokens', r.prompt_tokens, 'completion_tokens', r.completion_tokens, "
        "'truncated', r.truncated, 'error', r.error)::text"
    )
    # JSON text never holds a raw control character (json_build_object escapes them), so CSV
    # format with \x01 as quote and \x02 as delimiter never quotes or escapes anything: each
    # row comes out verbatim, one JSON object per line. (TEXT format would double backslashes.)
    return (
        f"COPY (SELECT {obj} {_FROM}) TO STDOUT "
        "WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    )


#: The columns of a Parquet download and their types: tokens as integers, confidence as a
#: float, truncated as a boolean, the rest strings (all nullable, as in the table).
PARQUET_COLUMNS = (
    ("id", "string"),
    ("output", "string"),
    ("label", "string"),
    ("confidence", "float64"),
    ("finish_reason", "string"),
    ("prompt_tokens", "int64"),
    ("completion_tokens", "int64"),
    ("truncated", "bool"),
    ("error", "string"),
)


def _parquet_query() -> str:
    """A page as CSV for pyarrow's CSV reader (C, typed) to turn into a row group: every value
    quoted, so NULL (unquoted, empty) and '' (quoted) stay apart; no formula neutralisation,
    a Parquet file is not opened by a spreadsheet as text."""
    cols = [f"{_ID} AS id", *(f"r.{name}" for name, _ in PARQUET_COLUMNS[1:])]
    return (
        f"COPY (SELECT {', '.join(cols)} {_FROM}) TO STDOUT "
        "WITH (FORMAT csv, HEADER false, FORCE_QUOTE *)"
    )


#: (first page's query, every later page's query) per format: the CSV header comes once.
QUERIES = {
    "csv": (_csv_query(True), _csv_query(False)),
    "jsonl": (_jsonl_query(),) * 2,
    "parquet": (_parquet_query(),) * 2,
}


def stream_results(engine: Engine, job_id: uuid.UUID, fmt: Format) -> Iterator[bytes]:
    """Yields the job's results as ``fmt`` in ~256 KiB pieces, a page at a time; the next page
    is read (in a thread of its own) while this one is sent. Parquet: a row group per page."""
    if fmt == "parquet":
        return _parquet(_pages(engine, job_id, fmt))
    return (piece for page in _pages(engine, job_id, fmt) for piece in page.pieces)


class _Sink:
    """Where the Parquet writer writes: the bytes so far, taken (and forgotten) per page."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False
        self._pos = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def _parquet(pages: Iterator[_Page]) -> Iterator[bytes]:
    """Each page parsed by pyarrow's CSV reader into typed columns and written as one row
    group, whose bytes are sent before the next page is parsed: memory is a page or two."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.type_for_alias(t)) for name, t in PARQUET_COLUMNS])
    convert = pacsv.ConvertOptions(
        column_types=schema,
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,  # '' is quoted: an empty string, not NULL
        true_values=["t"],
        false_values=["f"],
    )
    sink = _Sink()
    writer = pq.ParquetWriter(sink, schema)
    for page in pages:
        data = b"".join(page.pieces)
        page.pieces.clear()
        if not data:
            continue
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(
                column_names=schema.names, use_threads=False, block_size=len(data) + 1
            ),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=convert,
        )
        writer.write_table(table, row_group_size=max(1, table.num_rows))
        yield sink.take()
    writer.close()
    yield sink.take()


def _pages(engine: Engine, job_id: uuid.UUID, fmt: Format) -> Iterator[_Page]:
    """The job's result pages in order, each read while the one before is sent."""
    last_idx = _last_idx(engine, job_id)
    first_query, query = QUERIES[fmt]
    ahead = ThreadPoolExecutor(1, thread_name_prefix="export-page")
    try:
        next_page: Future[_Page] | None = ahead.submit(
            _read_page, engine, first_query, job_id, 0, _FIRST_PAGE_ROWS, last_idx
        )
        while next_page is not None:
            page = next_page.result()
            next_page = None
            if page.hi < last_idx:
                next_page = ahead.submit(
                    _read_page, engine, query, job_id, page.hi, page.next_rows, last_idx
                )
            yield page
    finally:
        # Never waits: a download cut off mid-way must not block whoever closes it; a page
        # still being read gives its connection back when it is done.
        ahead.shutdown(wait=False, cancel_futures=True)
    if _expired(engine, job_id):
        # Retention and a DELETE mark a job before they delete a row: pages read after that
        # may miss rows.
        raise ResultsExpiredError(
            f"the results of job {job_id} expired or were deleted during the download"
        )


@dataclass
class _Page:
    hi: int  # the last idx this page covers
    next_rows: int  # how many idx the next page should cover
    pieces: list[bytes]


class _PageTooBig(Exception):
    pass


def _read_page(
    engine: Engine, query: str, job_id: uuid.UUID, lo: int, rows: int, last_idx: int
) -> _Page:
    """The page after ``lo``, about ``rows`` idx long, read whole in one short transaction.
    One that passes _MAX_BUFFER_BYTES (rows much longer than the last page's) is dropped and
    read again in a range an eighth as long; a single row is read whatever its size."""
    while True:
        hi = min(lo + rows, last_idx)
        try:
            pieces, size = _copy(engine, query, job_id, lo, hi, limit=rows > 1)
        except _PageTooBig:
            rows = max(1, rows // 8)
            continue
        # The next page from the bytes per row of this one: about _PAGE_BYTES, at most twice
        # as many rows as this page (a stretch of unfinished rows reads as empty).
        grow = min(2 * rows, rows * _PAGE_BYTES // size) if size else 2 * rows
        return _Page(hi, max(1, min(grow, _MAX_PAGE_ROWS)), pieces)


def _copy(
    engine: Engine, query: str, job_id: uuid.UUID, lo: int, hi: int, *, limit: bool
) -> tuple[list[bytes], int]:
    pieces: list[bytes] = []
    buf: list[bytes] = []
    size = total = 0
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        cur.execute(_PLAN)
        with cur.copy(query, {"job": job_id, "lo": lo, "hi": hi}) as copy:
            for data in copy:
                buf.append(bytes(data))
                size += len(data)
                if size >= _FLUSH_BYTES:
                    pieces.append(b"".join(buf))
                    buf.clear()
                    total += size
                    size = 0
                    if limit and total > _MAX_BUFFER_BYTES:
                        raise _PageTooBig  # psycopg cancels the COPY on the way out
        conn.commit()
    except _PageTooBig:
        conn.rollback()
        raise
    finally:
        conn.close()
    if buf:
        pieces.append(b"".join(buf))
    return pieces, total + size


def _last_idx(engine: Engine, job_id: uuid.UUID) -> int:
    conn = engine.raw_connection()
    try:
        row = (
            conn.cursor()
            .execute("SELECT max(idx) FROM documents WHERE job_id = %s", (job_id,))
            .fetchone()
        )
        conn.commit()
    finally:
        conn.close()
    return int(row[0]) if row and row[0] is not None else 0


def _expired(engine: Engine, job_id: uuid.UUID) -> bool:
    conn = engine.raw_connection()
    try:
        row = (
            conn.cursor()
            .execute(
                # A DELETE (a tombstone, purged after) ends a download like retention does.
                "SELECT results_expired_at IS NOT NULL OR deleted_at IS NOT NULL FROM jobs "
                "WHERE id = %s",
                (job_id,),
            )
            .fetchone()
        )
        conn.commit()
    finally:
        conn.close()
    return bool(row[0]) if row else True


# --- files written in-process (``docqueue run``) -----------------------------------------------

#: Cell starts a spreadsheet reads as a formula (the CSV download's ``_FORMULA_STARTS``).
_FORMULA_CHARS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str | None) -> str | None:
    return "'" + value if value and value[0] in _FORMULA_CHARS else value


def result_record(external_id: str | None, idx: int, r: dict[str, Any]) -> dict[str, Any]:
    """One row of a results file, the download's columns (``PARQUET_COLUMNS``) in its order."""
    return {
        "id": external_id if external_id is not None else str(idx),
        "output": r["output"],
        "label": r["label"],
        "confidence": r["confidence"],
        "finish_reason": r["finish_reason"],
        "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "truncated": bool(r["truncated"]),
        "error": r["error"],
    }


def write_file(records: Iterable[dict[str, Any]], fmt: Format, path: Path) -> int:
    """Results (``result_record``s, in input order) to ``path`` as the download would give
    them: CSV (formula-safe cells, NULL empty), JSON Lines or Parquet. Written to a temporary
    file first and renamed, so ``path`` is never half-written. Returns the rows written."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        rows = _write(records, fmt, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return rows


def _write(records: Iterable[dict[str, Any]], fmt: Format, tmp: Path) -> int:
    rows = 0
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(name, pa.type_for_alias(t)) for name, t in PARQUET_COLUMNS])
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in _batches(records, 50_000):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                rows += len(batch)
    else:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            if fmt == "csv":
                out = csv.writer(fh, lineterminator="\n")
                out.writerow([name for name, _ in PARQUET_COLUMNS])
                for rec in records:
                    out.writerow(
                        [_cell(v) if isinstance(v, str) else _csv_value(v) for v in rec.values()]
                    )
                    rows += 1
            else:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    rows += 1
    return rows


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def _batches(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch

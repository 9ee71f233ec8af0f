"""Results export, streamed in input order straight out of PostgreSQL ``COPY ... TO STDOUT``.

PostgreSQL formats every row (CSV quoting, JSON escaping) in C, and this module only batches the
bytes, so memory stays flat and the export runs at COPY speed. Rows that are not done yet are
simply absent, so a running job downloads what is finished so far.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Literal

from sqlalchemy import Engine

Format = Literal["csv", "jsonl"]
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
_FLUSH_BYTES = 256 * 1024

_FROM = (
    "FROM results r JOIN documents d ON d.job_id = r.job_id AND d.idx = r.idx "
    "WHERE r.job_id = %(job)s ORDER BY r.idx"
)
_ID = "coalesce(d.external_id, d.idx::text)"


def _safe_cell(expr: str) -> str:
    """Spreadsheet formula neutralisation: a cell starting with = + - @ gets a leading quote."""
    return f"CASE WHEN left({expr}, 1) IN ('=', '+', '-', '@') THEN '''' || {expr} ELSE {expr} END"


def _csv_query() -> str:
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
    return f"COPY (SELECT {', '.join(cols)} {_FROM}) TO STDOUT WITH (FORMAT csv, HEADER true)"


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


QUERIES = {"csv": _csv_query(), "jsonl": _jsonl_query()}


def stream_results(engine: Engine, job_id: uuid.UUID, fmt: Format) -> Iterator[bytes]:
    """Yields the job's results as ``fmt`` in ~256 KiB pieces from one COPY."""
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        buf: list[bytes] = []
        size = 0
        with cur.copy(QUERIES[fmt], {"job": job_id}) as copy:
            for data in copy:
                buf.append(bytes(data))
                size += len(data)
                if size >= _FLUSH_BYTES:
                    yield b"".join(buf)
                    buf.clear()
                    size = 0
        if buf:
            yield b"".join(buf)
        conn.commit()
    finally:
        conn.close()

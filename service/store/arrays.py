"""PostgreSQL array literals for the results write's ``unnest`` columns.

psycopg adapts a Python list element by element in Python (several µs per row for the twelve
columns of a result); these build the literal with ``str.join``, about four times cheaper
for the worker and for PostgreSQL's parsing alike. The statement casts each parameter
(``CAST(:output AS text[])``), so PostgreSQL's array input parses what is built here.
"""

from __future__ import annotations

from collections.abc import Iterable


def _quoted(value: str) -> str:
    # In a double-quoted element only backslash and double quote are special.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: Iterable[str | None]) -> str:
    """``text[]`` (also ``jsonb[]`` of JSON texts). Every element is quoted, so commas,
    braces, spaces and the word NULL stay text; None is SQL NULL. Text must hold no NUL."""
    return "{" + ",".join("NULL" if v is None else _quoted(v) for v in values) + "}"


def int_array(values: Iterable[int | None]) -> str:
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


def float_array(values: Iterable[float | None]) -> str:
    """``float8[]``: ``repr`` round-trips exactly; inf and nan are spelt as PostgreSQL reads
    them (``Infinity``, ``-Infinity``, ``NaN``)."""
    return "{" + ",".join("NULL" if v is None else _float(v) for v in values) + "}"


def bool_array(values: Iterable[bool | None]) -> str:
    return "{" + ",".join("NULL" if v is None else ("t" if v else "f") for v in values) + "}"


def _float(v: float) -> str:
    text = repr(float(v))
    if text[-1].isdigit():
        return text
    return {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}[text]

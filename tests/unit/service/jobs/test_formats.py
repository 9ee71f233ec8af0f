"""Which format an upload is, and the JSON Lines reader's rows, without a database."""

from __future__ import annotations

import io

import pytest

from service.errors import InvalidFileError, InvalidParameterError
from service.jobs.formats import JsonlReader, format_of_name, parse_format, resolve_format
from service.jobs.ingest import IngestOptions


def test_parse_format() -> None:
    assert parse_format(None) is None and parse_format(" ") is None
    assert parse_format(" JSONL ") == "jsonl" and parse_format("ndjson") == "jsonl"
    with pytest.raises(InvalidParameterError) as exc:
        parse_format("xlsx")
    assert exc.value.where == {"field": "format"}


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.CSV", "csv"), ("a.tsv", "csv"), ("x/y.ndjson", "jsonl"), ("d.json", "jsonl"),
     ("d.parquet", "parquet"), ("d.pq", "parquet"), ("d", None), ("d.gz", None), (None, None)],
)  # fmt: skip
def test_format_of_name(name: str | None, fmt: str | None) -> None:
    assert format_of_name(name) == fmt


@pytest.mark.parametrize(
    ("head", "fmt"),
    [(b"PAR1\x15\x04", "parquet"), (b'\xef\xbb\xbf \n{"text": 1}', "jsonl"),
     (b"text,id\n", "csv"), (b"", "csv"), (b"[1, 2]\n", "csv")],
)  # fmt: skip
def test_resolve_format_from_content_leaves_the_upload_where_it_was(head: bytes, fmt: str) -> None:
    upload = io.BytesIO(b"xx" + head)
    upload.seek(2)
    assert resolve_format(upload, None, "upload") == fmt
    assert upload.tell() == 2
    assert resolve_format(upload, "parquet", "a.csv") == "parquet"  # the field wins
    assert resolve_format(upload, None, "a.jsonl") == "jsonl"  # then the name


def rows(data: bytes, **opts: object) -> tuple[list[str], list[list[str]]]:
    reader = JsonlReader(io.BytesIO(data), IngestOptions(**opts))  # type: ignore[arg-type]
    return reader.header, [list(r) for r in reader]


def test_jsonl_rows_blank_lines_crlf_and_a_last_line_without_newline() -> None:
    data = b'\r\n{"text": "a", "k": 1}\r\n\n  \n{"k": 2, "text": "b"}'
    assert rows(data) == (["text", "k"], [["a", "1"], ["b", "2"]])


def test_jsonl_limits() -> None:
    with pytest.raises(InvalidFileError, match="the file is empty"):
        rows(b"\n\n")
    with pytest.raises(InvalidFileError, match="the first object has 3 keys; the limit is 2"):
        rows(b'{"text": "a", "b": 1, "c": 2}\n', max_columns=2)
    with pytest.raises(InvalidFileError, match="no keys"):
        rows(b"{}\n")
    # A line longer than a read block and the limit, never read whole.
    with pytest.raises(InvalidFileError, match=r"line 2 \(row 2\): the line is longer than 1000"):
        rows(b'{"text": "a"}\n{"text": "' + b"x" * 200_000, max_jsonl_line_bytes=1000)

"""The CSV reader's pure parts: delimiter sniffing, COPY escaping, header and BOM."""

from __future__ import annotations

import io

import pytest

from service.errors import InvalidFileError
from service.jobs.ingest import IngestOptions, _copy_escape, _sniff_delimiter, read_rows


@pytest.mark.parametrize(
    ("sample", "delimiter"),
    [
        (["id,text\n", "1,hello\n"], ","),
        (["id;text\n", "1;hello, world\n"], ";"),
        (["id\ttext\n", "1\thello; world, again\n"], "\t"),
        (["text\n", "hello\n"], ","),
        (["id,text\n", '1,"a; b; c; d"\n'], ","),
    ],
)
def test_sniff_delimiter(sample: list[str], delimiter: str) -> None:
    assert _sniff_delimiter(sample) == delimiter


def test_copy_escape() -> None:
    assert _copy_escape("plain") == "plain"
    assert _copy_escape("a\\b\tc\nd\re") == "a\\\\b\\tc\\nd\\re"


def test_read_rows_header_and_bom() -> None:
    header, delim, rows = read_rows(io.BytesIO("\ufeff text , id\nx,1\n".encode()), IngestOptions())
    assert header == ["text", "id"] and delim == ","
    assert list(rows) == [["x", "1"]]
    with pytest.raises(InvalidFileError, match="empty"):
        read_rows(io.BytesIO(b""), IngestOptions())

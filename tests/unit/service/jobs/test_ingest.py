"""The CSV reader's pure parts: delimiter sniffing, COPY escaping, header, dialect traps and the
bounds on what one row may cost (no database: rows are read, not stored)."""

from __future__ import annotations

import io
import tracemalloc

import pytest

from service.errors import InvalidFileError
from service.jobs.ingest import (
    IngestOptions,
    _copy_escape,
    _sniff_delimiter,
    read_rows,
)
from service.settings import Settings
from tests.support.helpers import override


def rows_of(body: bytes | str, **opts: object) -> list[list[str]]:
    data = body.encode() if isinstance(body, str) else body
    _, _, rows = read_rows(io.BytesIO(data), IngestOptions(**opts))  # type: ignore[arg-type]
    return list(rows)


def error_of(body: bytes | str, **opts: object) -> InvalidFileError:
    with pytest.raises(InvalidFileError) as info:
        rows_of(body, **opts)
    return info.value


@pytest.mark.parametrize(
    ("sample", "delimiter"),
    [
        (["id,text\n", "1,hello\n"], ","),
        (["id;text\n", "1;hello, world\n"], ";"),
        (["id\ttext\n", "1\thello; world, again\n"], "\t"),
        (["text\n", "hello\n"], ","),
        (["id,text\n", '1,"a; b; c; d"\n'], ","),
        # One column whose texts carry semicolons: comma, which splits none of them.
        (["text\n", "a; b; c\n", "d; e\n"], ","),
        # One column whose texts carry commas: not comma, which would split every text.
        (["text\n", "hello, world\n", "more, text\n"], ";"),
        # A short row does not make a one-column reading win over the header's two columns.
        (["body,extra\n", "first,x\n", "second\n"], ","),
    ],
)
def test_sniff_delimiter(sample: list[str], delimiter: str) -> None:
    assert _sniff_delimiter(sample) == delimiter


def test_sniff_ignores_a_cut_last_row() -> None:
    # The sample ends inside a row: its field count says nothing.
    assert _sniff_delimiter(["a;b\n", "1;2\n", "3;4;5;6"], complete=False) == ";"


def test_copy_escape() -> None:
    assert _copy_escape("plain") == "plain"
    assert _copy_escape("a\\b\tc\nd\re") == "a\\\\b\\tc\\nd\\re"


def test_read_rows_header_and_bom() -> None:
    header, delim, rows = read_rows(io.BytesIO("\ufeff text , id\nx,1\n".encode()), IngestOptions())
    assert header == ["text", "id"] and delim == ","
    assert list(rows) == [["x", "1"]]
    with pytest.raises(InvalidFileError, match="empty"):
        read_rows(io.BytesIO(b""), IngestOptions())


def test_options_from_settings_carry_every_limit() -> None:
    """The API's limits reach the reader, not the dataclass defaults."""
    settings = override(
        Settings(),
        jobs={
            "max_columns": 3,
            "max_extra_bytes": 100,
            "max_document_bytes": 2000,
            "max_rows_per_job": 7,
        },
    )
    opts = IngestOptions.from_settings(settings, text_column="body", id_column="id")
    assert (opts.max_columns, opts.max_extra_bytes, opts.max_document_bytes, opts.max_rows) == (
        3,
        100,
        2000,
        7,
    )
    assert (opts.text_column, opts.id_column) == ("body", "id")
    assert "the limit is 3 columns" in error_of("a,b,c,text\n1,2,3,x\n", max_columns=3).message


def test_short_and_long_rows_name_the_row_and_the_delimiter() -> None:
    short = error_of("id,text,lang\n1,a,en\n2,b\n")
    assert (short.where["row"], short.where["line"]) == (2, 3)
    assert "2 fields, but the header has 3" in short.message
    assert "read with delimiter ','" in short.message and "'tab'" in short.message
    long = error_of("id;text\n1;a;b\n", delimiter=";")
    assert "3 fields, but the header has 2" in long.message and "as given" in long.message


def test_unclosed_quote_names_the_line_it_opened_on() -> None:
    body = 'id,text\n1,fine\n2,"never closed\n3,swallowed\n4,"and this"\n5,too\n'
    err = error_of(body)
    assert (err.where["row"], err.where["line"]) == (2, 3)
    assert "opened on line 3" in err.message


@pytest.mark.parametrize("tail_lines", [3, 5000])
def test_an_unclosed_quote_after_a_closed_multiline_field_names_its_own_line(
    tail_lines: int,
) -> None:
    """The row begins on line 2, its first quoted field spans lines 2-3 and closes; the one that
    never closes opens on line 3. With a long tail the field limit or the row bound stops the
    read: the line is the same."""
    opts = {"max_document_bytes": 8 * 1024, "max_extra_bytes": 1024}
    body = 'id,text,note\n1,"multi\nline","never closed\n' + "2,more text,x\n" * tail_lines
    err = error_of(body, **opts)
    assert (err.where["row"], err.where["line"]) == (1, 3), err.message
    assert "opened on line 3" in err.message
    # Closed on a later line, with text after the closing quote: the same line.
    err = error_of('id,text,note\n1,"multi\nline","never closed\n2,"x",y\n', **opts)
    assert (err.where["row"], err.where["line"]) == (1, 3), err.message


def test_text_after_a_closing_quote_is_an_error_not_merged() -> None:
    err = error_of('id,text\n1,"abc"def\n')
    assert (err.where["row"], err.where["line"]) == (1, 2)
    assert "closing quote" in err.message


def test_a_quote_inside_an_unquoted_field_is_literal() -> None:
    assert rows_of('id,text\n1,a 5" screen\n2,she said "hi"\n') == [
        ["1", 'a 5" screen'],
        ["2", 'she said "hi"'],
    ]


def test_line_endings_may_mix_but_a_lone_cr_never_splits_a_row() -> None:
    assert rows_of('text\r\none\ntwo\r\n"three\rlines\r\nhere"\n') == [
        ["one"],
        ["two"],
        ["three\rlines\r\nhere"],
    ]
    err = error_of("text\none\ntwo\rthree\nfour\n")
    assert (err.where["row"], err.where["line"]) == (2, 3)
    assert "line break (\\r)" in err.message
    # A classic-Mac file (rows end in \r) reads; a \n inside its unquoted field does not split.
    assert rows_of("id,text\r1,a\r2,b\r") == [["1", "a"], ["2", "b"]]
    assert "line break (\\n)" in error_of("id,text\r1,a\nb\r2,c\r").message


def test_a_line_longer_than_any_row_is_refused_in_bounded_memory() -> None:
    opts = {"max_document_bytes": 1024, "max_extra_bytes": 1024}
    bound = IngestOptions(**opts).max_row_bytes  # type: ignore[arg-type]
    body = b"text\n" + b"x" * (40 * bound) + b"\n"
    tracemalloc.start()
    try:
        err = error_of(body, **opts)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.where == {"row": 1, "line": 2}
    assert f"longer than {bound} bytes" in err.message
    assert peak < 4 * bound + 1024 * 1024  # not the 40 bounds of the line


def test_a_row_of_many_short_quoted_lines_is_bounded_too() -> None:
    opts = {"max_document_bytes": 1024, "max_extra_bytes": 1024}
    bound = IngestOptions(**opts).max_row_bytes  # type: ignore[arg-type]
    # One record that never ends: a field per line, each line short.
    body = "text\n" + '"\n",' * (2 * bound) + "x\n"
    err = error_of(body, delimiter=",", **opts)
    assert err.where["row"] == 1 and err.where["line"] == 2
    assert f"the row that begins on line 2 is longer than {bound} bytes" in err.message


def test_a_huge_header_is_a_small_error() -> None:
    names = ",".join(f"column_{i:07d}" for i in range(1_200_000))  # ~17 MB on one line
    err = error_of(f"{names}\nx\n")
    assert len(err.message) < 2000 and err.where == {"line": 1}


def test_a_header_field_over_the_field_limit_is_a_clean_error() -> None:
    err = error_of("text," + "h" * (1024 * 1024 + 10) + "\nx,y\n")
    assert err.where == {"line": 1} and "column name" in err.message

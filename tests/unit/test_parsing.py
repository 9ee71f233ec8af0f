from __future__ import annotations

import io

import pytest

from service.errors import BadInputError, InvalidFileError, InvalidParameterError
from service.jobs.ingest import IngestOptions, _copy_escape, _sniff_delimiter, read_rows
from service.jobs.validate import parse_labels, template_fields
from service.settings import Settings


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("positive,negative,neutral", ["positive", "negative", "neutral"]),
        (" a , b ,, a ", ["a", "b"]),
        ('["x, with comma", "y"]', ["x, with comma", "y"]),
        ("", None),
        (None, None),
    ],
)
def test_parse_labels(raw: str | None, expected: list[str] | None) -> None:
    assert parse_labels(raw) == expected


def test_parse_labels_rejects_bad_json() -> None:
    with pytest.raises(InvalidParameterError, match="JSON list of strings"):
        parse_labels("[1, 2]")


def test_template_fields() -> None:
    assert template_fields("Summarize {text} in {lang}. {{literal}}") == {"text", "lang"}
    for bad in ("{}", "{0} {text}", "{text.upper}", "{row[0]}", "{text"):
        with pytest.raises(InvalidParameterError):
            template_fields(bad)


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


def test_errors_share_one_root_and_say_where() -> None:
    err = InvalidFileError("row 3: bad", row=3, column=None)
    assert isinstance(err, BadInputError)
    assert err.to_dict() == {"code": "invalid_file", "message": "row 3: bad", "row": 3}
    assert err.status_code == 400 and InvalidParameterError("x").status_code == 422


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCQUEUE_MAX_ROWS_PER_JOB", "42")
    monkeypatch.setenv("DOCQUEUE_REDIS_URL", "redis://r:1/2")
    s = Settings()
    assert s.max_rows_per_job == 42 and s.redis_url == "redis://r:1/2"
    assert Settings.model_fields["max_document_bytes"].default == 1024 * 1024
    assert Settings.model_fields["max_rows_per_job"].default == 2_000_000
    assert Settings.model_fields["database_url"].default == (
        "postgresql+psycopg://postgres@127.0.0.1:5432/docqueue"
    )

"""Label parsing and prompt template fields of a job request."""

from __future__ import annotations

import pytest

from service.errors import InvalidParameterError
from service.jobs.validate import parse_labels, template_fields


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

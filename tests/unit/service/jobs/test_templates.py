"""The prompt template language: plain ``{name}`` fields and ``{{ }}`` escapes, nothing of
``str.format``; rendered lengths counted before anything is built."""

from __future__ import annotations

import tracemalloc

import pytest

from service.errors import InvalidParameterError, RowError
from service.jobs.templates import Field, TemplateError, check, parse, render, rendered_length


def test_fields_literals_and_escapes() -> None:
    t = parse("Summarize {text} in {lang}. {{literal}} {{{text}}}")
    assert t.fields == {"text", "lang"}
    out = render(t, {"text": "T", "lang": "en"}, 1000)
    assert out == "Summarize T in en. {literal} {T}"


def test_column_names_with_spaces_and_dashes() -> None:
    """CSV headers are free text: a field is whatever stands between the braces."""
    t = parse("{my col} / {part-no} / {Größe} / {text}")
    assert t.parts[0] == Field("my col")
    assert render(t, {"my col": "a", "part-no": "b", "Größe": "c", "text": "d"}, 100) == (
        "a / b / c / d"
    )


def test_values_are_inserted_verbatim() -> None:
    """A value holding braces or format syntax is text, never parsed again."""
    t = parse("<{text}>")
    assert render(t, {"text": "{text} {0} {x.__class__} %s"}, 100) == (
        "<{text} {0} {x.__class__} %s>"
    )


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        ("{}", "'{}'"),
        ("x {0} {text}", "'{0}'"),
        ("{text.upper}", "'{text.upper}'"),
        ("{row[0]}", "'{row[0]}'"),
        ("{text:>1000000000}", "'{text:>1000000000}'"),
        ("{text!r}", "'{text!r}'"),
        ("{text:{text.__class__.__mro__}}", "'{text:{text.__class__.__mro__}'"),
        ("{a{b}}", "'{a{b}'"),
        ("unclosed {text", "'{text'"),
        ("stray } brace {text}", "'stray }'"),
        ("{text}}", "'{text}}'"),
        ("{ }", "'{ }'"),
        ("{te\txt}", "'{te\\txt}'"),
    ],
)
def test_everything_else_is_refused_naming_the_piece(template: str, shown: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse(template)
    err = info.value
    assert isinstance(err, InvalidParameterError) and err.status_code == 422
    assert err.where == {"field": "prompt"}
    assert err.message.startswith("prompt: ")
    assert shown in err.message, err.message


def test_an_offending_piece_is_shown_truncated() -> None:
    with pytest.raises(TemplateError) as info:
        parse("{" + "x" * 100_000 + ":>9}")
    assert len(info.value.message) < 400
    assert "'{xxxx" in info.value.message and "...'" in info.value.message


def test_template_length_cap() -> None:
    assert check("{text}" * 10, 60).fields == {"text"}
    with pytest.raises(TemplateError, match="61 characters; the limit is 60"):
        check("{text}" * 10 + " ", 60)


def test_parsing_is_linear() -> None:
    """Tens of thousands of fields and escapes parse quickly (no quadratic rescans)."""
    t = parse("{text}{{}}" * 20_000)
    assert len(t.parts) == 40_000 and t.fields == {"text"}


def test_missing_field_is_a_row_error() -> None:
    with pytest.raises(RowError, match=r"field \{lang\} has no value in this row"):
        render(parse("{lang}: {text}"), {"text": "x"}, 100)


def test_rendered_length_cap_is_checked_before_building() -> None:
    """5,000 copies of a 1 MiB field would be 5 GiB: refused with the limit named, and
    without allocating more than a few KiB."""
    t = parse("{text}" * 5000)
    values = {"text": "x" * (1 << 20)}
    assert rendered_length(t, values) == 5000 << 20
    tracemalloc.start()
    try:
        with pytest.raises(RowError, match=r"5242880000 characters; the limit is 2097152"):
            render(t, values, 2 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert render(parse("{text}{text}"), {"text": "ab"}, 4) == "abab"  # at the limit: fine

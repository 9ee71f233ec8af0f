"""The results write's array literals, read back by real PostgreSQL: every value arrives as
it was, however hostile the text."""

from __future__ import annotations

import json
import math

import pytest

from service.settings import Settings
from service.store.arrays import bool_array, float_array, int_array, text_array
from tests.support.helpers import pg

HOSTILE = [
    "",
    "plain",
    "NULL",
    "null",
    " leading and trailing ",
    'comma, {braces} and "quotes"',
    'back\\slash \\" mixed \\\\',
    "ends with a backslash \\",
    "new\nline\ttab\r",
    "unicode: ½ ∑ 🙂 中文",
    "{}",
    '"',
    "\\",
    None,
    "x" * 10_000,
]


def _read(settings: Settings, literal: str, cast: str) -> list[object]:
    with pg(settings.database.url) as conn:
        row = conn.execute(f"SELECT CAST(%s AS {cast})", (literal,)).fetchone()
    assert row is not None
    return list(row[0])


def test_text_elements_round_trip(settings: Settings) -> None:
    assert _read(settings, text_array(HOSTILE), "text[]") == HOSTILE
    assert _read(settings, text_array([]), "text[]") == []


def test_json_texts_round_trip_as_jsonb(settings: Settings) -> None:
    docs: list[object] = [{"text": 'a "quoted" \\ value, {x}', "n": [1, 2.5, None]}, None, []]
    literal = text_array(None if d is None else json.dumps(d) for d in docs)
    assert _read(settings, literal, "jsonb[]") == docs


@pytest.mark.parametrize(
    ("values", "cast", "encode"),
    [
        ([0, -1, 2**31 - 1, -(2**31), None], "int[]", int_array),
        ([True, False, None], "bool[]", bool_array),
        ([0.1, -2.5e-300, 1e300, 5e-324, -0.0, 123456789.123456789, None], "float8[]", float_array),
    ],
)
def test_numbers_round_trip(
    settings: Settings, values: list[object], cast: str, encode: object
) -> None:
    assert callable(encode)
    assert _read(settings, encode(values), cast) == values


def test_infinities_and_nan_are_spelt_for_postgresql(settings: Settings) -> None:
    back = _read(settings, float_array([math.inf, -math.inf, math.nan]), "float8[]")
    assert back[:2] == [math.inf, -math.inf] and math.isnan(float(str(back[2])))

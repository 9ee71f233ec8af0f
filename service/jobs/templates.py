"""Prompt templates: the one parser and renderer, used by the API's checks and the workers alike,
so a template the API accepted is exactly the template a worker renders.

The language is deliberately tiny, and it is not Python's ``str.format``:

- ``{name}`` is replaced by the value of field ``name`` (a column of the row, ``text``, ``id``,
  and the task's own fields such as ``words``, ``language`` or ``labels``). A name is taken
  exactly as written between the braces, spaces included (``{my col}`` names the column
  ``my col``); it may not be empty, all digits, or contain ``{ } : ! . [ ]`` or control
  characters. So ``{text:>10}``, ``{text!r}``, ``{a.b}``, ``{a[0]}``, ``{}`` and ``{0}`` are
  refused: nothing in a template can pad, convert, or reach into an object.
- ``{{`` and ``}}`` are a literal ``{`` and ``}``. Any other brace (unclosed, unmatched or
  nested) is refused.

A template is parsed once into literal and field parts. A rendering adds up the parts' lengths
before it builds anything, so a template that repeats a field thousands of times over a large
document is refused with the limit named, never allocated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from service.errors import InvalidParameterError, RowError

#: Characters a field name may not contain (format specs, conversions, attributes, indexes).
FORBIDDEN = frozenset("{}:!.[]")
_SHOWN = 40  # characters of an offending piece shown in a message


class TemplateError(InvalidParameterError):
    """A malformed prompt template: a 422 naming ``prompt`` at submission; a row error in a
    worker that meets one stored before these rules."""

    def __init__(self, message: str) -> None:
        super().__init__(f"prompt: {message}", field="prompt")


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Template:
    parts: tuple[str | Field, ...]  # literal text or a field, in order; no empty literals
    fields: frozenset[str]

    @property
    def literal_chars(self) -> int:
        return sum(len(p) for p in self.parts if isinstance(p, str))


def _shown(piece: str) -> str:
    """An offending piece for a message: quoted, cut to a readable length."""
    cut = piece if len(piece) <= _SHOWN else piece[:_SHOWN] + "..."
    return repr(cut)


def _check_name(name: str, source: str, start: int, end: int) -> None:
    piece = source[start : end + 1]
    why = None
    if not name.strip():
        why = "is empty"
    elif name.isdigit():
        why = "is a number, not a column name"
    elif any(c in FORBIDDEN for c in name):
        why = (
            "is not a plain name: format specs, conversions, attributes and indexes "
            "(':', '!', '.', '[', ']') are not supported"
        )
    elif any(not c.isprintable() for c in name):
        why = "contains a control character"
    if why is not None:
        raise TemplateError(
            f"template field {_shown(piece)} at character {start} {why}; a field must name a "
            "column, e.g. {text}; write {{ and }} for literal braces"
        )


def parse(source: str) -> Template:
    """The parts of ``source``, or ``TemplateError`` naming the first offending piece. Linear
    in the template's length (the caller bounds that length)."""
    return _parse(source)


@lru_cache(maxsize=64)  # a worker renders one job's template for every row of a chunk
def _parse(source: str) -> Template:
    parts: list[str | Field] = []
    literal: list[str] = []
    i, n = 0, len(source)
    while i < n:
        opening = source.find("{", i)
        closing = source.find("}", i)
        if opening == -1 and closing == -1:
            literal.append(source[i:])
            break
        if closing != -1 and (opening == -1 or closing < opening):
            if source.startswith("}}", closing):
                literal.append(source[i : closing + 1])
                i = closing + 2
                continue
            raise TemplateError(
                f"'}}' at character {closing} has no matching '{{' "
                f"(near {_shown(source[max(closing - 20, 0) : closing + 1])}); "
                "write }} for a literal brace"
            )
        if source.startswith("{{", opening):
            literal.append(source[i : opening + 1])
            i = opening + 2
            continue
        literal.append(source[i:opening])
        end = source.find("}", opening + 1)
        if end == -1:
            raise TemplateError(
                f"'{{' at character {opening} is never closed "
                f"(near {_shown(source[opening:])}); write {{{{ for a literal brace"
            )
        nested = source.find("{", opening + 1, end)
        if nested != -1:
            raise TemplateError(
                f"template field {_shown(source[opening : end + 1])} at character {opening} "
                "has a '{' inside it; fields cannot nest (write {{ and }} for literal braces)"
            )
        name = source[opening + 1 : end]
        _check_name(name, source, opening, end)
        text = "".join(literal)
        if text:
            parts.append(text)
        literal = []
        parts.append(Field(name))
        i = end + 1
    text = "".join(literal)
    if text:
        parts.append(text)
    return Template(tuple(parts), frozenset(p.name for p in parts if isinstance(p, Field)))


def check(source: str, max_chars: int) -> Template:
    """A template from a request: at most ``max_chars`` long, and well formed (422s)."""
    if len(source) > max_chars:
        raise TemplateError(
            f"the template is {len(source)} characters; the limit is {max_chars} "
            "(DOCQUEUE_MAX_TEMPLATE_CHARS)"
        )
    return parse(source)


def rendered_length(template: Template, values: Mapping[str, str]) -> int:
    """The length ``render`` would produce, without producing it (``RowError`` for a field
    this row has no value for)."""
    total = 0
    for part in template.parts:
        if isinstance(part, str):
            total += len(part)
            continue
        value = values.get(part.name)
        if value is None:
            raise RowError(f"prompt template field {{{part.name}}} has no value in this row")
        total += len(value)
    return total


def render(template: Template, values: Mapping[str, str], max_chars: int) -> str:
    """The template with every field replaced by its value. A result longer than ``max_chars``
    is this row's ``RowError`` naming the limit; its length is computed before anything is
    built, so an oversized prompt never takes the memory it would need."""
    length = rendered_length(template, values)
    if length > max_chars:
        raise RowError(
            f"the rendered prompt would be {length} characters; the limit is {max_chars} "
            "(DOCQUEUE_MAX_PROMPT_CHARS): the prompt template repeats large fields, or the "
            "row's fields are too long"
        )
    return "".join(p if isinstance(p, str) else values[p.name] for p in template.parts)

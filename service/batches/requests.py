"""An OpenAI batch input file, line by line: its structure, and what each request asks for.

Two kinds of fault, as OpenAI draws them. A line whose *structure* is wrong (not JSON, not an
object, a missing field, a method other than POST, a ``url`` other than the batch's endpoint, a
duplicate ``custom_id``, a model other than the first line's, one line too many) fails the
whole batch, and the batch's ``errors`` name each line. A well-formed line whose *body* asks for
something docqueue cannot do (a field it does not honour, a value out of range) is that one
request's error, named with its ``param``; the rest of the batch runs. Nothing a request asks
for is ignored: every body field is either honoured or refused (``INFORMATIONAL`` fields change
nothing about the generation and are accepted as such).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: OpenAI's floor for a logprob it cannot tell: a token the model gives no chance (vLLM says
#: ``-inf``, and JSON has no -Infinity), or one the engine did not report.
LOGPROB_FLOOR = -9999.0


def finite_logprob(value: Any) -> float:
    """A logprob as OpenAI sends it: a finite number, else ``LOGPROB_FLOOR``."""
    number = float(value) if isinstance(value, int | float) else LOGPROB_FLOOR
    return number if math.isfinite(number) else LOGPROB_FLOOR


#: The endpoints a batch may name, and the kind of request each line is.
ENDPOINTS: dict[str, Literal["chat", "completion"]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
}
#: Body fields accepted without effect on the output: who asked, and what OpenAI stores.
INFORMATIONAL = frozenset({"user", "metadata", "store", "safety_identifier", "prompt_cache_key"})
#: OpenAI's own bounds (an ``n`` past this is refused, not clipped).
MAX_N = 128
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_CUSTOM_ID_CHARS = 512
#: Error codes of a batch's ``errors`` list, as OpenAI names them.
INVALID_JSON = "invalid_json_line"
MISSING = "missing_required_parameter"
INVALID_VALUE = "invalid_value"
DUPLICATE = "duplicate_custom_id"
MISMATCHED_URL = "invalid_url"
MISMATCHED_MODEL = "mismatched_model"
TOO_MANY = "too_many_requests"


#: How pydantic names a union member in an error's location (``list[str]``, ``str``, ``TextPart``).
_UNION_TAG = re.compile(r"[\[\]]|^(str|int|float|bool|dict|list)$|^[A-Z]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    """A chat message. Text only: an image or audio part is the request's error."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchema(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


Stop = Annotated[list[str], Field(max_length=MAX_STOP)] | str


class _Sampling(_Strict):
    """What both endpoints share. ``None`` means the OpenAI default (see ``Sampling``)."""

    model: str = Field(min_length=1, max_length=500)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Stop | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _consistent(self) -> ChatBody:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self


class CompletionBody(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


@dataclass(frozen=True)
class LineError:
    """A fault of the file: it fails the batch (OpenAI's ``errors.data`` entry)."""

    line: int
    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class Request:
    """One line that will become one document. ``error`` set: the request fails alone with
    it (``param`` names the field), and no engine sees it."""

    line: int
    custom_id: str
    body: ChatBody | CompletionBody | None
    raw_body: Mapping[str, Any]
    error: str | None = None
    param: str | None = None


@dataclass
class Parsed:
    """A whole file: its requests, or the errors that fail the batch, and its one model."""

    requests: list[Request] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    model: str | None = None  # as the lines name it (an alias, before resolving)

    @property
    def ok(self) -> bool:
        return not self.errors


def _first_error(exc: ValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, as a message and the body field it concerns (its path,
    without the names pydantic gives the members of a union: ``stop``, not ``stop.list[str]``)."""
    err = exc.errors(include_url=False)[0]
    path = [str(p) for p in err["loc"] if isinstance(p, int) or not _UNION_TAG.search(str(p))]
    param = ".".join(path) or None
    if err["type"] == "extra_forbidden":
        return f"docqueue does not support the parameter {param!r}", param
    return f"{param}: {err['msg']}" if param else err["msg"], param


def parse_body(kind: Literal["chat", "completion"], body: Mapping[str, Any]) -> Request:
    """The body of one well-formed line as a request, or that request's own error."""
    model = ChatBody if kind == "chat" else CompletionBody
    try:
        parsed: ChatBody | CompletionBody = model.model_validate(dict(body))
    except ValidationError as exc:
        message, param = _first_error(exc)
        return Request(0, "", None, body, message, param)
    return Request(0, "", parsed, body)


def parse_lines(
    lines: Iterable[bytes],
    endpoint: str,
    *,
    max_requests: int,
    max_line_bytes: int,
    max_errors: int = 100,
) -> Parsed:
    """Reads a batch file's lines (each without or with its newline; blank lines are skipped,
    as OpenAI does). Stops collecting after ``max_errors`` faults: the batch fails anyway."""
    kind = ENDPOINTS[endpoint]
    out = Parsed()
    seen: set[str] = set()
    for number, request in _lines(lines, max_line_bytes, out):
        if len(out.errors) >= max_errors:
            break
        if request is None:
            continue
        if len(seen) >= max_requests:
            out.errors.append(
                LineError(number, TOO_MANY, f"a batch holds at most {max_requests} requests")
            )
            break
        fault = _structure(number, request, endpoint, out)
        if fault is not None:
            out.errors.append(fault)
            continue
        custom_id, body = request["custom_id"], request["body"]
        if custom_id in seen:
            out.errors.append(
                LineError(number, DUPLICATE, f"custom_id {custom_id!r} is used by an earlier line",
                          "custom_id")
            )  # fmt: skip
            continue
        seen.add(custom_id)
        parsed = parse_body(kind, body)
        out.requests.append(
            Request(number, custom_id, parsed.body, body, parsed.error, parsed.param)
        )
    if out.errors:
        out.requests = []
    return out


def _lines(
    lines: Iterable[bytes], max_line_bytes: int, out: Parsed
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, the line's object) for each non-blank line; a fault is recorded in
    ``out`` and yields None."""
    for number, raw in enumerate(lines, 1):
        if len(raw) > max_line_bytes:
            out.errors.append(
                LineError(number, INVALID_VALUE, f"the line is over {max_line_bytes} bytes")
            )
            yield number, None
            continue
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            out.errors.append(LineError(number, INVALID_JSON, f"not valid JSON: {exc}"[:300]))
            yield number, None
            continue
        if not isinstance(value, dict):
            out.errors.append(LineError(number, INVALID_JSON, "a line must be a JSON object"))
            yield number, None
            continue
        yield number, value


def _structure(number: int, line: dict[str, Any], endpoint: str, out: Parsed) -> LineError | None:
    """A fault in the line's envelope (which fails the batch), or None."""
    for name in ("custom_id", "method", "url", "body"):
        if name not in line:
            return LineError(number, MISSING, f"missing required parameter {name!r}", name)
    extra = sorted(set(line) - {"custom_id", "method", "url", "body"})
    if extra:
        return LineError(number, INVALID_VALUE, f"unknown parameter {extra[0]!r}", extra[0])
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return LineError(
            number,
            INVALID_VALUE,
            f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters",
            "custom_id",
        )
    if line["method"] != "POST":
        return LineError(number, INVALID_VALUE, "method must be 'POST'", "method")
    if line["url"] != endpoint:
        return LineError(
            number,
            MISMATCHED_URL,
            f"url {str(line['url'])[:200]!r} is not the batch's endpoint {endpoint!r}",
            "url",
        )
    body = line["body"]
    if not isinstance(body, dict):
        return LineError(number, INVALID_VALUE, "body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return LineError(number, MISSING, "body.model is required", "body.model")
    if out.model is None:
        out.model = model
    elif model != out.model:
        return LineError(
            number,
            MISMATCHED_MODEL,
            f"every request of a batch must name the same model: {model[:200]!r} is not "
            f"{out.model[:200]!r} (the first request's)",
            "body.model",
        )
    return None


#: A request's text kept for people (the native results' ``text``), in characters.
DISPLAY_CHARS = 1000


def display_text(body: Mapping[str, Any]) -> str:
    """A request's text for people (listings, the native results): its last message or its
    prompt, cut to ``DISPLAY_CHARS``."""
    text: Any = ""
    if isinstance(body.get("messages"), list) and body["messages"]:
        last = body["messages"][-1]
        text = last.get("content", "") if isinstance(last, dict) else ""
        if isinstance(text, list):
            text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
    elif "prompt" in body:
        text = body["prompt"]
        text = text[0] if isinstance(text, list) and text else text
    return str(text)[:DISPLAY_CHARS] if isinstance(text, str) else ""

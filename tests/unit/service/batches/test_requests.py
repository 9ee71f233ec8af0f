"""An OpenAI batch file, line by line: faults that fail the batch name their lines; a body
docqueue cannot honour is that request's error, naming the field; nothing is ignored."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from service.batches.requests import (
    DUPLICATE,
    INFORMATIONAL,
    INVALID_JSON,
    MISMATCHED_MODEL,
    MISMATCHED_URL,
    MISSING,
    TOO_MANY,
    ChatBody,
    CompletionBody,
    parse_body,
    parse_lines,
)
from service.settings import Settings

CHAT = "/v1/chat/completions"


def line(custom_id: str = "r1", url: str = CHAT, **body: Any) -> bytes:
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def parse(*lines: bytes, max_requests: int = 100) -> Any:
    return parse_lines(lines, CHAT, max_requests=max_requests, max_line_bytes=10_000)


def test_a_good_file_gives_one_request_per_line_in_order() -> None:
    out = parse(line("a"), b"\n", line("b", temperature=0, max_tokens=5, stop=["\n"], n=2))
    assert out.ok and out.model == "gpt-4o-mini"
    assert [(r.line, r.custom_id, r.error) for r in out.requests] == [
        (1, "a", None),
        (3, "b", None),  # the blank line 2 is skipped, and numbering counts it
    ]
    body = out.requests[1].body
    assert isinstance(body, ChatBody) and (body.n, body.max_tokens, body.stop) == (2, 5, ["\n"])


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{not json", INVALID_JSON, None),
        (b"[1, 2]", INVALID_JSON, None),
        (json.dumps({"custom_id": "x", "method": "POST", "url": CHAT}).encode(), MISSING, "body"),
        (line(url="/v1/completions"), MISMATCHED_URL, "url"),
        (line(model="other-model"), MISMATCHED_MODEL, "body.model"),
        (line("r1"), DUPLICATE, "custom_id"),
    ],
)
def test_a_faulty_line_fails_the_batch_and_is_named(
    raw: bytes, code: str, param: str | None
) -> None:
    out = parse(line("r1"), raw, line("r9"))
    assert not out.ok and out.requests == []
    (error,) = out.errors
    assert (error.line, error.code, error.param) == (2, code, param)


def test_too_many_lines_and_a_line_too_long_are_named() -> None:
    out = parse(line("a"), line("b"), line("c"), max_requests=2)
    assert [(e.line, e.code) for e in out.errors] == [(3, TOO_MANY)]
    long = parse_lines([line("a", messages=[{"role": "user", "content": "x" * 500}])], CHAT,
                       max_requests=10, max_line_bytes=200)  # fmt: skip
    assert long.errors[0].line == 1 and "over 200 bytes" in long.errors[0].message


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [{"type": "function"}]}, "tools", "does not support the parameter 'tools'"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "does not support"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"n": 129}, "n", "128"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"top_logprobs": 3}, None, "requires logprobs"),
        ({"max_tokens": 5, "max_completion_tokens": 5}, None, "not both"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
            "messages",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ],
)
def test_a_body_docqueue_cannot_honour_is_that_requests_error_naming_the_field(
    body: dict[str, Any], param: str | None, words: str
) -> None:
    out = parse(line("bad", **body), line("good"))
    assert out.ok, out.errors  # the batch runs; only this request fails
    bad, good = out.requests
    assert bad.body is None and bad.error is not None and words in bad.error
    if param is not None:
        assert bad.param is not None and bad.param.startswith(param)
    assert good.error is None


def test_every_honoured_field_is_a_real_openai_field_and_every_other_one_is_refused() -> None:
    """Checked against the official SDK's own request types: no field of ours is invented,
    and every OpenAI field we do not honour is refused by name, never dropped."""
    for ours, theirs in (
        (ChatBody, chat_params.CompletionCreateParamsBase),
        (CompletionBody, completion_params.CompletionCreateParamsBase),
    ):
        honoured = set(ours.model_fields)
        openai_fields = set(theirs.__annotations__)
        assert honoured <= openai_fields, honoured - openai_fields
        assert INFORMATIONAL & openai_fields <= honoured  # accepted, as documented
        for name in sorted(openai_fields - honoured):
            kind: Literal["chat", "completion"] = "chat" if ours is ChatBody else "completion"
            base: dict[str, Any] = {"model": "m"}
            base |= {"messages": [{"role": "user", "content": "x"}]} if kind == "chat" else {}
            base |= {"prompt": "x"} if kind == "completion" else {}
            request = parse_body(kind, {**base, name: None})
            assert request.error is not None and name in request.error, name


def test_model_aliases_come_from_one_setting() -> None:
    settings = Settings.model_validate(
        {"openai": {"model_aliases": "gpt-4o-mini=HuggingFaceTB/SmolLM2-135M-Instruct, a=b"}}
    )
    assert settings.openai.resolve_model("gpt-4o-mini") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert settings.openai.resolve_model("not-an-alias") == "not-an-alias"
    with pytest.raises(ValueError, match="alias=model"):
        Settings.model_validate({"openai": {"model_aliases": "missing-equals"}})

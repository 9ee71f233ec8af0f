"""One OpenAI batch request's output line, from its document and result: what a finalized
batch's files hold (``service.batches.finalize``) and what ``docqueue run`` writes for an OpenAI
batch file. No database here: a row is anything with the attributes ``render`` reads (the
finalizer's SQL rows, the embedded store's records).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from service.batches import objects as o
from service.batches.requests import finite_logprob, parse_body

#: Row errors that are the request's own fault (a 400); any other row error is docqueue's (500).
_CONTEXT = "this model's maximum context length"
_REQUEST_FAULTS = (_CONTEXT, "could not render the request", "the row has no request body")

FinalStatus = Literal["completed", "cancelled", "expired"]


def _hex(batch_id: uuid.UUID, idx: int, what: str) -> str:
    """A stable id for one request's line: a retaken batch writes the same files."""
    return hashlib.sha256(f"{batch_id}:{idx}:{what}".encode()).hexdigest()[:32]


def render(
    row: Any,
    batch_id: uuid.UUID,
    kind: Literal["chat", "completion"],
    model: str,
    status: FinalStatus,
) -> tuple[o.RequestOutput, bool]:
    """One request's line, and whether it belongs to the output file (else the error file)."""
    line_id = f"batch_req_{_hex(batch_id, row.idx, 'line')}"
    custom_id = row.custom_id or str(row.idx)
    if not row.has_result:
        expired = status == "expired"
        return (
            o.RequestOutput(
                id=line_id,
                custom_id=custom_id,
                response=None,
                error=o.RequestError(
                    code="batch_expired" if expired else "batch_cancelled",
                    message="the batch expired before this request ran"
                    if expired
                    else "the batch was cancelled before this request ran",
                ),
            ),
            False,
        )
    request_id = _hex(batch_id, row.idx, "request")
    if row.error is not None:
        status_code, detail = row_error(row.error, row.body, kind)
        response = o.RequestResponse(
            status_code=status_code, request_id=request_id, body=o.ErrorBody(error=detail)
        )
        return o.RequestOutput(
            id=line_id, custom_id=custom_id, response=response, error=None
        ), False
    body = _completion(row, batch_id, kind, model)
    response = o.RequestResponse(status_code=200, request_id=request_id, body=body)
    return o.RequestOutput(id=line_id, custom_id=custom_id, response=response, error=None), True


def row_error(
    message: str, body: Any, kind: Literal["chat", "completion"]
) -> tuple[int, o.ErrorDetail]:
    """A row error as OpenAI answers it: the request's own fault (a field docqueue does not
    support, a value out of range, a prompt too long for the model) is a 400
    ``invalid_request_error`` naming the field; anything else (a chunk that failed after its
    retries, an engine error) is docqueue's, a 500 ``server_error``, which clients may retry."""
    if isinstance(body, dict):
        parsed = parse_body(kind, body)
        if parsed.error is not None:
            unsupported = parsed.error.startswith("docqueue does not support")
            code = "unsupported_parameter" if unsupported else "invalid_value"
            return 400, o.ErrorDetail(
                message=message, type="invalid_request_error", param=parsed.param, code=code
            )
    if message.startswith(_CONTEXT):
        param = "messages" if kind == "chat" else "prompt"
        return 400, o.ErrorDetail(
            message=message,
            type="invalid_request_error",
            param=param,
            code="context_length_exceeded",
        )
    if message.startswith(_REQUEST_FAULTS):
        return 400, o.ErrorDetail(
            message=message, type="invalid_request_error", param=None, code=None
        )
    return 500, o.ErrorDetail(message=message, type="server_error", param=None, code=None)


@dataclass
class _Choice:
    index: int
    text: str
    finish_reason: o.FinishReason
    logprobs: list[dict[str, Any]] | None = field(default=None)


def _choices(row: Any) -> list[_Choice]:
    """Every choice of a result: ``results.choices`` when kept (n > 1, logprobs), else the
    one in ``output``/``finish_reason``."""
    if not row.choices:
        return [_Choice(0, row.output or "", _finish_reason(row.finish_reason))]
    return [
        _Choice(
            int(c.get("index", i)),
            c.get("text") or "",
            _finish_reason(c.get("finish_reason")),
            c.get("logprobs"),
        )
        for i, c in enumerate(row.choices)
    ]


def _finish_reason(value: str | None) -> o.FinishReason:
    """vLLM's ``length`` is OpenAI's; everything else (a stop string, the end token) is stop."""
    return "length" if value == "length" else "stop"


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "replace"))


def _chat_logprobs(tokens: Sequence[dict[str, Any]]) -> o.ChatLogprobs:
    return o.ChatLogprobs(
        content=[
            o.TokenLogprob(
                token=str(t.get("token") or ""),
                logprob=finite_logprob(t.get("logprob")),
                bytes=_bytes(str(t.get("token") or "")),
                top_logprobs=[
                    o.TopLogprob(
                        token=str(a.get("token") or ""),
                        logprob=finite_logprob(a.get("logprob")),
                        bytes=_bytes(str(a.get("token") or "")),
                    )
                    for a in t.get("top_logprobs") or ()
                ],
            )
            for t in tokens
        ]
    )


def _completion_logprobs(tokens: Sequence[dict[str, Any]], start: int) -> o.CompletionLogprobs:
    """The legacy shape: parallel lists, ``text_offset`` counting characters from the end of
    the prompt (the output follows it; no echo)."""
    words = [str(t.get("token") or "") for t in tokens]
    offsets: list[int] = []
    at = start
    for word in words:
        offsets.append(at)
        at += len(word)
    return o.CompletionLogprobs(
        tokens=words,
        token_logprobs=[finite_logprob(t.get("logprob")) for t in tokens],
        top_logprobs=[
            {
                str(a.get("token") or ""): finite_logprob(a.get("logprob"))
                for a in t.get("top_logprobs") or ()
            }
            for t in tokens
        ],
        text_offset=offsets,
    )


def _completion(
    row: Any, batch_id: uuid.UUID, kind: Literal["chat", "completion"], model: str
) -> o.ChatCompletion | o.TextCompletion:
    created = int(row.created_at.timestamp())
    prompt, completion = int(row.prompt_tokens or 0), int(row.completion_tokens or 0)
    usage = o.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
    choices = _choices(row)
    if kind == "chat":
        return o.ChatCompletion(
            id=f"chatcmpl-{_hex(batch_id, row.idx, 'completion')}",
            created=created,
            model=model,
            choices=[
                o.ChatChoice(
                    index=c.index,
                    message=o.ChatMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    logprobs=None if c.logprobs is None else _chat_logprobs(c.logprobs),
                )
                for c in choices
            ],
            usage=usage,
        )
    start = int(row.prompt_chars or 0)
    return o.TextCompletion(
        id=f"cmpl-{_hex(batch_id, row.idx, 'completion')}",
        created=created,
        model=model,
        choices=[
            o.CompletionChoice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=None if c.logprobs is None else _completion_logprobs(c.logprobs, start),
            )
            for c in choices
        ],
        usage=usage,
    )

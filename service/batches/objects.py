"""OpenAI's wire objects for batches, as pydantic models: what docqueue writes, field by field,
so a client's SDK parses it as it parses OpenAI's.

Each section is one group of objects; the tests validate every one against the official
``openai`` SDK's own types.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

# --- A batch's output and error files: one line per request (service/batches/finalize.py) ----


class _Wire(BaseModel):
    """A field docqueue did not mean to send is a bug, not an extra key on the wire."""

    model_config = ConfigDict(extra="forbid")


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Wire):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


FinishReason = Literal["stop", "length"]


class ChatChoice(_Wire):
    index: int
    message: ChatMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Wire):
    """The body a ``/v1/chat/completions`` request answers with."""

    id: str  # chatcmpl-<hex>
    object: Literal["chat.completion"] = "chat.completion"
    created: int  # unix seconds
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Wire):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Wire):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None


class TextCompletion(_Wire):
    """The body a ``/v1/completions`` request answers with."""

    id: str  # cmpl-<hex>
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ErrorDetail(_Wire):
    message: str
    type: str  # invalid_request_error (the request's fault) or server_error
    param: str | None
    code: str | None


class ErrorBody(_Wire):
    error: ErrorDetail


class RequestResponse(_Wire):
    status_code: int
    request_id: str
    body: ChatCompletion | TextCompletion | ErrorBody


class RequestError(_Wire):
    """Why a request got no response at all: its batch ended before it ran."""

    code: Literal["batch_cancelled", "batch_expired"]
    message: str


class RequestOutput(_Wire):
    """One line of a batch's output file (a response) or error file (an error response, or
    no response and ``error``)."""

    id: str  # batch_req_<hex>
    custom_id: str
    response: RequestResponse | None
    error: RequestError | None

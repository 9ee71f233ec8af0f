"""Prompt rendering: task instruction + document through the model's chat template, truncated
to fit the context. Runs on chunk threads, never on the engine's driver thread."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.errors import RowError
from service.jobs import templates
from service.settings import get_settings
from service.store.chunks import Doc
from workers.engines.base import GenRequest

SUMMARIZE = (
    "Summarize the following text in at most {words} words{language}. "
    "Reply with the summary only.\n\n{text}"
)
CLASSIFY = (
    "Classify the following text as exactly one of: {labels}. "
    "Reply with the label only.\n\nText: {text}"
)


@dataclass(frozen=True)
class Rendered:
    token_ids: list[int]
    truncated: bool


def _text(value: Any) -> str:
    """A field's value as text: a column's string as is; anything else as its JSON (never a
    Python repr)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def instruction(
    task: str, params: dict[str, Any], doc: Doc, text: str, max_chars: int | None = None
) -> str:
    """The user message for one document (before the chat template), rendered by the same
    template engine the API validated the template with (``service.jobs.templates``).

    A template stored before those rules (an old job row) that they refuse is this row's error,
    as is a message longer than ``max_chars`` (default: ``DOCQUEUE_MAX_PROMPT_CHARS``), which is
    refused before it is built."""
    if max_chars is None:
        max_chars = get_settings().jobs.max_prompt_chars
    source = params.get("prompt")
    if source is None and task == "generate" and len(text) <= max_chars:
        return text  # the default template, "{text}", without building its values
    if source is not None and not isinstance(source, str):
        raise RowError("invalid prompt template: not a string")
    task_values: dict[str, str] = {}
    if task == "summarize":
        language = params.get("language")
        task_values["words"] = _text(params.get("summary_words", 60))
        task_values["language"] = f", in {_text(language)}" if language else ""
        default = SUMMARIZE
    elif task == "classify":
        task_values["labels"] = ", ".join(_text(v) for v in params.get("labels") or [])
        default = CLASSIFY
    else:
        default = "{text}"
    columns = {str(k): _text(v) for k, v in (doc.extra or {}).items()}
    # A user's template may name a column that shadows a task field ({language} the column);
    # the built-in instructions always take the job's own values (a CSV column named
    # 'language' or 'words' must not rewrite "in at most 60 words").
    values = {**task_values, **columns} if source else {**columns, **task_values}
    values["text"] = text
    values["id"] = doc.external_id if doc.external_id is not None else str(doc.idx)
    try:
        template = templates.parse(source or default)
    except templates.TemplateError as exc:
        raise RowError(f"invalid prompt template: {exc.message}") from None
    return templates.render(template, values, max_chars)


def _encode(tokenizer: Any, user: str) -> list[int]:
    """Same path as vLLM's ``LLM.chat``: chat template to text, then tokens without extra
    special tokens (the template carries them). Falls back to plain text without a template."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)
    return list(tokenizer(user).input_ids)


def render(
    tokenizer: Any,
    task: str,
    params: dict[str, Any],
    doc: Doc,
    budget_tokens: int,
    max_chars: int | None = None,
) -> Rendered:
    """Token ids for one document. A prompt over the budget keeps the longest prefix of the
    document's tokens that fits (the instruction and template stay whole), so a truncated
    document loses as little as possible and the cut is reproducible outside docqueue:
    ``decode(tokens[:k])`` through the chat template, with the largest such ``k``.

    ``max_chars`` caps the rendered message before it is tokenized (default:
    ``DOCQUEUE_MAX_PROMPT_CHARS``); a row over it is a ``RowError`` naming the limit."""
    if not doc.text.strip():
        raise RowError("empty text: nothing to process")
    if max_chars is None:
        max_chars = get_settings().jobs.max_prompt_chars
    user = instruction(task, params, doc, doc.text, max_chars)
    try:
        ids = _encode(tokenizer, user)
        if len(ids) <= budget_tokens:
            return Rendered(ids, truncated=False)
        text_ids = list(tokenizer(doc.text, add_special_tokens=False).input_ids)
        best = _longest_prefix(
            tokenizer, task, params, doc, text_ids, len(ids), budget_tokens, max_chars
        )
    except RowError:
        raise
    except Exception as exc:  # a tokenizer that chokes on this text
        raise RowError(f"could not tokenize the document: {exc}") from exc
    if best is None:
        raise RowError(
            f"the prompt template alone needs more than {budget_tokens} tokens "
            "(max_model_len - max_tokens); shorten the prompt or lower max_tokens"
        )
    return Rendered(best, truncated=True)


def encode_document(tokenizer: Any, doc: Doc, max_tokens: int) -> Rendered:
    """The document alone, as an encoder classifier takes it (its tokenizer's special tokens,
    no prompt), cut to ``max_tokens`` as its tokenizer cuts."""
    if not doc.text.strip():
        raise RowError("empty text: nothing to process")
    try:
        full = tokenizer(doc.text, truncation=True, max_length=max_tokens + 1).input_ids
    except Exception as exc:  # a tokenizer that chokes on this text
        raise RowError(f"could not tokenize the document: {exc}") from exc
    if len(full) <= max_tokens:
        return Rendered(list(full), truncated=False)
    cut = tokenizer(doc.text, truncation=True, max_length=max_tokens).input_ids
    return Rendered(list(cut), truncated=True)


def _longest_prefix(
    tokenizer: Any,
    task: str,
    params: dict[str, Any],
    doc: Doc,
    text_ids: list[int],
    full_len: int,
    budget: int,
    max_chars: int,
) -> list[int] | None:
    """The prompt for the largest ``k`` whose ``text_ids[:k]`` prompt fits ``budget``.

    Keeps a bracket ``fit < k < miss`` and guesses from each try's excess or slack, so the
    usual case costs two or three encodes; after a few guesses it bisects, so a tokenizer that
    re-merges tokens at the cut cannot make it loop.
    """

    def prompt(k: int) -> list[int]:
        cut = tokenizer.decode(text_ids[:k], skip_special_tokens=True)
        return _encode(tokenizer, instruction(task, params, doc, cut, max_chars))

    fit, miss = 0, len(text_ids)  # k = len(text_ids) is the whole document: it did not fit
    best: list[int] | None = None
    k = budget - max(full_len - len(text_ids), 0)
    for tries in range(64):
        if miss - fit <= 1:
            break
        k = min(max(k, fit + 1), miss - 1) if tries < 6 else (fit + miss) // 2
        ids = prompt(k)
        slack = budget - len(ids)
        if slack >= 0:
            fit, best = k, ids
            k += max(slack, 1)
        else:
            miss = k
            k += slack
    return best


def openai_request(
    tokenizer: Any, task: str, doc: Doc, max_model_len: int, default_max_tokens: int
) -> GenRequest:
    """The engine request for one row of an OpenAI batch: its own body (``doc.extra["body"]``,
    validated when the batch was made), with OpenAI's defaults rather than the native ones
    (temperature 1, top_p 1). Chat messages go through the model's chat template as vLLM's
    ``LLM.chat`` does; a completion's prompt is tokenized as is. Nothing is truncated: a prompt
    that leaves no room for ``max_tokens`` is the row's error, as OpenAI answers it."""
    from service.batches.requests import ChatBody, CompletionBody, parse_body

    raw = (doc.extra or {}).get("body")
    if not isinstance(raw, dict):
        raise RowError("the row has no request body")
    parsed = parse_body("chat" if task == "chat" else "completion", raw)
    if parsed.body is None:
        raise RowError(parsed.error or "invalid request body")
    body = parsed.body
    try:
        if isinstance(body, ChatBody):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
                ids = list(tokenizer(text, add_special_tokens=False).input_ids)
            else:
                ids = list(tokenizer("\n".join(m["content"] for m in messages)).input_ids)
            asked = body.max_completion_tokens or body.max_tokens
        else:
            assert isinstance(body, CompletionBody)
            ids = list(tokenizer(body.text()).input_ids)
            asked = body.max_tokens
    except Exception as exc:  # a tokenizer or template that chokes on this request
        raise RowError(f"could not render the request: {exc}") from exc
    room = max_model_len - len(ids)
    if asked is not None and asked > room:
        raise RowError(
            f"this model's maximum context length is {max_model_len} tokens; the request has "
            f"{len(ids)} prompt tokens and asks for {asked} more"
        )
    if room < 1:
        raise RowError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt alone "
            f"has {len(ids)}"
        )
    fmt = body.response_format if isinstance(body, ChatBody) else None
    if isinstance(body, ChatBody):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return GenRequest(
        prompt_token_ids=ids,
        max_tokens=asked if asked is not None else min(default_max_tokens, room),
        temperature=1.0 if body.temperature is None else body.temperature,
        seed=body.seed,
        n=body.n or 1,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        json_schema=(
            json.dumps(fmt.json_schema.schema_)
            if fmt is not None and fmt.json_schema is not None
            else None
        ),
        json_object=fmt is not None and fmt.type == "json_object",
        logprobs=logprobs,
    )

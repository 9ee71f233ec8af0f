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

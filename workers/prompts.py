"""Prompt rendering: task instruction + document through the model's chat template, truncated
to fit the context. Runs on chunk threads, never on the engine's driver thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.work import Doc

SUMMARIZE = (
    "Summarize the following text in at most {words} words{language}. "
    "Reply with the summary only.\n\n{text}"
)
CLASSIFY = (
    "Classify the following text as exactly one of: {labels}. "
    "Reply with the label only.\n\nText: {text}"
)
#: Tokens kept free between the prompt and the context limit, for the template's own tokens
#: that re-tokenization at the truncation boundary can add.
_MARGIN_TOKENS = 8


class RowError(Exception):
    """This document cannot be turned into a prompt; the row gets the error, the chunk goes on."""


@dataclass(frozen=True)
class Rendered:
    token_ids: list[int]
    truncated: bool


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        raise RowError(f"prompt template field {{{key}}} has no value in this row")


def instruction(task: str, params: dict[str, Any], doc: Doc, text: str) -> str:
    """The user message for one document (before the chat template)."""
    template = params.get("prompt")
    fields = _Fields(doc.extra or {})
    fields["text"] = text
    fields["id"] = doc.external_id if doc.external_id is not None else str(doc.idx)
    if task == "summarize":
        language = params.get("language")
        fields.setdefault("words", params.get("summary_words", 60))
        fields.setdefault("language", f", in {language}" if language else "")
        return (template or SUMMARIZE).format_map(fields)
    if task == "classify":
        fields.setdefault("labels", ", ".join(params.get("labels") or []))
        return (template or CLASSIFY).format_map(fields)
    return (template or "{text}").format_map(fields)


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
    tokenizer: Any, task: str, params: dict[str, Any], doc: Doc, budget_tokens: int
) -> Rendered:
    """Token ids for one document, its text cut (by tokens) until the prompt fits the budget."""
    if not doc.text.strip():
        raise RowError("empty text: nothing to process")
    try:
        ids = _encode(tokenizer, instruction(task, params, doc, doc.text))
        if len(ids) <= budget_tokens:
            return Rendered(ids, truncated=False)
        text_ids = tokenizer(doc.text, add_special_tokens=False).input_ids
        overhead = max(len(ids) - len(text_ids), 0)
        keep = budget_tokens - overhead - _MARGIN_TOKENS
        for _ in range(4):
            if keep <= 0:
                break
            cut = tokenizer.decode(text_ids[:keep], skip_special_tokens=True)
            ids = _encode(tokenizer, instruction(task, params, doc, cut))
            if len(ids) <= budget_tokens:
                return Rendered(ids, truncated=True)
            keep -= max(len(ids) - budget_tokens, 1) + _MARGIN_TOKENS
    except RowError:
        raise
    except Exception as exc:  # a tokenizer that chokes on this text
        raise RowError(f"could not tokenize the document: {exc}") from exc
    raise RowError(
        f"the prompt template alone needs more than {budget_tokens} tokens "
        "(max_model_len - max_tokens); shorten the prompt or lower max_tokens"
    )

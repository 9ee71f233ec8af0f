"""Prompt rendering: task instruction + document through the model's chat template, truncated
to fit the context. Runs on chunk threads, never on the engine's driver thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import RowError
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
    """Token ids for one document. A prompt over the budget keeps the longest prefix of the
    document's tokens that fits (the instruction and template stay whole), so a truncated
    document loses as little as possible and the cut is reproducible outside docqueue:
    ``decode(tokens[:k])`` through the chat template, with the largest such ``k``."""
    if not doc.text.strip():
        raise RowError("empty text: nothing to process")
    try:
        ids = _encode(tokenizer, instruction(task, params, doc, doc.text))
        if len(ids) <= budget_tokens:
            return Rendered(ids, truncated=False)
        text_ids = list(tokenizer(doc.text, add_special_tokens=False).input_ids)
        best = _longest_prefix(tokenizer, task, params, doc, text_ids, len(ids), budget_tokens)
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
) -> list[int] | None:
    """The prompt for the largest ``k`` whose ``text_ids[:k]`` prompt fits ``budget``.

    Keeps a bracket ``fit < k < miss`` and guesses from each try's excess or slack, so the
    usual case costs two or three encodes; after a few guesses it bisects, so a tokenizer that
    re-merges tokens at the cut cannot make it loop.
    """

    def prompt(k: int) -> list[int]:
        cut = tokenizer.decode(text_ids[:k], skip_special_tokens=True)
        return _encode(tokenizer, instruction(task, params, doc, cut))

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

"""Prompt rendering and truncation with the tiny model's real tokenizer and chat template."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import RowError
from service.settings import get_settings
from service.store.chunks import Doc
from tests.support.models import tiny_model
from workers.prompts import instruction, render


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model())


def doc(text: str, **extra: str) -> Doc:
    return Doc(idx=7, external_id="ext-7", text=text, extra=extra or None)


def test_instructions_per_task() -> None:
    d = doc("The text.", lang="fr")
    assert "at most 60 words" in instruction("summarize", {"summary_words": 60}, d, d.text)
    assert ", in German" in instruction("summarize", {"language": "German"}, d, d.text)
    cls = instruction("classify", {"labels": ["pos", "neg"]}, d, d.text)
    assert "exactly one of: pos, neg" in cls and cls.endswith("The text.")
    gen = instruction("generate", {"prompt": "[{id}/{lang}] {text}"}, d, d.text)
    assert gen == "[ext-7/fr] The text."
    assert instruction("generate", {}, d, d.text) == "The text."


def test_render_uses_the_chat_template(tokenizer: Any) -> None:
    r = render(tokenizer, "generate", {}, doc("hello there"), budget_tokens=500)
    text = tokenizer.decode(r.token_ids)
    assert "<|im_start|>user" in text and "hello there" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert r.truncated is False


def test_long_documents_are_truncated_to_fit(tokenizer: Any) -> None:
    long = " ".join(f"word{i}" for i in range(3000))
    for budget in (100, 500, 1500):
        r = render(tokenizer, "summarize", {"summary_words": 50}, doc(long), budget)
        assert r.truncated is True
        assert budget - 4 <= len(r.token_ids) <= budget
        decoded = tokenizer.decode(r.token_ids)
        assert "word0 word1" in decoded and "word2999" not in decoded
        assert "Summarize the following text" in decoded  # the instruction survives


def test_truncation_keeps_the_longest_prefix_that_fits(tokenizer: Any) -> None:
    """The cut is the largest k whose prompt of ``decode(tokens[:k])`` fits, found here by
    trying every k from the top: what a user reproducing a truncated row would compute."""
    text = " ".join(f"Zeile {i}: café {i * 37 % 101}, naïve—résumé." for i in range(60))
    text_ids = tokenizer(text, add_special_tokens=False).input_ids
    params = {"summary_words": 20}

    def prompt_len(k: int) -> int:
        cut = tokenizer.decode(text_ids[:k], skip_special_tokens=True)
        user = instruction("summarize", params, doc(cut), cut)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer(rendered, add_special_tokens=False).input_ids)

    for budget in (60, 97, 150, 333):
        k = next(k for k in range(len(text_ids) - 1, 0, -1) if prompt_len(k) <= budget)
        cut = tokenizer.decode(text_ids[:k], skip_special_tokens=True)
        r = render(tokenizer, "summarize", params, doc(text), budget)
        assert r.truncated is True
        assert tokenizer.decode(r.token_ids) == tokenizer.decode(
            render(tokenizer, "summarize", params, doc(cut), budget).token_ids
        ), budget


def test_row_errors(tokenizer: Any) -> None:
    with pytest.raises(RowError, match="empty text"):
        render(tokenizer, "generate", {}, doc("  \n "), 100)
    with pytest.raises(RowError, match="no value in this row"):
        render(tokenizer, "generate", {"prompt": "{missing} {text}"}, doc("x"), 100)
    with pytest.raises(RowError, match="max_model_len - max_tokens"):
        render(tokenizer, "summarize", {}, doc("some text " * 50), 5)


@pytest.mark.parametrize(
    "template",
    [
        "{text:{text.__class__.__mro__}}",
        "{id.__class__.__mro__} {text}",
        "{text!r}",
        "{text:>100000}",
        "{0} {text}",
        "{text",
    ],
)
def test_a_stored_template_outside_the_rules_is_a_row_error(tokenizer: Any, template: str) -> None:
    """A job row written before the template rules (or by hand) never renders padding or an
    object's repr: the worker refuses it as that row's error, and says nothing of Python."""
    with pytest.raises(RowError, match="invalid prompt template") as info:
        render(tokenizer, "generate", {"prompt": template}, doc("the text"), 500)
    assert "<class" not in str(info.value) and "object" not in str(info.value)


def test_rendered_prompt_over_the_cap_is_a_row_error_before_it_is_built(tokenizer: Any) -> None:
    """2,000 copies of a 10,000-character document would be 20 M characters: refused with the
    limit named, whatever the task."""
    big = doc("y" * 10_000)
    for task in ("generate", "summarize", "classify"):
        params = {"prompt": "{text}" * 2000, "labels": ["a", "b"]}
        with pytest.raises(RowError, match="20000000 characters; the limit is 1048576"):
            instruction(task, params, big, big.text, max_chars=1 << 20)
    ok = instruction("generate", {"prompt": "{text}{text}"}, doc("abc"), "abc", max_chars=6)
    assert ok == "abcabc"


def test_the_cap_defaults_to_the_setting(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner calls render() without a cap: DOCQUEUE_MAX_PROMPT_CHARS applies."""
    monkeypatch.setenv("DOCQUEUE_MAX_PROMPT_CHARS", "100000")
    get_settings.cache_clear()
    try:
        with pytest.raises(RowError, match=r"the limit is 100000 \(DOCQUEUE_MAX_PROMPT_CHARS\)"):
            render(tokenizer, "generate", {"prompt": "{text}" * 2000}, doc("z" * 1000), 500)
        r = render(tokenizer, "generate", {"prompt": "{text} " * 90}, doc("z z"), 500)
        assert r.truncated is False  # under the cap: rendered as usual
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_field_values_are_text_not_templates(tokenizer: Any) -> None:
    """A row's values containing braces are inserted as they are, never parsed again."""
    d = doc("{id.__class__} {0} {{", note="{text!r}")
    assert instruction("generate", {"prompt": "{note}|{text}"}, d, d.text) == (
        "{text!r}|{id.__class__} {0} {{"
    )


def test_columns_do_not_rewrite_the_built_in_instructions() -> None:
    """A CSV with columns named ``words``, ``language`` or ``labels`` (common in real data)
    leaves the built-in instructions alone; a user's own template may still name them."""
    d = doc("The text.", words="many", language="en", labels="x")
    summary = instruction("summarize", {"summary_words": 30, "language": "German"}, d, d.text)
    assert "at most 30 words, in German." in summary
    cls = instruction("classify", {"labels": ["pos", "neg"]}, d, d.text)
    assert "exactly one of: pos, neg." in cls
    own = instruction("summarize", {"prompt": "{language}/{words}: {text}"}, d, d.text)
    assert own == "en/many: The text."


def test_an_encoder_classifier_gets_the_document_alone_cut_to_its_length() -> None:
    from transformers import AutoTokenizer

    from tests.support.models import tiny_bert_model
    from workers.prompts import encode_document

    tok = AutoTokenizer.from_pretrained(tiny_bert_model())
    short = encode_document(tok, Doc(1, None, "the api is down", None), 32)
    assert short.token_ids == list(tok("the api is down").input_ids) and not short.truncated
    assert tok.decode(short.token_ids) == "[CLS] the api is down [SEP]"
    long = encode_document(tok, Doc(2, None, "word " * 100, None), 32)
    assert len(long.token_ids) == 32 and long.truncated
    assert long.token_ids[-1] == tok.sep_token_id  # cut the tokenizer's way, [SEP] kept
    with pytest.raises(RowError, match="empty text"):
        encode_document(tok, Doc(3, None, "  ", None), 32)

"""Label parsing and the prompt template checks of a job request."""

from __future__ import annotations

import pytest

from service.errors import InvalidParameterError
from service.jobs.validate import (
    JobRequest,
    ModelCapabilities,
    check_capabilities,
    parse_labels,
    template_fields,
    validate,
)
from service.settings import Settings
from tests.support.helpers import override


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("positive,negative,neutral", ["positive", "negative", "neutral"]),
        (" a , b ,, a ", ["a", "b"]),
        ('["x, with comma", "y"]', ["x, with comma", "y"]),
        ("", None),
        (None, None),
    ],
)
def test_parse_labels(raw: str | None, expected: list[str] | None) -> None:
    assert parse_labels(raw) == expected


def test_parse_labels_rejects_bad_json() -> None:
    with pytest.raises(InvalidParameterError, match="JSON list of strings"):
        parse_labels("[1, 2]")


def test_template_fields() -> None:
    assert template_fields("Summarize {text} in {lang}. {{literal}}") == {"text", "lang"}
    assert template_fields("{my col}: {text}") == {"my col", "text"}
    for bad in ("{}", "{0} {text}", "{text.upper}", "{row[0]}", "{text", "{text:>9}", "{text!r}"):
        with pytest.raises(InvalidParameterError) as info:
            template_fields(bad)
        assert info.value.where == {"field": "prompt"}


def _validate(prompt: str, task: str = "generate", **jobs: int) -> None:
    settings = override(Settings(), jobs=jobs) if jobs else Settings()
    labels = ["a", "b"] if task == "classify" else None
    validate(JobRequest(task=task, model="m", prompt=prompt, labels=labels), settings)


def test_validate_parses_the_template_on_every_path() -> None:
    """validate() is what the form, the CLI and schedules all call: the template rules live
    there, not only in the upload path (a schedule stored ``{text.__class__}`` before)."""
    for bad in ("{text:{text.__class__.__mro__}}", "{text.__class__}", "{text:>1000000000}"):
        for task in ("generate", "summarize", "classify"):
            with pytest.raises(InvalidParameterError, match=r"not a plain name|inside it") as info:
                _validate(bad, task)
            assert info.value.where == {"field": "prompt"}


def test_validate_caps_the_template_length() -> None:
    _validate("{text}" * 10, max_template_chars=60)
    with pytest.raises(InvalidParameterError, match="the limit is 60") as info:
        _validate("{text}" * 11, max_template_chars=60)
    assert info.value.where == {"field": "prompt"}


def test_an_escaped_text_is_not_the_text_field() -> None:
    """``{{text}}`` is the literal ``{text}``: a summary prompt with only that has no document."""
    _validate("Summarize {text}. Say {{text}} literally.", "summarize")
    with pytest.raises(InvalidParameterError, match=r"must contain \{text\}"):
        _validate("Summarize {{text}}", "summarize")


CLASSIFIER = ModelCapabilities(tasks=("classify",), labels=("billing", "outage"), prompted=False)


def test_a_classifier_serves_classify_only_and_gives_a_job_its_labels() -> None:
    req = JobRequest(task="generate", model="bert")
    with pytest.raises(InvalidParameterError, match="serves classify, not generate") as exc:
        check_capabilities(req, CLASSIFIER)
    assert exc.value.where["field"] == "task"
    req = JobRequest(task="classify", model="bert")
    check_capabilities(req, CLASSIFIER)
    assert req.labels == ["billing", "outage"]
    same = JobRequest(task="classify", model="bert", labels=["outage", "billing"])
    check_capabilities(same, CLASSIFIER)
    assert same.labels == ["outage", "billing"]
    other = JobRequest(task="classify", model="bert", labels=["billing", "spam"])
    with pytest.raises(InvalidParameterError, match="the classifier's own") as exc:
        check_capabilities(other, CLASSIFIER)
    assert exc.value.where["field"] == "labels"


def test_validate_checks_the_capabilities_a_request_carries() -> None:
    settings = Settings()
    req = JobRequest(task="classify", model="bert", capabilities=CLASSIFIER)
    validate(req, settings)  # no labels needed: the classifier's own
    assert req.labels == ["billing", "outage"]
    causal = JobRequest(task="classify", model="llama", capabilities=ModelCapabilities())
    with pytest.raises(InvalidParameterError, match="classify needs labels"):
        validate(causal, settings)
    check_capabilities(JobRequest(task="generate", model="llama"), None)  # unknown: no check


def test_capabilities_round_trip_through_a_worker_row() -> None:
    assert ModelCapabilities.of(CLASSIFIER.as_json()) == CLASSIFIER
    assert ModelCapabilities.of(None) is None
    assert ModelCapabilities.of(ModelCapabilities().as_json()) == ModelCapabilities()

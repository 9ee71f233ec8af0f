"""OpenAI's error shape: which paths get it, the body's keys, and when a refusal tells the SDK
not to retry."""

from __future__ import annotations

import pytest

from service.api import openai_errors
from service.errors import NotFoundError, QuotaExceededError


@pytest.mark.parametrize(
    ("path", "applies"),
    [
        ("/v1/files", True),
        ("/v1/files/file-abc/content", True),
        ("/v1/batches", True),
        ("/v1/filesystem", False),
        ("/v1/jobs", False),
        ("/files", False),
    ],
)
def test_applies_to_the_sdks_routes_only(path: str, applies: bool) -> None:
    assert openai_errors.applies(path) is applies


def test_the_body_has_openais_keys_and_keeps_docqueues_extras() -> None:
    err = QuotaExceededError("over", quota="upload_bytes_per_day", limit=5, retry_after_s=9000)
    body = openai_errors.body(429, err.to_dict())
    assert list(body)[:4] == ["message", "type", "param", "code"]
    assert body["type"] == "rate_limit_error" and body["code"] == "quota_exceeded"
    assert body["param"] is None and body["quota"] == "upload_bytes_per_day"
    missing = openai_errors.body(404, NotFoundError("gone", param="file_id").to_dict())
    assert missing == {
        "message": "gone",
        "type": "invalid_request_error",
        "param": "file_id",
        "code": "not_found",
    }
    assert openai_errors.body(422, {"code": "x", "message": "m", "field": "purpose"})["param"] == (
        "purpose"
    )
    assert openai_errors.body(503, {"code": "unavailable", "message": "m"})["type"] == (
        "server_error"
    )


@pytest.mark.parametrize(
    ("status", "given", "should_retry"),
    [
        (400, {}, "false"),
        (404, {}, "false"),
        (409, {}, "false"),
        (413, {}, "false"),
        (429, {"Retry-After": "30"}, None),  # soon: the SDK's own retry may succeed
        (429, {"Retry-After": "40000"}, "false"),  # a daily quota: not before midnight
        (503, {"Retry-After": "5"}, None),
    ],
)
def test_x_should_retry_false_on_refusals_a_retry_would_meet_again(
    status: int, given: dict[str, str], should_retry: str | None
) -> None:
    headers = openai_errors.headers(status, given)
    assert headers.get("x-should-retry") == should_retry
    assert all(headers[k] == v for k, v in given.items())

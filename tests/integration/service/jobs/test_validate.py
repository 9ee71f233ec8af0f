"""Every rejected upload: its status code, a message naming the fault and where, nothing left."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.support.helpers import submit, tenant_totals

CASES: list[tuple[str, bytes, dict[str, Any], int, list[str], dict[str, Any]]] = [
    (
        "missing text column",
        b"id,body\n1,hello\n",
        {},
        400,
        ["text column 'text' not found", "'id', 'body'"],
        {"column": "text"},
    ),
    ("empty file", b"", {}, 400, ["empty"], {}),
    ("blank lines only", b"\n\n\n", {}, 400, ["empty"], {}),
    ("header only", b"id,text\n", {}, 400, ["no data rows"], {}),
    (
        "invalid utf-8",
        b"text\nfine\nalso fine\nbad \xff\xfe byte\n",
        {},
        400,
        ["row 3", "invalid UTF-8"],
        {"row": 3, "line": 4},
    ),
    (
        "field over the size limit",
        b"text\nshort\n" + b"x" * 3000 + b"\n",
        {},
        400,
        ["row 2", "limit"],
        {"row": 2},
    ),
    (
        "multibyte text over the byte limit",
        b"text\nshort\n" + ("\u00e9" * 1500).encode() + b"\n",
        {},
        400,
        ["row 2", "3000 bytes", "2048 bytes"],
        {"row": 2, "column": "text"},
    ),
    (
        "more rows than the limit",
        b"text\n" + b"".join(b"d%d\n" % i for i in range(6)),
        {},
        400,
        ["more than 5 rows"],
        {"row": 6},
    ),
    (
        "duplicate ids",
        b"id,text\na,one\nb,two\nc,three\nb,four\nc,five\n",
        {"id_column": "id"},
        400,
        ["row 4", "duplicate id 'b'", "column 'id'"],
        {"row": 4, "column": "id"},
    ),
    (
        "missing id column",
        b"text\none\n",
        {"id_column": "doc_id"},
        400,
        ["id column 'doc_id' not found", "'text'"],
        {"column": "doc_id"},
    ),
    (
        "empty id",
        b"id,text\na,one\n,two\n",
        {"id_column": "id"},
        400,
        ["row 2", "empty id"],
        {"row": 2},
    ),
    (
        "too many fields",
        b"id,text\n1,one\n2,two,three\n",
        {},
        400,
        ["row 2", "3 fields", "header has 2"],
        {"row": 2},
    ),
    (
        "duplicate header",
        b"text,text\na,b\n",
        {},
        400,
        ["duplicate column name 'text'"],
        {},
    ),
    (
        "classify without labels",
        b"text\nhello\n",
        {"task": "classify"},
        422,
        ["classify needs labels"],
        {"field": "labels"},
    ),
    (
        "classify with one label",
        b"text\nhello\n",
        {"task": "classify", "labels": "only"},
        422,
        ["at least two labels"],
        {"field": "labels"},
    ),
    (
        "labels not a JSON list of strings",
        b"text\nhello\n",
        {"task": "classify", "labels": "[1, 2"},
        422,
        ["labels: invalid JSON"],
        {"field": "labels"},
    ),
    (
        "unknown task",
        b"text\nhello\n",
        {"task": "translate"},
        422,
        ["unknown task 'translate'", "generate, summarize, classify"],
        {"field": "task"},
    ),
    (
        "unknown template field",
        b"text,lang\nhello,en\n",
        {"task": "generate", "prompt": "Answer in {language}: {text}"},
        422,
        ["{language}", "'text', 'lang'"],
        {"field": "prompt"},
    ),
    (
        "template attribute access",
        b"text\nhello\n",
        {"task": "generate", "prompt": "{text.__class__}"},
        422,
        ["must name a column"],
        {"field": "prompt"},
    ),
    (
        "malformed template",
        b"text\nhello\n",
        {"task": "generate", "prompt": "unclosed {text"},
        422,
        ["invalid template"],
        {"field": "prompt"},
    ),
    (
        "chunk size out of range",
        b"text\nhello\n",
        {"chunk_size": 0},
        422,
        ["chunk_size"],
        {"field": "chunk_size"},
    ),
    (
        "max_tokens not a number",
        b"text\nhello\n",
        {"max_tokens": "many"},
        422,
        ["max_tokens"],
        {"field": "max_tokens"},
    ),
]


@pytest.fixture()
def small_limits(settings: Settings) -> Any:
    """Small limits so the size cases need only a few bytes; restored afterwards."""
    old = (settings.jobs.max_document_bytes, settings.jobs.max_rows_per_job)
    settings.jobs.max_document_bytes = 2048
    settings.jobs.max_rows_per_job = 5
    yield settings
    settings.jobs.max_document_bytes, settings.jobs.max_rows_per_job = old


@pytest.mark.parametrize(
    ("body", "fields", "status", "phrases", "where"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_rejected_with_a_clear_message_and_nothing_left_behind(
    client: TestClient,
    api_key: str,
    small_limits: Settings,
    model_name: str,
    body: bytes,
    fields: dict[str, Any],
    status: int,
    phrases: list[str],
    where: dict[str, Any],
) -> None:
    resp = submit(client, api_key, body, model=model_name, **fields)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    for phrase in phrases:
        assert phrase in error["message"], (phrase, error)
    for key, value in where.items():
        assert error.get(key) == value, (key, error)
    assert tenant_totals(small_limits.database.url, api_key) == (0, 0, 0)


def test_missing_file_and_task_are_named(client: TestClient, api_key: str) -> None:
    from tests.support.helpers import auth

    resp = client.post("/v1/jobs", headers=auth(api_key), data={"task": "summarize"})
    assert resp.status_code == 422
    assert "file" in resp.json()["error"]["message"]
    resp = client.post(
        "/v1/jobs", headers=auth(api_key), files={"file": ("a.csv", b"text\nx\n", "text/csv")}
    )
    assert resp.status_code == 422
    assert "task" in resp.json()["error"]["message"]


def test_upload_over_byte_limit_is_413(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    old = settings.jobs.max_upload_bytes
    settings.jobs.max_upload_bytes = 1000
    try:
        resp = submit(client, api_key, b"text\n" + b"word " * 400 + b"\n", model=model_name)
    finally:
        settings.jobs.max_upload_bytes = old
    assert resp.status_code == 413, resp.text
    assert "exceeds the limit of 1000 bytes" in resp.json()["error"]["message"]
    assert tenant_totals(settings.database.url, api_key) == (0, 0, 0)

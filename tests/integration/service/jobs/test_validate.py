"""Every rejected upload: its status code, a message naming the fault and where, nothing left."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from service.settings import Settings
from tests.support.helpers import auth, pg, put, submit, tenant_totals

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
        ["'{text'", "never closed"],
        {"field": "prompt"},
    ),
    (
        "template format spec that pads to a gigabyte",
        b"text\nhello\n",
        {"task": "generate", "prompt": "{text:>1000000000}"},
        422,
        ["'{text:>1000000000}'", "not a plain name"],
        {"field": "prompt"},
    ),
    (
        "template format spec that reads object reprs",
        b"text\nhello\n",
        {"task": "summarize", "prompt": "{text:{text.__class__.__mro__}}"},
        422,
        ["'{text:{text.__class__.__mro__}'", "cannot nest"],
        {"field": "prompt"},
    ),
    (
        "template conversion",
        b"text\nhello\n",
        {"task": "generate", "prompt": "{text!r}"},
        422,
        ["'{text!r}'"],
        {"field": "prompt"},
    ),
    (
        "template index",
        b"text\nhello\n",
        {"task": "generate", "prompt": "{text[0]} {text}"},
        422,
        ["'{text[0]}'"],
        {"field": "prompt"},
    ),
    (
        "template positional field",
        b"text\nhello\n",
        {"task": "generate", "prompt": "{} {text}"},
        422,
        ["'{}'", "is empty"],
        {"field": "prompt"},
    ),
    (
        "template stray closing brace",
        b"text\nhello\n",
        {"task": "generate", "prompt": "a } b {text}"},
        422,
        ["'}' at character 2 has no matching '{'"],
        {"field": "prompt"},
    ),
    (
        "template over the length limit",
        b"text\nhello\n",
        {"task": "generate", "prompt": "{text}" * 17},
        422,
        ["102 characters", "the limit is 100", "DOCQUEUE_MAX_TEMPLATE_CHARS"],
        {"field": "prompt"},
    ),
    (
        "summary template whose only {text} is an escaped literal",
        b"text\nhello\n",
        {"task": "summarize", "prompt": "Summarize {{text}}"},
        422,
        ["must contain {text}"],
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
    jobs = settings.jobs
    old = (jobs.max_document_bytes, jobs.max_rows_per_job, jobs.max_template_chars)
    jobs.max_document_bytes = 2048
    jobs.max_rows_per_job = 5
    jobs.max_template_chars = 100
    yield settings
    jobs.max_document_bytes, jobs.max_rows_per_job, jobs.max_template_chars = old


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


def test_template_fields_with_spaces_escapes_and_the_limit(
    client: TestClient, api_key: str, small_limits: Settings, model_name: str
) -> None:
    """What the rules allow goes through: a column with a space, escaped braces, and a
    template exactly at the length limit."""
    ok = submit(
        client,
        api_key,
        b"text,my col\nhello,x\n",
        model=model_name,
        task="generate",
        prompt="{{json}}: {my col} {text}",
    )
    assert ok.status_code == 202, ok.text
    assert ok.json()["params"]["prompt"] == "{{json}}: {my col} {text}"
    at_limit = submit(
        client,
        api_key,
        b"text\nhello\n",
        model=model_name,
        task="generate",
        prompt="{text}" * 16 + "x" * 4,
    )
    assert at_limit.status_code == 202, at_limit.text


# --- schedules: the same rules when a schedule is created and whenever it runs ----------------


def _schedule(client: TestClient, key: str, model: str, params: dict[str, Any]) -> Any:
    return client.post(
        "/v1/schedules",
        headers=auth(key),
        json={"collection": "tpl", "model": model, "cron": "0 2 * * *", "params": params},
    )


@pytest.mark.parametrize(
    ("params", "field", "phrase"),
    [
        ({"prompt": "{text:{text.__class__.__mro__}}"}, "prompt", "cannot nest"),
        ({"prompt": "{text.__class__} {text}"}, "prompt", "'{text.__class__}'"),
        ({"prompt": "{text:>1000000000}"}, "prompt", "not a plain name"),
        ({"prompt": "{{text}} only"}, "prompt", "must contain {text}"),
        ({"prompt": "{text}" * 20}, "prompt", "the limit is 100"),
        ({"prompt": ["{text}"]}, "params.prompt", "must be a string"),
        ({"language": {"__class__": 1}}, "params.language", "must be a string"),
    ],
    ids=["nested-spec", "attribute", "padding", "escaped-text", "too-long", "list", "language"],
)
def test_schedule_prompt_is_validated_when_created(
    client: TestClient,
    api_key: str,
    small_limits: Settings,
    model_name: str,
    params: dict[str, Any],
    field: str,
    phrase: str,
) -> None:
    assert put(client, api_key, "tpl", "id,text\n1,a\n").status_code == 200
    resp = _schedule(client, api_key, model_name, params)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["field"] == field and phrase in error["message"], error
    assert client.get("/v1/schedules", headers=auth(api_key)).json()["data"] == []


def test_a_schedule_stored_before_the_rules_runs_no_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A schedule row holding a template the rules refuse (stored by an older version) makes
    no job: a manual run is a 422 naming the prompt, and nothing is queued."""
    assert put(client, api_key, "tpl", "id,text\n1,a\n2,b\n").status_code == 200
    made = _schedule(client, api_key, model_name, {"prompt": "Summarize {text}"})
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE schedules SET params = %s WHERE id = %s",
            (Jsonb({"prompt": "{text:{text.__class__.__mro__}} {text}"}), sid),
        )
    resp = client.post(f"/v1/schedules/{sid}/run", headers=auth(api_key))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "prompt"
    assert tenant_totals(settings.database.url, api_key) == (0, 0, 0)

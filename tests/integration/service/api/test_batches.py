"""``/v1/batches`` through the official ``openai`` SDK, pointed at the real app in-process with
only ``base_url`` changed: a batch answers ``validating`` at once and becomes a job whose rows
are its requests; a faulty file fails it naming the lines; listing pages; cancel; tenants apart.
(Running a batch to its output file with a real worker is the e2e test's.)"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.support.helpers import auth, override, pg
from tests.support.runs import new_tenant

CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"


@pytest.fixture(scope="module")
def http(settings: Settings) -> Iterator[TestClient]:
    """The app with the submit processes off: the file is read right after the response, in
    the test's own process, so each test sees the outcome when its call returns."""
    aliased = override(
        settings,
        api={"submit_processes": 0},
        openai={"model_aliases": {"gpt-4o-mini": "served-model-for-batches"}},
    )
    with TestClient(create_app(aliased)) as c:
        yield c


def sdk(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http)


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", [{"role": "user", "content": f"hello {custom_id}"}])
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def upload(client: openai.OpenAI, *lines: dict[str, Any] | bytes) -> str:
    raw = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    return client.files.create(file=("requests.jsonl", io.BytesIO(raw)), purpose="batch").id


def test_a_batch_answers_at_once_then_its_requests_become_the_jobs_rows(
    http: TestClient, api_key: str, settings: Settings
) -> None:
    client = sdk(http, api_key)
    file_id = upload(client, line("a"), line("b", n=2, temperature=0), line("c", tools=[]))
    made = client.batches.create(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"team": "search"},
    )
    assert isinstance(made, openai.types.Batch)
    assert made.status == "validating" and made.id.startswith("batch_")
    assert made.metadata == {"team": "search"} and made.input_file_id == file_id
    assert made.expires_at is not None and made.expires_at - made.created_at == 24 * 3600

    batch = client.batches.retrieve(made.id)
    assert batch.status == "in_progress" and batch.in_progress_at is not None
    assert batch.model == "gpt-4o-mini"  # as the requests name it
    assert batch.request_counts is not None and batch.request_counts.total == 3
    job_id = batch.model_extra["job_id"] if batch.model_extra else None
    job = http.get(f"/v1/jobs/{job_id}", headers=auth(api_key)).json()
    assert job["task"] == "chat" and job["model"] == "served-model-for-batches"  # the alias
    assert job["status"] == "queued" and job["counts"]["total"] == 3
    with pg(settings.database.url) as conn:
        rows = conn.execute(
            "SELECT idx, external_id, text, extra FROM documents WHERE job_id = %s ORDER BY idx",
            (job_id,),
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(1, "a", "hello a"), (2, "b", "hello b"),
                                                  (3, "c", "hello c")]  # fmt: skip
    assert rows[1][3]["body"]["n"] == 2 and rows[2][3]["body"]["tools"] == []


def test_a_faulty_file_fails_the_batch_naming_each_line(http: TestClient, api_key: str) -> None:
    client = sdk(http, api_key)
    file_id = upload(
        client,
        line("a"),
        b"{not json",
        line("a"),  # a duplicate custom_id
        {**line("d"), "url": "/v1/completions"},
        line("e", model="another-model"),
    )
    made = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    batch = client.batches.retrieve(made.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    found = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "invalid_url", "url"),
        (5, "mismatched_model", "body.model"),
    ]


def test_create_refuses_what_cannot_become_a_batch(
    http: TestClient, api_key: str, settings: Settings
) -> None:
    client = sdk(http, api_key)
    file_id = upload(client, line("a"))
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                              completion_window="24h")  # fmt: skip
    assert "no embedding task yet" in str(bad.value) and bad.value.body is not None
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + uuid.uuid4().hex, endpoint=CHAT,
                              completion_window="24h")  # fmt: skip
    with pytest.raises(openai.BadRequestError) as meta:
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                              metadata={f"k{i}": "v" for i in range(17)})  # fmt: skip
    assert "at most 16 keys" in str(meta.value)
    other = sdk(http, new_tenant(settings)[1])
    with pytest.raises(openai.NotFoundError):  # another tenant's file
        other.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")


def test_list_pages_with_after_and_tenants_see_their_own(
    http: TestClient, api_key: str, settings: Settings
) -> None:
    key = new_tenant(settings)[1]
    client = sdk(http, key)
    file_id = upload(client, line("a"))
    made = [
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id
        for _ in range(5)
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    seen = [b.id for b in client.batches.list(limit=2)]  # the SDK follows `after` itself
    assert seen == made[::-1]
    theirs = sdk(http, api_key)
    assert not {b.id for b in theirs.batches.list(limit=100).data} & set(made)
    with pytest.raises(openai.NotFoundError):
        theirs.batches.retrieve(made[0])


def test_cancel_stops_a_batch_and_a_finished_one_is_a_409_not_retried(
    http: TestClient, api_key: str
) -> None:
    client = sdk(http, api_key)
    file_id = upload(client, line("a"), line("b"))
    made = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    cancelled = client.batches.cancel(made.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    job_id = cancelled.model_extra["job_id"] if cancelled.model_extra else None
    job = http.get(f"/v1/jobs/{job_id}", headers=auth(api_key)).json()
    assert job["status"] == "cancelled" and job["counts"]["cancelled"] == 2

    failed = client.batches.create(
        input_file_id=upload(client, b"[]"), endpoint=CHAT, completion_window="24h"
    )
    resp = http.post(f"/v1/batches/{failed.id}/cancel", headers=auth(api_key))
    assert resp.status_code == 409 and resp.headers["x-should-retry"] == "false"
    assert resp.json()["error"]["type"] == "invalid_request_error"

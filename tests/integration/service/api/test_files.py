"""``/v1/files`` through the official ``openai`` SDK, pointed at the real app in-process with
only ``base_url`` changed: create, retrieve, list (paged), content, delete, tenants apart, and
refusals in OpenAI's error shape (the SDK's exception classes, ``x-should-retry: false``)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.files import store
from service.settings import Settings
from service.store.engine import get_engine
from tests.support.helpers import auth, override, pg
from tests.support.runs import new_tenant

PART = 4096
UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_settings(settings: Settings) -> Settings:
    """4 KiB parts (a few KiB make a multi-part file) and 64 KiB uploads."""
    return override(settings, files={"part_bytes": PART}, jobs={"max_upload_bytes": UPLOAD_LIMIT})


@pytest.fixture(scope="module")
def app(small_settings: Settings) -> FastAPI:
    return create_app(small_settings)


@pytest.fixture(scope="module")
def http(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def sdk(http: TestClient, key: str) -> openai.OpenAI:
    """The official client, as a user would make it, with the in-process transport."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http)


def jsonl(n: int, pad: int = 0) -> bytes:
    return b"".join(
        f'{{"custom_id": "r{i}", "method": "POST", "url": "/v1/chat/completions", '
        f'"body": {{"pad": "{"x" * pad}"}}}}\n'.encode()
        for i in range(n)
    )


def test_create_retrieve_content_delete(http: TestClient, api_key: str) -> None:
    client = sdk(http, api_key)
    data = jsonl(3)
    made = client.files.create(file=("input.jsonl", data), purpose="batch")
    assert made.id.startswith("file-") and len(made.id) == 37
    assert (made.object, made.purpose, made.status) == ("file", "batch", "processed")
    assert made.bytes == len(data) and made.filename == "input.jsonl"
    assert made.expires_at == made.created_at + 30 * 24 * 3600  # the default for batch files

    assert client.files.retrieve(made.id) == made
    assert client.files.content(made.id).content == data

    deleted = client.files.delete(made.id)
    assert (deleted.id, deleted.deleted) == (made.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(made.id)


def test_expires_after_is_kept_and_expiry_purges(
    http: TestClient, api_key: str, small_settings: Settings
) -> None:
    client = sdk(http, api_key)
    made = client.files.create(
        file=("short.jsonl", jsonl(2)),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert made.expires_at == made.created_at + 3600
    engine = get_engine(small_settings.database.url)
    store.purge_expired(engine, small_settings, now=datetime.now(UTC) + timedelta(seconds=3500))
    assert client.files.retrieve(made.id).id == made.id  # not yet
    report = store.purge_expired(
        engine, small_settings, now=datetime.now(UTC) + timedelta(seconds=3700)
    )
    assert report.files >= 1
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    with pg(small_settings.database.url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM file_parts WHERE file_id = %s", (uuid.UUID(made.id[5:]),)
        ).fetchone()
    assert row == (0,)


@pytest.mark.parametrize("seconds", [60, 2_592_001])
def test_expires_after_out_of_range_is_a_400_naming_it(
    http: TestClient, api_key: str, seconds: int
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(http, api_key).files.create(
            file=("f.jsonl", b"{}\n"),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": seconds},
        )
    assert caught.value.body["param"] == "expires_after[seconds]"  # type: ignore[index]


def test_list_pages_with_after_and_limit(http: TestClient, api_key: str) -> None:
    client = sdk(http, api_key)
    made = [
        client.files.create(file=(f"{i}.jsonl", jsonl(1)), purpose="batch").id for i in range(5)
    ]
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == made[:2:-1] and first.has_more
    assert [f.id for f in client.files.list(limit=2, after=first.data[-1].id).data] == [
        made[2],
        made[1],
    ]
    # The SDK's auto-paging (after = the last id of each page) sees each file once.
    assert [f.id for f in client.files.list(limit=2)] == made[::-1]
    assert [f.id for f in client.files.list(order="asc")] == made
    assert [f.id for f in client.files.list(purpose="batch_output")] == []
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(after="file-nope")
    assert caught.value.body["param"] == "after"  # type: ignore[index]


def test_content_of_a_multi_part_file_is_streamed_part_by_part(
    http: TestClient, app: FastAPI, api_key: str
) -> None:
    data = jsonl(40, pad=300)  # about 15 KiB: four parts of 4 KiB
    made = sdk(http, api_key).files.create(file=("big.jsonl", data), purpose="batch")
    with sdk(http, api_key).files.with_streaming_response.content(made.id) as resp:
        assert b"".join(resp.iter_bytes()) == data
        assert resp.headers["content-length"] == str(len(data))

    # The ASGI conversation itself: one body message per stored part, not one whole body.
    sent: list[dict[str, Any]] = []

    asked = 0

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if asked > 1:  # the client stays connected: wait until the response is done
            await asyncio.Event().wait()
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/v1/files/{made.id}/content",
        "raw_path": f"/v1/files/{made.id}/content".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {api_key}".encode()), (b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]
    full, rest = divmod(len(data), PART)
    assert full >= 3 and [len(b) for b in bodies] == [PART] * full + ([rest] if rest else [])
    assert hashlib.sha256(b"".join(bodies)).digest() == hashlib.sha256(data).digest()


def test_another_tenants_file_is_a_404_in_openais_shape(
    http: TestClient, api_key: str, settings: Settings
) -> None:
    made = sdk(http, api_key).files.create(file=("mine.jsonl", jsonl(1)), purpose="batch")
    other = sdk(http, new_tenant(settings)[1])
    for call in (
        lambda: other.files.retrieve(made.id),
        lambda: other.files.content(made.id),
        lambda: other.files.delete(made.id),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        err = caught.value
        assert err.body == {
            "message": f"No such File object: {made.id}",
            "type": "invalid_request_error",
            "param": "file_id",
            "code": "not_found",
        }
        assert err.response.headers["x-should-retry"] == "false"
    assert made.id not in [f.id for f in other.files.list()]
    assert sdk(http, api_key).files.retrieve(made.id).id == made.id  # still there


def test_a_bad_purpose_is_a_400_naming_purpose(http: TestClient, api_key: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(http, api_key).files.create(file=("f.jsonl", b"{}\n"), purpose="fine-tune")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == "purpose" and body["type"] == "invalid_request_error"
    assert "purpose" in body["message"] and "batch" in body["message"]


def test_an_empty_file_and_a_too_long_file_name_are_400s(http: TestClient, api_key: str) -> None:
    client = sdk(http, api_key)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.files.create(file=("f.jsonl", b""), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("n" * 250 + ".jsonl", b"{}\n"), purpose="batch")
    assert caught.value.body["param"] == "file"  # type: ignore[index]
    assert client.files.list().data == []  # nothing stored


def test_an_over_size_upload_is_a_413_and_stores_nothing(
    http: TestClient, api_key: str, small_settings: Settings
) -> None:
    client = sdk(http, api_key)
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * (UPLOAD_LIMIT + 1)), purpose="batch")
    err = caught.value
    assert err.status_code == 413 and err.response.headers["x-should-retry"] == "false"
    assert isinstance(err.body, dict) and err.body["code"] == "payload_too_large"
    assert "DOCQUEUE_MAX_UPLOAD_BYTES" in err.body["message"]

    # Chunked, with no Content-Length: counted as it arrives and cut off at the limit.
    def body() -> Iterator[bytes]:
        yield (
            b'--b0\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b0\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n'
        )
        for _ in range(UPLOAD_LIMIT // 1024 + 2):
            yield b"y" * 1024
        yield b"\r\n--b0--\r\n"

    resp = http.post(
        "/v1/files",
        headers={**auth(api_key), "Content-Type": "multipart/form-data; boundary=b0"},
        content=body(),
    )
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert client.files.list().data == []


def test_past_the_daily_upload_quota_is_a_429_not_retried(
    http: TestClient, settings: Settings
) -> None:
    name, key = new_tenant(settings)
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE tenants SET quota_upload_bytes_per_day = 100 WHERE name = %s", (name,))
    client = sdk(http, key)
    client.files.create(file=("a.jsonl", b"a" * 60), purpose="batch")
    for _ in range(2):  # over with this file; then already at the quota (before the body)
        with pytest.raises(openai.RateLimitError) as caught:
            client.files.create(file=("b.jsonl", b"b" * 60), purpose="batch")
        err = caught.value
        assert isinstance(err.body, dict) and err.body["code"] == "quota_exceeded"
        assert err.body["quota"] == "upload_bytes_per_day"
        assert err.response.headers["x-should-retry"] == "false"
        with pg(settings.database.url) as conn:
            conn.execute(
                "UPDATE tenants SET quota_upload_bytes_per_day = 60 WHERE name = %s", (name,)
            )
    assert len(client.files.list().data) == 1


def test_a_bad_key_is_the_sdks_authentication_error(http: TestClient) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(http, "dq_not-a-key").files.create(file=("f.jsonl", b"{}\n"), purpose="batch")
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "authentication_error"
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_file_uploads_show_in_usage_as_upload_bytes(http: TestClient, settings: Settings) -> None:
    _, key = new_tenant(settings)
    sdk(http, key).files.create(file=("a b/ü.jsonl", b"x" * 123), purpose="batch")
    body = http.get("/v1/usage?group_by=model", headers=auth(key)).json()
    rows = [(r["model"], r["upload_bytes"]) for r in body["data"]]
    assert rows == [(store.FILES_LEDGER_MODEL, 123)]
    assert body["quotas"]["upload_bytes_per_day"]["used"] == 123
    made = sdk(http, key).files.list().data[0]
    assert made.filename == "ü.jsonl"  # the last path component
    resp = http.get(f"/v1/files/{made.id}/content", headers=auth(key))
    assert resp.headers["content-disposition"] == "attachment; filename*=UTF-8''%C3%BC.jsonl"

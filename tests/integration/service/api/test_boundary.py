"""The HTTP boundary as an attacker meets it: who is checked before any body byte is read, bodies
counted as they arrive (whatever Content-Length says), and hostile field values (5,000
characters, NUL, non-ASCII digits, path traversal) answered with a 422 naming the field, never a
500 and never stored."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.support.helpers import auth, override, put, submit, tenant_totals

CSV = "text\none\ntwo\n"
UPLOAD_LIMIT = 64 * 1024
JSON_LIMIT = 4 * 1024
CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def small_settings(settings: Settings) -> Settings:
    return override(
        settings, jobs={"max_upload_bytes": UPLOAD_LIMIT}, api={"max_json_bytes": JSON_LIMIT}
    )


@pytest.fixture(scope="module")
def small_app(small_settings: Settings) -> FastAPI:
    return create_app(small_settings)


@pytest.fixture(scope="module")
def small(small_app: FastAPI) -> Iterator[TestClient]:
    """The real app with small body limits (64 KiB uploads, 4 KiB JSON)."""
    with TestClient(small_app) as c:
        yield c


# --- the ASGI conversation itself: what the app reads, and when it answers --------------------


class Upload:
    """A client that streams a multipart upload without end (chunked, no Content-Length) and
    records how much of it the server asked for, and what the server answered."""

    BOUNDARY = "b0undary"

    def __init__(self, cap: int) -> None:
        self.cap = cap  # the most it sends, so that a server that reads everything still ends
        self.read = 0
        self.messages: list[dict[str, Any]] = []

    def head(self) -> bytes:
        return (
            f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="task"\r\n\r\n'
            f'summarize\r\n--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="docs.csv"\r\nContent-Type: text/csv\r\n\r\ntext\n'
        ).encode()

    async def body(self) -> AsyncIterator[bytes]:
        yield self.head()
        while self.read < self.cap:
            yield b"x" * (CHUNK - 1) + b"\n"
        yield f"\r\n--{self.BOUNDARY}--\r\n".encode()

    async def run(self, app: FastAPI, headers: dict[str, str]) -> int:
        chunks = self.body()

        async def receive() -> dict[str, Any]:
            try:
                data = await chunks.__anext__()
            except StopAsyncIteration:
                return {"type": "http.request", "body": b"", "more_body": False}
            self.read += len(data)
            return {"type": "http.request", "body": data, "more_body": True}

        async def send(message: MutableMapping[str, Any]) -> None:
            self.messages.append(dict(message))

        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        raw += [
            (b"host", b"testserver"),
            (b"content-type", f"multipart/form-data; boundary={self.BOUNDARY}".encode()),
            (b"transfer-encoding", b"chunked"),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/jobs",
            "raw_path": b"/v1/jobs",
            "query_string": b"",
            "root_path": "",
            "headers": raw,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=120)
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return int(starts[0]["status"])

    def error(self) -> dict[str, Any]:
        body = b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )
        return dict(json.loads(body)["error"])


def test_unauthenticated_upload_is_401_before_one_body_byte_is_read(small_app: FastAPI) -> None:
    """FastAPI parses a form before the route's dependencies run: without a check in front of
    it, anyone could make the API spool a body of any size to /tmp."""
    for headers in ({}, {"Authorization": "Bearer dq_not-a-key"}, {"Authorization": "Basic x"}):
        upload = Upload(cap=4 * 1024 * 1024)
        assert asyncio.run(upload.run(small_app, headers)) == 401
        assert upload.read == 0, headers
        assert upload.error()["code"] == "unauthorized"
        start = next(m for m in upload.messages if m["type"] == "http.response.start")
        assert (b"www-authenticate", b"Bearer") in start["headers"]
        assert (b"connection", b"close") in start["headers"]


def test_endless_chunked_upload_stops_at_the_limit_with_413(
    small_app: FastAPI, small_settings: Settings, api_key: str
) -> None:
    """No Content-Length to trust: the bytes are counted as they arrive and reading stops once
    they pass the limit."""
    upload = Upload(cap=8 * 1024 * 1024)
    assert asyncio.run(upload.run(small_app, auth(api_key))) == 413
    assert upload.read <= UPLOAD_LIMIT + 2 * CHUNK
    err = upload.error()
    assert err["code"] == "payload_too_large" and err["limit"] == UPLOAD_LIMIT
    assert f"exceeds the limit of {UPLOAD_LIMIT} bytes" in err["message"]
    assert "DOCQUEUE_MAX_UPLOAD_BYTES" in err["message"]
    assert tenant_totals(small_settings.database.url, api_key) == (0, 0, 0)


# --- through the test client ------------------------------------------------------------------


def test_chunked_upload_over_the_limit_is_413(
    small: TestClient, small_settings: Settings, api_key: str, model_name: str
) -> None:
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="task"\r\n\r\nsummarize\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\n'
        yield b"text\n" + b"word\n" * (UPLOAD_LIMIT // 5 + 10)
        yield b"\r\n--b--\r\n"

    resp = small.post(
        "/v1/jobs",
        headers={**auth(api_key), "Content-Type": "multipart/form-data; boundary=b"},
        content=body(),
    )
    assert resp.status_code == 413, resp.text
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert resp.json()["error"]["limit"] == UPLOAD_LIMIT
    assert tenant_totals(small_settings.database.url, api_key) == (0, 0, 0)


def test_upload_under_the_limit_still_works(
    small: TestClient, api_key: str, model_name: str
) -> None:
    resp = submit(small, api_key, "text\n" + "word\n" * 1000, model=model_name)
    assert resp.status_code == 202, resp.text


def test_declared_length_over_the_limit_is_413_at_once(
    small: TestClient, api_key: str, model_name: str
) -> None:
    resp = submit(small, api_key, b"text\n" + b"w\n" * UPLOAD_LIMIT, model=model_name)
    assert resp.status_code == 413
    assert f"exceeds the limit of {UPLOAD_LIMIT} bytes" in resp.json()["error"]["message"]


@pytest.mark.parametrize("chunked", [False, True])
def test_json_body_over_max_json_bytes_is_413(
    small: TestClient, api_key: str, chunked: bool
) -> None:
    body = json.dumps({"collection": "c", "cron": "@daily", "params": {"prompt": "x" * 10_000}})
    content: Any = iter([body.encode()]) if chunked else body.encode()
    resp = small.post(
        "/v1/schedules",
        headers={**auth(api_key), "Content-Type": "application/json"},
        content=content,
    )
    assert resp.status_code == 413, resp.text
    err = resp.json()["error"]
    assert err["limit"] == JSON_LIMIT and "DOCQUEUE_MAX_JSON_BYTES" in err["message"]


def test_multipart_to_a_json_route_gets_the_json_limit(small: TestClient, api_key: str) -> None:
    """Only the upload routes take an upload's size; elsewhere a body is read whole into memory."""
    resp = small.post(
        "/v1/schedules",
        headers=auth(api_key),
        files={"file": ("a.csv", b"x" * (JSON_LIMIT * 4), "text/csv")},
    )
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["limit"] == JSON_LIMIT


def test_an_absurd_content_length_is_413_not_500(small: TestClient, api_key: str) -> None:
    resp = small.post(
        "/v1/schedules",
        headers={**auth(api_key), "Content-Length": "9" * 5000, "Content-Type": "application/json"},
        content=b"{}",
    )
    assert resp.status_code == 413, resp.text


def test_valid_key_still_reaches_the_route_and_bad_ones_are_401(
    client: TestClient, api_key: str
) -> None:
    assert client.get("/v1/jobs", headers=auth(api_key)).status_code == 200
    resp = client.get("/v1/no-such-route", headers={"Authorization": "Bearer dq_nope"})
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "unauthorized"
    assert client.get("/healthz").status_code == 200


# --- hostile field values: 422 naming the field -----------------------------------------------

LONG = "a" * 5000
ARABIC_3 = "\u0663"  # int() reads it as 3


def assert_field(resp: Any, field: str) -> None:
    assert resp.status_code == 422, (field, resp.status_code, resp.text[:500])
    assert resp.json()["error"]["field"] == field, resp.json()


def add_schedule(client: TestClient, key: str, **body: Any) -> Any:
    body.setdefault("cron", "0 2 * * *")
    return client.post("/v1/schedules", headers=auth(key), json=body)


@pytest.fixture()
def collection(client: TestClient, api_key: str) -> str:
    name = f"c-{uuid.uuid4().hex[:8]}"
    assert put(client, api_key, name, "id,text\n1,a\n").status_code == 200
    return name


@pytest.mark.parametrize(
    "cron",
    [
        LONG,
        "0 2 * * *" + " " * 5000,
        f"0 2 * * {ARABIC_3}",
        f"{ARABIC_3} 2 * * *",
        "0 2 * * *\x00",
        "0 2 * * mon\x00",
        "* * * * * *",
        "0 2 31 2 *",
        "",
    ],
)
def test_hostile_cron_is_422_naming_cron(
    client: TestClient, api_key: str, collection: str, model_name: str, cron: str
) -> None:
    assert_field(
        add_schedule(client, api_key, collection=collection, model=model_name, cron=cron), "cron"
    )


@pytest.mark.parametrize(
    "tz",
    [
        LONG,
        "Europe",  # a directory of the tz database
        "../../../../etc/passwd",
        "/etc/localtime",
        "Europe/Berlin\x00",
        "zone.tab",
        "Europe/Berlin/x",
        "Europe/" + "a" * 300,
        "",
    ],
)
def test_hostile_timezone_is_422_naming_timezone(
    client: TestClient, api_key: str, collection: str, model_name: str, tz: str
) -> None:
    resp = add_schedule(client, api_key, collection=collection, model=model_name, timezone=tz)
    assert_field(resp, "timezone")


HOSTILE_MODELS = [LONG, "a\x00b", "org/model\nname", "modèle", " ", "", "a b"]


@pytest.mark.parametrize("model", HOSTILE_MODELS)
def test_hostile_model_name_in_a_schedule_is_422(
    client: TestClient, api_key: str, collection: str, model: str
) -> None:
    assert_field(add_schedule(client, api_key, collection=collection, model=model), "model")


@pytest.mark.parametrize("model", [m for m in HOSTILE_MODELS if m])  # "" is the default model
def test_hostile_model_name_in_a_job_is_422(
    client: TestClient, api_key: str, settings: Settings, model: str
) -> None:
    assert_field(submit(client, api_key, CSV, model=model), "model")
    assert tenant_totals(settings.database.url, api_key) == (0, 0, 0)


@pytest.mark.parametrize(
    "model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "org/name-1.5b", "/models/tiny_llama@v2"]
)
def test_ordinary_model_names_are_accepted(client: TestClient, api_key: str, model: str) -> None:
    assert submit(client, api_key, CSV, model=model).status_code == 202


def _raw_upload(client: TestClient, key: str, filename: bytes, **headers: str) -> Any:
    """A multipart body written by hand: httpx escapes control characters in a filename, an
    attacker's client does not."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="task"\r\n\r\nsummarize\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: text/csv\r\n\r\n'
        + CSV.encode()
        + b"\r\n--b--\r\n"
    )
    return client.post(
        "/v1/jobs",
        headers={**auth(key), "Content-Type": "multipart/form-data; boundary=b", **headers},
        content=body,
    )


@pytest.mark.parametrize(
    "filename",
    [b"a" * 300 + b".csv", b"docs\x00.csv", b"docs\x01.csv", b"docs\x7f.csv", b"/\x00"],
)
def test_hostile_filename_is_422_naming_file(
    client: TestClient, api_key: str, settings: Settings, filename: bytes
) -> None:
    assert_field(_raw_upload(client, api_key, filename), "file")
    assert tenant_totals(settings.database.url, api_key) == (0, 0, 0)


def test_a_part_header_past_the_parsers_bound_is_a_400_in_the_error_shape(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    """The multipart parser caps a part's header line; its refusal keeps the API's error
    shape (it used to be FastAPI's bare {"detail": ...})."""
    resp = _raw_upload(client, api_key, b"a" * 5000 + b".csv")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "bad_input"
    assert tenant_totals(settings.database.url, api_key) == (0, 0, 0)


@pytest.mark.parametrize(
    ("filename", "stored"),
    [
        (b"../../etc/passwd", "passwd"),
        (b"C:\\Users\\me\\docs.csv", "docs.csv"),
        ("donn\u00e9es.csv".encode(), "donn\u00e9es.csv"),
    ],
)
def test_filename_keeps_only_its_last_component(
    client: TestClient, api_key: str, filename: bytes, stored: str
) -> None:
    resp = _raw_upload(client, api_key, filename)
    assert resp.status_code == 202, resp.text
    assert resp.json()["source_name"] == stored


@pytest.mark.parametrize("key", [LONG, "a\x00b", "tab\there", "caf\xe9", " "])
def test_hostile_idempotency_key_is_422(
    client: TestClient, api_key: str, settings: Settings, key: str
) -> None:
    raw: Any = key.encode("latin-1")  # the bytes on the wire (httpx would refuse a str é)
    resp = submit(client, api_key, CSV, headers={"Idempotency-Key": raw})
    assert_field(resp, "Idempotency-Key")
    assert tenant_totals(settings.database.url, api_key) == (0, 0, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("language", "Deutsch\x00"),
        ("language", LONG),
        ("text_column", "te\x00xt"),
        ("text_column", LONG),
        ("id_column", "i\x00d"),
        ("labels", ",".join(f"l{i}" for i in range(1000))),
        ("labels", f"a,{LONG}"),
        ("labels", json.dumps(["a", "b\x00"])),
        ("task", LONG),
        ("priority", LONG),
        ("seed", str(10**30)),  # past what the engine's generator takes
        ("seed", "-1"),
    ],
)
def test_hostile_job_fields_are_422(
    client: TestClient, api_key: str, settings: Settings, field: str, value: str
) -> None:
    fields: dict[str, Any] = {"task": "classify", "labels": "a,b", field: value}
    assert_field(submit(client, api_key, CSV, **fields), field)
    assert tenant_totals(settings.database.url, api_key) == (0, 0, 0)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"labels": [f"l{i}" for i in range(1000)]}, "labels"),
        ({"labels": ["a", "b\x00"]}, "labels"),
        ({"language": "x\x00"}, "language"),
        ({"language": LONG}, "language"),
        ({"max_tokens": float("inf")}, "params.max_tokens"),
        ({"temperature": float("nan")}, "params.temperature"),
        ({"seed": {"nested": [1]}}, "params.seed"),
        ({"seed": 10**30}, "seed"),
        ({"max_tokens": "\u0663"}, "params.max_tokens"),  # ARABIC-INDIC DIGIT THREE: int() takes it
        ({"summary_words": "1\u0660"}, "params.summary_words"),
    ],
)
def test_hostile_schedule_params_are_422(
    client: TestClient, api_key: str, collection: str, model_name: str, params: Any, field: str
) -> None:
    task = "classify" if "labels" in params else "summarize"
    body = {"collection": collection, "model": model_name, "task": task, "params": params}
    resp = client.post(
        "/v1/schedules",
        headers={**auth(api_key), "Content-Type": "application/json"},
        content=json.dumps({**body, "cron": "@daily"}).encode(),  # json.dumps writes Infinity
    )
    assert_field(resp, field)


@pytest.mark.parametrize("name", [LONG, "a%00b", "..", "a/b", "caf\u00e9", "a%0Ab"])
@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
def test_hostile_collection_name_is_422(
    client: TestClient, api_key: str, name: str, method: str
) -> None:
    path = f"/v1/collections/{name}" + ("/documents" if method == "PUT" else "")
    files = {"file": ("a.csv", b"id,text\n1,a\n", "text/csv")} if method == "PUT" else None
    resp = client.request(method, path, headers=auth(api_key), files=files)
    if name in ("..", "a/b"):  # another route or none: never a 500
        assert resp.status_code in (404, 405, 422), resp.text
        return
    assert_field(resp, "name")


@pytest.mark.parametrize("collection_name", [LONG, "a\x00b"])
def test_hostile_collection_in_a_schedule_is_422(
    client: TestClient, api_key: str, model_name: str, collection_name: str
) -> None:
    resp = add_schedule(client, api_key, collection=collection_name, model=model_name)
    assert_field(resp, "collection")


def test_nul_in_a_document_id_is_422(client: TestClient, api_key: str, collection: str) -> None:
    for method in ("GET", "DELETE"):
        resp = client.request(
            method, f"/v1/collections/{collection}/documents/a%00b", headers=auth(api_key)
        )
        assert_field(resp, "external_id")


def test_database_down_at_the_key_check_is_503_not_500(settings: Settings, api_key: str) -> None:
    """The key is checked in front of the app now, outside its exception handlers: a database
    that does not answer must still read as "retry later"."""
    down = settings.model_copy(
        update={
            "database": settings.database.model_copy(
                update={"url": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
            )
        }
    )
    with TestClient(create_app(down)) as c:
        resp = c.post("/v1/jobs", headers=auth(api_key), files={"file": ("a.csv", b"text\nx\n")})
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "unavailable"


def test_nul_in_a_documents_page_token_is_422(
    client: TestClient, api_key: str, collection: str
) -> None:
    """``AA==`` decodes to a NUL, which PostgreSQL text cannot hold (it was a 500)."""
    resp = client.get(
        f"/v1/collections/{collection}/documents?page_token=AA==", headers=auth(api_key)
    )
    assert_field(resp, "page_token")

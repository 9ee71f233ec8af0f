"""Collections over the real app, Postgres and Redis: upsert, list, get, documents, delete,
tenant isolation, bad CSVs."""

from __future__ import annotations

import io
import threading

from fastapi.testclient import TestClient

from service.collections.documents import UpsertCounts, upsert_documents
from service.settings import Settings
from service.store.keys import hash_key
from tests.support.helpers import auth, pg, put, sha


def test_upsert_by_id_counts_and_marks_changed_documents_pending(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    first = put(client, api_key, "news", "id,text,lang\na,Alpha,en\nb,Beta,en\nc,Gamma,de\n")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["name"] == "news"
    assert body["upserted"] == {"inserted": 3, "updated": 0, "unchanged": 0}
    assert body["counts"] == {"documents": 3, "summarized": 0, "pending": 3}

    # Pretend b and c were summarized (their current text).
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE collection_documents SET summary = 's', summary_hash = content_hash, "
            "summary_model = 'm', summarized_at = now() WHERE external_id IN ('b', 'c')"
        )
    again = put(
        client, api_key, "news", "id,text,lang\nb,Beta,en\nc,Gamma changed,de\nd,Delta,en\n"
    )
    assert again.json()["upserted"] == {"inserted": 1, "updated": 1, "unchanged": 1}
    assert again.json()["counts"] == {"documents": 4, "summarized": 1, "pending": 3}

    page = client.get("/v1/collections/news/documents", headers=auth(api_key)).json()
    docs = {d["id"]: d for d in page["data"]}
    assert [d["id"] for d in page["data"]] == ["a", "b", "c", "d"]
    assert docs["c"]["text"] == "Gamma changed" and docs["c"]["status"] == "pending"
    assert docs["c"]["content_hash"] == sha("Gamma changed")
    # The previous summary stays readable, with the hash of the text it summarized.
    assert docs["c"]["summary"]["content_hash"] == sha("Gamma")
    assert docs["b"]["status"] == "summarized" and docs["b"]["extra"] == {"lang": "en"}
    assert docs["a"]["summary"] is None

    pending = client.get(
        "/v1/collections/news/documents?status=pending", headers=auth(api_key)
    ).json()
    assert [d["id"] for d in pending["data"]] == ["a", "c", "d"]


def test_documents_are_paginated_in_id_order(client: TestClient, api_key: str) -> None:
    body = "id,text\n" + "".join(f"doc-{i:03d},text {i}\n" for i in range(25))
    assert put(client, api_key, "pages", body).status_code == 200
    seen: list[str] = []
    token = None
    while True:
        url = "/v1/collections/pages/documents?limit=10" + (f"&page_token={token}" if token else "")
        page = client.get(url, headers=auth(api_key)).json()
        seen += [d["id"] for d in page["data"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == [f"doc-{i:03d}" for i in range(25)]


def test_list_get_and_delete(client: TestClient, api_key: str, settings: Settings) -> None:
    put(client, api_key, "one", "id,text\n1,x\n")
    put(client, api_key, "two", "id,text\n1,x\n2,y\n")
    listed = client.get("/v1/collections", headers=auth(api_key)).json()["data"]
    assert [(c["name"], c["counts"]["documents"]) for c in listed] == [("one", 1), ("two", 2)]
    got = client.get("/v1/collections/two", headers=auth(api_key)).json()
    assert got["counts"] == {"documents": 2, "summarized": 0, "pending": 2}
    gone = client.delete("/v1/collections/two", headers=auth(api_key))
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert client.get("/v1/collections/two", headers=auth(api_key)).status_code == 404
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM collection_documents cd JOIN collections c "
            "ON c.id = cd.collection_id WHERE c.name = 'two'"
        ).fetchone()
    assert row is not None and row[0] == 0


def test_another_tenants_collection_is_404_everywhere(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    from service.store.engine import session_scope
    from service.store.keys import create_key

    with session_scope(settings.database.url) as session:
        other = create_key(session, "collections-other-tenant")
    put(client, api_key, "private", "id,text\n1,secret\n")
    h = auth(other)
    assert client.get("/v1/collections/private", headers=h).status_code == 404
    assert client.get("/v1/collections/private/documents", headers=h).status_code == 404
    assert client.delete("/v1/collections/private", headers=h).status_code == 404
    assert client.get("/v1/collections/private/documents/1", headers=h).status_code == 404
    assert client.delete("/v1/collections/private/documents/1", headers=h).status_code == 404
    assert client.get("/v1/collections", headers=h).json()["data"] == []
    # The same name for the other tenant is its own, separate collection.
    assert put(client, other, "private", "id,text\n9,mine\n").json()["counts"]["documents"] == 1
    mine = client.get("/v1/collections/private/documents", headers=auth(api_key)).json()
    assert [d["text"] for d in mine["data"]] == ["secret"]


def test_bad_csv_is_a_4xx_naming_row_and_column_and_changes_nothing(
    client: TestClient, api_key: str
) -> None:
    assert put(client, api_key, "strict", "id,text\nkeep,original\n").status_code == 200

    missing = put(client, api_key, "strict", "text\nno ids here\n")
    assert missing.status_code == 400
    err = missing.json()["error"]
    assert err["column"] == "id" and "id column 'id' not found" in err["message"]

    empty_id = put(client, api_key, "strict", "id,text\nkeep,changed\n,no id\n")
    assert empty_id.status_code == 400
    err = empty_id.json()["error"]
    assert err["row"] == 2 and err["column"] == "id" and "empty id" in err["message"]

    dup = put(client, api_key, "strict", "id,text\nx,1\ny,2\nx,3\n")
    assert dup.status_code == 400
    err = dup.json()["error"]
    assert err["row"] == 3 and "duplicate id 'x'" in err["message"]

    no_text = put(client, api_key, "strict", "id,body\n1,a\n")
    assert no_text.status_code == 400 and no_text.json()["error"]["column"] == "text"

    bad_name = put(client, api_key, "no spaces", "id,text\n1,a\n")
    assert bad_name.status_code == 422 and bad_name.json()["error"]["field"] == "name"

    # Nothing of the rejected uploads is left: still the one original document.
    docs = client.get("/v1/collections/strict/documents", headers=auth(api_key)).json()["data"]
    assert [(d["id"], d["text"]) for d in docs] == [("keep", "original")]


def test_custom_columns_and_delimiter(client: TestClient, api_key: str) -> None:
    resp = put(
        client, api_key, "semi", "key;body\nk1;first\nk2;second\n", id_column="key",
        text_column="body", delimiter=";",
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    docs = client.get("/v1/collections/semi/documents", headers=auth(api_key)).json()["data"]
    assert [(d["id"], d["text"]) for d in docs] == [("k1", "first"), ("k2", "second")]


def test_get_and_delete_one_document(client: TestClient, api_key: str) -> None:
    put(client, api_key, "single-docs", "id,text,topic\na/1,first,x\nb,second,y\n")
    h = auth(api_key)
    doc = client.get("/v1/collections/single-docs/documents/a%2F1", headers=h)
    assert doc.status_code == 200, doc.text
    body = doc.json()
    assert body["id"] == "a/1" and body["text"] == "first" and body["extra"] == {"topic": "x"}
    assert body["status"] == "pending" and body["content_hash"] == sha("first")

    gone = client.delete("/v1/collections/single-docs/documents/a%2F1", headers=h)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert client.get("/v1/collections/single-docs/documents/a%2F1", headers=h).status_code == 404
    again = client.delete("/v1/collections/single-docs/documents/a%2F1", headers=h)
    assert again.status_code == 404 and "a/1" in again.json()["error"]["message"]
    coll = client.get("/v1/collections/single-docs", headers=h).json()
    assert coll["counts"]["documents"] == 1
    missing = client.get("/v1/collections/nope/documents/b", headers=h)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


class SlowUpload:
    """An upload that stalls after its first block until ``gate`` opens: a slow client, or a
    big file still being parsed and copied."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self._calls = 0
        self.stalled = threading.Event()
        self.gate = threading.Event()

    def read(self, n: int = -1) -> bytes:
        self._calls += 1
        if self._calls == 2:
            self.stalled.set()
            self.gate.wait(30)
        return self._buf.read(n)


def test_an_upload_in_progress_does_not_hold_the_collection_lock(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    """The collection's row lock is what a scheduled job's finalization waits on (holding its
    chunk and job rows). An upload takes it only for the merge after its ingest, so while it
    streams anyone else gets the lock at once; the upload still applies in full."""
    assert put(client, api_key, "busy", "id,text\nseed,Seed\n").status_code == 200
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT tenant_id FROM api_keys WHERE key_hash = %s", (hash_key(api_key),)
        ).fetchone()
    assert row is not None
    upload = SlowUpload(
        ("id,text\n" + "".join(f"doc-{i:06d},text number {i}\n" for i in range(20000))).encode()
    )
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(upsert_documents(row[0], "busy", upload, settings))  # type: ignore[arg-type]
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert upload.stalled.wait(30)
        with pg(settings.database.url) as other, other.transaction():
            locked = other.execute(
                "SELECT name FROM collections WHERE name = 'busy' FOR UPDATE NOWAIT"
            ).fetchone()
            assert locked == ("busy",)
    finally:
        upload.gate.set()
        thread.join(60)
    (counts,) = outcome
    assert counts == UpsertCounts(inserted=20000, updated=0, unchanged=0)
    info = client.get("/v1/collections/busy", headers=auth(api_key)).json()
    assert info["counts"]["documents"] == 20001

"""A job's life cycle over the real API: ``DELETE /v1/jobs/{id}`` (a tombstone, rows gone, a
running job's leases fenced off) and ``POST /v1/jobs/{id}/retry`` (a new job over the failed
rows). The worker's part is played by the real chunk store (claim, write, close)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.errors import LeaseLostError
from service.settings import Settings
from service.store.chunks import PgChunkStore, RowResult
from service.store.engine import get_engine, session_scope
from service.store.keys import create_key
from service.store.states import ChunkState
from tests.support.helpers import (
    auth,
    chunk_rows,
    count_rows,
    documents,
    job_view,
    override,
    submit,
)


def make_store(settings: Settings) -> PgChunkStore:
    return PgChunkStore(get_engine(settings.database.url), lease_s=30, max_attempts=3)


def work(settings: Settings, job_id: str, fail: set[int], chunks: int | None = None) -> None:
    """Runs the job's chunks (the first ``chunks`` of them) as a worker would: rows in ``fail``
    get an error, the others an output; each chunk is closed done."""
    store = make_store(settings)
    for chunk in chunk_rows(settings, job_id)[:chunks]:
        lease = store.claim(chunk[0], "w").lease
        assert lease is not None
        rows = [
            RowResult(idx=d.idx, error=f"boom {d.idx}")
            if d.idx in fail
            else RowResult(idx=d.idx, output=f"out {d.idx}")
            for d in store.pending(lease)
        ]
        store.write(lease, rows)
        store.close(lease, ChunkState.DONE)


def csv_with_ids(n: int) -> str:
    return "id,text,lang\n" + "".join(f"r{i},doc {i},l{i}\n" for i in range(1, n + 1))


def results(client: TestClient, key: str, job_id: str) -> list[dict[str, Any]]:
    resp = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(key))
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines()]


def other_key(settings: Settings) -> str:
    with session_scope(settings.database.url) as session:
        return create_key(session, f"other-{uuid.uuid4().hex[:6]}")


# --- delete ------------------------------------------------------------------------------------


def test_delete_leaves_a_tombstone_and_answers_again_the_same(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, csv_with_ids(3), model=model_name, id_column="id").json()["id"]
    work(settings, job_id, fail={2})
    before = job_view(client, api_key, job_id)

    resp = client.delete(f"/v1/jobs/{job_id}", headers=auth(api_key))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["id"], body["deleted"], body["purge"]) == (job_id, True, "done")
    tomb = body["job"]
    assert tomb["deleted_at"] is not None and tomb["status"] == "completed"
    assert (
        tomb["counts"]
        == before["counts"]
        == {
            "total": 3,
            "succeeded": 2,
            "failed": 1,
            "cancelled": 0,
        }
    )
    assert job_view(client, api_key, job_id) == {**tomb, "model_served": False, "warning": None}
    url = settings.database.url
    assert [count_rows(url, t, job_id) for t in ("documents", "results", "chunks")] == [0, 0, 0]

    gone = client.get(f"/v1/jobs/{job_id}/results", headers=auth(api_key))
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "job_deleted"
    listed = client.get("/v1/jobs", headers=auth(api_key)).json()["data"]
    assert [(j["id"], j["deleted_at"]) for j in listed] == [(job_id, tomb["deleted_at"])]

    again = client.delete(f"/v1/jobs/{job_id}", headers=auth(api_key))
    assert again.status_code == 200 and again.json()["job"]["deleted_at"] == tomb["deleted_at"]
    retry = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(api_key))
    assert retry.status_code == 410 and retry.json()["error"]["code"] == "job_deleted"


def test_delete_of_a_running_job_refuses_the_lease_holders_later_write(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text\n" + "".join(f"doc {i}\n" for i in range(1, 17))
    job_id = submit(client, api_key, body, model=model_name, chunk_size=8).json()["id"]
    store = make_store(settings)
    lease = store.claim(chunk_rows(settings, job_id)[0][0], "w1").lease
    assert lease is not None
    store.write(lease, [RowResult(idx=1, output="done before the delete")])

    resp = client.delete(f"/v1/jobs/{job_id}", headers=auth(api_key))
    assert resp.status_code == 200, resp.text
    tomb = resp.json()["job"]
    assert tomb["status"] == "cancelled" and tomb["deleted_at"] is not None
    assert tomb["counts"] == {"total": 16, "succeeded": 1, "failed": 0, "cancelled": 15}

    with pytest.raises(LeaseLostError):
        store.write(lease, [RowResult(idx=2, output="written after the delete")])
    with pytest.raises(LeaseLostError):
        store.close(lease, ChunkState.DONE)
    assert count_rows(settings.database.url, "results", job_id) == 0
    assert job_view(client, api_key, job_id)["counts"] == tomb["counts"]


def test_delete_and_retry_are_404_for_another_tenant(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, csv_with_ids(3), model=model_name).json()["id"]
    work(settings, job_id, fail={1})
    other = other_key(settings)
    for resp in (
        client.delete(f"/v1/jobs/{job_id}", headers=auth(other)),
        client.post(f"/v1/jobs/{job_id}/retry", headers=auth(other)),
        client.delete(f"/v1/jobs/{uuid.uuid4()}", headers=auth(api_key)),
        client.delete("/v1/jobs/not-a-uuid", headers=auth(api_key)),
    ):
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert job_view(client, api_key, job_id)["deleted_at"] is None
    assert count_rows(settings.database.url, "documents", job_id) == 3
    assert len(results(client, api_key, job_id)) == 3
    assert client.get("/v1/jobs", headers=auth(other)).json()["data"] == []


@pytest.fixture()
def small_batch_client(settings: Settings) -> Iterator[TestClient]:
    """The app with retention_batch_rows 5: a job of more rows is purged after the DELETE."""
    with TestClient(create_app(override(settings, retention={"batch_rows": 5}))) as c:
        yield c


def test_delete_of_a_large_job_answers_at_once_and_purges_after(
    small_batch_client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    client = small_batch_client
    body = "text\n" + "".join(f"doc {i}\n" for i in range(1, 13))
    job_id = submit(client, api_key, body, model=model_name, chunk_size=8).json()["id"]
    work(settings, job_id, fail=set(), chunks=1)  # running: chunk 2 still queued

    resp = client.delete(f"/v1/jobs/{job_id}", headers=auth(api_key))
    assert resp.status_code == 200, resp.text
    assert resp.json()["purge"] == "pending"
    assert resp.json()["job"]["counts"] == {
        "total": 12,
        "succeeded": 8,
        "failed": 0,
        "cancelled": 4,
    }
    # The purge runs after the response (the test client waits for it): nothing is left.
    url = settings.database.url
    assert [count_rows(url, t, job_id) for t in ("documents", "results", "chunks")] == [0, 0, 0]
    again = client.delete(f"/v1/jobs/{job_id}", headers=auth(api_key))
    assert again.json()["purge"] == "done"


# --- retry -------------------------------------------------------------------------------------


def test_retry_runs_exactly_the_failed_rows_as_a_linked_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(
        client,
        api_key,
        csv_with_ids(20),
        model=model_name,
        id_column="id",
        chunk_size=8,
        task="classify",
        labels="a,b",
        priority="bulk",
    ).json()["id"]
    work(settings, job_id, fail={2, 9, 17})
    original = job_view(client, api_key, job_id)
    assert original["status"] == "completed" and original["counts"]["failed"] == 3

    resp = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(api_key))
    assert resp.status_code == 202, resp.text
    retry = resp.json()
    assert resp.headers["Location"] == f"/v1/jobs/{retry['id']}"
    assert retry["id"] != job_id and retry["retry_of"] == job_id
    assert retry["status"] == "queued" and retry["counts"]["total"] == 3
    for same in ("task", "model", "params", "priority", "queue", "chunk_size"):
        assert retry[same] == original[same], same
    assert retry["chunks"] == 1
    # The failed rows, in input order, renumbered 1..n, each with its own id and columns.
    assert documents(settings.database.url, retry["id"]) == [
        (1, "r2", "doc 2", {"lang": "l2"}),
        (2, "r9", "doc 9", {"lang": "l9"}),
        (3, "r17", "doc 17", {"lang": "l17"}),
    ]
    assert [c[2] for c in chunk_rows(settings, retry["id"])] == ["queued"]
    # The original is untouched; the retry's results carry the original rows' ids.
    assert job_view(client, api_key, job_id)["counts"] == original["counts"]
    work(settings, retry["id"], fail=set())
    assert [r["id"] for r in results(client, api_key, retry["id"])] == ["r2", "r9", "r17"]
    listed = {
        j["id"]: j["retry_of"] for j in client.get("/v1/jobs", headers=auth(api_key)).json()["data"]
    }
    assert listed == {job_id: None, retry["id"]: job_id}


def test_a_retry_of_a_job_without_ids_keeps_the_original_row_numbers_as_ids(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text\n" + "".join(f"doc {i}\n" for i in range(1, 11))
    job_id = submit(client, api_key, body, model=model_name, chunk_size=8).json()["id"]
    work(settings, job_id, fail={4, 10})
    failed_ids = [r["id"] for r in results(client, api_key, job_id) if r["error"]]
    assert failed_ids == ["4", "10"]

    retry = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(api_key)).json()
    work(settings, retry["id"], fail=set())
    assert [r["id"] for r in results(client, api_key, retry["id"])] == failed_ids


def test_retry_of_an_unfinished_job_is_409(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, csv_with_ids(3), model=model_name).json()["id"]
    queued = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(api_key))
    assert queued.status_code == 409 and "queued" in queued.json()["error"]["message"]
    lease = make_store(settings).claim(chunk_rows(settings, job_id)[0][0], "w").lease
    assert lease is not None
    make_store(settings).write(lease, [RowResult(idx=1, error="boom")])  # a failed row already
    running = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(api_key))
    assert running.status_code == 409 and running.json()["error"]["code"] == "conflict"
    assert "running" in running.json()["error"]["message"]
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(api_key)).json()["data"]] == [
        job_id
    ]


def test_retry_with_no_failed_row_is_409_and_cancelled_rows_need_asking(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text\n" + "".join(f"doc {i}\n" for i in range(1, 17))
    clean = submit(client, api_key, body, model=model_name, chunk_size=8).json()["id"]
    work(settings, clean, fail=set())
    none = client.post(f"/v1/jobs/{clean}/retry", headers=auth(api_key))
    assert none.status_code == 409 and "no failed rows" in none.json()["error"]["message"]

    # One chunk ran (row 3 failed); the job was cancelled before the second one started.
    job_id = submit(client, api_key, body, model=model_name, chunk_size=8).json()["id"]
    work(settings, job_id, fail={3}, chunks=1)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).status_code == 200
    assert job_view(client, api_key, job_id)["counts"]["cancelled"] == 8

    failed_only = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(api_key)).json()
    assert [d[1] for d in documents(settings.database.url, failed_only["id"])] == ["3"]
    with_cancelled = client.post(
        f"/v1/jobs/{job_id}/retry", headers=auth(api_key), json={"include_cancelled": True}
    ).json()
    assert [d[1] for d in documents(settings.database.url, with_cancelled["id"])] == [
        str(i) for i in (3, *range(9, 17))
    ]
    assert with_cancelled["counts"]["total"] == 9 and with_cancelled["chunks"] == 2

    # A cancelled job whose only unfinished rows were cancelled: the message says how.
    only_cancelled = submit(client, api_key, body, model=model_name, chunk_size=8).json()["id"]
    client.post(f"/v1/jobs/{only_cancelled}/cancel", headers=auth(api_key))
    hint = client.post(f"/v1/jobs/{only_cancelled}/retry", headers=auth(api_key))
    assert hint.status_code == 409 and "include_cancelled" in hint.json()["error"]["message"]
    bad = client.post(
        f"/v1/jobs/{only_cancelled}/retry", headers=auth(api_key), json={"everything": True}
    )
    assert bad.status_code == 422


def test_retry_with_an_idempotency_key_makes_one_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, csv_with_ids(3), model=model_name).json()["id"]
    work(settings, job_id, fail={1})
    headers = {**auth(api_key), "Idempotency-Key": f"retry-{job_id}"}
    first = client.post(f"/v1/jobs/{job_id}/retry", headers=headers)
    again = client.post(f"/v1/jobs/{job_id}/retry", headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = client.post(
        f"/v1/jobs/{job_id}/retry", headers=headers, json={"include_cancelled": True}
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    retries = [
        j for j in client.get("/v1/jobs", headers=auth(api_key)).json()["data"] if j["retry_of"]
    ]
    assert len(retries) == 1


def test_a_retry_counts_against_the_tenants_quotas(
    client: TestClient, settings: Settings, model_name: str
) -> None:
    """A retry is a job like any other: past the tenant's open-jobs quota it is a 429, and
    deleting the open job (cancelled on the way) frees the quota again."""
    from service.store.quotas import set_quotas

    tenant = f"quota-{uuid.uuid4().hex[:6]}"
    with session_scope(settings.database.url) as session:
        key = create_key(session, tenant)
        set_quotas(session, tenant, {"running_jobs": 1})
    done = submit(client, key, csv_with_ids(3), model=model_name).json()["id"]
    work(settings, done, fail={2})
    still_open = submit(client, key, csv_with_ids(3), model=model_name).json()["id"]

    refused = client.post(f"/v1/jobs/{done}/retry", headers=auth(key))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["quota"] == "running_jobs"
    assert client.delete(f"/v1/jobs/{still_open}", headers=auth(key)).status_code == 200
    retried = client.post(f"/v1/jobs/{done}/retry", headers=auth(key))
    assert retried.status_code == 202 and retried.json()["counts"]["total"] == 1

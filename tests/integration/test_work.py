"""The worker side of the data model against real Postgres and Redis: leases, idempotent
results, finalization, and the reconciler's recovery of lost and stuck work."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.db import get_engine
from service.queue import chunk_ids_in_broker, make_celery, queue_for_model
from service.settings import Settings
from service.work import RowResult, claim_chunk, close_chunk, pending_documents, write_results
from tests.conftest import auth
from tests.helpers import pg, submit
from workers.reconciler import reconcile


def _chunks(settings: Settings, job_id: str) -> list[Any]:
    with pg(settings.database_url) as conn:
        return conn.execute(
            "SELECT id, seq, state, attempts, worker, enqueued_at FROM chunks WHERE job_id = %s "
            "ORDER BY seq",
            (job_id,),
        ).fetchall()


def _job(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json())


def test_lease_admits_one_runner_and_done_is_a_no_op(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\nc\n", model=model_name, chunk_size=2).json()["id"]
    first, _second = _chunks(settings, job_id)
    db = get_engine(settings.database_url)
    with db.begin() as conn:
        claim = claim_chunk(conn, first[0], "w1", 30)
    assert claim.reason == "leased" and claim.lease is not None
    assert claim.lease.attempts == 1 and (claim.lease.start_idx, claim.lease.end_idx) == (1, 3)
    assert _job(client, api_key, job_id)["status"] == "running"
    with db.begin() as conn:  # a duplicate delivery while the lease is live
        assert claim_chunk(conn, first[0], "w2", 30).reason == "busy"
        docs = pending_documents(conn, claim.lease)
        assert [d.text for d in docs] == ["a", "b"]
        write_results(conn, claim.lease.job_id, [RowResult(idx=1, output="A")])
        # A re-run only sees what has no result yet.
        assert [d.idx for d in pending_documents(conn, claim.lease)] == [2]
        write_results(conn, claim.lease.job_id, [RowResult(idx=2, output="B")])
        assert close_chunk(conn, first[0], claim.lease.job_id, "done") is None  # chunk 2 open
        assert claim_chunk(conn, first[0], "w2", 30).reason == "done"


def test_expired_lease_can_be_taken_over(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    (chunk,) = _chunks(settings, job_id)
    db = get_engine(settings.database_url)
    with db.begin() as conn:
        assert claim_chunk(conn, chunk[0], "dead-worker", 30).reason == "leased"
        conn.execute(
            text("UPDATE chunks SET lease_expires_at = now() - interval '1 second' WHERE id = :i"),
            {"i": chunk[0]},
        )
        again = claim_chunk(conn, chunk[0], "w2", 30)
    assert again.reason == "leased" and again.lease is not None and again.lease.attempts == 2


def test_results_are_idempotent_and_counters_move_once(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    (chunk,) = _chunks(settings, job_id)
    db = get_engine(settings.database_url)
    rows = [
        RowResult(idx=1, output="x", prompt_tokens=3, completion_tokens=2),
        RowResult(idx=2, error="empty text"),
    ]
    with db.begin() as conn:
        lease = claim_chunk(conn, chunk[0], "w", 30).lease
        assert lease is not None
        write_results(conn, lease.job_id, rows)
        write_results(conn, lease.job_id, rows)  # a redelivered chunk writes again
        assert close_chunk(conn, chunk[0], lease.job_id, "done") == "completed"
    job = _job(client, api_key, job_id)
    assert job["counts"] == {"total": 2, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert job["tokens"] == {"prompt": 3, "completion": 2}
    assert job["status"] == "completed" and job["finished_at"] is not None
    with pg(settings.database_url) as conn:
        n = conn.execute("SELECT count(*) FROM results WHERE job_id = %s", (job_id,)).fetchone()
    assert n is not None and n[0] == 2


def test_failed_chunk_turns_unfinished_rows_into_errors(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\nc\n", model=model_name).json()["id"]
    (chunk,) = _chunks(settings, job_id)
    db = get_engine(settings.database_url)
    with db.begin() as conn:
        lease = claim_chunk(conn, chunk[0], "w", 30).lease
        assert lease is not None
        write_results(conn, lease.job_id, [RowResult(idx=1, output="ok")])
        status = close_chunk(conn, chunk[0], lease.job_id, "failed", "engine died twice")
    assert status == "completed"  # completed with failed rows, as a batch API does
    job = _job(client, api_key, job_id)
    assert job["counts"] == {"total": 3, "succeeded": 1, "failed": 2, "cancelled": 0}
    body = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)).text
    errors = [json.loads(line)["error"] for line in body.splitlines()]
    assert errors == [None, "engine died twice", "engine died twice"]


def test_all_rows_failed_fails_the_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    (chunk,) = _chunks(settings, job_id)
    with get_engine(settings.database_url).begin() as conn:
        lease = claim_chunk(conn, chunk[0], "w", 30).lease
        assert lease is not None
        assert close_chunk(conn, chunk[0], lease.job_id, "failed", "boom") == "failed"
    job = _job(client, api_key, job_id)
    assert job["status"] == "failed" and "all 1 documents failed" in job["error"]


def test_reconciler_requeues_expired_leases_then_gives_up(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,  # type: ignore[type-arg]
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    (chunk,) = _chunks(settings, job_id)
    queue = queue_for_model(model_name)
    redis_client.delete(queue)
    db = get_engine(settings.database_url)
    app = make_celery(settings)
    s = settings.model_copy(update={"max_attempts": 2})

    def lease_and_die() -> None:
        with db.begin() as conn:
            assert claim_chunk(conn, chunk[0], "killed-worker", 30).reason == "leased"
            conn.execute(
                text("UPDATE chunks SET lease_expires_at = now() - interval '1 s' WHERE id = :i"),
                {"i": chunk[0]},
            )

    lease_and_die()
    report = reconcile(db, app, s)  # (other tests' leftovers may be reconciled too)
    assert report.requeued >= 1 and str(chunk[0]) in report.resent_ids
    assert _chunks(settings, job_id)[0][2] == "queued"
    assert chunk_ids_in_broker(redis_client, [queue]) == {str(chunk[0])}

    lease_and_die()  # second attempt dies too: out of attempts
    report = reconcile(db, app, s)
    assert report.failed >= 1
    job = _job(client, api_key, job_id)
    assert job["status"] == "failed" and job["counts"]["failed"] == 2
    body = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)).text
    assert "gave up after 2 attempts (worker killed-worker lost the lease)" in body
    app.close()


def test_reconciler_resends_lost_messages_only(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,  # type: ignore[type-arg]
) -> None:
    job_id = submit(client, api_key, "text\na\nb\nc\n", model=model_name, chunk_size=1).json()["id"]
    queue = queue_for_model(model_name)
    chunks = _chunks(settings, job_id)
    assert redis_client.llen(queue) == 3
    db = get_engine(settings.database_url)
    app = make_celery(settings)
    s = settings.model_copy(update={"requeue_after_s": 0})
    ours = {str(c[0]) for c in chunks}
    # Messages still in Redis: nothing of ours to do.
    assert not ours & set(reconcile(db, app, s).resent_ids)
    # Redis loses everything (FLUSHALL, restart without persistence): all three come back.
    redis_client.delete(queue)
    report = reconcile(db, app, s)
    assert ours <= set(report.resent_ids)
    assert chunk_ids_in_broker(redis_client, [queue]) == ours
    assert redis_client.llen(queue) == 3
    app.close()


def test_reconciler_resends_a_delivery_to_a_dead_worker(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,  # type: ignore[type-arg]
) -> None:
    """A message delivered (unacked) long ago whose chunk was never claimed went to a worker
    that died before claiming it; a recent delivery is left alone."""
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    (chunk,) = _chunks(settings, job_id)
    queue = queue_for_model(model_name)
    raw = redis_client.lpop(queue)
    assert raw is not None
    tag = f"tag-{uuid.uuid4().hex}"
    redis_client.hset("unacked", tag, json.dumps([json.loads(raw), "", queue]))
    db = get_engine(settings.database_url)
    app = make_celery(settings)
    s = settings.model_copy(update={"requeue_after_s": 30})
    with pg(settings.database_url) as conn:
        conn.execute(
            "UPDATE chunks SET enqueued_at = now() - interval '1 minute' WHERE id = %s", (chunk[0],)
        )
    try:
        redis_client.zadd("unacked_index", {tag: time.time() - 5})  # delivered 5 s ago
        assert str(chunk[0]) not in reconcile(db, app, s).resent_ids
        redis_client.zadd("unacked_index", {tag: time.time() - 300})  # 5 minutes ago
        assert str(chunk[0]) in reconcile(db, app, s).resent_ids
        assert redis_client.llen(queue) == 1
    finally:
        redis_client.hdel("unacked", tag)
        redis_client.zrem("unacked_index", tag)
        app.close()


def test_cancelled_job_claims_close_the_chunk(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name, chunk_size=1).json()["id"]
    first, second = _chunks(settings, job_id)
    db = get_engine(settings.database_url)
    with db.begin() as conn:
        lease = claim_chunk(conn, first[0], "w", 30).lease
        assert lease is not None
    job = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).json()
    assert job["status"] == "cancelling" and job["counts"]["cancelled"] == 1
    with db.begin() as conn:
        assert claim_chunk(conn, second[0], "w", 30).reason == "cancelled"
        assert close_chunk(conn, first[0], uuid.UUID(job_id), "cancelled") == "cancelled"
    job = _job(client, api_key, job_id)
    assert job["status"] == "cancelled"
    assert job["counts"] == {"total": 2, "succeeded": 0, "failed": 0, "cancelled": 2}

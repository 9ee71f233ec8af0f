"""The reconciler against real Postgres and Redis: dead leases expire, lost messages come back,
a message still waiting is never doubled."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis
from fastapi.testclient import TestClient

from service.contract import make_celery, queue_for_model
from service.dispatcher import dispatch
from service.settings import Settings
from service.store.chunks import ClaimOutcome, PgChunkStore
from tests.support.helpers import (
    auth,
    chunk_rows,
    expire_lease,
    job_view,
    override,
    pg,
    submit,
    wait_enqueued,
)
from workers.ops.broker import chunk_ids_in_broker
from workers.ops.reconciler import reconcile


def make_store(settings: Settings) -> PgChunkStore:
    return PgChunkStore.from_settings(settings)


def test_reconciler_requeues_expired_leases_then_gives_up(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    wait_enqueued(settings, job_id, 1)  # the submit pool sends after the 202
    (chunk,) = chunk_rows(settings, job_id)
    queue = queue_for_model(model_name)
    redis_client.delete(queue)
    app = make_celery(settings)
    s = override(settings, worker={"max_attempts": 2})
    store = make_store(s)

    def lease_and_die() -> None:
        assert store.claim(chunk[0], "killed-worker").outcome == ClaimOutcome.LEASED
        expire_lease(settings, chunk[0])

    lease_and_die()
    report = reconcile(store, app, s)  # (other tests' leftovers may be reconciled too)
    # Waiting again, and released at once by the pass's dispatcher (this model has room).
    assert report.requeued >= 1 and str(chunk[0]) in report.released_ids
    assert chunk_rows(settings, job_id)[0][2] == "queued"
    assert chunk_ids_in_broker(redis_client, [queue]) == {str(chunk[0])}

    lease_and_die()  # second attempt dies too: out of attempts
    report = reconcile(store, app, s)
    assert report.failed >= 1
    job = job_view(client, api_key, job_id)
    assert job["status"] == "failed" and job["counts"]["failed"] == 2
    body = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)).text
    assert "gave up after 2 attempts (worker killed-worker lost the lease)" in body
    app.close()


def test_reconciler_resends_lost_messages_only(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
) -> None:
    job_id = submit(client, api_key, "text\na\nb\nc\n", model=model_name, chunk_size=1).json()["id"]
    wait_enqueued(settings, job_id, 3)
    queue = queue_for_model(model_name)
    chunks = chunk_rows(settings, job_id)
    assert redis_client.llen(queue) == 3
    app = make_celery(settings)
    s = override(settings, worker={"requeue_after_s": 0})
    store = make_store(s)
    ours = {str(c[0]) for c in chunks}
    # Messages still in Redis: nothing of ours to do.
    assert not ours & set(reconcile(store, app, s).resent_ids)
    # Redis loses everything (FLUSHALL, restart without persistence): all three come back.
    redis_client.delete(queue)
    report = reconcile(store, app, s)
    assert ours <= set(report.resent_ids)
    assert chunk_ids_in_broker(redis_client, [queue]) == ours
    assert redis_client.llen(queue) == 3
    app.close()


def lost_delivery(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
    delivered_s_ago: float,
) -> tuple[uuid.UUID, str, str]:
    """A one-chunk job whose message was delivered (unacked) ``delivered_s_ago`` and whose chunk
    was never claimed, released a minute ago: (chunk id, queue, unacked tag)."""
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    wait_enqueued(settings, job_id, 1)
    (chunk,) = chunk_rows(settings, job_id)
    queue = queue_for_model(model_name)
    raw = redis_client.lpop(queue)
    assert raw is not None
    tag = f"tag-{uuid.uuid4().hex}"
    redis_client.hset("unacked", tag, json.dumps([json.loads(raw), "", queue]))
    redis_client.zadd("unacked_index", {tag: time.time() - delivered_s_ago})
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE chunks SET enqueued_at = now() - interval '1 minute' WHERE id = %s", (chunk[0],)
        )
    return chunk[0], queue, tag


def test_reconciler_resends_a_delivery_to_a_dead_worker(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
) -> None:
    """A message delivered (unacked) long ago whose chunk was never claimed went to a worker
    that died before claiming it; a recent delivery is left alone.

    The warm workers of the test session reconcile the same database every 2 s (their
    ``requeue_after_s`` is 5): the recent delivery is fresh for them too, and the old one may
    be re-sent by one of them instead of this pass, but only once in all."""
    chunk_id, queue, tag = lost_delivery(
        client, api_key, settings, model_name, redis_client, delivered_s_ago=0
    )
    app = make_celery(settings)
    s = override(settings, worker={"requeue_after_s": 30})
    store = make_store(s)
    try:
        assert str(chunk_id) not in reconcile(store, app, s).resent_ids
        assert redis_client.llen(queue) == 0
        redis_client.zadd("unacked_index", {tag: time.time() - 300})  # 5 minutes ago
        reconcile(store, app, s)  # this pass re-sends it, or a session worker's did just before
        with pg(settings.database.url) as conn:
            row = conn.execute(
                "SELECT enqueued_at > now() - interval '20 s' FROM chunks WHERE id = %s",
                (chunk_id,),
            ).fetchone()
        assert row is not None and row[0], "the re-sent chunk's wait starts again"
        assert chunk_ids_in_broker(redis_client, [queue]) == {str(chunk_id)}
        assert redis_client.llen(queue) == 1, "re-sent once"
    finally:
        redis_client.hdel("unacked", tag)
        redis_client.zrem("unacked_index", tag)
        app.close()


def test_a_lost_message_is_resent_once_however_many_passes_run_at_once(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
) -> None:
    """Every worker reconciles: passes that find the same lost message at once send it once."""
    chunk_id, queue, tag = lost_delivery(
        client, api_key, settings, model_name, redis_client, delivered_s_ago=300
    )
    s = override(settings, worker={"requeue_after_s": 30})
    apps = [make_celery(s) for _ in range(6)]
    try:
        with ThreadPoolExecutor(6) as pool:
            reports = list(pool.map(lambda app: reconcile(make_store(s), app, s), apps))
        resent = [cid for r in reports for cid in r.resent_ids if cid == str(chunk_id)]
        assert len(resent) <= 1
        assert redis_client.llen(queue) == 1
        assert chunk_ids_in_broker(redis_client, [queue]) == {str(chunk_id)}
    finally:
        redis_client.hdel("unacked", tag)
        redis_client.zrem("unacked_index", tag)
        for app in apps:
            app.close()


def test_a_waiting_chunk_is_released_once_however_many_passes_run_at_once(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
) -> None:
    """The submitter's dispatch, workers' dispatches and reconciler passes run at any time in
    any process: a waiting chunk gets exactly one message however many race for it."""
    job_id = submit(client, api_key, "text\n" + "x\n" * 24, model=model_name, chunk_size=1).json()[
        "id"
    ]
    wait_enqueued(settings, job_id, settings.dispatch.ahead)  # no worker: `ahead` released
    queue = queue_for_model(model_name)
    redis_client.delete(queue)
    with pg(settings.database.url) as conn:  # all waiting again, as before any pass
        conn.execute("UPDATE chunks SET enqueued_at = NULL WHERE job_id = %s", (job_id,))
    s = override(settings, dispatch={"ahead": 30})
    apps = [make_celery(s) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(dispatch, make_store(s), app, s, [model_name]) for app in apps * 3
            ]
            released = [cid for f in futures for cid in f.result().chunk_ids]
        ours = {str(c[0]) for c in chunk_rows(settings, job_id)}
        # Each at most once by these passes; a reconciler of another worker in the test session
        # may take some first (it dispatches every model with waiting chunks).
        assert len(released) == len(set(released)) and set(released) <= ours
        bodies = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)]
        assert len(bodies) == 24 and chunk_ids_in_broker(redis_client, [queue]) == ours
    finally:
        for app in apps:
            app.close()


def test_reconciler_closes_the_queued_chunks_of_a_cancelling_job(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
) -> None:
    """A cancelling job whose queued chunk's message was lost: no claim will ever come to close
    that chunk, and lost messages are re-sent for open jobs only, so without the reconciler the
    job stays ``cancelling`` forever. (Today's cancel closes queued chunks itself; jobs cancelled
    by an earlier version, whose cancel left them to their claims, are in this state.)"""
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name, chunk_size=1).json()["id"]
    wait_enqueued(settings, job_id, 2)
    first, second = chunk_rows(settings, job_id)
    queue = queue_for_model(model_name)
    redis_client.delete(queue)  # every message lost
    app = make_celery(settings)
    s = override(settings, worker={"requeue_after_s": 0})
    store = make_store(s)
    assert store.claim(first[0], "worker-that-dies").outcome == ClaimOutcome.LEASED
    with pg(settings.database.url) as conn:  # the earlier cancel: status only
        conn.execute("UPDATE jobs SET status = 'cancelling' WHERE id = %s", (job_id,))
    try:
        report = reconcile(store, app, s)
        assert report.cancelled >= 1 and str(second[0]) not in report.resent_ids
        assert [c[2] for c in chunk_rows(settings, job_id)] == ["leased", "cancelled"]
        assert job_view(client, api_key, job_id)["status"] == "cancelling"  # one still runs
        expire_lease(settings, first[0])  # its worker died
        reconcile(store, app, s)
        job = job_view(client, api_key, job_id)
        assert job["status"] == "cancelled" and job["finished_at"] is not None
        assert job["counts"] == {"total": 2, "succeeded": 0, "failed": 0, "cancelled": 2}
        # Nothing of the cancelled job was re-sent (other tests' leftovers may have been).
        assert not {str(first[0]), str(second[0])} & chunk_ids_in_broker(redis_client, [queue])
    finally:
        app.close()

"""The dispatcher against real PostgreSQL and Redis: how many chunks it releases (live workers'
slots plus ``ahead``), to whom first (the tenant with the fewest out, interactive before bulk),
and that Redis holds no more than that."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from service.contract import make_celery, queue_for_model, queues_for_model
from service.dispatcher import dispatch
from service.settings import Settings
from service.store.chunks import ClaimOutcome, PgChunkStore, RowResult
from service.store.engine import get_engine, session_scope
from service.store.keys import create_key
from service.store.registry import register_worker, unregister_worker
from service.store.states import ChunkState
from tests.support.helpers import pg, submit, wait_enqueued


@pytest.fixture()
def store(settings: Settings) -> PgChunkStore:
    return PgChunkStore.from_settings(settings)


@pytest.fixture()
def celery(settings: Settings) -> Iterator[object]:
    app = make_celery(settings)
    yield app
    app.close()


def released(settings: Settings, job_id: str) -> list[int]:
    """The seqs of the job's chunks that were released (their message sent)."""
    with pg(settings.database.url) as conn:
        rows = conn.execute(
            "SELECT seq FROM chunks WHERE job_id = %s AND enqueued_at IS NOT NULL ORDER BY seq",
            (job_id,),
        ).fetchall()
    return [r[0] for r in rows]


def in_redis(redis_client: redis.Redis, model: str) -> int:
    return sum(int(redis_client.llen(q)) for q in queues_for_model(model))


def finish(store: PgChunkStore, settings: Settings, job_id: str, seq: int) -> None:
    """A worker claims the released chunk ``seq``, writes its rows and closes it."""
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT id, start_idx, end_idx FROM chunks WHERE job_id = %s AND seq = %s",
            (job_id, seq),
        ).fetchone()
    assert row is not None
    claim = store.claim(row[0], "w@test")
    assert claim.outcome == ClaimOutcome.LEASED and claim.lease is not None
    store.write(claim.lease, [RowResult(idx=i, output="ok") for i in range(row[1], row[2])])
    store.close(claim.lease, ChunkState.DONE)


def second_key(settings: Settings) -> str:
    with session_scope(settings.database.url) as session:
        return create_key(session, f"tenant-{uuid.uuid4().hex[:8]}")


def test_it_keeps_the_live_workers_slots_plus_ahead_released_and_no_more(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    redis_client: redis.Redis,
    store: PgChunkStore,
    celery: object,
) -> None:
    ahead = settings.dispatch.ahead
    job = submit(client, api_key, "text\n" + "x\n" * 20, model=model_name, chunk_size=1).json()
    assert job["chunks"] == 20
    wait_enqueued(settings, job["id"], ahead)  # no worker serves the model: `ahead` only
    assert released(settings, job["id"]) == list(range(ahead))
    assert in_redis(redis_client, model_name) == ahead
    assert dispatch(store, celery, settings, [model_name]).total == 0  # nothing has changed

    name = f"w-{uuid.uuid4().hex[:6]}@test"
    with get_engine(settings.database.url).begin() as conn:
        register_worker(conn, name, model_name, job["queue"], "cpu", 1, True, slots=3)
    try:
        assert dispatch(store, celery, settings, [model_name]).total == 3  # the worker's slots
        assert in_redis(redis_client, model_name) == ahead + 3
        # A claim moves a chunk from released to running: still out, nothing more released.
        redis_client.rpop(queue_for_model(model_name))  # the worker took its message
        with pg(settings.database.url) as conn:
            first = conn.execute(
                "SELECT id FROM chunks WHERE job_id = %s AND seq = 0", (job["id"],)
            ).fetchone()
        assert first is not None
        lease = store.claim(first[0], "w@test").lease
        assert lease is not None
        assert dispatch(store, celery, settings, [model_name]).total == 0
        # Its close frees a slot: exactly one more, the next in order.
        store.write(lease, [RowResult(idx=1, output="ok")])
        store.close(lease, ChunkState.DONE)
        report = dispatch(store, celery, settings, [model_name])
        assert report.total == 1
        assert released(settings, job["id"]) == list(range(ahead + 4))
        assert in_redis(redis_client, model_name) == ahead + 3
    finally:
        with get_engine(settings.database.url).begin() as conn:
            unregister_worker(conn, name)


def test_another_tenants_small_job_goes_before_the_rest_of_a_large_one(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    store: PgChunkStore,
    celery: object,
) -> None:
    """The large job filled the model's budget. As its chunks finish, the small job's chunks
    are released next, not after the large job's thirty."""
    ahead = settings.dispatch.ahead
    big = submit(client, api_key, "text\n" + "a\n" * 30, model=model_name, chunk_size=1).json()
    wait_enqueued(settings, big["id"], ahead)
    other = second_key(settings)
    small = submit(client, other, "text\nb\nc\n", model=model_name, chunk_size=1).json()
    assert small["status"] == "queued" and small["chunks"] == 2
    assert released(settings, small["id"]) == []  # the budget is full: it waits

    finish(store, settings, big["id"], 0)
    dispatch(store, celery, settings, [model_name])
    assert released(settings, small["id"]) == [0]
    assert released(settings, big["id"]) == list(range(ahead))
    finish(store, settings, big["id"], 1)
    dispatch(store, celery, settings, [model_name])
    assert released(settings, small["id"]) == [0, 1]
    # The small job is all out; the large one has the model again.
    finish(store, settings, big["id"], 2)
    dispatch(store, celery, settings, [model_name])
    assert released(settings, big["id"]) == list(range(ahead + 1))


def test_interactive_chunks_are_released_before_bulk_ones(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    store: PgChunkStore,
    celery: object,
) -> None:
    ahead = settings.dispatch.ahead
    bulk = submit(
        client, api_key, "text\n" + "a\n" * 10, model=model_name, chunk_size=1, priority="bulk"
    ).json()
    wait_enqueued(settings, bulk["id"], ahead)
    urgent = submit(client, api_key, "text\nb\n", model=model_name, chunk_size=1).json()
    assert released(settings, urgent["id"]) == []
    finish(store, settings, bulk["id"], 0)
    dispatch(store, celery, settings, [model_name])
    assert released(settings, urgent["id"]) == [0]
    assert released(settings, bulk["id"]) == list(range(ahead))


def test_the_minimum_chunk_size_is_a_422_naming_both_limits(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    from service.api.app import create_app
    from tests.support.helpers import override

    strict = override(settings, jobs={"min_chunk_size": 8}, api={"submit_processes": 0})
    with TestClient(create_app(strict)) as c:
        resp = submit(c, api_key, "text\na\n", model=model_name, chunk_size=4)
        ok = submit(c, api_key, "text\na\n", model=model_name, chunk_size=8)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["field"] == "chunk_size" and "between 8 and" in err["message"]
    assert "DOCQUEUE_MIN_CHUNK_SIZE" in err["message"]
    assert ok.status_code == 202, ok.text

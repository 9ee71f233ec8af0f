"""The chunk runner's fencing against real PostgreSQL: a runner whose lease was taken over while
its engine was busy (a pause, a slow GPU) stops without touching the chunk, and every document
ends with exactly one result, the new owner's.

The engine is the project's zero-cost bench engine, held back by a gate so the first runner is
mid-chunk when its lease goes: the stand-in for a slow GPU, which this machine does not have.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from fastapi.testclient import TestClient

from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from tests.support.helpers import chunk_rows, expire_lease, job_view, override, pg, submit
from workers.engines.base import Batch, GenRequest
from workers.engines.bench import BenchEngine
from workers.runner import POLL_S, process_chunk
from workers.runtime import Runtime


class GatedEngine(BenchEngine):
    """The bench engine whose batches finish only once ``gate`` is set."""

    def __init__(self, model: str, output: str) -> None:
        super().__init__(model)
        self.gate = threading.Event()
        self.submitted = threading.Event()
        self.output = output

    def submit(self, requests: list[GenRequest]) -> Batch:
        done = super().submit(requests)
        for r in done.results:
            assert r is not None
            r.text = self.output
        batch = Batch(len(requests))
        self.submitted.set()

        def finish() -> None:
            self.gate.wait(60)
            for i, r in enumerate(done.results):
                assert r is not None
                batch.set(i, r)

        threading.Thread(target=finish, daemon=True).start()
        return batch


def runtime(settings: Settings, model: str, name: str, engine: BenchEngine) -> Runtime:
    db = get_engine(settings.database.url)
    return Runtime(
        settings=settings,
        model=model,
        name=name,
        engine=engine,
        db=db,
        store=PgChunkStore.from_settings(settings, db),
    )


def run_in_thread(rt: Runtime, chunk_id: uuid.UUID) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(process_chunk(rt, chunk_id)))
    thread.start()
    return thread, outcome


def results(settings: Settings, job_id: str) -> list[tuple[Any, ...]]:
    with pg(settings.database.url) as conn:
        return conn.execute(
            "SELECT idx, output, error FROM results WHERE job_id = %s ORDER BY idx", (job_id,)
        ).fetchall()


def test_a_runner_whose_lease_expired_by_force_writes_nothing_and_stops(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text\n" + "".join(f"doc {i}\n" for i in range(10))
    job_id = submit(client, api_key, body, model=model_name, task="generate").json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    s = override(settings, worker={"sub_batch_size": 4})

    gated = GatedEngine(model_name, "stale")
    stale = runtime(s, model_name, "stale-worker", gated)
    thread, stale_outcome = run_in_thread(stale, chunk[0])
    assert gated.submitted.wait(30)
    # The reconciler expires the lease (the worker stopped renewing it) and a new worker takes
    # the chunk and finishes it, while the first one's engine is still busy.
    expire_lease(settings, chunk[0])
    assert chunk[0] in {c.chunk_id for c in stale.store.expire().requeued}
    fresh = runtime(s, model_name, "successor", BenchEngine(model_name))
    assert process_chunk(fresh, chunk[0]) == "done"

    gated.gate.set()  # its results arrive, too late
    thread.join(30)
    assert stale_outcome == ["lease_lost"]
    rows = results(settings, job_id)
    assert [r[0] for r in rows] == list(range(1, 11))  # exactly one result per document
    assert {r[1] for r in rows} == {"ok"} and {r[2] for r in rows} == {None}  # the successor's
    job = job_view(client, api_key, job_id)
    assert job["status"] == "completed"
    assert job["counts"] == {"total": 10, "succeeded": 10, "failed": 0, "cancelled": 0}


def test_the_heartbeat_notices_a_lease_taken_over_and_the_runner_stops_at_once(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text\n" + "".join(f"doc {i}\n" for i in range(6))
    job_id = submit(client, api_key, body, model=model_name, task="generate").json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    short = override(settings, worker={"lease_s": 2})

    gated = GatedEngine(model_name, "stale")
    paused = runtime(short, model_name, "paused-worker", gated)
    thread, paused_outcome = run_in_thread(paused, chunk[0])
    assert gated.submitted.wait(30)
    time.sleep(2.5)  # paused past lease_s: no renewal went out
    fresh = runtime(settings, model_name, "successor", BenchEngine(model_name))
    assert process_chunk(fresh, chunk[0]) == "done"

    paused.beat_once()  # it wakes up: the renewal finds the lease gone
    (lost,) = paused.lost_leases  # the lease's token
    assert paused.leases[lost].chunk_id == chunk[0]
    started = time.monotonic()
    thread.join(POLL_S + 5)  # the runner stops at its next poll, its engine still busy
    assert not thread.is_alive() and paused_outcome == ["lease_lost"]
    assert time.monotonic() - started < POLL_S + 5
    assert not paused.leases  # dropped
    gated.gate.set()

    rows = results(settings, job_id)
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, "ok", None) for i in range(1, 7)]
    assert job_view(client, api_key, job_id)["status"] == "completed"

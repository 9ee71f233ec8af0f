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

from service.errors import EngineDeadError
from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from tests.support.helpers import chunk_rows, expire_lease, job_view, override, pg, submit
from workers.engines.base import Batch, GenRequest
from workers.engines.bench import BenchEngine
from workers.runner import POLL_S, EngineStalledError, RetryChunk, process_chunk
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


# --- a hung engine, odd model output ----------------------------------------------------------


def run_catching(rt: Runtime, chunk_id: uuid.UUID) -> tuple[threading.Thread, list[object]]:
    """process_chunk in a thread; its return value or the exception it raised."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(process_chunk(rt, chunk_id))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_until(predicate: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def hang_once(rt: Runtime, chunk_id: uuid.UUID, deadline_s: float) -> object:
    """Runs the chunk on ``rt`` (a hung engine) and beats like its heartbeat thread would;
    what the runner ended with."""
    thread, outcome = run_catching(rt, chunk_id)
    wait_until(lambda: bool(rt.batches))  # submitted; the engine never answers
    rt.beat_once()  # within the deadline: renewed as usual
    assert not rt.stalled_leases
    time.sleep(deadline_s + 0.2)
    rt.beat_once()  # past it: given up
    thread.join(5)  # the runner notices within a wait of 0.5 s
    assert not thread.is_alive(), "the runner kept waiting on a hung engine"
    (result,) = outcome
    return result


def test_a_hung_engine_gives_its_chunk_back_and_the_next_engine_completes_it(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """An engine that is alive but answers nothing would have its lease renewed forever.
    Past progress_deadline_s the heartbeat gives up on it: the runner gives the chunk back as
    an engine failure (its attempt counted; the task restarts the process, as for a dead
    engine), and a worker with a working engine finishes the job."""
    body = "text\n" + "".join(f"doc {i}\n" for i in range(5))
    job_id = submit(client, api_key, body, model=model_name, task="generate").json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    s = override(settings, worker={"progress_deadline_s": 1.0, "sub_batch_size": 2})
    hung = runtime(s, model_name, "hung-worker", BenchEngine(model_name, hang=True))

    result = hang_once(hung, chunk[0], 1.0)
    assert isinstance(result, RetryChunk) and isinstance(result.cause, EngineStalledError)
    assert isinstance(result.cause, EngineDeadError)  # so the task restarts the process
    assert result.countdown_s is not None  # and retries the chunk
    assert not hung.leases and not hung.batches  # dropped
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT state, attempts, error FROM chunks WHERE id = %s", (chunk[0],)
        ).fetchone()
    assert row is not None and row[:2] == ("queued", 1)
    assert "EngineStalledError" in row[2] and "no progress" in row[2]

    fresh = runtime(s, model_name, "fresh-worker", BenchEngine(model_name))
    assert process_chunk(fresh, chunk[0]) == "done"
    job = job_view(client, api_key, job_id)
    assert job["status"] == "completed"
    assert job["counts"] == {"total": 5, "succeeded": 5, "failed": 0, "cancelled": 0}


def test_a_chunk_that_hangs_every_engine_fails_after_max_attempts(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Each hang counts as an attempt, so a chunk that wedges every engine it meets ends
    ``failed`` with the reason instead of going round for ever."""
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name, task="generate").json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    s = override(settings, worker={"progress_deadline_s": 0.5, "max_attempts": 2})
    first = hang_once(
        runtime(s, model_name, "hung-1", BenchEngine(model_name, hang=True)), chunk[0], 0.5
    )
    assert isinstance(first, RetryChunk) and first.countdown_s is not None
    last = hang_once(
        runtime(s, model_name, "hung-2", BenchEngine(model_name, hang=True)), chunk[0], 0.5
    )
    # Closed on its last attempt: no retry, but the task still restarts the process.
    assert isinstance(last, RetryChunk) and last.countdown_s is None
    assert isinstance(last.cause, EngineStalledError)
    job = job_view(client, api_key, job_id)
    assert job["status"] == "failed"
    assert job["counts"] == {"total": 2, "succeeded": 0, "failed": 2, "cancelled": 0}
    assert {r[2].split(";")[0] for r in results(settings, job_id)} == {"gave up after 2 attempts"}


class DripEngine(BenchEngine):
    """The bench engine, slow but alive: one result every ``every_s``."""

    def __init__(self, model: str, every_s: float) -> None:
        super().__init__(model)
        self.every_s = every_s

    def submit(self, requests: list[GenRequest]) -> Batch:
        done = super().submit(requests)
        batch = Batch(len(requests))

        def drip() -> None:
            for i, r in enumerate(done.results):
                time.sleep(self.every_s)
                assert r is not None
                batch.set(i, r)

        threading.Thread(target=drip, daemon=True).start()
        return batch


def test_a_slow_engine_that_keeps_answering_is_not_given_up_on(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """The deadline is on progress, not on the chunk's run time: an engine that answers a
    row every 0.4 s runs a chunk far longer than a 1 s deadline and keeps its lease."""
    body = "text\n" + "".join(f"doc {i}\n" for i in range(8))
    job_id = submit(client, api_key, body, model=model_name, task="generate").json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    s = override(settings, worker={"progress_deadline_s": 1.0, "sub_batch_size": 4})
    rt = runtime(s, model_name, "slow-worker", DripEngine(model_name, 0.4))
    thread, outcome = run_catching(rt, chunk[0])
    while thread.is_alive():
        rt.beat_once()
        assert not rt.stalled_leases
        thread.join(0.3)
    assert outcome == ["done"]
    assert job_view(client, api_key, job_id)["status"] == "completed"


class OddOutputEngine(BenchEngine):
    """The bench engine answering with what a model may emit and PostgreSQL cannot store."""

    def submit(self, requests: list[GenRequest]) -> Batch:
        batch = super().submit(requests)
        for k, r in enumerate(batch.results):
            assert r is not None
            if k % 2:
                r.text, r.error = "", "engine rejected the prompt: \udcff"
            else:
                r.text = "lone \ud800 and nul \x00 and a pair \ud83d\ude00"
        return batch


def test_a_lone_surrogate_or_nul_in_model_output_never_fails_the_write(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Written as U+FFFD (NUL dropped) at once, where the chunk used to fail its write on
    every attempt and end with every row lost."""
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name, task="generate").json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    rt = runtime(settings, model_name, "odd-worker", OddOutputEngine(model_name))
    assert process_chunk(rt, chunk[0]) == "done"
    assert results(settings, job_id) == [
        (1, "lone \ufffd and nul  and a pair \U0001f600", None),
        (2, None, "engine rejected the prompt: \ufffd"),
    ]
    job = job_view(client, api_key, job_id)
    assert job["status"] == "completed"
    assert job["counts"] == {"total": 2, "succeeded": 1, "failed": 1, "cancelled": 0}

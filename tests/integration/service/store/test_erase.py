"""Erasing a job in the chunk state machine (``PgChunkStore.erase``), against real Postgres: a
running job is cancelled and its leases fenced off, rows go at once or in batches, the job row
stays as a tombstone with its counts. Jobs are submitted through the real app."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from service.errors import LeaseLostError, NotFoundError
from service.jobs.lifecycle import purge_rows
from service.settings import Settings
from service.store.chunks import ClaimOutcome, PgChunkStore, RowResult
from service.store.engine import get_engine
from service.store.states import ChunkState, JobStatus
from tests.support.helpers import chunk_rows, count_rows, job_view, override, pg, submit
from workers.ops.retention import purge_expired


def make_store(settings: Settings) -> PgChunkStore:
    return PgChunkStore(get_engine(settings.database.url), lease_s=30, max_attempts=3)


def docs(n: int) -> str:
    return "text\n" + "".join(f"doc {i}\n" for i in range(1, n + 1))


def rows_left(settings: Settings, job_id: str) -> tuple[int, int, int]:
    url = settings.database.url
    return (
        count_rows(url, "documents", job_id),
        count_rows(url, "results", job_id),
        count_rows(url, "chunks", job_id),
    )


def test_erasing_a_running_job_fences_off_its_leased_chunk(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """The holder of a live lease learns it lost the chunk from every call it makes next, and
    none of them writes a row or moves a counter of the tombstone."""
    job_id = submit(client, api_key, docs(20), model=model_name, chunk_size=8).json()["id"]
    first = chunk_rows(settings, job_id)[0]
    store = make_store(settings)
    lease = store.claim(first[0], "w1").lease
    assert lease is not None
    store.write(
        lease, [RowResult(idx=1, output="a", completion_tokens=2), RowResult(idx=2, error="x")]
    )

    erased = store.erase(uuid.UUID(job_id), purge_rows=1000)
    assert (erased.status, erased.already, erased.purged) == (JobStatus.CANCELLED, False, True)

    with pytest.raises(LeaseLostError):
        store.write(lease, [RowResult(idx=3, output="late")])
    with pytest.raises(LeaseLostError):
        store.close(lease, ChunkState.DONE)
    with pytest.raises(LeaseLostError):
        store.release(lease, "engine died")
    assert store.renew([lease]) == {lease.token}
    assert store.claim(first[0], "w2").outcome == ClaimOutcome.MISSING
    assert rows_left(settings, job_id) == (0, 0, 0)
    job = job_view(client, api_key, job_id)
    assert job["status"] == "cancelled" and job["deleted_at"] is not None
    # The rows done before the delete stay counted; the rest count as cancelled.
    assert job["counts"] == {"total": 20, "succeeded": 1, "failed": 1, "cancelled": 18}
    assert job["tokens"]["completion"] == 2 and job["finished_at"] is not None


def test_a_write_queued_behind_the_erase_is_refused(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A runner's write that waits for the job's lock while the erase holds it reads the chunk
    after the erase committed, and is refused: nothing lands on a deleted job."""
    job_id = submit(client, api_key, docs(8), model=model_name, chunk_size=8).json()["id"]
    store = make_store(settings)
    (chunk,) = chunk_rows(settings, job_id)
    lease = store.claim(chunk[0], "w1").lease
    assert lease is not None
    done: dict[str, BaseException | None] = {}

    def run(name: str, call: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                call()
                done[name] = None
            except BaseException as exc:  # the test looks at what it was
                done[name] = exc

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    with pg(settings.database.url) as conn, conn.transaction():
        # Hold the chunk row, so the erase stops inside its transaction holding the job's lock.
        conn.execute("SELECT 1 FROM chunks WHERE id = %s FOR UPDATE", (chunk[0],))
        eraser = run("erase", lambda: store.erase(uuid.UUID(job_id), purge_rows=1000))
        time.sleep(0.5)
        writer = run("write", lambda: store.write(lease, [RowResult(idx=1, output="late")]))
        time.sleep(0.5)
        assert eraser.is_alive() and writer.is_alive()  # the write waits for the erase
    eraser.join(10)
    writer.join(10)
    assert done["erase"] is None
    assert isinstance(done["write"], LeaseLostError)
    assert rows_left(settings, job_id) == (0, 0, 0)
    assert job_view(client, api_key, job_id)["counts"]["succeeded"] == 0


def test_erasing_a_finished_job_keeps_its_counts_and_is_idempotent(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, docs(3), model=model_name, chunk_size=8).json()["id"]
    store = make_store(settings)
    lease = store.claim(chunk_rows(settings, job_id)[0][0], "w").lease
    assert lease is not None
    store.write(lease, [RowResult(idx=i, output="ok", prompt_tokens=5) for i in (1, 2, 3)])
    store.close(lease, ChunkState.DONE)
    before = job_view(client, api_key, job_id)

    first = store.erase(uuid.UUID(job_id), purge_rows=1000)
    again = store.erase(uuid.UUID(job_id), purge_rows=1000)
    assert (first.status, first.already, first.purged) == (JobStatus.COMPLETED, False, True)
    assert (again.already, again.purged, again.deleted_at) == (True, True, first.deleted_at)
    after = job_view(client, api_key, job_id)
    assert after["status"] == "completed" and after["counts"] == before["counts"]
    assert after["tokens"] == before["tokens"] and after["finished_at"] == before["finished_at"]
    assert rows_left(settings, job_id) == (0, 0, 0)
    with pytest.raises(NotFoundError):
        store.erase(uuid.uuid4(), purge_rows=1000)


def test_a_large_job_is_marked_at_once_and_purged_in_batches(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Past ``purge_rows`` the erase only cancels and marks; the rows go in short batches
    (a purge cut short resumes; retention finishes what an API that stopped left)."""
    job_id = submit(client, api_key, docs(20), model=model_name, chunk_size=8).json()["id"]
    store = make_store(settings)
    lease = store.claim(chunk_rows(settings, job_id)[1][0], "w1").lease
    assert lease is not None
    erased = store.erase(uuid.UUID(job_id), purge_rows=19)
    assert (erased.status, erased.purged) == (JobStatus.CANCELLED, False)
    assert [c[2] for c in chunk_rows(settings, job_id)] == ["cancelled"] * 3
    # The chunk rows outlive the erase here: the fence, not their absence, refuses the holder.
    with pytest.raises(LeaseLostError):
        store.write(lease, [RowResult(idx=9, output="late")])
    assert count_rows(settings.database.url, "results", job_id) == 0
    assert rows_left(settings, job_id)[0] == 20
    again = store.erase(uuid.UUID(job_id), purge_rows=19)
    assert (again.already, again.purged) == (True, False)  # the rows are still there

    engine = get_engine(settings.database.url)
    cut = purge_rows(engine, uuid.UUID(job_id), 7, deadline=time.monotonic() - 1)
    assert not cut.complete and rows_left(settings, job_id)[0] == 20
    with pg(settings.database.url) as conn:  # a first batch went before the API stopped
        conn.execute("DELETE FROM documents WHERE job_id = %s AND idx < 8", (job_id,))
    report = purge_expired(engine, override(settings, retention={"batch_rows": 7}))
    # (The pass also finishes other tests' pending purges: count this job's rows, not the pass's.)
    assert job_id in report.job_ids and report.complete
    assert rows_left(settings, job_id) == (0, 0, 0)
    assert store.erase(uuid.UUID(job_id), purge_rows=19).purged
    assert job_view(client, api_key, job_id)["counts"]["cancelled"] == 20

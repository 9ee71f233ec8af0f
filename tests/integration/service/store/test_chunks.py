"""The chunk state machine against real Postgres: leases, fencing, idempotent results,
finalization, cancel and lease expiry. Jobs are submitted through the real app."""

from __future__ import annotations

import json
import threading
import time
import traceback
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import DataError

from service.errors import ConflictError, LeaseLostError, StoreUnavailableError
from service.settings import Settings
from service.store.chunks import ClaimOutcome, PgChunkStore, RowResult
from service.store.engine import get_engine
from service.store.states import ChunkState, JobStatus
from tests.support.helpers import auth, chunk_rows, expire_lease, job_view, pg, put, submit


def make_store(settings: Settings, lease_s: float = 30, max_attempts: int = 3) -> PgChunkStore:
    return PgChunkStore(
        get_engine(settings.database.url), lease_s=lease_s, max_attempts=max_attempts
    )


def test_lease_admits_one_runner_and_done_is_a_no_op(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\nc\n", model=model_name, chunk_size=2).json()["id"]
    first, _second = chunk_rows(settings, job_id)
    store = make_store(settings)
    claim = store.claim(first[0], "w1")
    assert claim.outcome == ClaimOutcome.LEASED and claim.lease is not None
    lease = claim.lease
    assert lease.attempts == 1 and (lease.start_idx, lease.end_idx) == (1, 3)
    assert job_view(client, api_key, job_id)["status"] == "running"
    # A duplicate delivery while the lease is live.
    assert store.claim(first[0], "w2").outcome == ClaimOutcome.BUSY
    assert [d.text for d in store.pending(lease)] == ["a", "b"]
    store.write(lease, [RowResult(idx=1, output="A")])
    # A re-run only sees what has no result yet.
    assert [d.idx for d in store.pending(lease)] == [2]
    store.write(lease, [RowResult(idx=2, output="B")])
    store.close(lease, ChunkState.DONE)
    assert store.job_status(lease.job_id) == JobStatus.RUNNING  # chunk 2 is still open
    assert store.claim(first[0], "w2").outcome == ClaimOutcome.DONE


def test_a_claim_reads_the_rows_left_and_finish_writes_and_closes_at_once(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """The runner's two calls per chunk besides the claim: the claim's documents are those
    with no result yet, and ``finish`` writes the last rows and closes the chunk in one
    transaction (the job finishes with its last chunk)."""
    job_id = submit(client, api_key, "text\na\nb\nc\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    first = store.claim(chunk[0], "w1")
    assert first.lease is not None and [d.text for d in first.docs] == ["a", "b", "c"]
    store.write(first.lease, [RowResult(idx=1, output="A")])
    expire_lease(settings, chunk[0])
    again = store.claim(chunk[0], "w2")  # a re-run: only the rows left
    assert again.lease is not None and [d.idx for d in again.docs] == [2, 3]
    written = store.finish(again.lease, [RowResult(idx=2, output="B"), RowResult(idx=3, error="x")])
    assert (written.succeeded, written.failed) == (1, 1)
    job = job_view(client, api_key, job_id)
    assert job["status"] == "completed"
    assert job["counts"] == {"total": 3, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert store.claim(chunk[0], "w3").outcome == ClaimOutcome.DONE


def test_expired_lease_can_be_taken_over(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    assert store.claim(chunk[0], "dead-worker").outcome == ClaimOutcome.LEASED
    expire_lease(settings, chunk[0])
    again = store.claim(chunk[0], "w2")
    assert again.outcome == ClaimOutcome.LEASED and again.lease is not None
    assert again.lease.attempts == 2


def test_results_are_idempotent_and_counters_move_once(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    rows = [
        RowResult(idx=1, output="x", prompt_tokens=3, completion_tokens=2),
        RowResult(idx=2, error="empty text"),
    ]
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    first = store.write(lease, rows)
    again = store.write(lease, rows)  # a redelivered sub-batch writes again
    assert (first.succeeded, first.failed, again.succeeded, again.failed) == (1, 1, 0, 0)
    store.close(lease, ChunkState.DONE)
    job = job_view(client, api_key, job_id)
    assert job["counts"] == {"total": 2, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert job["tokens"] == {"prompt": 3, "completion": 2}
    assert job["status"] == "completed" and job["finished_at"] is not None
    with pg(settings.database.url) as conn:
        n = conn.execute("SELECT count(*) FROM results WHERE job_id = %s", (job_id,)).fetchone()
    assert n is not None and n[0] == 2


def test_failed_chunk_turns_unfinished_rows_into_errors(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\nc\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    store.write(lease, [RowResult(idx=1, output="ok")])
    store.close(lease, ChunkState.FAILED, "engine died twice")
    job = job_view(client, api_key, job_id)
    assert job["status"] == "completed"  # completed with failed rows, as a batch API does
    assert job["counts"] == {"total": 3, "succeeded": 1, "failed": 2, "cancelled": 0}
    body = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)).text
    errors = [json.loads(line)["error"] for line in body.splitlines()]
    assert errors == [None, "engine died twice", "engine died twice"]


def test_all_rows_failed_fails_the_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    store.close(lease, ChunkState.FAILED, "boom")
    job = job_view(client, api_key, job_id)
    assert job["status"] == "failed" and "all 1 documents failed" in job["error"]


def test_release_requeues_until_the_last_attempt_then_fails_the_rows(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings, max_attempts=2)
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    store.write(lease, [RowResult(idx=1, output="kept")])
    released = store.release(lease, "StoreUnavailableError: database away")
    assert released.requeued and released.attempts == 1
    assert chunk_rows(settings, job_id)[0][2] == "queued"
    second = store.claim(chunk[0], "w2").lease
    assert second is not None and second.attempts == 2
    assert not store.release(second, "EngineDeadError: gone").requeued  # out of attempts
    job = job_view(client, api_key, job_id)
    assert job["counts"] == {"total": 2, "succeeded": 1, "failed": 1, "cancelled": 0}
    body = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)).text
    assert "gave up after 2 attempts; last error: EngineDeadError: gone" in body


def test_cancel_closes_queued_chunks_and_a_claim_of_a_cancelled_job_closes_its_chunk(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name, chunk_size=1).json()["id"]
    first, second = chunk_rows(settings, job_id)
    store = make_store(settings)
    lease = store.claim(first[0], "w").lease
    assert lease is not None
    job = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).json()
    assert job["status"] == "cancelling" and job["counts"]["cancelled"] == 1
    assert store.claim(second[0], "w").outcome == ClaimOutcome.CANCELLED
    assert store.write(lease, []).status == JobStatus.CANCELLING  # the runner notices
    store.close(lease, ChunkState.CANCELLED)
    job = job_view(client, api_key, job_id)
    assert job["status"] == "cancelled"
    assert job["counts"] == {"total": 2, "succeeded": 0, "failed": 0, "cancelled": 2}


# --- fencing ------------------------------------------------------------------------------------


def assert_fenced_out(store: PgChunkStore, stale: Any) -> None:
    """Every transition under a lost lease is refused."""
    with pytest.raises(LeaseLostError):
        store.write(stale, [RowResult(idx=stale.start_idx, output="stale")])
    with pytest.raises(LeaseLostError):
        store.write(stale, [RowResult(idx=stale.start_idx, error="stale failure")])
    with pytest.raises(LeaseLostError):
        store.release(stale, "stale worker gives up")
    with pytest.raises(LeaseLostError):
        store.close(stale, ChunkState.FAILED, "stale worker fails the chunk")
    with pytest.raises(LeaseLostError):
        store.close(stale, ChunkState.DONE)
    with pytest.raises(LeaseLostError):
        store.finish(stale, [RowResult(idx=stale.start_idx, output="stale, closing")])
    with pytest.raises(LeaseLostError):
        store.finish(stale, [])
    assert store.renew([stale]) == {stale.token}


def test_a_worker_paused_past_its_lease_cannot_touch_the_chunk_its_successor_holds(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text\n" + "".join(f"doc {i}\n" for i in range(6))
    job_id = submit(client, api_key, body, model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    short = make_store(settings, lease_s=0.5)
    stale = short.claim(chunk[0], "paused-worker").lease
    assert stale is not None
    time.sleep(1.0)  # the worker pauses (GC, SIGSTOP, a partition) longer than lease_s
    store = make_store(settings)
    new = store.claim(chunk[0], "successor").lease
    assert new is not None and new.attempts == 2 and new.token != stale.token

    assert_fenced_out(store, stale)

    # The stale worker never closed the chunk as failed nor wrote an error row.
    assert [d.idx for d in store.pending(new)] == [1, 2, 3, 4, 5, 6]
    store.write(new, [RowResult(idx=d.idx, output=f"new {d.idx}") for d in store.pending(new)])
    store.close(new, ChunkState.DONE)
    assert_fenced_out(store, stale)  # and after the close too
    rows = [
        json.loads(line)
        for line in client.get(
            f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)
        ).text.splitlines()
    ]
    assert [r["output"] for r in rows] == [f"new {i}" for i in range(1, 7)]  # the new owner's
    assert all(r["error"] is None for r in rows)
    job = job_view(client, api_key, job_id)
    assert job["status"] == "completed"
    assert job["counts"] == {"total": 6, "succeeded": 6, "failed": 0, "cancelled": 0}


def test_a_lease_expired_by_force_is_fenced_before_anyone_takes_it_over(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    stale = store.claim(chunk[0], "slow-worker").lease
    assert stale is not None
    expire_lease(settings, chunk[0])
    report = store.expire()  # the reconciler requeues it (other tests' leftovers may count)
    assert chunk[0] in {c.chunk_id for c in report.requeued}
    assert chunk_rows(settings, job_id)[0][2] == "queued"

    assert_fenced_out(store, stale)  # queued, no owner: still not the stale worker's

    new = store.claim(chunk[0], "successor").lease
    assert new is not None and new.attempts == 2
    assert_fenced_out(store, stale)
    store.write(new, [RowResult(idx=1, output="a'"), RowResult(idx=2, output="b'")])
    store.close(new, ChunkState.DONE)
    with pg(settings.database.url) as conn:
        rows = conn.execute(
            "SELECT idx, output, attempts FROM results WHERE job_id = %s ORDER BY idx", (job_id,)
        ).fetchall()
    assert rows == [(1, "a'", 1), (2, "b'", 1)]  # exactly one result per document
    assert job_view(client, api_key, job_id)["status"] == "completed"


def test_renew_extends_live_leases_and_reports_lost_ones(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name, chunk_size=1).json()["id"]
    first, second = chunk_rows(settings, job_id)
    store = make_store(settings)
    a = store.claim(first[0], "w").lease
    b = store.claim(second[0], "w").lease
    assert a is not None and b is not None
    expire_lease(settings, second[0])
    assert store.renew([a, b]) == set()  # expired but not taken over: still ours, renewed
    expire_lease(settings, second[0])
    taken = store.claim(second[0], "other")
    assert taken.outcome == ClaimOutcome.LEASED
    assert store.renew([a, b]) == {b.token}


def test_a_write_that_waited_for_the_job_lock_sees_the_takeover_it_waited_for(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """The fence reads the chunk after taking the job's lock: a stale worker's write queued
    behind the successor's claim (which holds that lock until it commits) is refused, not let
    through on the chunk row from before the claim."""
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    stale = store.claim(chunk[0], "stale-worker").lease
    assert stale is not None
    outcome: list[object] = []
    with pg(settings.database.url) as conn, conn.transaction():
        # The successor's claim, mid-transaction: job locked, chunk taken over, not committed.
        conn.execute("SELECT 1 FROM jobs WHERE id = %s FOR NO KEY UPDATE", (stale.job_id,))
        conn.execute(
            "UPDATE chunks SET lease_token = %s, worker = 'successor', attempts = attempts + 1 "
            "WHERE id = %s",
            (uuid.uuid4(), chunk[0]),
        )

        def late_write() -> None:
            try:
                outcome.append(store.write(stale, [RowResult(idx=1, output="stale")]))
            except LeaseLostError as exc:
                outcome.append(exc)

        writer = threading.Thread(target=late_write)
        writer.start()
        time.sleep(0.5)  # the write now waits for the job's lock
        assert writer.is_alive()
    writer.join(10)  # the claim committed; the write goes on, against the new chunk row
    assert len(outcome) == 1 and isinstance(outcome[0], LeaseLostError)
    with pg(settings.database.url) as conn:
        n = conn.execute("SELECT count(*) FROM results WHERE job_id = %s", (job_id,)).fetchone()
    assert n is not None and n[0] == 0


def test_cancel_counts_only_rows_without_a_result(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A chunk given back after writing some rows is queued again; cancelling the job then
    cancels only its rows that have no result, so the counts add up to the total."""
    job_id = submit(client, api_key, "text\na\nb\nc\nd\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    store.write(lease, [RowResult(idx=1, output="A"), RowResult(idx=2, output="B")])
    assert store.release(lease, "StoreUnavailableError: away").requeued
    job = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).json()
    assert job["status"] == "cancelled"
    assert job["counts"] == {"total": 4, "succeeded": 2, "failed": 0, "cancelled": 2}
    assert job["percent"] == 100.0


# --- races and faults ---------------------------------------------------------------------------


def run_with_deadline(fn: Any, seconds: float) -> list[Any]:
    """Runs ``fn`` in a thread; the outcome (a value or the exception), or [] if it was still
    running after ``seconds`` (a hang)."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return out


def test_renew_skips_a_chunk_locked_elsewhere_and_renews_the_others_at_once(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A transaction holding one chunk's row (a finalize waiting on a collection lock) must not
    hold up the renewal of this worker's other leases, nor make the held one count as lost."""
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name, chunk_size=1).json()["id"]
    first, second = chunk_rows(settings, job_id)
    store = make_store(settings)
    a = store.claim(first[0], "w").lease
    b = store.claim(second[0], "w").lease
    assert a is not None and b is not None
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE chunks SET lease_expires_at = now() + interval '1 second' WHERE id = %s",
            (second[0],),
        )
    with pg(settings.database.url) as holder, holder.transaction():
        holder.execute("SELECT 1 FROM chunks WHERE id = %s FOR UPDATE", (first[0],))
        started = time.monotonic()
        outcome = run_with_deadline(lambda: store.renew([a, b]), 3.0)
        assert outcome == [set()], "renewal blocked behind a locked chunk row"
        assert time.monotonic() - started < 2.0
    with pg(settings.database.url) as conn:
        left = conn.execute(
            "SELECT extract(epoch FROM lease_expires_at - now()) FROM chunks WHERE id = %s",
            (second[0],),
        ).fetchone()
    assert left is not None and left[0] > 20  # renewed to lease_s (30 s)
    assert store.renew([a, b]) == set()  # and the skipped one next time


def test_a_lock_wait_past_lock_timeout_is_a_transient_error_that_hides_the_values(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A write stuck behind another transaction's lock gives up after lock_timeout with the
    store's transient error (the runner gives the chunk back and retries), never a hang; and
    neither the error nor its cause shows the statement's values (a model's output here)."""
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = PgChunkStore(
        get_engine(settings.database.url, lock_timeout_s=0.5), lease_s=30, max_attempts=3
    )
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    secret = "SECRET-OUTPUT-4711"
    with pg(settings.database.url) as holder, holder.transaction():
        # Another writer of the same row, not yet committed: the insert must wait on it.
        holder.execute(
            "INSERT INTO results (job_id, idx, output) VALUES (%s, 1, 'other')", (job_id,)
        )
        started = time.monotonic()
        outcome = run_with_deadline(
            lambda: store.write(lease, [RowResult(idx=1, output=secret)]), 5.0
        )
        assert outcome, "the write hung behind a lock"
        assert time.monotonic() - started < 3.0
    (exc,) = outcome
    assert isinstance(exc, StoreUnavailableError), exc
    assert "lock timeout" in str(exc)
    shown = "".join(traceback.format_exception(exc))
    assert secret not in shown and "parameters hidden" in shown


def test_sql_errors_never_carry_parameter_values(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A statement that fails on its data (here a token count out of range) raises an error
    that names the statement but not its values: documents and outputs never reach logs."""
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    secret = "PRIVATE-DOCUMENT-TEXT-0815"
    with pytest.raises(DataError) as info:
        store.write(lease, [RowResult(idx=1, output=secret, prompt_tokens=2**40)])
    shown = "".join(traceback.format_exception(info.value))
    assert "INSERT INTO results" in shown
    assert secret not in shown and "parameters hidden" in shown


def race_cancel_against_close(store: PgChunkStore, last: Any) -> object:
    """Closes the job's last chunk and cancels the job at the same instant; the cancel's
    outcome (a status or the ConflictError)."""
    barrier = threading.Barrier(2)
    outcome: list[object] = []

    def close() -> None:
        barrier.wait()
        store.close(last, ChunkState.DONE)

    def cancel() -> None:
        barrier.wait()
        try:
            outcome.append(store.cancel(last.job_id))
        except ConflictError as exc:
            outcome.append(exc)

    threads = [threading.Thread(target=close), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    (result,) = outcome
    return result


def test_cancel_racing_the_last_close_never_cancels_a_completed_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Cancel and the last chunk's close, started together many times: a job the close
    completed stays completed (the cancel is a 409), a job the cancel reached first ends
    cancelled; either way the counts add up to the total and percent never passes 100. The
    closing chunk was given back once after writing a row, so its rows are partly written."""
    store = make_store(settings)
    for _ in range(12):
        body = "text\na\nb\nc\nd\n"
        job_id = submit(client, api_key, body, model=model_name, chunk_size=2).json()["id"]
        first, second = chunk_rows(settings, job_id)
        done = store.claim(first[0], "w").lease
        assert done is not None
        store.write(done, [RowResult(idx=1, output="A"), RowResult(idx=2, output="B")])
        store.close(done, ChunkState.DONE)
        given_back = store.claim(second[0], "w").lease
        assert given_back is not None
        store.write(given_back, [RowResult(idx=3, output="C")])
        store.release(given_back, "StoreUnavailableError: away")
        last = store.claim(second[0], "w2").lease
        assert last is not None
        store.write(last, [RowResult(idx=4, output="D")])

        outcome = race_cancel_against_close(store, last)
        job = job_view(client, api_key, job_id)
        counts = job["counts"]
        assert counts["succeeded"] + counts["failed"] + counts["cancelled"] == counts["total"]
        assert counts == {"total": 4, "succeeded": 4, "failed": 0, "cancelled": 0}
        assert job["percent"] <= 100.0
        if isinstance(outcome, ConflictError):
            assert job["status"] == "completed"
        else:
            assert outcome == JobStatus.CANCELLING
            assert job["status"] == "cancelled"


def test_model_output_with_a_lone_surrogate_or_nul_is_written(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """PostgreSQL text holds neither NUL nor a lone UTF-16 surrogate; a row with either, in
    its output or its error, is written with U+FFFD (NUL dropped) instead of failing the whole
    write on every attempt of the chunk."""
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    (chunk,) = chunk_rows(settings, job_id)
    store = make_store(settings)
    lease = store.claim(chunk[0], "w").lease
    assert lease is not None
    written = store.write(
        lease,
        [
            RowResult(idx=1, output="half \ud800 a pair\x00, \ud83d\ude00 whole"),
            RowResult(idx=2, error="engine rejected \udfff\x00"),
        ],
    )
    assert (written.succeeded, written.failed) == (1, 1)
    store.close(lease, ChunkState.DONE)
    body = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)).text
    rows = [json.loads(line) for line in body.splitlines()]
    assert rows[0]["output"] == "half \ufffd a pair, \U0001f600 whole"
    assert rows[1]["error"] == "engine rejected \ufffd"
    assert job_view(client, api_key, job_id)["status"] == "completed"


def test_a_finalize_stuck_on_its_collection_lock_stalls_no_renewal_and_times_out(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """The scenario of the lost leases: a scheduled job's last close finalizes the job, which
    writes the summaries back under the collection's lock, holding the chunk's row meanwhile.
    With that lock held elsewhere, the worker's batched renewal (this chunk's lease with
    another tenant's) still goes through at once, and the close gives up after lock_timeout
    with a transient error; once the lock is free, the close goes through."""
    assert put(client, api_key, "slowcoll", "id,text\na,Alpha\nb,Beta\n").status_code == 200
    schedule = client.post(
        "/v1/schedules",
        headers=auth(api_key),
        json={
            "collection": "slowcoll",
            "model": model_name,
            "task": "summarize",
            "cron": "0 2 * * *",
        },
    ).json()
    run = client.post(f"/v1/schedules/{schedule['id']}/run", headers=auth(api_key)).json()
    job_id = run["job"]["id"]
    (chunk,) = chunk_rows(settings, job_id)
    other_job = submit(client, api_key, "text\nx\n", model=model_name).json()["id"]
    (other_chunk,) = chunk_rows(settings, other_job)
    store = PgChunkStore(
        get_engine(settings.database.url, lock_timeout_s=2.0), lease_s=30, max_attempts=3
    )
    lease = store.claim(chunk[0], "w").lease
    other = store.claim(other_chunk[0], "w").lease
    assert lease is not None and other is not None
    store.write(lease, [RowResult(idx=1, output="sum a"), RowResult(idx=2, output="sum b")])
    outcome: list[Any] = []

    def close() -> None:
        outcome.extend(run_with_deadline(lambda: store.close(lease, ChunkState.DONE), 6.0))

    with pg(settings.database.url) as holder, holder.transaction():
        holder.execute("SELECT 1 FROM collections WHERE name = 'slowcoll' FOR UPDATE")
        closing = threading.Thread(target=close)
        closing.start()
        time.sleep(0.3)  # the close now holds the chunk's row and waits for the collection
        started = time.monotonic()
        assert run_with_deadline(lambda: store.renew([lease, other]), 1.5) == [set()]
        assert time.monotonic() - started < 1.0
        closing.join(8)
        assert outcome, "the close hung on the collection lock"
        assert isinstance(outcome[0], StoreUnavailableError) and "lock timeout" in str(outcome[0])
    store.close(lease, ChunkState.DONE)
    assert job_view(client, api_key, job_id)["status"] == "completed"
    docs = client.get("/v1/collections/slowcoll/documents", headers=auth(api_key)).json()
    assert [d["summary"]["text"] for d in docs["data"]] == ["sum a", "sum b"]

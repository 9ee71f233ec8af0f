"""The embedded store (``docqueue run``'s) against the real chunk runner and the bench engine:
the same state machine as PostgreSQL's, on a SQLite file in a temp dir."""

from __future__ import annotations

import io
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.errors import ConflictError, InvalidFileError, LeaseLostError
from service.jobs.formats import ingest_upload
from service.jobs.ingest import IngestOptions, IngestResult, RowSink
from service.store.chunks import ClaimOutcome, Doc, Lease, RowResult
from service.store.sqlite import SqliteChunkStore
from service.store.states import ChunkState, JobStatus
from workers.engines import Batch, Engine
from workers.engines.bench import BenchEngine
from workers.runner import process_chunk

MODEL = "bench-zero-cost"


@dataclass
class Local:
    """The runner's context with no worker process around it (what ``docqueue run`` needs)."""

    store: SqliteChunkStore
    engine: Engine = field(default_factory=lambda: BenchEngine(MODEL))
    model: str = MODEL
    name: str = "test-run"
    sub_batch_size: int = 4
    default_max_tokens: int = 16
    summary_words: int = 50
    retry_backoff_s: float = 0.0
    closed_jobs: list[uuid.UUID] = field(default_factory=list)

    def hold(self, lease: Lease) -> None: ...
    def drop(self, lease: Lease) -> None: ...
    def lost(self, lease: Lease) -> bool:
        return False

    def watch(self, lease: Lease, batches: Sequence[Batch]) -> None: ...
    def stalled(self, lease: Lease) -> bool:
        return False

    def closed(self, lease: Lease) -> None:
        self.closed_jobs.append(lease.job_id)


def csv_file(n: int) -> bytes:
    rows = "".join(f"id-{i},document number {i} about things,{i % 3}\n" for i in range(1, n + 1))
    return f"id,text,group\n{rows}".encode()


def loader(content: bytes, **opts: Any) -> Callable[[RowSink], IngestResult]:
    """The service's own reading of an upload (any format), into the store's sink."""

    def load(sink: RowSink) -> IngestResult:
        upload = io.BytesIO(content)
        return ingest_upload(sink, upload, upload, IngestOptions(id_column="id", **opts))

    return load


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[SqliteChunkStore]:
    s = SqliteChunkStore(tmp_path / "run.sqlite", lease_s=30, max_attempts=3)
    yield s
    s.close_file()


def new_job(store: SqliteChunkStore, n: int = 20, chunk_size: int = 8) -> uuid.UUID:
    return store.create_job(
        task="generate", model=MODEL, params={}, load=loader(csv_file(n)), chunk_size=chunk_size
    )


def result_idx(store: SqliteChunkStore, job: uuid.UUID) -> list[int]:
    return [d.idx for d, r in store.rows(job) if r is not None]


def test_every_document_gets_one_result_through_the_runner(store: SqliteChunkStore) -> None:
    job = new_job(store, 20, 8)
    ctx = Local(store)
    chunks = store.open_chunks(job)
    assert len(chunks) == 3
    assert [process_chunk(ctx, c) for c in chunks] == ["done"] * 3
    row = store.job(job)
    assert (row["status"], row["succeeded"], row["failed"], row["total"]) == (
        JobStatus.COMPLETED,
        20,
        0,
        20,
    )
    assert row["completion_tokens"] == 20 and row["finished_at"] is not None
    assert result_idx(store, job) == list(range(1, 21))
    assert {r["output"] for _, r in store.rows(job) if r} == {"ok"}
    assert store.open_chunks(job) == []
    assert process_chunk(ctx, chunks[0]) == "done"  # a second run of a done chunk: nothing


def test_a_lease_taken_over_is_fenced_and_each_row_lands_once(store: SqliteChunkStore) -> None:
    job = new_job(store, 8, 8)
    (chunk,) = store.open_chunks(job)
    first = store.claim(chunk, "first")
    assert first.lease is not None and len(first.docs) == 8
    assert store.claim(chunk, "second").outcome == ClaimOutcome.BUSY  # live lease
    store.write(first.lease, [RowResult(idx=1, output="from first")])
    assert store.expire(every_lease=True).requeued  # the first run died
    second = store.claim(chunk, "second")
    assert second.lease is not None and second.lease.attempts == 2
    assert [d.idx for d in second.docs] == list(range(2, 9))  # row 1 is never redone
    with pytest.raises(LeaseLostError):
        store.write(first.lease, [RowResult(idx=2, output="late")])
    with pytest.raises(LeaseLostError):
        store.close(first.lease, ChunkState.DONE)
    assert store.renew([first.lease, second.lease]) == {first.lease.token}
    rows = [RowResult(idx=i, output="second") for i in range(1, 9)]  # 1 is there already
    written = store.finish(second.lease, rows)
    assert (written.succeeded, written.status) == (7, JobStatus.RUNNING)
    out = {d.idx: r["output"] for d, r in store.rows(job) if r}
    assert out == {1: "from first", **{i: "second" for i in range(2, 9)}}
    assert store.job(job)["succeeded"] == 8 and store.job_status(job) == JobStatus.COMPLETED


def test_release_retries_then_fails_the_rows_with_the_reason(store: SqliteChunkStore) -> None:
    job = new_job(store, 4, 4)
    (chunk,) = store.open_chunks(job)
    for attempt in (1, 2):
        lease = store.claim(chunk, "w").lease
        assert lease is not None and lease.attempts == attempt
        assert store.release(lease, "engine died").requeued
    lease = store.claim(chunk, "w").lease
    assert lease is not None
    released = store.release(lease, "engine died")
    assert not released.requeued
    errors = {r["error"] for _, r in store.rows(job) if r}
    assert errors == {"gave up after 3 attempts; last error: engine died"}
    row = store.job(job)
    assert (row["status"], row["failed"]) == (JobStatus.FAILED, 4)


def test_cancel_closes_queued_chunks_and_waits_for_a_running_one(
    store: SqliteChunkStore,
) -> None:
    job = new_job(store, 12, 4)
    first, *rest = store.open_chunks(job)
    lease = store.claim(first, "w").lease
    assert lease is not None
    store.write(lease, [RowResult(idx=1, output="kept")])
    assert store.cancel(job) == JobStatus.CANCELLING
    assert store.claim(rest[0], "w").outcome == ClaimOutcome.CANCELLED
    store.close(lease, ChunkState.CANCELLED)
    row = store.job(job)
    assert (row["status"], row["succeeded"], row["cancelled"]) == (JobStatus.CANCELLED, 1, 11)
    assert store.cancel(job) == JobStatus.CANCELLED  # again: nothing changes
    done = new_job(store, 4, 4)
    assert [process_chunk(Local(store), c) for c in store.open_chunks(done)] == ["done"]
    with pytest.raises(ConflictError, match="already completed"):
        store.cancel(done)


def test_the_file_keeps_everything_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    store = SqliteChunkStore(path, lease_s=30, max_attempts=3)
    job = new_job(store, 6, 3)
    first = store.open_chunks(job)[0]
    assert process_chunk(Local(store), first) == "done"
    lease = store.claim(store.open_chunks(job)[0], "died").lease
    assert lease is not None
    store.set_meta({"input_sha256": "abc"})
    store.close_file()  # the process ends with a lease held

    again = SqliteChunkStore(path, lease_s=30, max_attempts=3)
    assert again.meta("input_sha256") == "abc"
    assert len(again.expire(every_lease=True).requeued) == 1
    assert [process_chunk(Local(again), c) for c in again.open_chunks(job)] == ["done"]
    assert result_idx(again, job) == list(range(1, 7))
    again.close_file()

    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(ConflictError, match="store version 999"):
        SqliteChunkStore(path, lease_s=30, max_attempts=3)


def test_threads_share_the_store_and_text_sqlite_cannot_hold_is_replaced(
    store: SqliteChunkStore,
) -> None:
    job = new_job(store, 64, 4)
    ctx = Local(store)
    outcomes: list[str] = []
    threads = [
        threading.Thread(target=lambda c=c: outcomes.append(process_chunk(ctx, c)))
        for c in store.open_chunks(job)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == ["done"] * 16 and result_idx(store, job) == list(range(1, 65))

    rows = list(store.rows(job))
    assert rows[6][0] == Doc(7, "id-7", "document number 7 about things", {"group": "1"})


def test_the_files_errors_are_the_services_and_nothing_is_stored(
    store: SqliteChunkStore,
) -> None:
    def create(content: bytes) -> uuid.UUID:
        return store.create_job(
            task="generate", model=MODEL, params={}, load=loader(content), chunk_size=4
        )

    with pytest.raises(InvalidFileError, match=r"row 3: duplicate id 'b'") as dup:
        create(b"id,text\na,x\nb,y\nb,z\n")
    assert dup.value.where["row"] == 3 and dup.value.where["line"] == 4
    with pytest.raises(InvalidFileError, match="row 2: invalid UTF-8") as bad:
        create(b"id,text\na,x\nb,caf\xe9\n")
    assert bad.value.where["line"] == 3
    with pytest.raises(InvalidFileError, match="text column 'text' not found"):
        create(b"id,body\na,x\n")
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)

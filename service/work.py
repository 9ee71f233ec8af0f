"""The worker side of the data model: leases, documents, idempotent results, finalization.

Every function takes a SQLAlchemy ``Connection`` inside the caller's transaction, so a result
batch and the job counters it moves always commit together. Postgres decides who owns a chunk
(the lease); Redis only delivers the news that there is one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Connection, text

#: Terminal chunk states: a message for such a chunk is a no-op.
CHUNK_FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Lease:
    chunk_id: uuid.UUID
    job_id: uuid.UUID
    seq: int
    start_idx: int
    end_idx: int
    attempts: int
    task: str
    model: str
    params: dict[str, Any]
    job_status: str


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to lease a chunk: a lease, or why there is none."""

    lease: Lease | None
    reason: str  # "leased" | "done" | "failed" | "cancelled" | "busy" | "missing" | "job_cancelled"
    job_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Doc:
    idx: int
    external_id: str | None
    text: str
    extra: dict[str, Any] | None


@dataclass
class RowResult:
    """One document's outcome, ready to be written."""

    idx: int
    output: str | None = None
    label: str | None = None
    confidence: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False
    error: str | None = None
    attempts: int = 1
    latency_ms: float | None = None


def claim_chunk(conn: Connection, chunk_id: uuid.UUID, worker: str, lease_s: float) -> Claim:
    """Leases a queued chunk, or one whose lease expired (its worker died). Never a live one."""
    # Lock order everywhere: the job row, then its chunks (cancel does the same), so a claim
    # racing a cancel waits instead of deadlocking.
    conn.execute(
        text(
            "SELECT 1 FROM jobs WHERE id = (SELECT job_id FROM chunks WHERE id = :id) "
            "FOR NO KEY UPDATE"
        ),
        {"id": chunk_id},
    )
    row = conn.execute(
        text(
            """
            UPDATE chunks c SET state = 'leased', worker = :worker, attempts = c.attempts + 1,
                   lease_expires_at = now() + make_interval(secs => :lease_s), updated_at = now()
            FROM jobs j
            WHERE c.id = :id AND j.id = c.job_id AND j.status IN ('queued', 'running')
              AND (c.state = 'queued' OR (c.state = 'leased' AND c.lease_expires_at < now()))
            RETURNING c.job_id, c.seq, c.start_idx, c.end_idx, c.attempts,
                      j.task, j.model, j.params, j.status
            """
        ),
        {"id": chunk_id, "worker": worker, "lease_s": float(lease_s)},
    ).first()
    if row is not None:
        if row.status == "queued":
            conn.execute(
                text(
                    "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, now()) "
                    "WHERE id = :j AND status = 'queued'"
                ),
                {"j": row.job_id},
            )
        lease = Lease(
            chunk_id=chunk_id,
            job_id=row.job_id,
            seq=row.seq,
            start_idx=row.start_idx,
            end_idx=row.end_idx,
            attempts=row.attempts,
            task=row.task,
            model=row.model,
            params=dict(row.params or {}),
            job_status="running",
        )
        return Claim(lease, "leased", row.job_id)
    state = conn.execute(
        text(
            "SELECT c.state, c.job_id, j.status FROM chunks c JOIN jobs j ON j.id = c.job_id "
            "WHERE c.id = :id"
        ),
        {"id": chunk_id},
    ).first()
    if state is None:
        return Claim(None, "missing")
    if state.state in CHUNK_FINISHED:
        return Claim(None, state.state, state.job_id)
    if state.status in ("cancelling", "cancelled"):
        return Claim(None, "job_cancelled", state.job_id)
    return Claim(None, "busy", state.job_id)


def pending_documents(conn: Connection, lease: Lease) -> list[Doc]:
    """The chunk's documents that have no result yet (a re-run never redoes finished rows)."""
    rows = conn.execute(
        text(
            """
            SELECT d.idx, d.external_id, d.text, d.extra FROM documents d
            WHERE d.job_id = :j AND d.idx >= :s AND d.idx < :e
              AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = d.job_id AND r.idx = d.idx)
            ORDER BY d.idx
            """
        ),
        {"j": lease.job_id, "s": lease.start_idx, "e": lease.end_idx},
    ).all()
    return [Doc(r.idx, r.external_id, r.text, r.extra) for r in rows]


class Written(NamedTuple):
    """What one ``write_results`` did: the job's status (callers notice a cancel) and the rows
    it inserted (a redelivered chunk's rows that already had results count nothing)."""

    status: str
    succeeded: int = 0
    failed: int = 0
    completion_tokens: int = 0


def write_results(conn: Connection, job_id: uuid.UUID, results: Sequence[RowResult]) -> Written:
    """Inserts results (a row that already has one is skipped) and moves the job's counters by
    exactly the rows inserted."""
    if not results:
        status = conn.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id})
        return Written(str(status.scalar_one()))
    cols: dict[str, list[Any]] = {
        "idx": [r.idx for r in results],
        "output": [r.output for r in results],
        "label": [r.label for r in results],
        "confidence": [r.confidence for r in results],
        "finish_reason": [r.finish_reason for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "completion_tokens": [r.completion_tokens for r in results],
        "truncated": [r.truncated for r in results],
        "error": [r.error for r in results],
        "attempts": [r.attempts for r in results],
        "latency_ms": [r.latency_ms for r in results],
    }
    row = conn.execute(
        text(
            """
            WITH ins AS (
              INSERT INTO results (job_id, idx, output, label, confidence, finish_reason,
                                   prompt_tokens, completion_tokens, truncated, error, attempts,
                                   latency_ms)
              SELECT :j, * FROM unnest(
                CAST(:idx AS int[]), CAST(:output AS text[]), CAST(:label AS text[]),
                CAST(:confidence AS float8[]), CAST(:finish_reason AS text[]),
                CAST(:prompt_tokens AS int[]), CAST(:completion_tokens AS int[]),
                CAST(:truncated AS bool[]), CAST(:error AS text[]), CAST(:attempts AS int[]),
                CAST(:latency_ms AS float8[]))
              ON CONFLICT (job_id, idx) DO NOTHING
              RETURNING error IS NULL AS ok, prompt_tokens, completion_tokens
            ), n AS (
              SELECT count(*) FILTER (WHERE ok) AS ok, count(*) FILTER (WHERE NOT ok) AS bad,
                     coalesce(sum(prompt_tokens), 0) AS pt,
                     coalesce(sum(completion_tokens), 0) AS ct
              FROM ins
            )
            UPDATE jobs SET
              succeeded = succeeded + n.ok,
              failed = failed + n.bad,
              prompt_tokens = prompt_tokens + n.pt,
              completion_tokens = completion_tokens + n.ct
            FROM n
            WHERE id = :j
            RETURNING status, n.ok, n.bad, n.ct
            """
        ),
        {"j": job_id, **cols},
    ).first()
    if row is None:
        return Written("missing")
    return Written(str(row.status), int(row.ok), int(row.bad), int(row.ct))


def renew_leases(
    conn: Connection, chunk_ids: Sequence[uuid.UUID], worker: str, lease_s: float
) -> int:
    if not chunk_ids:
        return 0
    res = conn.execute(
        text(
            "UPDATE chunks SET lease_expires_at = now() + make_interval(secs => :lease_s) "
            "WHERE id = ANY(:ids) AND worker = :worker AND state = 'leased'"
        ),
        {"ids": list(chunk_ids), "worker": worker, "lease_s": float(lease_s)},
    )
    return int(res.rowcount or 0)


def release_chunk(conn: Connection, chunk_id: uuid.UUID, worker: str, error: str) -> None:
    """Gives a leased chunk back to the queue after a transient failure (its message is re-sent
    by the caller with a backoff)."""
    conn.execute(
        text(
            "UPDATE chunks SET state = 'queued', lease_expires_at = NULL, error = :err, "
            "enqueued_at = now(), updated_at = now() "
            "WHERE id = :id AND worker = :worker AND state = 'leased'"
        ),
        {"id": chunk_id, "worker": worker, "err": error[:2000]},
    )


def close_chunk(
    conn: Connection, chunk_id: uuid.UUID, job_id: uuid.UUID, state: str, error: str | None = None
) -> str | None:
    """Ends a chunk. Rows without a result become errors (``failed``) or are counted as
    cancelled (``cancelled``); ``done`` needs no rows. Then finalizes the job if this was its
    last open chunk. Returns the job's new terminal status, if it got one."""
    assert state in CHUNK_FINISHED
    conn.execute(text("SELECT 1 FROM jobs WHERE id = :j FOR NO KEY UPDATE"), {"j": job_id})
    chunk = conn.execute(
        text(
            "UPDATE chunks SET state = :state, lease_expires_at = NULL, error = :err, "
            "updated_at = now() WHERE id = :id AND state NOT IN ('done', 'failed', 'cancelled') "
            "RETURNING start_idx, end_idx, attempts"
        ),
        {"id": chunk_id, "state": state, "err": error[:2000] if error else None},
    ).first()
    if chunk is None:
        return None  # someone else closed it already
    if state in ("failed", "cancelled"):
        missing = (
            conn.execute(
                text(
                    "SELECT d.idx FROM documents d WHERE d.job_id = :j AND d.idx >= :s "
                    "AND d.idx < :e AND NOT EXISTS "
                    "(SELECT 1 FROM results r WHERE r.job_id = d.job_id AND r.idx = d.idx)"
                ),
                {"j": job_id, "s": chunk.start_idx, "e": chunk.end_idx},
            )
            .scalars()
            .all()
        )
        if missing and state == "failed":
            reason = error or "chunk failed"
            write_results(
                conn,
                job_id,
                [RowResult(idx=i, error=reason, attempts=chunk.attempts) for i in missing],
            )
        elif missing:
            conn.execute(
                text("UPDATE jobs SET cancelled = cancelled + :n WHERE id = :j"),
                {"n": len(missing), "j": job_id},
            )
    return finalize_job(conn, job_id)


def finalize_job(conn: Connection, job_id: uuid.UUID) -> str | None:
    """If no chunk of the job is open any more, gives the job its terminal status."""
    job = conn.execute(
        text("SELECT status, succeeded, failed FROM jobs WHERE id = :j FOR UPDATE"), {"j": job_id}
    ).first()
    if job is None or job.status in ("completed", "failed", "cancelled"):
        return None
    open_chunks = conn.execute(
        text("SELECT count(*) FROM chunks WHERE job_id = :j AND state IN ('queued', 'leased')"),
        {"j": job_id},
    ).scalar_one()
    if open_chunks:
        return None
    if job.status == "cancelling":
        status, error = "cancelled", None
    elif job.succeeded == 0 and job.failed > 0:
        status, error = "failed", f"all {job.failed} documents failed; see the results' errors"
    else:
        status, error = "completed", None
    conn.execute(
        text(
            "UPDATE jobs SET status = :s, finished_at = now(), error = coalesce(:e, error) "
            "WHERE id = :j"
        ),
        {"s": status, "e": error, "j": job_id},
    )
    apply_to_collection(conn, job_id)
    return status


def apply_to_collection(conn: Connection, job_id: uuid.UUID) -> int:
    """A scheduled job's successful results become its collection's latest summaries, in the
    transaction that ends the job. Only documents whose text is still the one summarized (same
    content hash) are updated: a document changed meanwhile stays pending for the next run.
    Any other job: a no-op. Returns the documents updated."""
    collection = conn.execute(
        text("SELECT collection_id FROM jobs WHERE id = :j"), {"j": job_id}
    ).scalar()
    if collection is None:
        return 0
    # The collection row first, as uploads (service.collections.upsert_documents) take it
    # before the document rows: both then touch documents in one order, never a deadlock.
    conn.execute(text("SELECT 1 FROM collections WHERE id = :c FOR UPDATE"), {"c": collection})
    res = conn.execute(
        text(
            """
            UPDATE collection_documents cd SET
              summary = coalesce(r.label, r.output), summary_model = j.model,
              summarized_at = now(), summary_hash = cd.content_hash, summary_job_id = j.id
            FROM jobs j
            JOIN documents d ON d.job_id = j.id
            JOIN results r ON r.job_id = d.job_id AND r.idx = d.idx
            WHERE j.id = :j AND j.collection_id IS NOT NULL
              AND cd.collection_id = j.collection_id AND cd.external_id = d.external_id
              AND r.error IS NULL
              AND cd.content_hash = encode(sha256(convert_to(d.text, 'UTF8')), 'hex')
            """
        ),
        {"j": job_id},
    )
    return int(res.rowcount or 0)


def register_worker(
    conn: Connection, name: str, model: str, queue: str, device: str, pid: int, ready: bool
) -> None:
    conn.execute(
        text(
            """
            INSERT INTO workers (name, model, queue, device, pid, engine_ready)
            VALUES (:name, :model, :queue, :device, :pid, :ready)
            ON CONFLICT (name) DO UPDATE SET model = excluded.model, queue = excluded.queue,
              device = excluded.device, pid = excluded.pid, engine_ready = excluded.engine_ready,
              started_at = now(), last_heartbeat_at = now()
            """
        ),
        {
            "name": name,
            "model": model,
            "queue": queue,
            "device": device,
            "pid": pid,
            "ready": ready,
        },
    )


def heartbeat(conn: Connection, name: str, ready: bool) -> None:
    conn.execute(
        text(
            "UPDATE workers SET last_heartbeat_at = now(), engine_ready = :ready WHERE name = :name"
        ),
        {"name": name, "ready": ready},
    )


def unregister_worker(conn: Connection, name: str) -> None:
    conn.execute(text("DELETE FROM workers WHERE name = :name"), {"name": name})

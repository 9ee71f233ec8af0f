"""A finished job's afterlife: retry its failed rows as a new job, purge it once deleted.

Deleting is a chunk-state transition and lives in the state machine
(``PgChunkStore.erase``: cancel if it runs, fence off its leases, tombstone); what it leaves
for later, the rows of a job too large to delete in one transaction, is purged here in batches.

Retry numbering: the new job's documents are the original's failed rows (and, when asked, its
cancelled rows: those that never got a result) in the original's input order, numbered
``idx`` 1..n without gaps, as every job is (chunks cover 1..n). Each keeps the original's
``external_id``, or, where the original had none (no id column), the original's ``idx`` as
text. The ``id`` a download shows (``external_id``, else ``idx``) is therefore the same in the
retry's results as in the original's, so the two match row for row by ``id``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import logs
from service.errors import ConflictError, JobDeletedError, NotFoundError, ResultsExpiredError
from service.jobs.submit import chunk_rows, find_idempotent, replay
from service.settings import Settings
from service.store import quotas
from service.store.states import JobStatus
from service.store.tables import Chunk, Job

log = logging.getLogger(__name__)

#: The original's rows a retry takes: failed ones (a result with an error), and with
#: ``:cancelled`` also those that never got a result (cancelled). One statement, in the
#: database: a million-row job's rows never pass through Python.
_COPY_ROWS = text(
    """
    INSERT INTO documents (job_id, idx, external_id, text, extra)
    SELECT :new, row_number() OVER (ORDER BY d.idx), coalesce(d.external_id, d.idx::text),
           d.text, d.extra
    FROM documents d LEFT JOIN results r ON r.job_id = d.job_id AND r.idx = d.idx
    WHERE d.job_id = :old AND (r.error IS NOT NULL OR (:cancelled AND r.idx IS NULL))
    ORDER BY d.idx
    """
)


def retry_fingerprint(original_id: uuid.UUID, include_cancelled: bool) -> str:
    """What an ``Idempotency-Key`` replay of a retry must match: the same job, same rows."""
    canonical = {"retry_of": str(original_id), "include_cancelled": include_cancelled}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def retry_job(
    engine: Engine,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    settings: Settings,
    *,
    include_cancelled: bool = False,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """A new job over a finished job's failed rows (see the module's numbering), with the same
    task, model, parameters, queue, priority and chunk size, ``retry_of`` the original.
    Returns (job, created); the caller sends its chunks after the commit (``enqueue_job``).

    Refused: another tenant's job or none (404), a job still open (409: its failed rows may
    yet change), a deleted or expired one (410: its rows are gone), a job with no row to
    retry (409), and a retry past the tenant's quotas (429). The original is locked FOR SHARE
    while its rows are copied, so a delete or a retention purge cannot remove them half-way."""
    fingerprint = retry_fingerprint(job_id, include_cancelled)
    if idempotency_key:
        with Session(engine, expire_on_commit=False) as session:
            existing = find_idempotent(session, tenant_id, idempotency_key)
        if existing is not None:
            return replay(existing, idempotency_key, fingerprint), False
    new_id = uuid.uuid4()
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            original = session.scalar(
                select(Job)
                .where(Job.id == job_id, Job.tenant_id == tenant_id)
                .with_for_update(read=True)
            )
            _check_retryable(original, job_id, settings)
            assert original is not None
            # A quota already reached refuses before any row is copied (the exact check, with
            # the rows, follows the copy).
            quotas.check_before_upload(session, tenant_id, settings)
            job = Job(
                id=new_id,
                tenant_id=tenant_id,
                task=original.task,
                model=original.model,
                queue=original.queue,
                params=dict(original.params),
                status=JobStatus.QUEUED,
                priority=original.priority,
                idempotency_key=idempotency_key,
                request_sha256=fingerprint,
                source_name=original.source_name,
                chunk_size=original.chunk_size,
                # A scheduled job's retry also brings its summaries back to the collection.
                collection_id=original.collection_id,
                retry_of=original.id,
            )
            session.add(job)
            session.flush()  # the chunks' foreign key needs the job row
            n = (
                session.connection()
                .execute(
                    _COPY_ROWS, {"new": new_id, "old": original.id, "cancelled": include_cancelled}
                )
                .rowcount
            )
            if not n:
                raise ConflictError(_nothing_to_retry(original, include_cancelled))
            chunks = chunk_rows(new_id, n, original.chunk_size)
            session.execute(
                insert(Chunk),
                [
                    {"id": cid, "job_id": new_id, "seq": seq, "start_idx": s, "end_idx": e}
                    for cid, seq, s, e in chunks
                ],
            )
            job.total = n
            job.n_chunks = len(chunks)
            # A retry is a job like a submitted one: it counts against the tenant's quotas
            # (open jobs, rows waiting); it uploads nothing.
            quotas.check_submission(session, tenant_id, new_id, n, 0, settings)
    except IntegrityError as exc:
        # The same key sent twice at once: the winner's job, if this is the same request.
        if idempotency_key and "uq_jobs_tenant_idempotency_key" in str(exc.orig):
            with Session(engine, expire_on_commit=False) as session:
                existing = find_idempotent(session, tenant_id, idempotency_key)
            if existing is not None:
                return replay(existing, idempotency_key, fingerprint), False
        raise
    with logs.log_context(job_id=new_id):
        log.info("job created: retry of %s, %d documents in %d chunks", job_id, n, len(chunks))
    return job, True


def _check_retryable(original: Job | None, job_id: uuid.UUID, settings: Settings) -> None:
    if original is None:
        raise NotFoundError(f"job {job_id} not found")
    if original.deleted_at is not None:
        raise JobDeletedError.for_job(original.id, original.deleted_at)
    if original.results_expired_at is not None:
        raise ResultsExpiredError.for_job(
            original.id, original.results_expired_at, settings.retention.days
        )
    status = JobStatus(original.status)
    if not status.terminal:
        raise ConflictError(
            f"job {original.id} is {status}; only a finished job (completed, failed or "
            "cancelled) can be retried: wait for it, or cancel it first"
        )


def _nothing_to_retry(original: Job, include_cancelled: bool) -> str:
    message = f"job {original.id} has no failed rows to retry"
    if original.cancelled and not include_cancelled:
        message += (
            f"; its {original.cancelled} cancelled rows are retried with include_cancelled "
            "(docqueue retry --include-cancelled)"
        )
    return message


# --- purging a deleted job ---------------------------------------------------------------------


@dataclass
class Purged:
    documents: int = 0
    results: int = 0
    complete: bool = True  # False: the deadline came first; the rest is left for the next pass


def purge_rows(engine: Engine, job_id: uuid.UUID, batch_rows: int, deadline: float) -> Purged:
    """Deletes a job's results and documents in ``batch_rows``-long idx ranges, each range in
    its own transaction (no long locks, no giant transaction), then its chunks. Stops at
    ``deadline`` (``time.monotonic()``); run again, it resumes where it stopped. The caller
    marked the job first (deleted or expired), so nothing reads or writes these rows any
    more."""
    report = Purged()
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT greatest(j.total, (SELECT max(idx) FROM documents WHERE job_id = :j)) "
                "FROM jobs j WHERE j.id = :j"
            ),
            {"j": job_id},
        ).scalar()
    last = int(row or 0)
    for start in range(1, last + 1, batch_rows):
        if time.monotonic() > deadline:
            report.complete = False
            return report
        bounds = {"j": job_id, "s": start, "e": start + batch_rows}
        with engine.begin() as conn:
            report.results += _delete_range(conn, "results", bounds)
            report.documents += _delete_range(conn, "documents", bounds)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM chunks WHERE job_id = :j"), {"j": job_id})
    return report


def _delete_range(conn: Connection, table: str, bounds: dict[str, object]) -> int:
    res = conn.execute(
        text(f"DELETE FROM {table} WHERE job_id = :j AND idx >= :s AND idx < :e"), bounds
    )
    return int(res.rowcount or 0)


def purge_deleted(engine: Engine, job_id: uuid.UUID, settings: Settings) -> Purged:
    """The rows of a deleted job that ``erase`` left (it was larger than one transaction
    should delete), run after the DELETE's response. A purge cut short (the deadline, the API
    stopping) is finished by retention's next pass (``workers/ops/retention.py``)."""
    deadline = time.monotonic() + settings.retention.max_pass_s
    with logs.log_context(job_id=job_id):
        report = purge_rows(engine, job_id, settings.retention.batch_rows, deadline)
        log.info("deleted job purged: %s", report)
    return report

"""The chunk state machine: every state change of a chunk and of its job's counters, and its SQL.

Nothing else in docqueue writes ``chunks.state`` or a job's counters after submission. The
interface (``ChunkStore``) is small on purpose: the embedded single-process mode will give it a
second implementation on SQLite, and the chunk runner must not care which one it talks to.

Leases are fenced. Each claim draws a fresh ``lease_token``; every write, renewal, release and
close carries the token of the lease it acts under, and is refused (``LeaseLostError``) once the
chunk belongs to someone else, so a worker that paused past ``lease_s`` can never overwrite,
fail or close the chunk its successor now runs. Every transition locks the job row first and
the chunk after it, so transitions of one job never interleave and never deadlock.

PostgreSQL decides who owns a chunk (the lease); Redis only delivers the news that there is one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, NoReturn, Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.errors import ConflictError, LeaseLostError, NotFoundError, StoreUnavailableError
from service.settings import Settings
from service.store.arrays import bool_array, float_array, int_array, text_array
from service.store.engine import get_engine
from service.store.states import CANCEL_STATUSES, ChunkState, JobStatus

log = logging.getLogger(__name__)

#: Chunk-level errors are stored at most this long (a row error repeats them per row).
ERROR_CHARS = 2000
#: Advisory lock that lets one process at a time expire leases.
_EXPIRE_LOCK = 0x64710001
#: Advisory lock class of the dispatcher (with the model's hash): one release per model at once.
_DISPATCH_LOCK = 0x64710002
#: What a PostgreSQL ``text`` cannot hold: NUL, and UTF-16 surrogates (not encodable as UTF-8).
_NOT_PG_TEXT = re.compile("[\x00\ud800-\udfff]")


def pg_text(value: str | None) -> str | None:
    """``value`` as PostgreSQL can store it: NUL dropped, a surrogate pair joined into its
    character, a lone surrogate (``'\\ud800'``) replaced with U+FFFD. A model's output or an
    error message with either would otherwise fail the whole write (psycopg cannot encode it),
    again on every attempt of the chunk."""
    if value is None or not _NOT_PG_TEXT.search(value):
        return value
    value = value.replace("\x00", "")
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _json_text(value: Any) -> str:
    """JSON PostgreSQL can store: every string cleaned as a ``text`` column's is (``jsonb``
    refuses ``\\u0000``, and a lone surrogate cannot be encoded)."""
    return json.dumps(_pg_json(value), ensure_ascii=False)


def _pg_json(value: Any) -> Any:
    if isinstance(value, str):
        return pg_text(value)
    if isinstance(value, float) and not math.isfinite(value):  # JSON has no inf or NaN
        return None
    if isinstance(value, dict):
        return {str(pg_text(str(k))): _pg_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_pg_json(v) for v in value]
    return value


def _error_text(error: str | None) -> str | None:
    return pg_text(error[:ERROR_CHARS]) if error else None


@dataclass(frozen=True)
class Lease:
    """A worker's right to run one chunk, until ``lease_s`` passes without a renewal."""

    chunk_id: uuid.UUID
    token: uuid.UUID  # the fence: only this token's holder may write, renew, release or close
    job_id: uuid.UUID
    seq: int
    start_idx: int
    end_idx: int
    attempts: int  # counting this one
    task: str
    model: str
    params: dict[str, Any]


class ClaimOutcome(StrEnum):
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"  # finished earlier, or out of attempts now
    CANCELLED = "cancelled"
    JOB_CANCELLED = "job_cancelled"  # closed now because its job is being cancelled
    BUSY = "busy"  # another worker holds a live lease
    MISSING = "missing"


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to lease a chunk: a lease, or why there is none."""

    lease: Lease | None
    outcome: ClaimOutcome
    job_id: uuid.UUID | None = None
    # With a lease: the chunk's documents that have no result yet, read in the claim's own
    # transaction (one round of the pool, not two, per chunk).
    docs: tuple[Doc, ...] = ()


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
    choices: list[dict[str, Any]] | None = None  # an OpenAI request's every choice


class Written(NamedTuple):
    """What one ``write`` did: the job's status (the runner notices a cancel) and the rows it
    inserted (rows that already had a result count nothing)."""

    status: JobStatus
    succeeded: int = 0
    failed: int = 0
    completion_tokens: int = 0


class Released(NamedTuple):
    """A lease given back after a transient failure: requeued (retry after a backoff) or, out
    of attempts, closed ``failed``."""

    attempts: int
    requeued: bool


class Erased(NamedTuple):
    """What ``erase`` did. ``already``: the job was deleted before (nothing changed now).
    ``purged``: no document, result or chunk of it is left; otherwise the caller purges them
    in batches (``service.jobs.lifecycle.purge_deleted``)."""

    status: JobStatus
    deleted_at: datetime
    already: bool
    purged: bool


@dataclass
class Expired:
    """What one ``expire`` pass did with the leases whose worker stopped renewing them."""

    requeued: list[Unsent] = field(default_factory=list)  # waiting again, for the dispatcher
    failed: int = 0
    cancelled: int = 0
    skipped: bool = False  # another process holds the pass
    busy_jobs: int = 0  # expired leases left to the next pass: their job was locked elsewhere


class Unsent(NamedTuple):
    """A queued chunk whose message is to be sent: released by the dispatcher now, or
    released earlier with a message that may have been lost."""

    chunk_id: uuid.UUID
    job_id: uuid.UUID
    seq: int
    n_chunks: int
    queue: str
    priority: int


class ChunkStore(Protocol):
    """The chunk state machine, as the chunk runner, the reconciler and the API see it."""

    def claim(self, chunk_id: uuid.UUID, worker: str) -> Claim: ...

    def pending(self, lease: Lease) -> list[Doc]: ...

    def renew(self, leases: Iterable[Lease]) -> set[uuid.UUID]:
        """Extends the leases still held; returns the tokens of those that were lost."""
        ...

    def write(self, lease: Lease, results: Sequence[RowResult]) -> Written: ...

    def release(self, lease: Lease, error: str) -> Released: ...

    def finish(self, lease: Lease, results: Sequence[RowResult]) -> Written: ...

    def close(self, lease: Lease, state: ChunkState, error: str | None = None) -> None: ...

    def job_status(self, job_id: uuid.UUID) -> JobStatus | None: ...

    def cancel(self, job_id: uuid.UUID) -> JobStatus: ...

    def expire(self) -> Expired: ...


class PgChunkStore:
    """The PostgreSQL implementation. Each method is one transaction; driver errors leave it as
    ``StoreUnavailableError`` (transient: the chunk task retries on it)."""

    def __init__(self, db: Engine, *, lease_s: float, max_attempts: int) -> None:
        self.db = db
        self.lease_s = float(lease_s)
        self.max_attempts = max_attempts

    @classmethod
    def from_settings(cls, settings: Settings, db: Engine | None = None) -> PgChunkStore:
        """The store with the deployment's lease length and attempts (``settings.worker``)."""
        return cls(
            db
            if db is not None
            else get_engine(settings.database.url, settings.database.lock_timeout_s),
            lease_s=settings.worker.lease_s,
            max_attempts=settings.worker.max_attempts,
        )

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.db.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailableError(f"database unavailable: {exc.orig or exc}") from exc
        except PoolTimeoutError as exc:  # every pooled connection busy: also worth a retry
            raise StoreUnavailableError(f"database busy: {exc}") from exc

    # --- the lease holder's transitions ---------------------------------------------------

    def claim(self, chunk_id: uuid.UUID, worker: str) -> Claim:
        """Leases a queued chunk, or one whose lease expired (its worker died). Never a live
        one. A claim past ``max_attempts`` closes the chunk ``failed`` instead."""
        with self._tx() as conn:
            job_id = _lock_job_of(conn, chunk_id)
            if job_id is None:
                return Claim(None, ClaimOutcome.MISSING)
            token = uuid.uuid4()
            row = conn.execute(
                text(
                    """
                    UPDATE chunks c SET state = 'leased', worker = :worker,
                           attempts = c.attempts + 1, lease_token = :token,
                           lease_expires_at = now() + make_interval(secs => :lease_s),
                           updated_at = now()
                    FROM jobs j
                    WHERE c.id = :id AND j.id = c.job_id AND j.status IN ('queued', 'running')
                      AND (c.state = 'queued'
                           OR (c.state = 'leased' AND c.lease_expires_at < now()))
                    RETURNING c.seq, c.start_idx, c.end_idx, c.attempts,
                              j.task, j.model, j.params, j.status
                    """
                ),
                {"id": chunk_id, "worker": worker, "token": token, "lease_s": self.lease_s},
            ).first()
            if row is None:
                return _why_not(conn, chunk_id, job_id)
            if row.attempts > self.max_attempts:
                _close(
                    conn,
                    chunk_id,
                    job_id,
                    ChunkState.FAILED,
                    f"gave up after {self.max_attempts} attempts",
                )
                return Claim(None, ClaimOutcome.FAILED, job_id)
            if row.status == JobStatus.QUEUED:
                conn.execute(
                    text(
                        "UPDATE jobs SET status = 'running', "
                        "started_at = coalesce(started_at, now()) "
                        "WHERE id = :j AND status = 'queued'"
                    ),
                    {"j": job_id},
                )
            lease = Lease(
                chunk_id=chunk_id,
                token=token,
                job_id=job_id,
                seq=row.seq,
                start_idx=row.start_idx,
                end_idx=row.end_idx,
                attempts=row.attempts,
                task=row.task,
                model=row.model,
                params=dict(row.params or {}),
            )
            docs = _pending(conn, lease, first_claim=lease.attempts == 1)
            return Claim(lease, ClaimOutcome.LEASED, job_id, tuple(docs))

    def pending(self, lease: Lease) -> list[Doc]:
        """The chunk's documents that have no result yet (a re-run never redoes finished rows)."""
        with self._tx() as conn:
            return _pending(conn, lease)

    def renew(self, leases: Iterable[Lease]) -> set[uuid.UUID]:
        """Extends the leases still held; returns the tokens of those that were lost (a token
        names one lease: one process may hold, then lose, two leases on one chunk).

        One statement per batch, and it never waits: a chunk row another transaction has
        locked (its own runner closing it, a finalize waiting on a collection) is skipped, not
        waited for, so one slow transaction cannot make every lease of this worker, other
        tenants' too, expire behind it. A skipped lease is not lost: only a lease whose token
        no longer matches is reported; the next beat renews the skipped one."""
        held = list(leases)
        if not held:
            return set()
        with self._tx() as conn:
            lost = conn.execute(
                text(
                    """
                    WITH t AS (
                      SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[]))
                        AS t(id, token)
                    ), mine AS (
                      SELECT c.id FROM chunks c JOIN t ON c.id = t.id
                      WHERE c.lease_token = t.token AND c.state = 'leased'
                      FOR UPDATE OF c SKIP LOCKED
                    ), renewed AS (  -- a data-modifying CTE runs whether or not it is read
                      UPDATE chunks c
                      SET lease_expires_at = now() + make_interval(secs => :lease_s)
                      FROM mine WHERE c.id = mine.id
                    )
                    SELECT t.token FROM t
                    WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = t.id
                                      AND c.lease_token = t.token AND c.state = 'leased')
                    """
                ),
                {
                    "ids": [x.chunk_id for x in held],
                    "tokens": [x.token for x in held],
                    "lease_s": self.lease_s,
                },
            ).scalars()
            return set(lost)

    def write(self, lease: Lease, results: Sequence[RowResult]) -> Written:
        """Inserts results (a row that already has one is skipped) and moves the job's counters
        by exactly the rows inserted. Refused once the lease is lost."""
        with self._tx() as conn:
            return _write(conn, lease, results)

    def release(self, lease: Lease, error: str) -> Released:
        """Gives the chunk back after a transient failure: queued again for a retry (the caller
        re-sends its message after a backoff), or closed ``failed`` when this was its last
        attempt, or ``cancelled`` when its job is being cancelled meanwhile."""
        with self._tx() as conn:
            status = _hold(conn, lease)
            if status in CANCEL_STATUSES:
                _close(conn, lease.chunk_id, lease.job_id, ChunkState.CANCELLED)
                return Released(lease.attempts, requeued=False)
            if lease.attempts >= self.max_attempts:
                reason = f"gave up after {lease.attempts} attempts; last error: {error}"
                _close(conn, lease.chunk_id, lease.job_id, ChunkState.FAILED, reason)
                return Released(lease.attempts, requeued=False)
            conn.execute(
                text(
                    "UPDATE chunks SET state = 'queued', lease_token = NULL, "
                    "lease_expires_at = NULL, error = :err, enqueued_at = now(), "
                    "updated_at = now() WHERE id = :id AND lease_token = :token"
                ),
                {"id": lease.chunk_id, "token": lease.token, "err": _error_text(error)},
            )
            return Released(lease.attempts, requeued=True)

    def finish(self, lease: Lease, results: Sequence[RowResult]) -> Written:
        """The chunk's last results and its close (``done``) in one transaction: ``write``
        then ``close``, one commit instead of two per chunk. Refused once the lease is lost."""
        with self._tx() as conn:
            written = _write(conn, lease, results)
            _close(conn, lease.chunk_id, lease.job_id, ChunkState.DONE)
            return written

    def close(self, lease: Lease, state: ChunkState, error: str | None = None) -> None:
        """Ends the chunk (``done``, ``failed`` or ``cancelled``) and finalizes its job if this
        was the job's last open chunk. Refused once the lease is lost."""
        with self._tx() as conn:
            _hold(conn, lease)
            _close(conn, lease.chunk_id, lease.job_id, state, error)

    def job_status(self, job_id: uuid.UUID) -> JobStatus | None:
        with self._tx() as conn:
            value = conn.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id})
            status = value.scalar()
        return JobStatus(status) if status is not None else None

    # --- transitions made for the job as a whole ------------------------------------------

    def cancel(self, job_id: uuid.UUID) -> JobStatus:
        """Queued chunks never start; running ones finish their current step, and their worker
        (or the lease's expiry) completes the cancel. Results so far are kept. With no chunk
        running the job is ``cancelled`` at once, otherwise ``cancelling``."""
        with self._tx() as conn:
            current = conn.execute(
                text("SELECT status FROM jobs WHERE id = :j FOR UPDATE"), {"j": job_id}
            ).scalar()
            if current is None:
                raise ConflictError(f"job {job_id} does not exist")
            status = JobStatus(current)
            if status in CANCEL_STATUSES:
                return status
            if status.terminal:
                raise ConflictError(f"job {job_id} is already {status}; nothing to cancel")
            # Only rows without a result: a queued chunk may have written some before it was
            # given back (a transient failure, an expired lease).
            cancelled_docs = conn.execute(
                text(
                    """
                    WITH c AS (
                      UPDATE chunks SET state = 'cancelled', lease_token = NULL,
                             updated_at = now()
                      WHERE job_id = :j AND state = 'queued' RETURNING start_idx, end_idx
                    )
                    SELECT count(*) FROM c
                    JOIN documents d ON d.job_id = :j AND d.idx >= c.start_idx
                                    AND d.idx < c.end_idx
                    WHERE NOT EXISTS (SELECT 1 FROM results r
                                      WHERE r.job_id = d.job_id AND r.idx = d.idx)
                    """
                ),
                {"j": job_id},
            ).scalar_one()
            running = conn.execute(
                text("SELECT count(*) FROM chunks WHERE job_id = :j AND state = 'leased'"),
                {"j": job_id},
            ).scalar_one()
            new = JobStatus.CANCELLING if running else JobStatus.CANCELLED
            conn.execute(
                text(
                    "UPDATE jobs SET cancelled = cancelled + :n, status = :s, "
                    "finished_at = CASE WHEN :ended THEN now() END WHERE id = :j"
                ),
                {
                    "n": int(cancelled_docs),
                    "s": new,
                    "ended": new == JobStatus.CANCELLED,
                    "j": job_id,
                },
            )
            if new == JobStatus.CANCELLED:
                _apply_to_collection(conn, job_id)  # results so far, if scheduled
            return new

    def expire(self) -> Expired:
        """Leases whose worker stopped renewing them: the chunk is queued again, or ``failed``
        once it used up its attempts, or ``cancelled`` if its job is being cancelled. Then the
        queued chunks of ``cancelling`` jobs are closed, and such a job with nothing open is
        finalized ``cancelled`` (no claim will ever come for a chunk whose message was lost,
        and ``unsent`` re-sends only open jobs' chunks). One process at a time (an advisory
        lock); a second one skips the pass."""
        report = Expired()
        with self._tx() as conn:
            locked = conn.execute(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _EXPIRE_LOCK}
            ).scalar()
            if not locked:
                report.skipped = True
                return report
            expired = conn.execute(
                text(
                    "SELECT id, job_id FROM chunks "
                    "WHERE state = 'leased' AND lease_expires_at < now() ORDER BY job_id"
                )
            ).all()
            for chunk_id, job_id in expired:
                # A job locked elsewhere (its worker frozen mid-transaction) waits for the
                # next pass; waiting here would stall expiry for every other job.
                if (
                    conn.execute(
                        text("SELECT 1 FROM jobs WHERE id = :j FOR NO KEY UPDATE SKIP LOCKED"),
                        {"j": job_id},
                    ).first()
                    is None
                ):
                    report.busy_jobs += 1
                    continue
                c = conn.execute(
                    text(
                        """
                        SELECT c.attempts, c.error, c.worker, c.seq, j.status, j.n_chunks,
                               j.queue, j.priority
                        FROM chunks c JOIN jobs j ON j.id = c.job_id
                        WHERE c.id = :id AND c.state = 'leased' AND c.lease_expires_at < now()
                        FOR UPDATE OF c SKIP LOCKED
                        """
                    ),
                    {"id": chunk_id},
                ).first()
                if c is None:  # renewed or taken over meanwhile
                    continue
                if c.status in CANCEL_STATUSES:
                    _close(conn, chunk_id, job_id, ChunkState.CANCELLED)
                    report.cancelled += 1
                elif c.attempts >= self.max_attempts:
                    reason = (
                        f"gave up after {c.attempts} attempts (worker {c.worker} lost the lease)"
                    )
                    if c.error:
                        reason += f"; last error: {c.error}"
                    _close(conn, chunk_id, job_id, ChunkState.FAILED, reason)
                    report.failed += 1
                else:
                    conn.execute(
                        text(
                            "UPDATE chunks SET state = 'queued', lease_token = NULL, "
                            "lease_expires_at = NULL, enqueued_at = NULL, updated_at = now() "
                            "WHERE id = :id"
                        ),
                        {"id": chunk_id},
                    )
                    report.requeued.append(
                        Unsent(chunk_id, job_id, c.seq, c.n_chunks, c.queue, c.priority)
                    )
            report.cancelled += _close_cancelling(conn)
        return report

    # --- the dispatcher's transition and lost messages ------------------------------------

    @contextmanager
    def releasing(self, model: str, *, ahead: int, live_s: float) -> Iterator[list[Unsent]]:
        """Releases the model's next chunks: marks them released and yields them, and the
        caller sends their messages inside the block. A send that fails rolls the release
        back, so a chunk is never marked released without a message having been sent.

        How many: the model's live workers' slots plus ``ahead``, less the chunks already
        released or running, so Redis holds at most that many of the model's messages however
        large its jobs are. Which: interactive before bulk, and within a priority the tenant
        with the fewest chunks released or running first (each tenant's jobs oldest first), so
        a small job never waits behind another tenant's large one for more than the messages
        already released. One pass per model at a time (an advisory lock: the budget read and
        the release are one step); rows a transition holds are skipped, never waited for."""
        with self._tx() as conn:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:k, hashtext(:m))"),
                {"k": _DISPATCH_LOCK, "m": model},
            )
            rows = conn.execute(_RELEASE, {"m": model, "ahead": ahead, "live_s": live_s}).all()
            picked = [Unsent(*row) for row in rows]
            yield picked

    def dispatchable_models(self) -> list[str]:
        """Models with chunks waiting for release (the periodic pass visits each)."""
        with self._tx() as conn:
            rows = conn.execute(
                text(
                    "SELECT DISTINCT j.model FROM jobs j WHERE j.status IN ('queued', 'running') "
                    "AND EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = j.id "
                    "AND c.state = 'queued' AND c.enqueued_at IS NULL) ORDER BY j.model"
                )
            ).scalars()
            return list(rows)

    def unsent(self, requeue_after_s: float) -> list[Unsent]:
        """Released chunks still unclaimed ``requeue_after_s`` after their message was sent:
        their message may have been lost (the reconciler checks Redis before re-sending).
        Chunks never released wait for the dispatcher and are not listed."""
        with self._tx() as conn:
            rows = conn.execute(
                text(
                    """
                    SELECT c.id, c.job_id, c.seq, j.n_chunks, j.queue, j.priority
                    FROM chunks c JOIN jobs j ON j.id = c.job_id
                    WHERE c.state = 'queued' AND c.enqueued_at IS NOT NULL
                      AND j.status IN ('queued', 'running')
                      AND c.enqueued_at < now() - make_interval(secs => :after)
                    ORDER BY j.priority DESC, j.created_at, c.seq
                    """
                ),
                {"after": float(requeue_after_s)},
            ).all()
        return [Unsent(*r) for r in rows]

    def restamp(self, chunk_ids: Sequence[uuid.UUID], requeue_after_s: float) -> set[uuid.UUID]:
        """Stamps the chunks about to be re-sent (their wait starts again) and returns those
        this call stamped. Every worker runs a reconciler: the stamp is conditional, so of
        passes that found the same lost message at once only one re-sends it."""
        if not chunk_ids:
            return set()
        with self._tx() as conn:
            # = ANY(array): one parameter however many chunks (IN (...) stops at 65,535).
            rows = conn.execute(
                text(
                    """
                    UPDATE chunks SET enqueued_at = now()
                    WHERE id = ANY(:ids) AND state = 'queued'
                      AND enqueued_at < now() - make_interval(secs => :after)
                    RETURNING id
                    """
                ),
                {"ids": list(chunk_ids), "after": float(requeue_after_s)},
            ).scalars()
            return set(rows)

    # --- erasing a job ----------------------------------------------------------------------

    def erase(self, job_id: uuid.UUID, *, purge_rows: int) -> Erased:
        """Deletes a job for its tenant, keeping a tombstone: the job row with its counts and
        tokens, ``deleted_at`` set. One transaction under the job's lock.

        A job that is not finished is cancelled first, and its leased chunks are closed here
        too (not left to their runners, as ``cancel`` does): their lease tokens are dropped, so
        whatever a runner still sends (``write``, ``close``, ``release``, ``renew``) is refused
        by the fence, and nothing lands after the delete. Rows that had no result count as
        cancelled, so the tombstone's counts still add up to its total.

        A job of at most ``purge_rows`` documents loses its results, documents and chunks in
        this transaction; a larger one is only marked here, so one request never deletes a
        million rows in one transaction, and the caller purges it in batches. Deleting a job
        that is already deleted changes nothing and says so (``already``)."""
        with self._tx() as conn:
            job = conn.execute(
                text("SELECT status, total, deleted_at FROM jobs WHERE id = :j FOR UPDATE"),
                {"j": job_id},
            ).first()
            if job is None:
                raise NotFoundError(f"job {job_id} not found")
            if job.deleted_at is not None:
                left = conn.execute(_ROWS_LEFT, {"j": job_id}).scalar_one()
                return Erased(JobStatus(job.status), job.deleted_at, True, not left)
            status = JobStatus(job.status)
            if not status.terminal:
                status = _cancel_for_erase(conn, job_id)
            purged = int(job.total) <= purge_rows
            if purged:
                # Results before documents: their foreign key cascades row by row otherwise.
                for table in ("results", "documents", "chunks"):
                    conn.execute(text(f"DELETE FROM {table} WHERE job_id = :j"), {"j": job_id})
            deleted_at = conn.execute(
                text("UPDATE jobs SET deleted_at = now() WHERE id = :j RETURNING deleted_at"),
                {"j": job_id},
            ).scalar_one()
        log.info("job %s deleted (%s; rows %s)", job_id, status, "purged" if purged else "to purge")
        return Erased(status, deleted_at, False, purged)


#: The dispatcher's release, in one statement (the advisory lock is taken before it, so its
#: snapshot sees every release that came before). ``budget``: the model's live workers' slots
#: plus ``ahead``, less its chunks out (released, not yet claimed, or running). ``offered``: each
#: open job's first waiting chunks; a tenant's turn counts its chunks already out, so the tenant
#: with the fewest goes first within a priority, interleaving tenants from there on. The picked
#: chunks are marked released in the same statement.
_RELEASE = text(
    """
    WITH open_jobs AS (
      SELECT j.id, j.tenant_id, j.priority, j.created_at, j.n_chunks, j.queue FROM jobs j
      WHERE j.model = :m AND j.status IN ('queued', 'running')
    ), out AS (
      SELECT o.tenant_id, o.priority, count(*) AS n FROM open_jobs o
      JOIN chunks c ON c.job_id = o.id
      WHERE c.state = 'leased' OR (c.state = 'queued' AND c.enqueued_at IS NOT NULL)
      GROUP BY o.tenant_id, o.priority
    ), budget AS (
      SELECT greatest(0,
        (SELECT coalesce(sum(w.slots), 0) FROM workers w
         WHERE w.model = :m AND w.last_heartbeat_at > now() - make_interval(secs => :live_s))
        + :ahead - (SELECT coalesce(sum(n), 0) FROM out)) AS n
    ), offered AS (
      SELECT w.id, w.seq, o.id AS job_id, o.tenant_id, o.priority, o.created_at, o.n_chunks,
             o.queue
      FROM open_jobs o CROSS JOIN LATERAL (
        SELECT c.id, c.seq FROM chunks c
        WHERE c.job_id = o.id AND c.state = 'queued' AND c.enqueued_at IS NULL
        ORDER BY c.seq LIMIT (SELECT n FROM budget) FOR UPDATE SKIP LOCKED
      ) w
    ), turns AS (
      SELECT f.*, coalesce(out.n, 0) + row_number() OVER (
               PARTITION BY f.tenant_id, f.priority ORDER BY f.created_at, f.job_id, f.seq
             ) AS turn
      FROM offered f LEFT JOIN out ON out.tenant_id = f.tenant_id AND out.priority = f.priority
    ), picked AS (
      SELECT id, job_id, seq, n_chunks, queue, priority, turn, created_at FROM turns
      ORDER BY priority DESC, turn, created_at, job_id, seq
      LIMIT (SELECT n FROM budget)
    ), released AS (
      UPDATE chunks c SET enqueued_at = now(), updated_at = now()
      FROM picked WHERE c.id = picked.id
    )
    SELECT id, job_id, seq, n_chunks, queue, priority FROM picked
    ORDER BY priority DESC, turn, created_at, job_id, seq
    """
)


# --- the SQL under the transitions (each runs inside the caller's transaction) ---------------


#: Whether a deleted job still holds rows (its purge is not finished).
_ROWS_LEFT = text(
    "SELECT EXISTS (SELECT 1 FROM documents WHERE job_id = :j) "
    "OR EXISTS (SELECT 1 FROM chunks WHERE job_id = :j)"
)


def _cancel_for_erase(conn: Connection, job_id: uuid.UUID) -> JobStatus:
    """Ends an unfinished job ``cancelled`` at once (the job row is locked): every open chunk,
    leased ones included, is closed ``cancelled`` with its lease token dropped, its rows
    without a result are counted as cancelled, and a scheduled job's results so far reach its
    collection, as a finished cancel's would."""
    cancelled_docs = conn.execute(
        text(
            """
            WITH c AS (
              UPDATE chunks SET state = 'cancelled', lease_token = NULL,
                     lease_expires_at = NULL, updated_at = now()
              WHERE job_id = :j AND state IN ('queued', 'leased') RETURNING start_idx, end_idx
            )
            SELECT count(*) FROM c
            JOIN documents d ON d.job_id = :j AND d.idx >= c.start_idx AND d.idx < c.end_idx
            WHERE NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = d.job_id AND r.idx = d.idx)
            """
        ),
        {"j": job_id},
    ).scalar_one()
    conn.execute(
        text(
            "UPDATE jobs SET cancelled = cancelled + :n, status = 'cancelled', "
            "finished_at = now() WHERE id = :j"
        ),
        {"n": int(cancelled_docs), "j": job_id},
    )
    _apply_to_collection(conn, job_id)
    return JobStatus.CANCELLED


_PENDING = text(
    """
    SELECT d.idx, d.external_id, d.text, d.extra FROM documents d
    WHERE d.job_id = :j AND d.idx >= :s AND d.idx < :e
      AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = d.job_id AND r.idx = d.idx)
    ORDER BY d.idx
    """
)


#: A chunk's first lease: none of its rows can have a result yet (results are written only
#: under a lease, or when a leased chunk is closed or expires), so no per-row results probe.
_FIRST_PENDING = text(
    """
    SELECT d.idx, d.external_id, d.text, d.extra FROM documents d
    WHERE d.job_id = :j AND d.idx >= :s AND d.idx < :e ORDER BY d.idx
    """
)


def _pending(conn: Connection, lease: Lease, *, first_claim: bool = False) -> list[Doc]:
    rows = conn.execute(
        _FIRST_PENDING if first_claim else _PENDING,
        {"j": lease.job_id, "s": lease.start_idx, "e": lease.end_idx},
    ).all()
    return [Doc(idx, external_id, text, extra) for idx, external_id, text, extra in rows]


def _lock_job_of(conn: Connection, chunk_id: uuid.UUID) -> uuid.UUID | None:
    """Locks the chunk's job row (lock order everywhere: the job, then its chunks)."""
    job_id = conn.execute(
        text(
            "SELECT j.id FROM jobs j JOIN chunks c ON c.job_id = j.id WHERE c.id = :id "
            "FOR NO KEY UPDATE OF j"
        ),
        {"id": chunk_id},
    ).scalar()
    return None if job_id is None else uuid.UUID(str(job_id))


def _write(conn: Connection, lease: Lease, results: Sequence[RowResult]) -> Written:
    """Results under the lease (``write``): refused, and nothing written, once it is lost."""
    if not results:
        return Written(_hold(conn, lease))
    # The job's lock first, in its own statement, so that the fence in the insert's statement
    # reads the chunk as it is after any takeover that held the lock.
    status = conn.execute(
        text("SELECT status FROM jobs WHERE id = :j FOR NO KEY UPDATE"), {"j": lease.job_id}
    ).scalar()
    if status is None:
        _refuse(lease, "gone")
    written = _insert_results(conn, lease.job_id, results, JobStatus(status), lease)
    if written is None:
        _refuse(lease, "taken over")
    return written


def _hold(conn: Connection, lease: Lease) -> JobStatus:
    """Locks the job and checks the fence: the chunk is still leased under this lease's token.
    Returns the job's status; a lost lease raises (and is logged), so nothing is written.

    Two statements on purpose: under READ COMMITTED a statement that waited for the job's lock
    re-reads only the locked row, so a chunk read in the same statement could be the one from
    before the takeover that held the lock. Read after the lock, it is the current one."""
    status = conn.execute(
        text("SELECT status FROM jobs WHERE id = :j FOR NO KEY UPDATE"), {"j": lease.job_id}
    ).scalar()
    row = conn.execute(
        text(
            "SELECT state, worker, (state = 'leased' AND lease_token = :token) AS owned "
            "FROM chunks WHERE id = :id"
        ),
        {"id": lease.chunk_id, "token": lease.token},
    ).first()
    if status is None or row is None or not row.owned:
        _refuse(lease, "gone" if row is None else f"{row.state}, worker {row.worker}")
    return JobStatus(status)


def _close_cancelling(conn: Connection) -> int:
    """Closes the queued chunks of ``cancelling`` jobs and finalizes those jobs with nothing
    open left; returns the chunks closed. Leased chunks are left to their runner or their
    lease's expiry. Only reached through ``expire`` (under its advisory lock)."""
    jobs = (
        conn.execute(text("SELECT id FROM jobs WHERE status = 'cancelling' ORDER BY id"))
        .scalars()
        .all()
    )
    closed = 0
    for job_id in jobs:
        status = conn.execute(
            text("SELECT status FROM jobs WHERE id = :j FOR NO KEY UPDATE SKIP LOCKED"),
            {"j": job_id},
        ).scalar()
        if status != JobStatus.CANCELLING:  # finished, or locked elsewhere: the next pass
            continue
        queued = conn.execute(
            text("SELECT id FROM chunks WHERE job_id = :j AND state = 'queued' ORDER BY seq"),
            {"j": job_id},
        ).scalars()
        for chunk_id in list(queued):
            _close(conn, chunk_id, job_id, ChunkState.CANCELLED)
            closed += 1
        _finalize(conn, job_id)  # a no-op while a chunk is still leased
    return closed


def _refuse(lease: Lease, where: str) -> NoReturn:
    log.warning(
        "chunk %s: lease lost (attempt %d); the write is refused (chunk now %s)",
        lease.chunk_id,
        lease.attempts,
        where,
    )
    raise LeaseLostError(
        f"chunk {lease.chunk_id}: lease of attempt {lease.attempts} was taken over ({where})"
    )


def _why_not(conn: Connection, chunk_id: uuid.UUID, job_id: uuid.UUID) -> Claim:
    """Why a claim found nothing to lease; a chunk of a cancelled job that no live lease holds
    is closed ``cancelled`` on the way."""
    state = conn.execute(
        text(
            "SELECT c.state, c.lease_expires_at < now() AS expired, j.status "
            "FROM chunks c JOIN jobs j ON j.id = c.job_id WHERE c.id = :id"
        ),
        {"id": chunk_id},
    ).first()
    if state is None:
        return Claim(None, ClaimOutcome.MISSING)
    chunk_state = ChunkState(state.state)
    if chunk_state.finished:
        return Claim(None, ClaimOutcome(chunk_state.value), job_id)
    if state.status in CANCEL_STATUSES:
        if chunk_state == ChunkState.QUEUED or state.expired:
            _close(conn, chunk_id, job_id, ChunkState.CANCELLED)
        return Claim(None, ClaimOutcome.JOB_CANCELLED, job_id)
    return Claim(None, ClaimOutcome.BUSY, job_id)


_INSERT_RESULTS = """
    WITH fence AS ({fence}),
    ins AS (
      INSERT INTO results (job_id, idx, output, label, confidence, finish_reason,
                           prompt_tokens, completion_tokens, truncated, error, attempts,
                           latency_ms, choices)
      SELECT :j, u.* FROM unnest(
        CAST(:idx AS int[]), CAST(:output AS text[]), CAST(:label AS text[]),
        CAST(:confidence AS float8[]), CAST(:finish_reason AS text[]),
        CAST(:prompt_tokens AS int[]), CAST(:completion_tokens AS int[]),
        CAST(:truncated AS bool[]), CAST(:error AS text[]), CAST(:attempts AS int[]),
        CAST(:latency_ms AS float8[]), CAST(:choices AS jsonb[])) AS u
      WHERE EXISTS (SELECT 1 FROM fence)
      ON CONFLICT (job_id, idx) DO NOTHING
      RETURNING error IS NULL AS ok, prompt_tokens, completion_tokens
    ), n AS (
      SELECT count(*) FILTER (WHERE ok) AS ok, count(*) FILTER (WHERE NOT ok) AS bad,
             coalesce(sum(prompt_tokens), 0) AS pt,
             coalesce(sum(completion_tokens), 0) AS ct
      FROM ins
    ), usage AS (
      -- The tenant's ledger (usage, daily quotas), moved by exactly the rows inserted. Keyed
      -- by job: its row is only written under this job's lock, so writers never queue on it.
      INSERT INTO usage_daily (tenant_id, day, job_id, model, documents, failed,
                               prompt_tokens, completion_tokens)
      SELECT jb.tenant_id, (now() AT TIME ZONE 'UTC')::date, jb.id, jb.model, n.ok + n.bad,
             n.bad, n.pt, n.ct
      FROM n JOIN jobs jb ON jb.id = :j
      WHERE n.ok + n.bad > 0
      ON CONFLICT (tenant_id, day, job_id) DO UPDATE SET
        documents = usage_daily.documents + EXCLUDED.documents,
        failed = usage_daily.failed + EXCLUDED.failed,
        prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens
    )
    UPDATE jobs SET
      succeeded = succeeded + n.ok,
      failed = failed + n.bad,
      prompt_tokens = prompt_tokens + n.pt,
      completion_tokens = completion_tokens + n.ct
    FROM n
    WHERE id = :j
    RETURNING status, n.ok, n.bad, n.ct, EXISTS (SELECT 1 FROM fence) AS owned
"""
#: Results under a lease: inserted only while the chunk is leased with that lease's token.
_INSERT_FENCED = text(
    _INSERT_RESULTS.format(
        fence="SELECT 1 FROM chunks WHERE id = :c AND state = 'leased' AND lease_token = :t"
    )
)
#: Results written by a transition that already holds the chunk (a close failing its rows).
_INSERT_HELD = text(_INSERT_RESULTS.format(fence="SELECT 1"))


def _insert_results(
    conn: Connection,
    job_id: uuid.UUID,
    results: Sequence[RowResult],
    status: JobStatus,
    fence: Lease | None = None,
) -> Written | None:
    """One statement: the rows (a row that already has a result is skipped), and the job's
    counters and the tenant's usage ledger (``usage_daily``) moved by exactly the rows
    inserted. With ``fence``, nothing is written unless the chunk is still leased under that
    lease's token; None then says it was not."""
    if not results:
        return Written(status)
    cols = {  # array literals: see service.store.arrays
        "idx": int_array(r.idx for r in results),
        "output": text_array(pg_text(r.output) for r in results),
        "label": text_array(pg_text(r.label) for r in results),
        "confidence": float_array(r.confidence for r in results),
        "finish_reason": text_array(pg_text(r.finish_reason) for r in results),
        "prompt_tokens": int_array(r.prompt_tokens for r in results),
        "completion_tokens": int_array(r.completion_tokens for r in results),
        "truncated": bool_array(r.truncated for r in results),
        "error": text_array(pg_text(r.error) for r in results),
        "attempts": int_array(r.attempts for r in results),
        "latency_ms": float_array(r.latency_ms for r in results),
        "choices": text_array(
            None if r.choices is None else _json_text(r.choices) for r in results
        ),
    }
    if fence is None:
        row = conn.execute(_INSERT_HELD, {"j": job_id, **cols}).first()
    else:
        row = conn.execute(
            _INSERT_FENCED, {"j": job_id, "c": fence.chunk_id, "t": fence.token, **cols}
        ).first()
    if row is None:
        return Written(status)
    if not row.owned:
        return None
    return Written(JobStatus(row.status), int(row.ok), int(row.bad), int(row.ct))


def _close(
    conn: Connection,
    chunk_id: uuid.UUID,
    job_id: uuid.UUID,
    state: ChunkState,
    error: str | None = None,
) -> None:
    """Ends a chunk (the job row is already locked). Rows without a result become errors
    (``failed``) or are counted as cancelled (``cancelled``); ``done`` needs no rows. Then
    finalizes the job if this was its last open chunk."""
    if not state.finished:
        raise ValueError(f"cannot close a chunk as {state}")
    chunk = conn.execute(
        text(
            "UPDATE chunks SET state = :state, lease_token = NULL, lease_expires_at = NULL, "
            "error = :err, updated_at = now() "
            "WHERE id = :id AND state NOT IN ('done', 'failed', 'cancelled') "
            "RETURNING start_idx, end_idx, attempts"
        ),
        {"id": chunk_id, "state": state, "err": _error_text(error)},
    ).first()
    if chunk is None:
        return  # closed already
    if state != ChunkState.DONE:
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
        if missing and state == ChunkState.FAILED:
            reason = error or "chunk failed"
            rows = [RowResult(idx=i, error=reason, attempts=chunk.attempts) for i in missing]
            _insert_results(conn, job_id, rows, JobStatus.RUNNING)
        elif missing:
            conn.execute(
                text("UPDATE jobs SET cancelled = cancelled + :n WHERE id = :j"),
                {"n": len(missing), "j": job_id},
            )
    _finalize(conn, job_id)


def _finalize(conn: Connection, job_id: uuid.UUID) -> JobStatus | None:
    """If no chunk of the job is open any more, gives the job its terminal status."""
    job = conn.execute(
        text("SELECT status, succeeded, failed FROM jobs WHERE id = :j FOR UPDATE"), {"j": job_id}
    ).first()
    if job is None or JobStatus(job.status).terminal:
        return None
    # From the job's last chunk backwards: chunks close roughly in order, so an open one is
    # found at once, where counting them read every open chunk of the job at every close.
    open_chunk = conn.execute(
        text(
            "SELECT 1 FROM chunks WHERE job_id = :j AND state IN ('queued', 'leased') "
            "ORDER BY seq DESC LIMIT 1"
        ),
        {"j": job_id},
    ).first()
    if open_chunk is not None:
        return None
    error: str | None = None
    if job.status == JobStatus.CANCELLING:
        status = JobStatus.CANCELLED
    elif job.succeeded == 0 and job.failed > 0:
        status = JobStatus.FAILED
        error = f"all {job.failed} documents failed; see the results' errors"
    else:
        status = JobStatus.COMPLETED
    conn.execute(
        text(
            "UPDATE jobs SET status = :s, finished_at = now(), error = coalesce(:e, error) "
            "WHERE id = :j"
        ),
        {"s": status, "e": error, "j": job_id},
    )
    _apply_to_collection(conn, job_id)
    return status


def _apply_to_collection(conn: Connection, job_id: uuid.UUID) -> int:
    """A scheduled job's successful results become its collection's latest summaries, in the
    transaction that ends the job. Only documents whose text is still the one summarized (same
    content hash) are updated: a document changed meanwhile stays pending for the next run.
    Any other job: a no-op. Returns the documents updated."""
    collection = conn.execute(
        text("SELECT collection_id FROM jobs WHERE id = :j"), {"j": job_id}
    ).scalar()
    if collection is None:
        return 0
    # The collection row first, as uploads (service.collections.documents.upsert_documents)
    # take it before the document rows: both touch documents in one order, never a deadlock.
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

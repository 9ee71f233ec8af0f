"""The chunk state machine on an embedded SQLite file: ``docqueue run``'s store, no server.

The one permitted second implementation of ``service.store.chunks.ChunkStore``; everything
else (parsing, rendering, the runner, the engine, export) is shared with the service. The
transitions mirror ``PgChunkStore`` one for one: fenced leases (every write, renewal, release
and close carries its lease's token and is refused once the chunk has another), results
unique per document, counters moved by exactly the rows inserted, a job finalized by the close
of its last open chunk.

One process owns the file at a time (``docqueue run`` holds an exclusive lock on it), so
SQLite's single writer is no limit: every transition is one ``BEGIN IMMEDIATE`` transaction
under a process lock. Text is stored as PostgreSQL stores it (``pg_text``: no NUL, no lone
surrogate), so a run's output equals the service's byte for byte. The file is in WAL mode
with ``synchronous=NORMAL``: a crash of the process loses nothing committed, and a power cut
at worst loses the last transactions whole (their results and their counters together), so
those rows run again, never twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from service.errors import (
    ConflictError,
    InvalidFileError,
    LeaseLostError,
    StoreUnavailableError,
    clip,
)
from service.jobs.ingest import RowSink, encode_rows
from service.store.chunks import (
    ERROR_CHARS,
    Claim,
    ClaimOutcome,
    Doc,
    Expired,
    Lease,
    Released,
    RowResult,
    Unsent,
    Written,
    pg_text,
)
from service.store.states import CANCEL_STATUSES, ChunkState, JobStatus

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  task TEXT NOT NULL,
  model TEXT NOT NULL,
  params TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'queued',
  total INTEGER NOT NULL,
  n_chunks INTEGER NOT NULL,
  succeeded INTEGER NOT NULL DEFAULT 0,
  failed INTEGER NOT NULL DEFAULT 0,
  cancelled INTEGER NOT NULL DEFAULT 0,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  created_at REAL NOT NULL,
  started_at REAL,
  finished_at REAL
);
CREATE TABLE IF NOT EXISTS documents (
  job_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  external_id TEXT,
  text TEXT NOT NULL,
  extra TEXT,
  PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS documents_external_id ON documents (job_id, external_id);
CREATE TABLE IF NOT EXISTS chunks (
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  start_idx INTEGER NOT NULL,
  end_idx INTEGER NOT NULL,
  state TEXT NOT NULL DEFAULT 'queued',
  attempts INTEGER NOT NULL DEFAULT 0,
  lease_token TEXT,
  lease_expires_at REAL,
  worker TEXT,
  error TEXT
);
CREATE INDEX IF NOT EXISTS chunks_job_seq ON chunks (job_id, seq);
CREATE TABLE IF NOT EXISTS results (
  job_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  output TEXT,
  label TEXT,
  confidence REAL,
  finish_reason TEXT,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  truncated INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  attempts INTEGER NOT NULL DEFAULT 1,
  latency_ms REAL,
  choices TEXT,
  created_at REAL NOT NULL,
  PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""


def _error_text(error: str | None) -> str | None:
    return None if error is None else pg_text(error[:ERROR_CHARS])


class SqliteChunkStore:
    """``ChunkStore`` on one SQLite file. Thread-safe: the runner's chunk threads share it."""

    def __init__(self, path: Path | str, *, lease_s: float, max_attempts: int) -> None:
        self.path = Path(path)
        self.lease_s = float(lease_s)
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open the store {self.path}: {exc}") from exc
        version = self.meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise ConflictError(
                f"{self.path} was written by another docqueue (store version {version}, "
                f"this one reads {SCHEMA_VERSION}); use another --store or --restart"
            )

    def close_file(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:  # locked by another process, disk away
                raise StoreUnavailableError(f"store {self.path} unavailable: {exc}") from exc
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._conn.execute("ROLLBACK")
                raise StoreUnavailableError(f"store {self.path}: commit failed: {exc}") from exc

    # --- the run's own records --------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, values: dict[str, str]) -> None:
        with self._tx() as conn:
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def create_job(
        self,
        *,
        task: str,
        model: str,
        params: dict[str, Any],
        load: Callable[[RowSink], Any],
        chunk_size: int | Callable[[int], int],
    ) -> uuid.UUID:
        """Stores the documents ``load`` hands its sink (idx from 1, in input order: the
        service's readers and checks, ``service.jobs.formats.ingest_upload``) and cuts them
        into chunks (``chunk_size``, or a function of the row count), in one transaction: a
        run killed while storing starts over, never half-stored."""
        job_id = uuid.uuid4()
        with self._tx() as conn:
            sink = _Sink(conn, job_id)
            load(sink)
            sink.flush()
            total = sink.rows
            size = chunk_size if isinstance(chunk_size, int) else chunk_size(total)
            starts = range(1, total + 1, size)
            conn.executemany(
                "INSERT INTO chunks (id, job_id, seq, start_idx, end_idx) VALUES (?, ?, ?, ?, ?)",
                [
                    (str(uuid.uuid4()), str(job_id), seq, start, min(start + size, total + 1))
                    for seq, start in enumerate(starts)
                ],
            )
            conn.execute(
                "INSERT INTO jobs (id, task, model, params, status, total, n_chunks, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(job_id),
                    task,
                    model,
                    json.dumps(params),
                    JobStatus.QUEUED if total else JobStatus.COMPLETED,
                    total,
                    len(starts),
                    time.time(),
                ),
            )
        return job_id

    def open_chunks(self, job_id: uuid.UUID) -> list[uuid.UUID]:
        """The job's chunks still to run (queued, or leased by a run that died), in order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM chunks WHERE job_id = ? AND state IN ('queued', 'leased') "
                "ORDER BY seq",
                (str(job_id),),
            ).fetchall()
        return [uuid.UUID(r[0]) for r in rows]

    def job(self, job_id: uuid.UUID) -> dict[str, Any]:
        """The job's row (status, counters, tokens, times) as a dict."""
        with self._lock:
            cur = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (str(job_id),))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        if row is None:
            raise ConflictError(f"job {job_id} is not in {self.path}")
        return dict(zip(names, row, strict=True))

    def rows(
        self, job_id: uuid.UUID, page: int = 2000
    ) -> Iterator[tuple[Doc, dict[str, Any] | None]]:
        """Every document with its result (None: none yet), in input order, page by page."""
        after = 0
        while True:
            with self._lock:
                cur = self._conn.execute(
                    "SELECT d.idx, d.external_id, d.text, d.extra, r.* FROM documents d "
                    "LEFT JOIN results r ON r.job_id = d.job_id AND r.idx = d.idx "
                    "WHERE d.job_id = ? AND d.idx > ? ORDER BY d.idx LIMIT ?",
                    (str(job_id), after, page),
                )
                found = cur.fetchall()
                names = [d[0] for d in cur.description][4:]
            if not found:
                return
            for row in found:
                doc = Doc(row[0], row[1], row[2], None if row[3] is None else json.loads(row[3]))
                result = dict(zip(names, row[4:], strict=True))
                yield doc, (None if result["job_id"] is None else result)
            after = found[-1][0]

    # --- the lease holder's transitions (ChunkStore) ----------------------------------------

    def claim(self, chunk_id: uuid.UUID, worker: str) -> Claim:
        """Leases a queued chunk, or one whose lease expired. Never a live one. A claim past
        ``max_attempts`` closes the chunk ``failed`` instead."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT c.job_id, c.state, c.lease_expires_at, c.seq, c.start_idx, c.end_idx, "
                "c.attempts, j.task, j.model, j.params, j.status "
                "FROM chunks c JOIN jobs j ON j.id = c.job_id WHERE c.id = ?",
                (str(chunk_id),),
            ).fetchone()
            if row is None:
                return Claim(None, ClaimOutcome.MISSING)
            job_id = uuid.UUID(row[0])
            state, expires, status = ChunkState(row[1]), row[2], JobStatus(row[10])
            now = time.time()
            if state.finished:
                return Claim(None, ClaimOutcome(state.value), job_id)
            live = state == ChunkState.LEASED and expires is not None and expires >= now
            if status in CANCEL_STATUSES:
                if not live:
                    _close(conn, chunk_id, job_id, ChunkState.CANCELLED)
                return Claim(None, ClaimOutcome.JOB_CANCELLED, job_id)
            if live or not status.open:
                return Claim(None, ClaimOutcome.BUSY, job_id)
            attempts = int(row[6]) + 1
            token = uuid.uuid4()
            conn.execute(
                "UPDATE chunks SET state = 'leased', worker = ?, attempts = ?, lease_token = ?, "
                "lease_expires_at = ? WHERE id = ?",
                (worker, attempts, str(token), now + self.lease_s, str(chunk_id)),
            )
            if attempts > self.max_attempts:
                reason = f"gave up after {self.max_attempts} attempts"
                _close(conn, chunk_id, job_id, ChunkState.FAILED, reason)
                return Claim(None, ClaimOutcome.FAILED, job_id)
            if status == JobStatus.QUEUED:
                conn.execute(
                    "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?) "
                    "WHERE id = ?",
                    (now, str(job_id)),
                )
            lease = Lease(
                chunk_id=chunk_id,
                token=token,
                job_id=job_id,
                seq=int(row[3]),
                start_idx=int(row[4]),
                end_idx=int(row[5]),
                attempts=attempts,
                task=str(row[7]),
                model=str(row[8]),
                params=dict(json.loads(row[9]) or {}),
            )
            return Claim(lease, ClaimOutcome.LEASED, job_id, tuple(_pending(conn, lease)))

    def pending(self, lease: Lease) -> list[Doc]:
        """The chunk's documents that have no result yet (a re-run never redoes finished rows)."""
        with self._tx() as conn:
            return _pending(conn, lease)

    def renew(self, leases: Iterable[Lease]) -> set[uuid.UUID]:
        """Extends the leases still held; returns the tokens of those that were lost."""
        held = list(leases)
        if not held:
            return set()
        lost: set[uuid.UUID] = set()
        with self._tx() as conn:
            until = time.time() + self.lease_s
            for lease in held:
                cur = conn.execute(
                    "UPDATE chunks SET lease_expires_at = ? "
                    "WHERE id = ? AND state = 'leased' AND lease_token = ?",
                    (until, str(lease.chunk_id), str(lease.token)),
                )
                if cur.rowcount == 0:
                    lost.add(lease.token)
        return lost

    def write(self, lease: Lease, results: Sequence[RowResult]) -> Written:
        """Inserts results (a row that already has one is skipped) and moves the job's counters
        by exactly the rows inserted. Refused once the lease is lost."""
        with self._tx() as conn:
            status = _hold(conn, lease)
            return _insert_results(conn, lease.job_id, results, status)

    def release(self, lease: Lease, error: str) -> Released:
        """Gives the chunk back after a transient failure: queued again, or closed ``failed``
        on its last attempt, or ``cancelled`` when its job is being cancelled meanwhile."""
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
                "UPDATE chunks SET state = 'queued', lease_token = NULL, lease_expires_at = NULL,"
                " error = ? WHERE id = ?",
                (_error_text(error), str(lease.chunk_id)),
            )
            return Released(lease.attempts, requeued=True)

    def finish(self, lease: Lease, results: Sequence[RowResult]) -> Written:
        """The chunk's last results and its close (``done``) in one transaction."""
        with self._tx() as conn:
            status = _hold(conn, lease)
            written = _insert_results(conn, lease.job_id, results, status)
            _close(conn, lease.chunk_id, lease.job_id, ChunkState.DONE)
            return written

    def close(self, lease: Lease, state: ChunkState, error: str | None = None) -> None:
        """Ends the chunk and finalizes its job if this was its last open chunk."""
        with self._tx() as conn:
            _hold(conn, lease)
            _close(conn, lease.chunk_id, lease.job_id, state, error)

    def job_status(self, job_id: uuid.UUID) -> JobStatus | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT status FROM jobs WHERE id = ?", (str(job_id),)
            ).fetchone()
        return None if row is None else JobStatus(row[0])

    # --- transitions made for the job as a whole --------------------------------------------

    def cancel(self, job_id: uuid.UUID) -> JobStatus:
        """Queued chunks never start; leased ones end at their runner's next step. Results so
        far are kept. With no chunk running the job is ``cancelled`` at once."""
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (str(job_id),)).fetchone()
            if row is None:
                raise ConflictError(f"job {job_id} does not exist")
            status = JobStatus(row[0])
            if status in CANCEL_STATUSES:
                return status
            if status.terminal:
                raise ConflictError(f"job {job_id} is already {status}; nothing to cancel")
            missing = conn.execute(
                "SELECT count(*) FROM chunks c JOIN documents d ON d.job_id = c.job_id "
                "AND d.idx >= c.start_idx AND d.idx < c.end_idx "
                "WHERE c.job_id = ? AND c.state = 'queued' AND NOT EXISTS "
                "(SELECT 1 FROM results r WHERE r.job_id = d.job_id AND r.idx = d.idx)",
                (str(job_id),),
            ).fetchone()[0]
            conn.execute(
                "UPDATE chunks SET state = 'cancelled', lease_token = NULL "
                "WHERE job_id = ? AND state = 'queued'",
                (str(job_id),),
            )
            running = conn.execute(
                "SELECT count(*) FROM chunks WHERE job_id = ? AND state = 'leased'",
                (str(job_id),),
            ).fetchone()[0]
            new = JobStatus.CANCELLING if running else JobStatus.CANCELLED
            conn.execute(
                "UPDATE jobs SET cancelled = cancelled + ?, status = ?, finished_at = ? "
                "WHERE id = ?",
                (
                    int(missing),
                    new,
                    time.time() if new == JobStatus.CANCELLED else None,
                    str(job_id),
                ),
            )
            return new

    def expire(self, *, every_lease: bool = False) -> Expired:
        """Leases whose holder stopped renewing them: queued again, or ``failed`` once the
        chunk used up its attempts, or ``cancelled`` if the job is being cancelled. With
        ``every_lease``, all leases count as expired: a run that starts on a store no other
        process holds knows every lease in it belonged to a run that died."""
        report = Expired()
        with self._tx() as conn:
            now = float("inf") if every_lease else time.time()
            expired = conn.execute(
                "SELECT c.id, c.job_id, c.attempts, c.error, c.worker, c.seq, j.status, "
                "j.n_chunks FROM chunks c JOIN jobs j ON j.id = c.job_id "
                "WHERE c.state = 'leased' AND c.lease_expires_at < ?",
                (now,),
            ).fetchall()
            for cid, jid, attempts, error, worker, seq, status, n_chunks in expired:
                chunk_id, job_id = uuid.UUID(cid), uuid.UUID(jid)
                if JobStatus(status) in CANCEL_STATUSES:
                    _close(conn, chunk_id, job_id, ChunkState.CANCELLED)
                    report.cancelled += 1
                elif attempts >= self.max_attempts:
                    reason = f"gave up after {attempts} attempts ({worker} lost the lease)"
                    if error:
                        reason += f"; last error: {error}"
                    _close(conn, chunk_id, job_id, ChunkState.FAILED, reason)
                    report.failed += 1
                else:
                    conn.execute(
                        "UPDATE chunks SET state = 'queued', lease_token = NULL, "
                        "lease_expires_at = NULL WHERE id = ?",
                        (cid,),
                    )
                    report.requeued.append(Unsent(chunk_id, job_id, seq, n_chunks, "", 0))
        return report


class _Sink:
    """``RowSink`` into the store's ``documents`` (``load_rows`` checked the rows), in the
    creating transaction: bad UTF-8 and a duplicate id are the file's errors, as in the
    service."""

    def __init__(self, conn: sqlite3.Connection, job_id: uuid.UUID) -> None:
        self._conn, self._job = conn, str(job_id)
        self._batch: list[tuple[str, int, str | None, str, str | None]] = []
        self._where: list[int] = []
        self.rows = 0

    def add(
        self, idx: int, external_id: str | None, text: str, extra: str | None, line: int
    ) -> None:
        self._batch.append((self._job, idx, external_id, text, extra))
        self._where.append(line)

    def flush(self) -> None:
        if not self._batch:
            return
        first = self._batch[0][1]
        encode_rows(["".join(v or "" for v in row[2:]) for row in self._batch], first, self._where)
        try:
            self._conn.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)", self._batch)
        except sqlite3.IntegrityError:
            raise self._duplicate() from None
        self.rows += len(self._batch)
        self._batch.clear()
        self._where.clear()

    def _duplicate(self) -> InvalidFileError:
        """The batch's first row whose id an earlier row has (the failed insert may have kept
        the rows before it in this transaction; the caller rolls everything back)."""
        for (_, idx, ext, _, _), line in zip(self._batch, self._where, strict=True):
            if (
                ext is not None
                and self._conn.execute(
                    "SELECT 1 FROM documents WHERE job_id = ? AND external_id = ? AND idx < ?",
                    (self._job, ext, idx),
                ).fetchone()
            ):
                return InvalidFileError(
                    f"row {idx}: duplicate id {clip(ext, 64)!r} (ids must be unique within a job)",
                    row=idx,
                    line=line or None,
                )
        return InvalidFileError("duplicate id (ids must be unique within a job)")


def _pending(conn: sqlite3.Connection, lease: Lease) -> list[Doc]:
    rows = conn.execute(
        "SELECT d.idx, d.external_id, d.text, d.extra FROM documents d "
        "WHERE d.job_id = ? AND d.idx >= ? AND d.idx < ? AND NOT EXISTS "
        "(SELECT 1 FROM results r WHERE r.job_id = d.job_id AND r.idx = d.idx) ORDER BY d.idx",
        (str(lease.job_id), lease.start_idx, lease.end_idx),
    ).fetchall()
    return [Doc(i, e, t, None if x is None else json.loads(x)) for i, e, t, x in rows]


def _hold(conn: sqlite3.Connection, lease: Lease) -> JobStatus:
    """The fence: the chunk is still leased under this lease's token, else the write is
    refused. Returns the job's status."""
    row = conn.execute(
        "SELECT c.state, c.worker, c.lease_token, j.status FROM chunks c "
        "JOIN jobs j ON j.id = c.job_id WHERE c.id = ?",
        (str(lease.chunk_id),),
    ).fetchone()
    if row is None:
        _refuse(lease, "gone")
    if row[0] != ChunkState.LEASED or row[2] != str(lease.token):
        _refuse(lease, f"{row[0]}, worker {row[1]}")
    return JobStatus(row[3])


def _refuse(lease: Lease, where: str) -> NoReturn:
    raise LeaseLostError(
        f"chunk {lease.chunk_id}: lease of attempt {lease.attempts} was taken over ({where})"
    )


def _insert_results(
    conn: sqlite3.Connection, job_id: uuid.UUID, results: Sequence[RowResult], status: JobStatus
) -> Written:
    """The rows (a row that already has a result is skipped) and the job's counters moved by
    exactly the rows inserted, in the caller's transaction."""
    if not results:
        return Written(status)
    ok = bad = pt = ct = 0
    now = time.time()
    for r in results:
        cur = conn.execute(
            "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(job_id),
                r.idx,
                pg_text(r.output),
                pg_text(r.label),
                r.confidence,
                r.finish_reason,
                r.prompt_tokens,
                r.completion_tokens,
                int(r.truncated),
                _error_text(r.error),
                r.attempts,
                r.latency_ms,
                None if r.choices is None else json.dumps(r.choices),
                now,
            ),
        )
        if cur.rowcount:
            if r.error is None:
                ok += 1
            else:
                bad += 1
            pt += r.prompt_tokens
            ct += r.completion_tokens
    conn.execute(
        "UPDATE jobs SET succeeded = succeeded + ?, failed = failed + ?, "
        "prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ? "
        "WHERE id = ?",
        (ok, bad, pt, ct, str(job_id)),
    )
    return Written(status, ok, bad, ct)


def _close(
    conn: sqlite3.Connection,
    chunk_id: uuid.UUID,
    job_id: uuid.UUID,
    state: ChunkState,
    error: str | None = None,
) -> None:
    """Ends a chunk. Rows without a result become errors (``failed``) or count as cancelled
    (``cancelled``); ``done`` needs none. Then finalizes the job if nothing of it is open."""
    if not state.finished:
        raise ValueError(f"cannot close a chunk as {state}")
    chunk = conn.execute(
        "UPDATE chunks SET state = ?, lease_token = NULL, lease_expires_at = NULL, error = ? "
        "WHERE id = ? AND state NOT IN ('done', 'failed', 'cancelled') "
        "RETURNING start_idx, end_idx, attempts",
        (state, _error_text(error), str(chunk_id)),
    ).fetchone()
    if chunk is None:
        return  # closed already
    if state != ChunkState.DONE:
        missing = [
            r[0]
            for r in conn.execute(
                "SELECT d.idx FROM documents d WHERE d.job_id = ? AND d.idx >= ? AND d.idx < ? "
                "AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = d.job_id "
                "AND r.idx = d.idx)",
                (str(job_id), chunk[0], chunk[1]),
            ).fetchall()
        ]
        if missing and state == ChunkState.FAILED:
            reason = error or "chunk failed"
            rows = [RowResult(idx=i, error=reason, attempts=chunk[2]) for i in missing]
            _insert_results(conn, job_id, rows, JobStatus.RUNNING)
        elif missing:
            conn.execute(
                "UPDATE jobs SET cancelled = cancelled + ? WHERE id = ?",
                (len(missing), str(job_id)),
            )
    _finalize(conn, job_id)


def _finalize(conn: sqlite3.Connection, job_id: uuid.UUID) -> None:
    """If no chunk of the job is open any more, gives the job its terminal status."""
    job = conn.execute(
        "SELECT status, succeeded, failed FROM jobs WHERE id = ?", (str(job_id),)
    ).fetchone()
    if job is None or JobStatus(job[0]).terminal:
        return
    open_chunk = conn.execute(
        "SELECT 1 FROM chunks WHERE job_id = ? AND state IN ('queued', 'leased') LIMIT 1",
        (str(job_id),),
    ).fetchone()
    if open_chunk is not None:
        return
    error: str | None = None
    if job[0] == JobStatus.CANCELLING:
        status = JobStatus.CANCELLED
    elif job[1] == 0 and job[2] > 0:
        status = JobStatus.FAILED
        error = f"all {job[2]} documents failed; see the results' errors"
    else:
        status = JobStatus.COMPLETED
    conn.execute(
        "UPDATE jobs SET status = ?, finished_at = ?, error = coalesce(?, error) WHERE id = ?",
        (status, time.time(), error, str(job_id)),
    )

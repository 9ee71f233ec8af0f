"""A finished batch's output and error files, and its final status.

A batch is a job; once the job is terminal (completed, failed or cancelled) the batch is
*finalized*: its requests are read back in line order with their results, and written as two
files in OpenAI's shape (``objects.RequestOutput`` lines): the output file holds one line per
request that succeeded, the error file one per request that did not (its row error as a 4xx or
5xx response, or, for a request that never ran because the batch was cancelled or expired,
no response and ``error.code`` ``batch_cancelled`` / ``batch_expired``). A file that would be
empty is not made (its id stays null, as OpenAI does).

Any number of finalizers may race (the reconciler runs in every worker and in beat): one UPDATE
claims the batch (``finalizing``, ``finalizing_at`` from ``clock_timestamp()``), and that
timestamp is the claim's token. The finalizer renews it after every page; one that died leaves
it to age past ``batch_finalize_stale_s``, after which another retakes the batch. Every renewal
and the last UPDATE require the token, so a finalizer that lost its claim cannot overwrite the
winner: it deletes the files it wrote and returns None.

The rows are read ``batch_finalize_page_rows`` at a time (keyset on ``idx``), each page in its
own short transaction, and written through ``FileWriter`` part by part: no transaction, and no
more than a page and a file part in memory, however large the batch.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, text

from service.batches.lifecycle import validate_and_ingest
from service.batches.lines import FinalStatus, render
from service.batches.requests import ENDPOINTS
from service.errors import ConflictError
from service.files.store import FileWriter
from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.states import TERMINAL_STATUSES, JobStatus

log = logging.getLogger(__name__)

_TERMINAL = tuple(str(s) for s in sorted(TERMINAL_STATUSES))


@dataclass(frozen=True)
class _Claim:
    """A won claim on one batch: what the files need, and the token that fences the writes."""

    batch_id: uuid.UUID
    token: datetime
    job_id: uuid.UUID
    tenant_id: uuid.UUID
    endpoint: str
    model: str
    status: FinalStatus


_CLAIM = text(
    f"""
    UPDATE batches b SET status = 'finalizing', finalizing_at = clock_timestamp()
    FROM jobs j
    WHERE b.id = :b AND j.id = b.job_id AND j.status IN {_TERMINAL}
      AND (b.status IN ('in_progress', 'cancelling')
           OR (b.status = 'finalizing'
               AND b.finalizing_at < clock_timestamp() - make_interval(secs => :stale)))
    RETURNING b.finalizing_at, b.job_id, b.tenant_id, b.endpoint, coalesce(b.model, j.model)
              AS model, b.cancelling_at IS NOT NULL AS user_cancelled,
              j.status AS job_status, b.expires_at <= now() AS past_expiry
    """
)
_RENEW = text(
    "UPDATE batches SET finalizing_at = clock_timestamp() "
    "WHERE id = :b AND status = 'finalizing' AND finalizing_at = :t RETURNING finalizing_at"
)
_PAGE = text(
    """
    SELECT d.idx, d.external_id AS custom_id, r.idx IS NOT NULL AS has_result,
           r.output, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error,
           r.choices, r.created_at,
           CASE WHEN r.error IS NOT NULL THEN d.extra -> 'body' END AS body,
           CASE jsonb_typeof(d.extra -> 'body' -> 'prompt')
             WHEN 'string' THEN length(d.extra -> 'body' ->> 'prompt')
             WHEN 'array' THEN length(d.extra -> 'body' -> 'prompt' ->> 0)
           END AS prompt_chars
    FROM documents d
    LEFT JOIN results r ON r.job_id = d.job_id AND r.idx = d.idx
    WHERE d.job_id = :j AND d.idx > :after
    ORDER BY d.idx
    LIMIT :n
    """
)


def final_status(job_status: str, user_cancelled: bool, past_expiry: bool) -> FinalStatus:
    """OpenAI's name for how the batch ended. ``failed`` is not one of them: that is only a
    refused input file; a batch whose every request failed is ``completed`` with an error
    file. A job cancelled without the user asking was cancelled by the sweep at its expiry."""
    if user_cancelled:
        return "cancelled"
    if job_status == JobStatus.CANCELLED:
        return "expired" if past_expiry else "cancelled"
    return "completed"


def finalize(engine: Engine, batch_id: uuid.UUID, settings: Settings) -> str | None:
    """Writes the batch's output and error files and gives it its final status, if its job is
    terminal and no live finalizer holds it. Returns the final status, or None when there was
    nothing to do (not finished, already final, another finalizer has it or took it over)."""
    claim = _claim(engine, batch_id, settings)
    if claim is None:
        return None
    writers = _Files(engine, claim, settings)
    try:
        token = claim.token
        after = 0
        while True:
            with engine.connect() as conn:
                rows = conn.execute(
                    _PAGE,
                    {
                        "j": claim.job_id,
                        "after": after,
                        "n": settings.openai.batch_finalize_page_rows,
                    },
                ).all()
            if not rows:
                break
            for row in rows:
                writers.add(row)
            after = rows[-1].idx
            renewed = _renew(engine, claim.batch_id, token)
            if renewed is None:
                writers.abort()
                log.info("batch finalize: lost the claim on %s to another finalizer", batch_id)
                return None
            token = renewed
        output_id, error_id = writers.close()
        if not _finish(engine, claim, token, output_id, error_id):
            writers.delete_closed()
            return None
    except BaseException:
        writers.abort()
        raise
    log.info(
        "batch %s finalized %s: %d succeeded, %d errors",
        batch_id,
        claim.status,
        writers.counts[0],
        writers.counts[1],
    )
    return claim.status


def _claim(engine: Engine, batch_id: uuid.UUID, settings: Settings) -> _Claim | None:
    with engine.begin() as conn:
        row = conn.execute(
            _CLAIM, {"b": batch_id, "stale": settings.openai.batch_finalize_stale_s}
        ).first()
    if row is None:
        return None
    return _Claim(
        batch_id=batch_id,
        token=row.finalizing_at,
        job_id=row.job_id,
        tenant_id=row.tenant_id,
        endpoint=row.endpoint,
        model=row.model,
        status=final_status(row.job_status, row.user_cancelled, row.past_expiry),
    )


def _renew(engine: Engine, batch_id: uuid.UUID, token: datetime) -> datetime | None:
    with engine.begin() as conn:
        value: datetime | None = conn.execute(_RENEW, {"b": batch_id, "t": token}).scalar()
    return value


def _finish(
    engine: Engine,
    claim: _Claim,
    token: datetime,
    output_id: uuid.UUID | None,
    error_id: uuid.UUID | None,
) -> bool:
    """The files and the final status, only under our claim."""
    stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}
    with engine.begin() as conn:
        done = conn.execute(
            text(
                f"UPDATE batches SET status = :s, {stamp[claim.status]} = now(), "
                "output_file_id = :o, error_file_id = :e "
                "WHERE id = :b AND status = 'finalizing' AND finalizing_at = :t"
            ),
            {"s": claim.status, "o": output_id, "e": error_id, "b": claim.batch_id, "t": token},
        ).rowcount
    return bool(done)


class _Files:
    """The two files, each made on its first line (an empty one is never created)."""

    def __init__(self, engine: Engine, claim: _Claim, settings: Settings) -> None:
        self.engine = engine
        self.claim = claim
        self.settings = settings
        self.kind = ENDPOINTS[claim.endpoint]
        self.writers: list[FileWriter | None] = [None, None]
        self.closed: list[uuid.UUID] = []
        self.counts = [0, 0]

    def add(self, row: Row[Any]) -> None:
        line, ok = render(row, self.claim.batch_id, self.kind, self.claim.model, self.claim.status)
        which = 0 if ok else 1
        writer = self.writers[which]
        if writer is None:
            name = "output" if ok else "error"
            writer = FileWriter(
                self.engine,
                self.claim.tenant_id,
                filename=f"batch_{self.claim.batch_id.hex}_{name}.jsonl",
                settings=self.settings,
                max_bytes=self.settings.openai.batch_output_max_bytes,
            )
            self.writers[which] = writer
        writer.write(line.model_dump_json().encode() + b"\n")
        self.counts[which] += 1

    def close(self) -> tuple[uuid.UUID | None, uuid.UUID | None]:
        ids: list[uuid.UUID | None] = []
        for i, writer in enumerate(self.writers):
            if writer is None:
                ids.append(None)
                continue
            file = writer.close()
            self.writers[i] = None
            self.closed.append(file.id)
            ids.append(file.id)
        return ids[0], ids[1]

    def abort(self) -> None:
        """Deletes whatever was written: files still open and files already closed."""
        for i, writer in enumerate(self.writers):
            if writer is not None:
                writer.abort()
                self.writers[i] = None
        self.delete_closed()

    def delete_closed(self) -> None:
        if self.closed:
            with self.engine.begin() as conn:
                conn.execute(
                    text("DELETE FROM files WHERE id = ANY(:ids)"), {"ids": list(self.closed)}
                )
            self.closed = []


# --- The sweep: every finished batch finalized, every batch past its window expired ---------


#: A batch still ``validating`` this long after its creation lost its reader (the API process
#: died after answering): the sweep reads its file again.
VALIDATING_STALE_S = 300


@dataclass
class SweepReport:
    revalidated: int = 0  # batches whose file was read again (their first reader died)
    expired: int = 0  # batches whose job was cancelled now, at their expiry
    finalized: dict[str, int] = field(default_factory=dict)  # final status -> batches


def sweep(engine: Engine, settings: Settings) -> SweepReport:
    """One pass (the reconciler's): a batch left ``validating`` by a reader that died is read
    again; batches past ``expires_at`` still running get their job
    cancelled (``PgChunkStore.cancel``: queued rows never start, running ones finish their
    step); then every open batch whose job is terminal is finalized, at most
    ``batch_sweep_limit`` of each per pass."""
    report = SweepReport()
    limit = settings.openai.batch_sweep_limit
    with engine.connect() as conn:
        orphans = _ids(
            conn,
            "SELECT id FROM batches WHERE status = 'validating' "
            "AND created_at < now() - make_interval(secs => :stale) "
            "ORDER BY created_at LIMIT :n",
            limit,
            stale=VALIDATING_STALE_S,
        )
    for batch_id in orphans:  # safe twice: only a validating batch is read, under its lock
        validate_and_ingest(batch_id, settings)
        report.revalidated += 1
    with engine.connect() as conn:
        due = _ids(
            conn,
            "SELECT b.job_id FROM batches b JOIN jobs j ON j.id = b.job_id "
            "WHERE b.status = 'in_progress' AND b.expires_at <= now() "
            "AND j.status IN ('queued', 'running') "
            "ORDER BY b.expires_at LIMIT :n",
            limit,
        )
    if due:
        store = PgChunkStore.from_settings(settings, engine)
        for job_id in due:
            try:
                store.cancel(job_id)
                report.expired += 1
            except ConflictError:  # it ended meanwhile: finalized as it ended
                pass
    with engine.connect() as conn:
        ready = _ids(
            conn,
            "SELECT b.id FROM batches b JOIN jobs j ON j.id = b.job_id "
            f"WHERE j.status IN {_TERMINAL} AND (b.status IN ('in_progress', 'cancelling') "
            "OR (b.status = 'finalizing' AND b.finalizing_at < "
            "clock_timestamp() - make_interval(secs => :stale))) "
            "ORDER BY b.created_at LIMIT :n",
            limit,
            stale=settings.openai.batch_finalize_stale_s,
        )
    for batch_id in ready:
        status = finalize(engine, batch_id, settings)
        if status is not None:
            report.finalized[status] = report.finalized.get(status, 0) + 1
    return report


def _ids(conn: Connection, sql: str, limit: int, **params: Any) -> list[uuid.UUID]:
    return list(conn.execute(text(sql), {"n": limit, **params}).scalars())

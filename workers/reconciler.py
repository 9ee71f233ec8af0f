"""The reconciler: Postgres is the truth, so lost or stuck work is re-sent from it.

- A chunk whose lease expired (its worker died) is queued again, or failed once it used up its
  attempts, or cancelled if its job is being cancelled.
- A queued chunk whose message is gone from Redis (flushed, restarted without persistence, or
  never sent because Redis was down at submit time) is sent again.
Runs at worker start and every ``reconcile_interval_s`` in each worker, and as a beat task in
``docqueue beat`` (workers/beat.py); a Postgres advisory lock lets only one process act at a
time. Duplicate messages are harmless (leases, unique results).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis as redis_lib
from celery import Celery
from sqlalchemy import Engine, text

from service.queue import ChunkMessage, chunk_ids_in_broker, send_chunks
from service.settings import Settings
from service.work import close_chunk

log = logging.getLogger(__name__)
_LOCK_KEY = 0x64710001  # "dq" reconciler


@dataclass
class Report:
    requeued: int = 0
    failed: int = 0
    cancelled: int = 0
    resent: int = 0
    skipped: bool = False
    resent_ids: list[str] = field(default_factory=list)


def reconcile(db: Engine, app: Celery, settings: Settings) -> Report:
    report = Report()
    to_send: list[ChunkMessage] = []
    with db.begin() as conn:
        if not conn.execute(
            text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}
        ).scalar():
            report.skipped = True
            return report
        expired = conn.execute(
            text(
                "SELECT id, job_id FROM chunks "
                "WHERE state = 'leased' AND lease_expires_at < now() ORDER BY job_id"
            )
        ).all()
        for chunk_id, job_id in expired:
            # Job row first, then the chunk: the same lock order as claims and cancels.
            conn.execute(text("SELECT 1 FROM jobs WHERE id = :j FOR NO KEY UPDATE"), {"j": job_id})
            c = conn.execute(
                text(
                    """
                    SELECT c.id, c.job_id, c.attempts, c.error, c.worker, j.status
                    FROM chunks c JOIN jobs j ON j.id = c.job_id
                    WHERE c.id = :id AND c.state = 'leased' AND c.lease_expires_at < now()
                    FOR UPDATE OF c SKIP LOCKED
                    """
                ),
                {"id": chunk_id},
            ).first()
            if c is None:  # renewed or taken over meanwhile
                continue
            if c.status in ("cancelling", "cancelled"):
                close_chunk(conn, c.id, c.job_id, "cancelled")
                report.cancelled += 1
            elif c.attempts >= settings.max_attempts:
                reason = f"gave up after {c.attempts} attempts (worker {c.worker} lost the lease)"
                if c.error:
                    reason += f"; last error: {c.error}"
                close_chunk(conn, c.id, c.job_id, "failed", reason)
                report.failed += 1
            else:
                conn.execute(
                    text(
                        "UPDATE chunks SET state = 'queued', lease_expires_at = NULL, "
                        "enqueued_at = NULL, updated_at = now() WHERE id = :id"
                    ),
                    {"id": c.id},
                )
                report.requeued += 1
        candidates = conn.execute(
            text(
                """
                SELECT c.id, c.job_id, c.seq, c.enqueued_at, j.n_chunks, j.queue, j.priority
                FROM chunks c JOIN jobs j ON j.id = c.job_id
                WHERE c.state = 'queued' AND j.status IN ('queued', 'running')
                  AND (c.enqueued_at IS NULL
                       OR c.enqueued_at < now() - make_interval(secs => :after))
                ORDER BY j.priority DESC, j.created_at, c.seq
                """
            ),
            {"after": float(settings.requeue_after_s)},
        ).all()
        if candidates:
            in_broker: set[str] = set()
            if any(c.enqueued_at is not None for c in candidates):
                client = redis_lib.Redis.from_url(settings.redis_url)
                try:
                    in_broker = chunk_ids_in_broker(
                        client, {c.queue for c in candidates}, settings.requeue_after_s
                    )
                finally:
                    client.close()
            to_send = [
                ChunkMessage(c.id, c.job_id, c.seq, c.n_chunks, c.queue, c.priority)
                for c in candidates
                if c.enqueued_at is None or str(c.id) not in in_broker
            ]
    if to_send:
        report.resent = send_chunks(app, to_send)
        report.resent_ids = [str(m.chunk_id) for m in to_send]
        with db.begin() as conn:
            conn.execute(
                text("UPDATE chunks SET enqueued_at = now() WHERE id = ANY(:ids)"),
                {"ids": [m.chunk_id for m in to_send]},
            )
    if report.requeued or report.failed or report.cancelled or report.resent:
        log.info("reconciler: %s", report)
    return report


def run_periodically(
    db: Engine, app: Celery, settings: Settings, stop: threading.Event
) -> threading.Thread:
    """The in-worker loop; with ``reconcile_in_workers`` off it does nothing, and the beat task
    (``docqueue.reconcile`` in workers/beat.py) is the only periodic reconciler."""

    def loop() -> None:
        if not settings.reconcile_in_workers:
            return
        while not stop.wait(settings.reconcile_interval_s):
            try:
                reconcile(db, app, settings)
            except Exception:
                log.warning("reconciler pass failed; next pass retries", exc_info=True)

    thread = threading.Thread(target=loop, name="docqueue-reconciler", daemon=True)
    thread.start()
    return thread

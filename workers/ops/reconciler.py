"""The reconciler: Postgres is the truth, so lost or stuck work is found there and put back.

- A chunk whose lease expired (its worker died) waits again, or fails once it used up its
  attempts, or is cancelled if its job is being cancelled.
- A ``cancelling`` job's queued chunks are closed ``cancelled`` and the job finalized (no claim
  comes for a chunk whose message was lost, and lost messages are re-sent for open jobs only).
- The dispatcher's periodic pass: every model with waiting chunks gets what its workers can take
  (a worker that started, a lease that expired, a pass that failed earlier).
- A released chunk whose message is gone from Redis (flushed, restarted without persistence)
  is sent again, by one pass only: every worker runs these passes, and the chunk is stamped
  in Postgres before it is sent, so a racing pass skips it.
- OpenAI batches (``service.batches.finalize.sweep``): one past its window has its job
  cancelled; one whose job ended gets its output and error files and its final status.
Runs at worker start and every ``reconcile_interval_s`` in each worker, and as a beat task in
``docqueue beat`` (workers/ops/beat.py); a Postgres advisory lock lets only one process
expire leases at a time. Duplicate messages are harmless (leases, unique results).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis as redis_lib
from celery import Celery

from service.batches import finalize as batch_finalize
from service.contract import send_chunks
from service.dispatcher import dispatch, message
from service.settings import Settings
from service.store.chunks import PgChunkStore
from workers.ops.broker import chunk_ids_in_broker

log = logging.getLogger(__name__)


@dataclass
class Report:
    requeued: int = 0
    failed: int = 0
    cancelled: int = 0
    released: int = 0
    resent: int = 0
    skipped: bool = False
    resent_ids: list[str] = field(default_factory=list)
    released_ids: list[str] = field(default_factory=list)
    batches: batch_finalize.SweepReport | None = None


def reconcile(store: PgChunkStore, app: Celery, settings: Settings) -> Report:
    """One pass: expire dead leases (the state machine), release waiting chunks (the
    dispatcher), re-send lost messages, then sweep batches (only in a pass that was not
    skipped: finalizing writes files, so passes in every worker would mostly race for the same
    batches; the claim keeps racing finalizers safe anyway)."""
    expired = store.expire()
    report = Report(
        len(expired.requeued), expired.failed, expired.cancelled, skipped=expired.skipped
    )
    dispatched = dispatch(store, app, settings)
    report.released, report.released_ids = dispatched.total, dispatched.chunk_ids
    if expired.skipped:
        return report
    candidates = store.unsent(settings.worker.requeue_after_s)
    in_broker: set[str] = set()
    if candidates:
        client = redis_lib.Redis.from_url(settings.broker.url)
        try:
            in_broker = chunk_ids_in_broker(
                client, {c.queue for c in candidates}, settings.worker.requeue_after_s
            )
        finally:
            client.close()
    lost = [c.chunk_id for c in candidates if str(c.chunk_id) not in in_broker]
    # Stamped before sending, so a pass racing this one skips them. A send that fails leaves
    # the stamp: those chunks are sent again ``requeue_after_s`` later.
    stamped = store.restamp(lost, settings.worker.requeue_after_s)
    to_send = [message(c) for c in candidates if c.chunk_id in stamped]
    if to_send:
        report.resent = send_chunks(app, to_send)
        report.resent_ids = [str(m.chunk_id) for m in to_send]
    try:
        report.batches = batch_finalize.sweep(store.db, settings)
    except Exception:  # a batch that cannot be finalized must not stop the rest of the pass
        log.warning("reconciler: batch sweep failed; next pass retries", exc_info=True)
    swept = report.batches is not None and (report.batches.expired or report.batches.finalized)
    if report.requeued or report.failed or report.cancelled or report.resent or swept:
        log.info("reconciler: %s", report)
    return report


def run_periodically(
    store: PgChunkStore, app: Celery, settings: Settings, stop: threading.Event
) -> threading.Thread:
    """The in-worker loop; with ``reconcile_in_workers`` off it does nothing, and the beat task
    (``docqueue.reconcile`` in workers/ops/beat.py) is the only periodic reconciler."""

    def loop() -> None:
        if not settings.worker.reconcile_in_workers:
            return
        while not stop.wait(settings.worker.reconcile_interval_s):
            try:
                reconcile(store, app, settings)
            except Exception:
                log.warning("reconciler pass failed; next pass retries", exc_info=True)

    thread = threading.Thread(target=loop, name="docqueue-reconciler", daemon=True)
    thread.start()
    return thread

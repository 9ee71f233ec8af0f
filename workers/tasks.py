"""Celery glue for GPU workers: the chunk task, and the engine's life with the worker process.

The task is thin: it runs the chunk runner (``workers.runner``) and re-sends the chunk on
``TransientError``, and on nothing else. The attempt count and the decision to give up live in
the chunk state machine (a reconciler re-send starts Celery's own ``retries`` at 0 again; the
chunk's attempts do not).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from typing import Any

from celery import Task
from celery.signals import worker_init, worker_ready, worker_shutdown

from service.contract import TASK_RUN_CHUNK
from service.dispatcher import dispatch
from service.errors import EngineDeadError, TransientError
from workers import metrics as worker_metrics
from workers import runtime
from workers.app import app
from workers.runner import RetryChunk, backoff_s, process_chunk

log = logging.getLogger(__name__)


@app.task(name=TASK_RUN_CHUNK, bind=True, acks_late=True, max_retries=None)
def run_chunk(self: Task[Any, Any], chunk_id: str) -> str:
    """Process one chunk. Flower shows ``{'job': ..., 'chunk': 'n/N'}`` as its arguments."""
    rt = runtime.current()
    cid = uuid.UUID(chunk_id)
    try:
        with worker_metrics.observe_chunk(rt.model) as seen:  # duration, chunks in flight
            outcome = seen.outcome = process_chunk(rt, cid)
    except TransientError as exc:
        dispatch(rt.pg_store, app, rt.settings, [rt.model])
        if isinstance(exc, EngineDeadError) or isinstance(
            getattr(exc, "cause", None), EngineDeadError
        ):
            # This process cannot serve any more; let its supervisor start a fresh one.
            os.kill(os.getpid(), signal.SIGTERM)
        # Given back (RetryChunk: its backoff), or the claim itself failed (the first one).
        if isinstance(exc, RetryChunk):
            if exc.countdown_s is None:  # closed on its last attempt: nothing to retry
                return "failed"
            countdown = exc.countdown_s
        else:
            countdown = backoff_s(1, rt.settings.worker.retry_backoff_s)
        raise self.retry(exc=exc, countdown=countdown) from exc
    # This slot is free again: the dispatcher releases the model's next chunk (the fairest
    # one, across tenants) before the slot takes its next message.
    dispatch(rt.pg_store, app, rt.settings, [rt.model])
    log.info("chunk %s: %s", chunk_id, outcome)
    return outcome


# --- worker lifecycle -------------------------------------------------------------------------

_reconciler_stop: threading.Event | None = None


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Builds the engine in the worker's main thread, before any task can arrive."""
    hostname = getattr(sender, "hostname", None)
    slots = getattr(sender, "concurrency", None)
    runtime.start(hostname=hostname, slots=slots if isinstance(slots, int) else None)


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    from workers.ops.reconciler import reconcile, run_periodically

    global _reconciler_stop
    rt = runtime.current()
    try:
        reconcile(rt.pg_store, app, rt.settings)
    except Exception:
        log.warning("reconciler at worker start failed", exc_info=True)
    _reconciler_stop = threading.Event()
    run_periodically(rt.pg_store, app, rt.settings, _reconciler_stop)


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if _reconciler_stop is not None:
        _reconciler_stop.set()
    runtime.stop()

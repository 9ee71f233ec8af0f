"""The dispatcher: chunks wait in PostgreSQL and go to Redis only as workers can take them.

Submitting a job writes its chunks (``queued``, not yet released); the dispatcher then releases
each model's next chunks, fairly between tenants (``PgChunkStore.releasing``), and sends one
message per released chunk. Redis thus holds at most a model's live workers' slots plus
``DOCQUEUE_DISPATCH_AHEAD`` messages, whatever the size of the jobs behind them, and a tenant's
ten-row job waits behind those few messages, not behind another tenant's million rows.

It is not a daemon. A pass runs where something changed: after a submit commits (for the job's
model), after a worker finishes a chunk (for its model: one slot freed), and in every
reconciler pass (each model with waiting chunks: a worker that started, a lease that expired).
Any number of passes may run at once, in any process: the store serialises them per model.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service import logs
from service.contract import ChunkMessage, make_celery, send_chunks
from service.settings import Settings
from service.store.chunks import PgChunkStore, Unsent
from service.store.registry import live_horizon_s

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


@dataclass
class Dispatched:
    """What one dispatch call released: chunk messages sent, per model."""

    sent: dict[str, int] = field(default_factory=dict)
    chunk_ids: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def message(chunk: Unsent) -> ChunkMessage:
    return ChunkMessage(
        chunk_id=chunk.chunk_id,
        job_id=chunk.job_id,
        seq=chunk.seq,
        n_chunks=chunk.n_chunks,
        queue=chunk.queue,
    )


def dispatch(
    store: PgChunkStore,
    app: Celery,
    settings: Settings,
    models: Iterable[str] | None = None,
) -> Dispatched:
    """Releases what each model's workers can take now (``models``; None: every model with
    waiting chunks) and sends the messages. A model whose release fails (Redis or PostgreSQL
    away) is logged and left for the next pass: its chunks stay waiting, none is lost."""
    done = Dispatched()
    todo = store.dispatchable_models() if models is None else sorted(set(models))
    for model in todo:
        try:
            with store.releasing(
                model, ahead=settings.dispatch.ahead, live_s=live_horizon_s(settings)
            ) as chunks:
                if chunks:
                    send_chunks(app, [message(c) for c in chunks])
            done.sent[model] = len(chunks)
            done.chunk_ids += [str(c.chunk_id) for c in chunks]
        except Exception:  # the next pass (a chunk closing, the reconciler) releases them
            log.warning("dispatch for %s failed; its chunks keep waiting", model, exc_info=True)
    if done.total:
        log.debug("dispatched %s", done.sent)
    return done


def dispatch_job(job_id: uuid.UUID, model: str, settings: Settings) -> int:
    """The pass after a submit commits, from a process with no Celery app of its own (the API's
    submit pool, a schedule's tick): releases the job's model's next chunks."""
    app = make_celery(settings)
    try:
        with logs.log_context(job_id=job_id):
            return dispatch(PgChunkStore.from_settings(settings), app, settings, [model]).total
    finally:
        app.close()

"""The queue contract: task names, queue names and message payloads.

Both the producer (``service``) and the consumer (``workers``) import this module, so the two
sides cannot drift. Messages carry ids only, never document text: Postgres is the source of
truth and Redis merely carries work, so a lost message delays a chunk but never loses data.

The flow of a chunk, and who moves it:

1. **waiting** (``chunks.state = 'queued'``, ``enqueued_at`` NULL): submit wrote it; it is in
   PostgreSQL only.
2. **released** (``queued``, ``enqueued_at`` set): the dispatcher (``service/dispatcher.py``)
   sent its ``ChunkMessage`` to its model's queue (interactive or bulk). A model has at most
   its live workers' slots plus ``DOCQUEUE_DISPATCH_AHEAD`` chunks released or running, so
   Redis holds a few messages per model, never a job's worth.
3. **leased**: a worker took the message and claimed the chunk (``service/store/chunks.py``);
   the message is acknowledged when the task ends.
4. **done**, **failed** or **cancelled**; the worker then runs the dispatcher for its model
   (a slot is free). A lease that expires puts the chunk back to *waiting*; a released chunk
   whose message vanished from Redis is re-sent by the reconciler.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from service.settings import Settings, get_settings

if TYPE_CHECKING:  # Celery is imported only where messages are really sent
    from celery import Celery

APP_NAME = "docqueue"
#: The one task the workers run: process one chunk of one job.
TASK_RUN_CHUNK = "docqueue.run_chunk"
#: Prefix of every per-model queue.
QUEUE_PREFIX = "dq"

#: Readable job priorities and the ``jobs.priority`` value each is stored as (higher first, as
#: the reconciler re-sends). Interactive is the default; scheduled jobs are bulk. A legacy
#: integer priority below 0 counts as bulk, any other as interactive.
PRIORITIES = {"interactive": 0, "bulk": -10}
#: Suffix of a model's bulk queue; the interactive queue keeps the plain per-model name, so
#: messages and jobs from before priorities existed stay on the queue workers consume first.
BULK_SUFFIX = ".bulk"
#: The operations queue: beat's periodic tasks, consumed only by `docqueue beat`'s own worker
#: (GPU workers consume their model queues only).
OPS_QUEUE = f"{QUEUE_PREFIX}.ops"
TASK_SCHEDULES_TICK = "docqueue.schedules_tick"
TASK_RECONCILE = "docqueue.reconcile"
TASK_RETENTION = "docqueue.retention"


def priority_class(priority: int) -> Literal["interactive", "bulk"]:
    """``interactive`` or ``bulk`` for a stored ``jobs.priority``."""
    return "bulk" if priority < 0 else "interactive"


def parse_priority(raw: str | int | None) -> int:
    """``interactive``, ``bulk`` or a legacy integer; ValueError names the accepted values."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return PRIORITIES["interactive"]
    if isinstance(raw, int):
        return raw
    value = raw.strip().lower()
    if value in PRIORITIES:
        return PRIORITIES[value]
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"unknown priority {raw!r}; expected one of: {', '.join(PRIORITIES)}"
        ) from None


def queue_for_model(model: str, priority: int = 0) -> str:
    """Two queues per model (interactive, bulk), named so that a person reading Redis or Flower
    recognises them.

    A model may be a hub id or a local path; the readable part is its last path component and
    a short hash of the whole string keeps two models with the same basename apart.
    """
    base = model.rstrip("/").rsplit("/", 1)[-1].lower() or "model"
    slug = re.sub(r"[^a-z0-9_.-]+", "-", base).strip("-.")[:48] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    name = f"{QUEUE_PREFIX}.{slug}.{digest}"
    return name + BULK_SUFFIX if priority_class(priority) == "bulk" else name


def queues_for_model(model: str) -> list[str]:
    """What a worker consumes, in the order it takes work: interactive before bulk (the broker
    polls them in this fixed order, see ``queue_order_strategy`` in make_celery)."""
    return [queue_for_model(model, PRIORITIES[name]) for name in ("interactive", "bulk")]


class ChunkMessage(BaseModel, frozen=True):
    """A chunk message as the producer sends it. Its payload is the chunk id, nothing more.

    ``job_id``, ``seq`` and ``n_chunks`` travel only in the message's display form (``kwargsrepr``)
    so that Flower shows which job and chunk a task is without the worker trusting them.
    """

    chunk_id: uuid.UUID
    job_id: uuid.UUID
    seq: int = Field(ge=0)
    n_chunks: int = Field(ge=1)
    queue: str

    def kwargs(self) -> dict[str, Any]:
        return {"chunk_id": str(self.chunk_id)}

    def display(self) -> str:
        return f"{{'job': '{self.job_id}', 'chunk': '{self.seq + 1}/{self.n_chunks}'}}"


def make_celery(settings: Settings | None = None) -> Celery:
    """The Celery app shared by producers and workers (workers add their own settings on top)."""
    from celery import Celery

    settings = settings or get_settings()
    app = Celery(APP_NAME, broker=settings.broker.url)
    app.conf.update(
        task_ignore_result=True,  # Postgres holds all state; no result backend.
        task_serializer="json",
        accept_content=["json"],
        enable_utc=True,
        timezone="UTC",
        task_default_queue=f"{QUEUE_PREFIX}.default",
        task_create_missing_queues=True,
        # Producers and workers must agree on this, or a message could be redelivered early.
        broker_transport_options={
            "visibility_timeout": settings.broker.visibility_timeout_s,
            # kombu's Redis transport BRPOPs a worker's queues in the order given (-Q
            # interactive,bulk) instead of rotating them round robin: an interactive chunk is
            # always taken before the next bulk one (bulk waits; nothing is pre-empted).
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
    )
    return app


def send_chunks(
    app: Celery, messages: Iterable[ChunkMessage], countdown_s: float | None = None
) -> int:
    """Publish one message per chunk over one broker connection; returns how many were sent."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for msg in messages:
            app.send_task(
                TASK_RUN_CHUNK,
                kwargs=msg.kwargs(),
                queue=msg.queue,
                routing_key=msg.queue,
                producer=producer,
                kwargsrepr=msg.display(),
                countdown=countdown_s,
                # Readable task id (job and chunk); the suffix keeps a re-sent chunk's id distinct.
                task_id=f"{msg.job_id}:{msg.seq}:{uuid.uuid4().hex[:8]}",
            )
            sent += 1
    return sent

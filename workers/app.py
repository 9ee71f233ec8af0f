"""The one Celery app of ``workers/``: every Celery process docqueue starts loads it.

- GPU workers: ``celery -A workers.tasks worker`` (``docqueue worker`` wraps it) adds the chunk
  task and builds the engine at start;
- the ops worker: ``celery -A workers.ops.beat worker --beat`` adds beat's tasks, and no engine;
- Flower: ``celery -A workers.ops.flower flower`` only listens.
Each loads only its own module, so none pays for another's imports. The producer side
(``service/``, which never imports ``workers/``) builds its sending app from the same factory,
``service.contract.make_celery``, so broker settings cannot drift.
"""

from __future__ import annotations

from service import logs
from service.contract import make_celery
from service.settings import get_settings

settings = get_settings()
app = make_celery(settings)
app.conf.update(
    # Ack after the chunk ran, not when it was received: a worker that dies mid-chunk leaves
    # the message unacked, so Redis can redeliver it (Postgres leases re-run it sooner).
    task_acks_late=True,
    # A worker killed by the OS (OOM, SIGKILL) must not ack its message either.
    task_reject_on_worker_lost=True,
    # Reserve one message per pool slot: a chunk is minutes of GPU work, and messages held by
    # a busy worker are invisible to idle ones.
    worker_prefetch_multiplier=1,
    # Postgres holds all state; results in Redis would only cost memory.
    task_ignore_result=True,
    # Flower shows workers and tasks only when they send events.
    worker_send_task_events=True,
    task_send_sent_event=True,
    # Not worker_cancel_long_running_tasks_on_connection_loss: the threads pool cannot cancel
    # a running task (it logged NotImplementedError on every Redis loss). A chunk whose message
    # is redelivered meanwhile is fenced by its lease: the second claim finds it leased.
    # Leave Celery's own logging setup alone (docqueue configures logging).
    worker_hijack_root_logger=False,
    # Retries are scheduled by docqueue (Postgres attempts), never by a broker-side loop.
    task_default_retry_delay=5,
)

# docqueue's logging (service/logs.py) in worker processes, with each task's job and chunk ids.
logs.connect_celery()

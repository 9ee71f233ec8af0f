"""`docqueue beat`: Celery beat embedded in a small operations worker.

Why embedded: a deployment runs ``docqueue api``, GPU ``docqueue worker``s and one
``docqueue beat``. GPU workers consume only their model queues (and would build an engine for
anything they start), so beat's periodic tasks need a consumer of their own. This process is
both: beat (``--beat``) publishes the tasks below to the ``dq.ops`` queue, and the same
process's small thread pool runs them. It never imports ``workers.tasks``, so it builds no
engine and needs no GPU.

Beat's own schedule is static (intervals from settings) and kept in memory: what is due lives
in Postgres (``schedules.next_run_at``), so nothing is lost with the process, and a second
``docqueue beat`` by mistake creates no second job (row locks and the run's idempotency key).

- ``docqueue.schedules_tick`` (every ``schedule_tick_s``): runs the due schedules.
- ``docqueue.reconcile`` (every ``reconcile_interval_s``): the reconciler (workers also run it
  in-process unless ``DOCQUEUE_RECONCILE_IN_WORKERS=false``; an advisory lock lets one act).
- ``docqueue.retention`` (every ``retention_interval_s``): purges expired results.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from service.contract import OPS_QUEUE, TASK_RECONCILE, TASK_RETENTION, TASK_SCHEDULES_TICK
from service.settings import get_settings
from service.store.engine import get_engine
from workers.app import app

log = logging.getLogger(__name__)
__all__ = ["app", "command"]  # ``celery -A workers.ops.beat`` finds the app here

settings = get_settings()


def _entry(task: str, every_s: float) -> dict[str, Any]:
    # A tick not taken within its interval is dropped: the next one does the same work.
    return {"task": task, "schedule": every_s, "options": {"queue": OPS_QUEUE, "expires": every_s}}


app.conf.update(
    task_default_queue=OPS_QUEUE,
    task_routes={
        name: {"queue": OPS_QUEUE} for name in (TASK_SCHEDULES_TICK, TASK_RECONCILE, TASK_RETENTION)
    },
    beat_schedule={
        "schedules": _entry(TASK_SCHEDULES_TICK, settings.beat.schedule_tick_s),
        "reconcile": _entry(TASK_RECONCILE, settings.worker.reconcile_interval_s),
        "retention": _entry(TASK_RETENTION, settings.retention.interval_s),
    },
    # In memory: the state that matters is in Postgres, so no schedule file to keep or lose.
    beat_scheduler="celery.beat:Scheduler",
)


@app.task(name=TASK_SCHEDULES_TICK)
def schedules_tick() -> list[dict[str, Any]]:
    """Creates the jobs of the schedules that are due."""
    from service.collections import schedules

    results = schedules.tick(get_engine(settings.database.url), settings)
    return [
        {
            "schedule": str(r.schedule_id),
            "outcome": r.outcome,
            "job": str(r.job.id) if r.job is not None else None,
            "documents": r.documents,
        }
        for r in results
    ]


@app.task(name=TASK_RECONCILE)
def reconcile() -> dict[str, Any]:
    """Expired leases, the dispatcher's periodic pass, lost messages (see the reconciler)."""
    from service.store.chunks import PgChunkStore
    from workers.ops.reconciler import reconcile as run

    store = PgChunkStore.from_settings(settings)
    report = run(store, app, settings)
    return {
        "requeued": report.requeued,
        "failed": report.failed,
        "released": report.released,
        "resent": report.resent,
    }


@app.task(name=TASK_RETENTION)
def retention() -> dict[str, Any]:
    """Purges documents and results of jobs finished more than ``retention_days`` ago, and
    files past their ``expires_at``."""
    from workers.ops.retention import purge_expired, purge_expired_files

    engine = get_engine(settings.database.url)
    report = purge_expired(engine, settings)
    expired_files = purge_expired_files(engine, settings)  # /v1/files past their expires_at
    return {
        "marked": report.marked,
        "purged_jobs": report.purged_jobs,
        "done": report.complete,
        "files": expired_files.files,
        "files_done": expired_files.complete,
    }


def command(loglevel: str = "info", concurrency: int | None = None) -> list[str]:
    """The ops worker with embedded beat. Threads: the tasks wait on Postgres, and a long
    retention pass must not hold up a nightly run."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.ops.beat", "worker",
        "--beat", "--scheduler", "celery.beat:Scheduler",
        "--queues", OPS_QUEUE,
        "--pool", "threads", "--concurrency", str(concurrency or settings.beat.concurrency),
        "--hostname", "ops@%h",
        "--without-gossip", "--without-mingle",
        "--loglevel", loglevel,
    ]  # fmt: skip

"""Job reads: one tenant's job or list, live workers, and the job as the API shows it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.contract import priority_class
from service.errors import NotFoundError
from service.settings import Settings
from service.store.tables import Job, Worker


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID | str) -> Job:
    """The tenant's job or 404: another tenant's job is indistinguishable from none."""
    try:
        jid = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        raise NotFoundError(f"job {job_id} not found") from None
    job = session.scalar(select(Job).where(Job.id == jid, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    tenant_id: uuid.UUID,
    status: str | None = None,
    limit: int = 20,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[Job]:
    """Newest first; keyset pagination on (created_at, id) so pages never skip or repeat."""
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    if before is not None:
        q = q.where(
            text("(jobs.created_at, jobs.id) < (:b_created, :b_id)").bindparams(
                b_created=before[0], b_id=before[1]
            )
        )
    return list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def live_workers(session: Session, settings: Settings) -> list[Worker]:
    """Workers whose heartbeat is recent enough to count them as serving their model."""
    horizon = 3 * max(settings.worker_heartbeat_s, settings.lease_s / 3.0)
    return list(
        session.scalars(
            select(Worker)
            .where(Worker.last_heartbeat_at > func.now() - timedelta(seconds=horizon))
            .order_by(Worker.model, Worker.name)
        )
    )


def with_serving(view: dict[str, Any], served: set[str]) -> dict[str, Any]:
    """Adds whether a live worker serves the job's model; an unserved job waits, and says so."""
    view["model_served"] = view["model"] in served
    if view["status"] in ("queued", "running") and not view["model_served"]:
        view["warning"] = (
            f"no live worker serves model {view['model']!r}; the job waits until one starts "
            f"(docqueue worker --model {view['model']!r})"
        )
    return view


def job_view(job: Job, now: datetime | None = None) -> dict[str, Any]:
    """The job as the API shows it, with percent, rate and ETA derived from the counters."""
    now = now or datetime.now(UTC)
    done = job.succeeded + job.failed + job.cancelled
    percent = round(100.0 * done / job.total, 2) if job.total else 0.0
    docs_per_s: float | None = None
    eta_s: float | None = None
    if job.status in ("running", "cancelling") and job.started_at is not None:
        elapsed = (now - job.started_at).total_seconds()
        processed = job.succeeded + job.failed
        if elapsed > 0 and processed > 0:
            docs_per_s = round(processed / elapsed, 2)
            eta_s = round((job.total - done) / docs_per_s, 1)
    return {
        "id": str(job.id),
        "object": "job",
        "status": job.status,
        "task": job.task,
        "model": job.model,
        "queue": job.queue,
        "params": job.params,
        "priority": job.priority,
        "priority_class": priority_class(job.priority),
        "collection_id": str(job.collection_id) if job.collection_id else None,
        "source_name": job.source_name,
        "idempotency_key": job.idempotency_key,
        "chunk_size": job.chunk_size,
        "chunks": job.n_chunks,
        "counts": {
            "total": job.total,
            "succeeded": job.succeeded,
            "failed": job.failed,
            "cancelled": job.cancelled,
        },
        "percent": percent,
        "tokens": {"prompt": job.prompt_tokens, "completion": job.completion_tokens},
        "documents_per_s": docs_per_s,
        "eta_s": eta_s,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": job.error,
        # Set once retention purged the job's documents and results (counts stay).
        "results_expired_at": _iso(job.results_expired_at),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None

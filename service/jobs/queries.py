"""Job reads: one tenant's job or list, its progress, and the workers serving models."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.errors import NotFoundError
from service.jobs.validate import ModelCapabilities
from service.settings import Settings
from service.store.registry import live_horizon_s
from service.store.states import JobStatus
from service.store.tables import Job, Tenant, Worker


def get_job(session: Session, tenant_id: uuid.UUID | None, job_id: uuid.UUID | str) -> Job:
    """The tenant's job or 404: another tenant's job is indistinguishable from none.
    ``tenant_id`` None (an admin key): any tenant's job."""
    try:
        jid = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        raise NotFoundError(f"job {job_id} not found") from None
    query = select(Job).where(Job.id == jid)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    job = session.scalar(query)
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    tenant_id: uuid.UUID | None,
    status: str | None = None,
    limit: int = 20,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[Job]:
    """Newest first; keyset pagination on (created_at, id) so pages never skip or repeat.
    ``tenant_id`` None (an admin key): every tenant's jobs."""
    q = select(Job)
    if tenant_id is not None:
        q = q.where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    if before is not None:
        q = q.where(
            text("(jobs.created_at, jobs.id) < (:b_created, :b_id)").bindparams(
                b_created=before[0], b_id=before[1]
            )
        )
    return list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


_SERVED_TTL_S = 1.0
_served: dict[str, tuple[float, frozenset[str]]] = {}
_served_lock = threading.Lock()
_capabilities: dict[str, dict[str, ModelCapabilities | None]] = {}


def served_models(session: Session, settings: Settings) -> frozenset[str]:
    """The models live workers serve, as every job view's ``warning`` needs them: read at most
    once a second per process (workers heartbeat every ``heartbeat_s``, 10 s by default), so a
    status poll costs one query, not two."""
    key = settings.database.url
    now = time.monotonic()
    with _served_lock:
        hit = _served.get(key)
        if hit is not None and now - hit[0] < _SERVED_TTL_S:
            return hit[1]
    return frozenset(w.model for w in live_workers(session, settings))


def live_workers(session: Session, settings: Settings) -> list[Worker]:
    """Workers whose heartbeat is recent enough to count them as serving their model."""
    horizon = live_horizon_s(settings)
    workers = list(
        session.scalars(
            select(Worker)
            .where(Worker.last_heartbeat_at > func.now() - timedelta(seconds=horizon))
            .order_by(Worker.model, Worker.name)
        )
    )
    with _served_lock:  # what served_models answers next, until it is a second old
        _served[settings.database.url] = (time.monotonic(), frozenset(w.model for w in workers))
        _capabilities[settings.database.url] = served_capabilities(workers)
    return workers


def served_capabilities(workers: list[Worker]) -> dict[str, ModelCapabilities | None]:
    """Per served model, what its workers' engines say it can do: None where any worker says
    nothing (vLLM's: every task), else the first worker's word."""
    caps: dict[str, ModelCapabilities | None] = {}
    for w in workers:
        said = ModelCapabilities.of(w.capabilities)
        if w.model not in caps:
            caps[w.model] = said
        elif said is None:
            caps[w.model] = None
    return caps


def model_capabilities(
    session: Session, settings: Settings, model: str
) -> ModelCapabilities | None:
    """What the model's live workers say it can do (None: unknown, unserved or every task),
    read at most once a second per process like ``served_models``."""
    key = settings.database.url
    with _served_lock:
        hit = _served.get(key)
        if hit is not None and time.monotonic() - hit[0] < _SERVED_TTL_S:
            return _capabilities.get(key, {}).get(model)
    live_workers(session, settings)
    with _served_lock:
        return _capabilities.get(key, {}).get(model)


class Progress(NamedTuple):
    percent: float
    documents_per_s: float | None  # while running
    eta_s: float | None  # while running


def tenant_names(session: Session, jobs: list[Job]) -> dict[uuid.UUID, str]:
    """The names of the jobs' tenants (an admin's view names each job's tenant)."""
    ids = {j.tenant_id for j in jobs}
    if not ids:
        return {}
    rows = session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids))).all()
    return {tid: name for tid, name in rows}


def progress(job: Job, now: datetime) -> Progress:
    """Percent done, and while the job runs its rate and ETA, from the counters alone."""
    done = job.succeeded + job.failed + job.cancelled
    percent = round(100.0 * done / job.total, 2) if job.total else 0.0
    docs_per_s: float | None = None
    eta_s: float | None = None
    if job.status in (JobStatus.RUNNING, JobStatus.CANCELLING) and job.started_at is not None:
        elapsed = (now - job.started_at).total_seconds()
        processed = job.succeeded + job.failed
        if elapsed > 0 and processed > 0:
            docs_per_s = round(processed / elapsed, 2)
            eta_s = round((job.total - done) / docs_per_s, 1)
    return Progress(percent, docs_per_s, eta_s)

"""Admin routes (admin keys only; a tenant key gets 403): tenants and their quotas, the
registered workers, and each model's queue depth.

A tenant key sees only its own jobs and models' names; where work runs (hosts, devices, pids)
and how much every tenant queues is an operator's view."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

from datetime import timedelta

from fastapi import APIRouter
from sqlalchemy import func, select, text

from service.api.deps import Admin, Db, SettingsDep, read, tx
from service.api.schemas import (
    ERRORS,
    QueueDepth,
    QueueList,
    QuotasIn,
    TenantList,
    TenantOut,
    WorkerDetail,
    WorkerList,
)
from service.api.usage import quota_view
from service.store import quotas
from service.store.registry import live_horizon_s
from service.store.tables import Tenant, Worker

router = APIRouter(prefix="/v1", tags=["admin"], responses=ERRORS)


@router.get("/tenants", response_model=TenantList)
def list_tenants(who: Admin, settings: SettingsDep, db: Db) -> TenantList:
    """Every tenant with its quotas and their use."""
    with read(db) as session:
        tenants = list(session.scalars(select(Tenant).order_by(Tenant.name)))
        return TenantList(
            data=[
                TenantOut(
                    name=t.name, created_at=t.created_at, quotas=quota_view(session, t, settings)
                )
                for t in tenants
            ]
        )


@router.get("/tenants/{name}/quotas", response_model=TenantOut)
def get_quotas(name: str, who: Admin, settings: SettingsDep, db: Db) -> TenantOut:
    """The tenant's quotas (its own or the defaults) and their use."""
    with read(db) as session:
        tenant = quotas.get_tenant(session, name)
        return TenantOut(
            name=tenant.name,
            created_at=tenant.created_at,
            quotas=quota_view(session, tenant, settings),
        )


@router.put("/tenants/{name}/quotas", response_model=TenantOut)
def put_quotas(name: str, body: QuotasIn, who: Admin, settings: SettingsDep, db: Db) -> TenantOut:
    """Sets the quotas named in the body (null: back to the default); the next submission is
    checked against them. Jobs already accepted are not affected."""
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    with tx(db) as session:
        tenant = quotas.set_quotas(session, name, changes)
        return TenantOut(
            name=tenant.name,
            created_at=tenant.created_at,
            quotas=quota_view(session, tenant, settings),
        )


@router.get("/workers", response_model=WorkerList)
def list_workers(who: Admin, settings: SettingsDep, db: Db) -> WorkerList:
    """Every registered worker (host in its name, device, model), live or not."""
    horizon = timedelta(seconds=live_horizon_s(settings))
    with read(db) as session:
        now = session.scalar(select(func.now()))
        assert now is not None
        workers = list(session.scalars(select(Worker).order_by(Worker.model, Worker.name)))
    return WorkerList(
        data=[
            WorkerDetail(
                name=w.name,
                model=w.model,
                queue=w.queue,
                device=w.device,
                pid=w.pid,
                slots=w.slots,
                ready=w.engine_ready,
                live=w.last_heartbeat_at > now - horizon,
                started_at=w.started_at,
                last_heartbeat_at=w.last_heartbeat_at,
            )
            for w in workers
        ]
    )


_QUEUES = text(
    """
    WITH c AS (
      SELECT j.model,
             count(*) FILTER (WHERE c.state = 'queued' AND c.enqueued_at IS NULL) AS waiting,
             count(*) FILTER (WHERE c.state = 'queued' AND c.enqueued_at IS NOT NULL)
               AS released,
             count(*) FILTER (WHERE c.state = 'leased') AS leased,
             count(DISTINCT j.id) AS open_jobs
      FROM chunks c JOIN jobs j ON j.id = c.job_id
      WHERE c.state IN ('queued', 'leased')
      GROUP BY j.model
    ), w AS (
      SELECT model, count(*) AS live FROM workers
      WHERE last_heartbeat_at > now() - make_interval(secs => :horizon)
      GROUP BY model
    )
    SELECT coalesce(c.model, w.model) AS model, coalesce(c.waiting, 0), coalesce(c.released, 0),
           coalesce(c.leased, 0), coalesce(c.open_jobs, 0), coalesce(w.live, 0)
    FROM c FULL JOIN w ON w.model = c.model
    ORDER BY 1
    """
)


@router.get("/queues", response_model=QueueList)
def list_queues(who: Admin, settings: SettingsDep, db: Db) -> QueueList:
    """Per model: chunks waiting in PostgreSQL, released to Redis, and leased (running), from
    PostgreSQL (the source of truth; Redis only carries what was released)."""
    with read(db) as session:
        rows = session.execute(_QUEUES, {"horizon": live_horizon_s(settings)}).all()
    return QueueList(
        data=[
            QueueDepth(
                model=r[0],
                waiting=r[1],
                released=r[2],
                leased=r[3],
                open_jobs=r[4],
                live_workers=r[5],
            )
            for r in rows
        ]
    )

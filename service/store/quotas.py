"""Per-tenant quotas: what each tenant may hold at once or use in a UTC day, and the checks.

Four quotas, each a default in ``settings.quotas`` that a tenant's own value (set by an admin,
``tenants.quota_*``) overrides:

- ``running_jobs``: jobs open at once (queued, running, cancelling);
- ``queued_rows``: documents of its queued and running jobs without a result yet;
- ``upload_bytes_per_day``: bytes uploaded as jobs this UTC day (``usage_daily``);
- ``output_tokens_per_day``: completion tokens written this UTC day (``usage_daily``).

A submission is checked twice. ``check_before_upload`` runs before the body is read, so a
tenant already at a quota is refused without uploading gigabytes first. ``check_submission``
runs inside the submit transaction, after ingest (only then are the rows and bytes known),
under a lock on the tenant's row: concurrent submissions of one tenant pass it one at a time
and each sees the others' committed jobs, so two of them cannot both slip under a limit.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.errors import NotFoundError, QuotaExceededError
from service.settings import Settings
from service.store.tables import Tenant

#: The quotas by name, as the API, the CLI and ``tenants.quota_<name>`` spell them.
QUOTA_NAMES = ("running_jobs", "queued_rows", "upload_bytes_per_day", "output_tokens_per_day")
#: Where a quota's default is set, for messages.
_SETTING = {name: f"DOCQUEUE_QUOTA_{name.upper()}" for name in QUOTA_NAMES}
#: The UTC day, as every ledger write and read computes it (never the session's time zone).
UTC_TODAY = "(now() AT TIME ZONE 'UTC')::date"


@dataclass(frozen=True)
class Quotas:
    running_jobs: int
    queued_rows: int
    upload_bytes_per_day: int
    output_tokens_per_day: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class QuotaUse:
    """What a tenant holds now, and has used today (UTC), against each quota."""

    running_jobs: int
    queued_rows: int
    upload_bytes_per_day: int
    output_tokens_per_day: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def defaults(settings: Settings) -> Quotas:
    q = settings.quotas
    return Quotas(q.running_jobs, q.queued_rows, q.upload_bytes_per_day, q.output_tokens_per_day)


def effective(tenant: Tenant, settings: Settings) -> Quotas:
    """The tenant's own quotas where set, the defaults elsewhere."""
    base = defaults(settings).as_dict()
    own = own_quotas(tenant)
    merged: dict[str, int] = {}
    for name in QUOTA_NAMES:
        value = own[name]
        merged[name] = base[name] if value is None else value
    return Quotas(**merged)


def own_quotas(tenant: Tenant) -> dict[str, int | None]:
    """The tenant's own values (None: the default applies)."""
    return {name: getattr(tenant, f"quota_{name}") for name in QUOTA_NAMES}


def quotas_of(session: Session, tenant_id: uuid.UUID, settings: Settings) -> Quotas:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    return effective(tenant, settings)


_USE = text(
    f"""
    SELECT
      (SELECT count(*) FROM jobs
        WHERE tenant_id = :t AND status IN ('queued', 'running', 'cancelling')
          AND id IS DISTINCT FROM :own) AS running_jobs,
      (SELECT coalesce(sum(total - succeeded - failed - cancelled), 0) FROM jobs
        WHERE tenant_id = :t AND status IN ('queued', 'running')
          AND id IS DISTINCT FROM :own) AS queued_rows,
      (SELECT coalesce(sum(upload_bytes), 0) FROM usage_daily
        WHERE tenant_id = :t AND day = {UTC_TODAY}) AS upload_bytes_per_day,
      (SELECT coalesce(sum(completion_tokens), 0) FROM usage_daily
        WHERE tenant_id = :t AND day = {UTC_TODAY}) AS output_tokens_per_day
    """
)


def use_of(session: Session, tenant_id: uuid.UUID, own_job: uuid.UUID | None = None) -> QuotaUse:
    """The tenant's use now; ``own_job`` (a submission's own, uncommitted job) left out."""
    row = session.execute(_USE, {"t": tenant_id, "own": own_job}).one()
    return QuotaUse(*(int(v) for v in row))


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()) + 1)


def _exceeded(
    name: str,
    limit: int,
    used: int,
    adding: int | None,
    settings: Settings,
    subject: str = "this job",
) -> QuotaExceededError:
    daily = name.endswith("_per_day")
    retry = seconds_to_utc_midnight() if daily else settings.quotas.retry_after_s
    unit = {"upload_bytes_per_day": " bytes", "output_tokens_per_day": " tokens"}.get(name, "")
    what = f"quota {name} exceeded: limit {limit}{unit}"
    what += f" {'today (UTC)' if daily else 'at once'}, {used}{unit} in use"
    if adding is not None:
        what += f", {subject} adds {adding}{unit}"
    hint = (
        "it resets at 00:00 UTC"
        if daily
        else "it frees up as the tenant's open jobs finish (or are cancelled)"
    )
    return QuotaExceededError(
        f"{what}; {hint} (default {_SETTING[name]}; an admin sets a tenant's own with "
        "PUT /v1/tenants/{name}/quotas)",
        quota=name,
        limit=limit,
        used=used,
        adding=adding,
        retry_after_s=retry,
    )


def check_before_upload(session: Session, tenant_id: uuid.UUID, settings: Settings) -> None:
    """Refuses a submission the tenant cannot make whatever it uploads: a quota already
    reached. Runs before the body is read (no lock: ``check_submission`` is the exact one)."""
    quotas = quotas_of(session, tenant_id, settings)
    use = use_of(session, tenant_id)
    for name in QUOTA_NAMES:
        limit, used = getattr(quotas, name), getattr(use, name)
        if used >= limit:
            raise _exceeded(name, limit, used, None, settings)


def check_submission(
    session: Session,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    rows: int,
    upload_bytes: int,
    settings: Settings,
) -> None:
    """Inside the submit transaction, after ingest: refuses the job if it takes the tenant
    past a quota. Locks the tenant's row until the transaction ends (``FOR NO KEY UPDATE``,
    which the jobs' foreign key checks do not wait on), so a tenant's submissions are
    checked one at a time against each other's committed jobs."""
    tenant = session.execute(
        select(Tenant).where(Tenant.id == tenant_id).with_for_update(key_share=True, of=Tenant)
    ).scalar_one_or_none()
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    quotas = effective(tenant, settings)
    use = use_of(session, tenant_id, own_job=job_id)
    adds = {
        "running_jobs": 1,
        "queued_rows": rows,
        "upload_bytes_per_day": upload_bytes,
        "output_tokens_per_day": 0,  # unknown until it runs: only a day already spent counts
    }
    for name in QUOTA_NAMES:
        limit, used = getattr(quotas, name), getattr(use, name)
        if used + adds[name] > limit or used >= limit:
            raise _exceeded(name, limit, used, adds[name] or None, settings)


def check_file_upload(
    session: Session, tenant_id: uuid.UUID, upload_bytes: int | None, settings: Settings
) -> None:
    """A Files API upload counts against ``upload_bytes_per_day`` only (a file is no job and
    holds no rows). ``upload_bytes`` None: before the body is read, refused if the day's quota
    is already reached; else in the upload's transaction, under the same tenant lock as
    ``check_submission``, so files and jobs are checked one at a time against each other."""
    if upload_bytes is None:
        tenant = session.get(Tenant, tenant_id)
    else:
        tenant = session.execute(
            select(Tenant).where(Tenant.id == tenant_id).with_for_update(key_share=True, of=Tenant)
        ).scalar_one_or_none()
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    name = "upload_bytes_per_day"
    limit = effective(tenant, settings).upload_bytes_per_day
    used = use_of(session, tenant_id).upload_bytes_per_day
    if used >= limit or (upload_bytes is not None and used + upload_bytes > limit):
        raise _exceeded(name, limit, used, upload_bytes, settings, subject="this file")


def record_upload(
    session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, model: str, upload_bytes: int
) -> None:
    """Counts a submission's upload in today's ledger (in the submit transaction)."""
    session.execute(
        text(
            f"""
            INSERT INTO usage_daily (tenant_id, day, job_id, model, upload_bytes)
            VALUES (:t, {UTC_TODAY}, :j, :m, :b)
            ON CONFLICT (tenant_id, day, job_id)
            DO UPDATE SET upload_bytes = usage_daily.upload_bytes + EXCLUDED.upload_bytes
            """
        ),
        {"t": tenant_id, "j": job_id, "m": model, "b": upload_bytes},
    )


def get_tenant(session: Session, name: str, lock: bool = False) -> Tenant:
    query = select(Tenant).where(Tenant.name == name)
    if lock:
        query = query.with_for_update(key_share=True, of=Tenant)
    tenant = session.scalar(query)
    if tenant is None:
        raise NotFoundError(f"no tenant named {name!r}")
    return tenant


def set_quotas(session: Session, tenant_name: str, changes: dict[str, Any]) -> Tenant:
    """Sets the named quotas of a tenant (a value of None: back to the default); quotas not
    named keep their values."""
    tenant = get_tenant(session, tenant_name, lock=True)
    for name, value in changes.items():
        if name not in QUOTA_NAMES:
            raise ValueError(f"unknown quota {name!r}")
        setattr(tenant, f"quota_{name}", value)
    session.flush()
    return tenant

"""``/v1/usage``: a tenant's documents, tokens and upload bytes by UTC day and model, and its
quotas with their use. An admin key may name any tenant (``tenant=``) or see them all."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, cast

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from service.api.deps import Auth, Db, SettingsDep, read
from service.api.schemas import (
    ERRORS,
    MAX_USAGE_DAYS,
    QuotaOut,
    UsageGroup,
    UsageOut,
    UsageRow,
)
from service.errors import ForbiddenError, InvalidParameterError
from service.settings import Settings
from service.store import quotas, usage
from service.store.tables import Tenant

router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=ERRORS)

#: The range when none is given: the last 30 UTC days, today included.
DEFAULT_DAYS = 30


def parse_group_by(raw: str) -> list[UsageGroup]:
    """``day``, ``model`` or ``day,model`` (in any order; the order of the rows' keys)."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts or len(parts) > 2 or len(set(parts)) != len(parts):
        raise InvalidParameterError("group_by must be day, model, or day,model", field="group_by")
    for part in parts:
        if part not in ("day", "model"):
            raise InvalidParameterError(
                f"group_by: unknown group {part[:20]!r}; use day, model, or day,model",
                field="group_by",
            )
    return cast(list[UsageGroup], parts)


def quota_view(session: Session, tenant: Tenant, settings: Settings) -> dict[str, QuotaOut]:
    """Each quota of the tenant: its limit, whether that is the default, and its use."""
    limits = quotas.effective(tenant, settings).as_dict()
    own = quotas.own_quotas(tenant)
    used = quotas.use_of(session, tenant.id).as_dict()
    return {
        name: QuotaOut(limit=limits[name], used=used[name], default=own[name] is None)
        for name in quotas.QUOTA_NAMES
    }


def _row(r: usage.UsageRow) -> UsageRow:
    return UsageRow(
        day=r.day,
        model=r.model,
        tenant=r.tenant,
        documents=r.documents,
        failed=r.failed,
        prompt_tokens=r.prompt_tokens,
        output_tokens=r.completion_tokens,
        upload_bytes=r.upload_bytes,
    )


@router.get("", response_model=UsageOut, response_model_by_alias=True)
def get_usage(
    who: Auth,
    settings: SettingsDep,
    db: Db,
    from_: Annotated[date | None, Query(alias="from", description="first UTC day")] = None,
    to: Annotated[date | None, Query(description="last UTC day (included); default today")] = None,
    group_by: Annotated[str, Query(max_length=20, description="day, model or day,model")] = (
        "day,model"
    ),
    tenant: Annotated[
        str | None, Query(max_length=200, description="admin keys: this tenant; none: all")
    ] = None,
) -> UsageOut:
    """Documents, prompt and output tokens and upload bytes per UTC day and/or model, their
    totals, and (for one tenant) its quotas and their use. Read from the usage ledger, so a
    deleted or purged job's usage is still counted."""
    groups = parse_group_by(group_by)
    end = to or datetime.now(UTC).date()
    start = from_ or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise InvalidParameterError("from must not be after to", field="from")
    if (end - start).days + 1 > MAX_USAGE_DAYS:
        raise InvalidParameterError(f"at most {MAX_USAGE_DAYS} days per request", field="from")
    if tenant is not None and not who.admin and tenant != who.tenant_name:
        raise ForbiddenError("tenant= names another tenant: that needs an admin key")
    with read(db) as session:
        if who.admin and tenant is None:  # every tenant: each row names its tenant
            target = None
            rows = usage.report(session, None, start, end, [*groups, "tenant"])
        else:
            target = (
                quotas.get_tenant(session, tenant) if tenant else session.get(Tenant, who.tenant_id)
            )
            assert target is not None  # the key's tenant exists while the key does
            rows = usage.report(session, target.id, start, end, groups)
        (totals,) = usage.report(session, target.id if target else None, start, end, [])
        quota = quota_view(session, target, settings) if target else None
    return UsageOut(
        tenant=target.name if target else None,
        from_=start,
        to=end,
        group_by=groups,
        data=[_row(r) for r in rows],
        totals=_row(totals),
        quotas=quota,
    )

"""API keys: random, shown once, stored as sha256; one key belongs to one tenant.

An admin key (``create_key(..., admin=True)``) still belongs to a tenant (its own jobs are that
tenant's) and may also read every tenant's jobs, usage, workers and queues, and set quotas.

Operators list keys by their prefix and id (never the secret) and revoke them; ``authenticate``
reads the key's row on every request, so a revoked key is refused from its next request on.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import AuthError, ConflictError, NotFoundError
from service.store.tables import ApiKey, Tenant

KEY_PREFIX = "dq_"


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    tenant_name: str
    admin: bool = False


@dataclass(frozen=True)
class KeyInfo:
    """What an operator may see of a key: never the key itself, nor its hash."""

    id: uuid.UUID
    prefix: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str, admin: bool = False) -> str:
    """Creates the tenant if needed and returns a new key in clear text (the only time it is).
    ``admin``: the key may read every tenant and set quotas."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10], admin=admin))
    return key


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise AuthError("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("Authorization header must be 'Bearer <key>'")
    row = session.execute(
        select(Tenant.id, Tenant.name, ApiKey.admin)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key.strip()), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        raise AuthError("invalid or revoked API key")
    return Principal(tenant_id=row[0], tenant_name=row[1], admin=row[2])


def list_keys(session: Session, tenant_name: str | None = None) -> list[KeyInfo]:
    """Every key (or the tenant's), oldest first. An unknown tenant is a NotFoundError."""
    query = select(
        ApiKey.id, ApiKey.prefix, Tenant.name, ApiKey.created_at, ApiKey.revoked_at, ApiKey.admin
    )
    query = query.join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        if session.scalar(select(Tenant.id).where(Tenant.name == tenant_name)) is None:
            raise NotFoundError(f"no tenant named {tenant_name!r}")
        query = query.where(Tenant.name == tenant_name)
    rows = session.execute(query.order_by(ApiKey.created_at, ApiKey.id)).all()
    return [KeyInfo(*row) for row in rows]


def _parse_id(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


def revoke_key(session: Session, ref: str) -> tuple[KeyInfo, bool]:
    """Revokes the key with this id or prefix; returns it and whether this call revoked it
    (False: it already was). The key stops authenticating when the caller's transaction
    commits.

    A prefix is 7 random characters after ``dq_``: two keys may share one, and then the call
    names their ids and revokes neither, rather than guess.
    """
    ref = ref.strip()
    key_id = _parse_id(ref)
    where = ApiKey.id == key_id if key_id is not None else ApiKey.prefix == ref
    rows = session.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(where)
        .order_by(ApiKey.id)
        .with_for_update(of=ApiKey)
    ).all()
    if not rows:
        raise NotFoundError(f"no API key with id or prefix {ref!r}; see `docqueue keys list`")
    if len(rows) > 1:
        ids = ", ".join(str(key.id) for key, _ in rows)
        raise ConflictError(
            f"{len(rows)} API keys have the prefix {ref!r}; revoke one by its id: {ids}"
        )
    key, tenant = rows[0]
    revoked_now = key.revoked_at is None
    if revoked_now:
        key.revoked_at = session.scalar(select(func.now()))
        session.flush()
    info = KeyInfo(key.id, key.prefix, tenant, key.created_at, key.revoked_at, key.admin)
    return info, revoked_now

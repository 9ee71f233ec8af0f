"""API keys: random, shown once, stored as sha256; one key belongs to one tenant."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import AuthError
from service.store.tables import ApiKey, Tenant

KEY_PREFIX = "dq_"


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    tenant_name: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> str:
    """Creates the tenant if needed and returns a new key in clear text (the only time it is)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    return key


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise AuthError("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("Authorization header must be 'Bearer <key>'")
    row = session.execute(
        select(Tenant.id, Tenant.name)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key.strip()), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        raise AuthError("invalid or revoked API key")
    return Principal(tenant_id=row[0], tenant_name=row[1])

"""API keys: listed without their secret, revoked by prefix or id, refused from the next request."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from service.errors import ConflictError, NotFoundError
from service.settings import Settings
from service.store.engine import session_scope
from service.store.keys import create_key, hash_key, list_keys, revoke_key
from tests.support.helpers import auth, pg


def _key(settings: Settings, tenant: str) -> str:
    with session_scope(settings.database.url) as session:
        return create_key(session, tenant)


def test_a_revoked_key_is_refused_from_its_next_request(
    client: TestClient, settings: Settings
) -> None:
    """No cache between the key's row and the API: revocation takes effect at once."""
    tenant = f"revoke-{uuid.uuid4().hex[:8]}"
    key, other = _key(settings, tenant), _key(settings, tenant)
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200
    with session_scope(settings.database.url) as session:
        info, revoked_now = revoke_key(session, key[:10])
    assert revoked_now and info.revoked_at is not None and info.tenant == tenant
    refused = client.get("/v1/jobs", headers=auth(key))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    # The tenant's other key is untouched.
    assert client.get("/v1/jobs", headers=auth(other)).status_code == 200


def test_keys_are_listed_without_their_secret(settings: Settings) -> None:
    tenant = f"list-{uuid.uuid4().hex[:8]}"
    keys = [_key(settings, tenant), _key(settings, tenant)]
    with session_scope(settings.database.url) as session:
        revoke_key(session, keys[0][:10])
        listed = list_keys(session, tenant)
        everyone = list_keys(session)
    assert [k.prefix for k in listed] == [k[:10] for k in keys]
    assert [k.revoked_at is not None for k in listed] == [True, False]
    assert {k.tenant for k in listed} == {tenant}
    assert {k.id for k in listed} <= {k.id for k in everyone}
    shown = repr(everyone)
    assert all(k not in shown and hash_key(k) not in shown for k in keys)


def test_listing_an_unknown_tenant_says_so(settings: Settings) -> None:
    with session_scope(settings.database.url) as session, pytest.raises(NotFoundError) as exc:
        list_keys(session, "no-such-tenant")
    assert "no-such-tenant" in exc.value.message


def test_a_shared_prefix_revokes_nothing_and_names_the_ids(
    client: TestClient, settings: Settings
) -> None:
    """Prefixes carry 7 random characters: when two keys share one, the operator picks by id."""
    a, b = _key(settings, f"a-{uuid.uuid4().hex[:8]}"), _key(settings, f"b-{uuid.uuid4().hex[:8]}")
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE api_keys SET prefix = %s WHERE key_hash = %s", (a[:10], hash_key(b)))
        row = conn.execute("SELECT id FROM api_keys WHERE key_hash = %s", (hash_key(b),)).fetchone()
    assert row is not None
    with session_scope(settings.database.url) as session, pytest.raises(ConflictError) as exc:
        revoke_key(session, a[:10])
    assert str(row[0]) in exc.value.message and "by its id" in exc.value.message
    assert client.get("/v1/jobs", headers=auth(a)).status_code == 200
    assert client.get("/v1/jobs", headers=auth(b)).status_code == 200

    with session_scope(settings.database.url) as session:
        info, _ = revoke_key(session, str(row[0]))
    assert info.id == row[0]
    assert client.get("/v1/jobs", headers=auth(b)).status_code == 401
    assert client.get("/v1/jobs", headers=auth(a)).status_code == 200


def test_revoking_twice_or_an_unknown_key(settings: Settings) -> None:
    key = _key(settings, f"twice-{uuid.uuid4().hex[:8]}")
    with session_scope(settings.database.url) as session:
        first, revoked_now = revoke_key(session, key[:10])
    with session_scope(settings.database.url) as session:
        again, revoked_again = revoke_key(session, key[:10])
    assert revoked_now and not revoked_again and again.revoked_at == first.revoked_at
    for ref in ("dq_nothing", str(uuid.uuid4())):
        with session_scope(settings.database.url) as session, pytest.raises(NotFoundError):
            revoke_key(session, ref)

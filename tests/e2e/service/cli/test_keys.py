"""`docqueue keys` as an operator runs it, against a real `docqueue api` process: create, list
(never the secret), revoke (the next request is a 401)."""

from __future__ import annotations

import json
import uuid

import httpx

from service.settings import Settings
from service.store.keys import hash_key
from tests.support.helpers import pg
from tests.support.stack import cli, cli_env


def _create(env: dict[str, str], tenant: str) -> str:
    done = cli("keys", "create", "--tenant", tenant, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _jobs_status(api: str, key: str) -> int:
    resp = httpx.get(f"{api}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return resp.status_code


def test_list_and_revoke(settings: Settings, api_server: str) -> None:
    env = cli_env(settings, api_server)
    tenant = f"ops-{uuid.uuid4().hex[:6]}"
    key, spare = _create(env, tenant), _create(env, tenant)
    assert _jobs_status(api_server, key) == 200

    listed = cli("keys", "list", "--tenant", tenant, env=env)
    assert listed.returncode == 0, listed.stderr
    assert key[:10] in listed.stdout and spare[:10] in listed.stdout and tenant in listed.stdout
    for secret in (key, spare):
        assert secret not in listed.stdout + listed.stderr
        assert hash_key(secret) not in listed.stdout + listed.stderr

    revoked = cli("keys", "revoke", key[:10], env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout and key not in revoked.stdout
    assert _jobs_status(api_server, key) == 401  # the very next request
    assert _jobs_status(api_server, spare) == 200

    rows = json.loads(cli("keys", "list", "--tenant", tenant, "--json", env=env).stdout)
    assert {(r["prefix"], r["revoked_at"] is not None) for r in rows} == {
        (key[:10], True),
        (spare[:10], False),
    }
    again = cli("keys", "revoke", key[:10], env=env)
    assert again.returncode == 0 and "already revoked" in again.stdout


def test_revoke_refuses_an_unknown_or_shared_prefix(settings: Settings, api_server: str) -> None:
    env = cli_env(settings, api_server)
    unknown = cli("keys", "revoke", "dq_unknown", env=env)
    assert unknown.returncode == 1 and "no API key" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    a, b = _create(env, f"a-{uuid.uuid4().hex[:6]}"), _create(env, f"b-{uuid.uuid4().hex[:6]}")
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE api_keys SET prefix = %s WHERE key_hash = %s", (a[:10], hash_key(b)))
        row = conn.execute("SELECT id FROM api_keys WHERE key_hash = %s", (hash_key(b),)).fetchone()
    assert row is not None
    shared = cli("keys", "revoke", a[:10], env=env)
    assert shared.returncode == 1 and str(row[0]) in shared.stderr.replace("\n", "")
    assert _jobs_status(api_server, a) == _jobs_status(api_server, b) == 200

    by_id = cli("keys", "revoke", str(row[0]), env=env)
    assert by_id.returncode == 0, by_id.stderr
    assert _jobs_status(api_server, b) == 401 and _jobs_status(api_server, a) == 200

    missing = cli("keys", "list", "--tenant", "no-such-tenant", env=env)
    assert missing.returncode == 1 and "no-such-tenant" in missing.stderr

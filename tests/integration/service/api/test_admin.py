"""Admin keys over the real app: every tenant's jobs, tenants and quotas, workers and queue
depths; a tenant key sees only its own and gets 403 on the admin routes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from service.store.registry import register_worker
from tests.support.helpers import auth, chunk_rows, pg, submit
from tests.support.runs import local_client, new_admin_key, new_tenant

CSV = "text\none\ntwo\nthree\n"


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[TestClient]:
    with local_client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def admin_key(settings: Settings) -> str:
    return new_admin_key(settings)


def test_an_admin_sees_two_tenants_and_a_tenant_key_one(
    app: TestClient, settings: Settings, admin_key: str, model_name: str
) -> None:
    a, key_a = new_tenant(settings)
    b, key_b = new_tenant(settings)
    job_a = submit(app, key_a, CSV, model=model_name).json()["id"]
    job_b = submit(app, key_b, CSV, model=model_name).json()["id"]

    listed = app.get("/v1/jobs", headers=auth(admin_key), params={"limit": 100}).json()["data"]
    seen = {j["id"]: j["tenant"] for j in listed}
    assert seen[job_a] == a and seen[job_b] == b
    only_b = app.get("/v1/jobs", headers=auth(admin_key), params={"tenant": b}).json()["data"]
    assert [j["id"] for j in only_b] == [job_b]
    got = app.get(f"/v1/jobs/{job_a}", headers=auth(admin_key)).json()
    assert got["id"] == job_a and got["tenant"] == a

    mine = app.get("/v1/jobs", headers=auth(key_b), params={"limit": 100}).json()["data"]
    assert [j["id"] for j in mine] == [job_b] and mine[0]["tenant"] is None
    assert app.get(f"/v1/jobs/{job_a}", headers=auth(key_b)).status_code == 404
    resp = app.get("/v1/jobs", headers=auth(key_b), params={"tenant": a})
    assert resp.status_code == 403


def test_tenant_keys_are_refused_on_admin_routes(app: TestClient, settings: Settings) -> None:
    name, key = new_tenant(settings)
    for method, path in (
        ("GET", "/v1/tenants"),
        ("GET", f"/v1/tenants/{name}/quotas"),
        ("PUT", f"/v1/tenants/{name}/quotas"),
        ("GET", "/v1/workers"),
        ("GET", "/v1/queues"),
    ):
        resp = app.request(method, path, headers=auth(key), json={"running_jobs": 1000})
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json()["error"]["code"] == "forbidden"
    # Its own quotas stayed the defaults.
    quotas = app.get("/v1/usage", headers=auth(key)).json()["quotas"]
    assert all(q["default"] for q in quotas.values())


def test_set_and_reset_quotas(app: TestClient, settings: Settings, admin_key: str) -> None:
    name, _ = new_tenant(settings)
    url = f"/v1/tenants/{name}/quotas"
    body = app.put(url, headers=auth(admin_key), json={"queued_rows": 50, "running_jobs": 2})
    assert body.status_code == 200, body.text
    quotas = body.json()["quotas"]
    assert quotas["queued_rows"] == {"limit": 50, "used": 0, "default": False}
    assert quotas["running_jobs"]["limit"] == 2
    assert quotas["upload_bytes_per_day"] == {
        "limit": settings.quotas.upload_bytes_per_day,
        "used": 0,
        "default": True,
    }
    # Only the quotas named change; null is the default again.
    app.put(url, headers=auth(admin_key), json={"running_jobs": None})
    quotas = app.get(url, headers=auth(admin_key)).json()["quotas"]
    assert quotas["running_jobs"]["default"] is True and quotas["queued_rows"]["limit"] == 50
    listed = app.get("/v1/tenants", headers=auth(admin_key)).json()["data"]
    assert next(t for t in listed if t["name"] == name)["quotas"]["queued_rows"]["limit"] == 50

    for bad in ({"running_jobs": 0}, {"queued_rows": -1}, {"jobs": 3}, {"running_jobs": "x"}):
        resp = app.put(url, headers=auth(admin_key), json=bad)
        assert resp.status_code == 422, (bad, resp.text)
    missing = app.put("/v1/tenants/nobody-here/quotas", headers=auth(admin_key), json={})
    assert missing.status_code == 404


def test_workers_and_queue_depths(
    app: TestClient, settings: Settings, admin_key: str, model_name: str
) -> None:
    _, key = new_tenant(settings)
    name = f"gpu1@host-{uuid.uuid4().hex[:6]}"
    with get_engine(settings.database.url).begin() as conn:
        register_worker(conn, name, model_name, "q", "cuda (CUDA_VISIBLE_DEVICES=1)", 42, True, 3)
    workers = app.get("/v1/workers", headers=auth(admin_key)).json()["data"]
    mine = next(w for w in workers if w["name"] == name)
    assert mine["model"] == model_name and mine["device"] == "cuda (CUDA_VISIBLE_DEVICES=1)"
    assert (mine["pid"], mine["slots"], mine["live"], mine["ready"]) == (42, 3, True, True)

    # Four chunks: one waiting in PostgreSQL, two released to Redis, one leased.
    job = submit(app, key, "text\na\nb\nc\nd\n", model=model_name, chunk_size=1).json()["id"]
    chunks = chunk_rows(settings, job)
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE chunks SET enqueued_at = NULL WHERE job_id = %s", (job,))
        conn.execute(
            "UPDATE chunks SET enqueued_at = now() WHERE id = ANY(%s)",
            ([chunks[1][0], chunks[2][0], chunks[3][0]],),
        )
    store = PgChunkStore(get_engine(settings.database.url), lease_s=30, max_attempts=3)
    assert store.claim(chunks[3][0], "w").lease is not None
    queues = app.get("/v1/queues", headers=auth(admin_key)).json()["data"]
    depth = next(q for q in queues if q["model"] == model_name)
    assert depth == {
        "model": model_name,
        "waiting": 1,
        "released": 2,
        "leased": 1,
        "open_jobs": 1,
        "live_workers": 1,
    }

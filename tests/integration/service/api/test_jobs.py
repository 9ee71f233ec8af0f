"""Auth, tenant isolation, idempotency, listing, cancel and health over the real API."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from service.settings import Settings
from tests.support.helpers import auth, count_rows, override, pg, submit

CSV = "text\none\ntwo\nthree\n"


def test_requests_without_a_valid_key_are_401(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer dq_not-a-key"}, {"Authorization": "Basic x"}):
        resp = client.get("/v1/jobs", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_keys_are_stored_hashed(settings: Settings, api_key: str) -> None:
    with pg(settings.database.url) as conn:
        stored = [r[0] for r in conn.execute("SELECT key_hash FROM api_keys").fetchall()]
    assert api_key not in stored
    import hashlib

    assert hashlib.sha256(api_key.encode()).hexdigest() in stored


def test_another_tenants_job_is_404_everywhere(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    from service.store.engine import session_scope
    from service.store.keys import create_key

    with session_scope(settings.database.url) as session:
        other = create_key(session, f"other-{uuid.uuid4().hex[:6]}")
    job_id = submit(client, api_key, CSV, model=model_name).json()["id"]
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/results"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ):
        resp = client.request(method, path, headers=auth(other))
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json()["error"]["message"] == f"job {job_id} not found"
    listed = client.get("/v1/jobs", headers=auth(other)).json()["data"]
    assert job_id not in [j["id"] for j in listed]
    # The owner still sees it, untouched by the other tenant's cancel.
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(api_key)).json()["status"] == "queued"


def test_unknown_and_malformed_job_ids_are_404(client: TestClient, api_key: str) -> None:
    for jid in (str(uuid.uuid4()), "not-a-uuid"):
        assert client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).status_code == 404


def test_idempotency_key_returns_the_same_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    headers = {"Idempotency-Key": "nightly-2026-11-22"}
    first = submit(client, api_key, CSV, model=model_name, headers=headers)
    second = submit(client, api_key, CSV, model=model_name, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert count_rows(settings.database.url, "documents", first.json()["id"]) == 3
    # A different key, or none, makes a new job.
    third = submit(client, api_key, CSV, model=model_name, headers={"Idempotency-Key": "other"})
    assert third.json()["id"] != first.json()["id"]


def test_idempotency_keys_are_per_tenant(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    from service.store.engine import session_scope
    from service.store.keys import create_key

    with session_scope(settings.database.url) as session:
        other = create_key(session, f"other-{uuid.uuid4().hex[:6]}")
    headers = {"Idempotency-Key": "same-key"}
    a = submit(client, api_key, CSV, model=model_name, headers=headers).json()["id"]
    b = submit(client, other, CSV, model=model_name, headers=headers).json()["id"]
    assert a != b


def test_get_job_shape(client: TestClient, api_key: str, model_name: str) -> None:
    job = submit(
        client,
        api_key,
        CSV,
        model=model_name,
        task="classify",
        labels='["pos", "neg"]',
        max_tokens=5,
        temperature=0.5,
        seed=7,
        priority=3,
    ).json()
    got = client.get(f"/v1/jobs/{job['id']}", headers=auth(api_key)).json()
    assert got["id"] == job["id"]
    assert got["status"] == "queued"
    assert got["task"] == "classify"
    assert got["model"] == model_name
    assert got["counts"] == {"total": 3, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert got["percent"] == 0.0
    assert got["tokens"] == {"prompt": 0, "completion": 0}
    assert got["params"]["labels"] == ["pos", "neg"]
    assert got["params"]["max_tokens"] == 5
    assert got["params"]["temperature"] == 0.5
    assert got["params"]["seed"] == 7
    assert got["priority"] == 3
    assert got["created_at"] and got["started_at"] is None and got["finished_at"] is None
    assert got["documents_per_s"] is None and got["eta_s"] is None


def test_running_job_reports_rate_and_eta(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\n" + "d\n" * 100, model=model_name).json()["id"]
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE jobs SET status = 'running', succeeded = 20, failed = 5, "
            "started_at = now() - interval '10 seconds' WHERE id = %s",
            (job_id,),
        )
    got = client.get(f"/v1/jobs/{job_id}", headers=auth(api_key)).json()
    assert got["percent"] == 25.0
    assert 2.0 <= got["documents_per_s"] <= 2.6  # 25 documents in ~10 s
    assert 25 <= got["eta_s"] <= 40  # 75 left at ~2.5/s


def test_list_jobs_newest_first_paginated_and_filtered(
    client: TestClient, api_key: str, model_name: str
) -> None:
    ids = [submit(client, api_key, CSV, model=model_name).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[1]}/cancel", headers=auth(api_key))
    page1 = client.get("/v1/jobs?limit=2", headers=auth(api_key)).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2]
    seen = [j["id"] for j in page1["data"]]
    token = page1["next_page_token"]
    while token:
        page = client.get(f"/v1/jobs?limit=2&page_token={token}", headers=auth(api_key)).json()
        seen += [j["id"] for j in page["data"]]
        token = page["next_page_token"]
    assert seen == ids[::-1]
    cancelled = client.get("/v1/jobs?status=cancelled", headers=auth(api_key)).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    bad = client.get("/v1/jobs?status=bogus", headers=auth(api_key))
    error = bad.json()["error"]
    assert bad.status_code == 422 and error["field"] == "status"
    assert "status: Input should be 'validating', 'queued'" in error["message"]


def test_cancel_queued_job_is_immediate(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, CSV, model=model_name, chunk_size=1).json()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key))
    assert resp.status_code == 200
    job = resp.json()
    assert job["status"] == "cancelled"
    assert job["counts"]["cancelled"] == 3
    assert job["finished_at"] is not None
    with pg(settings.database.url) as conn:
        states = {
            r[0]
            for r in conn.execute(
                "SELECT state FROM chunks WHERE job_id = %s", (job_id,)
            ).fetchall()
        }
    assert states == {"cancelled"}  # a worker that receives these messages will skip them
    # Cancelling again is harmless.
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).json()
    assert again["status"] == "cancelled" and again["counts"]["cancelled"] == 3


def test_cancel_with_a_running_chunk_waits_for_it(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\n" + "d\n" * 10, model=model_name, chunk_size=4).json()[
        "id"
    ]
    with pg(settings.database.url) as conn:
        # Simulate a worker holding chunk 0's lease (the worker side is not part of this test).
        conn.execute(
            "UPDATE chunks SET state = 'leased', lease_expires_at = now() + interval '1 minute' "
            "WHERE job_id = %s AND seq = 0",
            (job_id,),
        )
        conn.execute(
            "UPDATE jobs SET status = 'running', started_at = now() WHERE id = %s", (job_id,)
        )
    job = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key)).json()
    assert job["status"] == "cancelling"
    assert job["counts"]["cancelled"] == 6  # chunks 1 and 2 (4 + 2 documents); chunk 0 runs on
    assert job["finished_at"] is None


def test_cancel_finished_job_is_409(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, CSV, model=model_name).json()["id"]
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE jobs SET status = 'completed' WHERE id = %s", (job_id,))
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(api_key))
    assert resp.status_code == 409
    assert "already completed" in resp.json()["error"]["message"]


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "postgres": "ok", "redis": "ok"}
    assert client.get("/openapi.json").json()["info"]["title"] == "docqueue"


def test_readyz_reports_an_unreachable_redis(settings: Settings) -> None:
    from service.api.app import create_app

    broken = override(settings, broker={"url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["postgres"] == "ok"
    assert resp.json()["redis"].startswith("error")


def test_models_and_unserved_job_warning(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job = submit(client, api_key, CSV, model=model_name).json()
    assert job["model_served"] is False
    assert f"no live worker serves model '{model_name}'" in job["warning"]
    from service.store.engine import get_engine, session_scope
    from service.store.keys import create_key
    from service.store.registry import heartbeat, register_worker

    name = f"gpu0@{uuid.uuid4().hex[:6]}"
    with get_engine(settings.database.url).begin() as conn:
        register_worker(conn, name, model_name, "q", "cuda (CUDA_VISIBLE_DEVICES=0)", 1, True)
        heartbeat(conn, name, ready=True)
    models = client.get("/v1/models", headers=auth(api_key)).json()["data"]
    entry = next(m for m in models if m["id"] == model_name)
    # A tenant key sees the model's name and readiness, never where it runs.
    assert entry["served"] is True and entry["ready"] is True
    assert entry["workers"] is None and entry["queue"] is None
    assert name not in str(models) and "CUDA_VISIBLE_DEVICES" not in str(models)
    with session_scope(settings.database.url) as session:
        admin_key = create_key(session, f"ops-{uuid.uuid4().hex[:6]}", admin=True)
    models = client.get("/v1/models", headers=auth(admin_key)).json()["data"]
    entry = next(m for m in models if m["id"] == model_name)
    assert entry["workers"][0]["name"] == name
    assert entry["workers"][0]["device"] == "cuda (CUDA_VISIBLE_DEVICES=0)"
    got = client.get(f"/v1/jobs/{job['id']}", headers=auth(api_key)).json()
    assert got["model_served"] is True and got["warning"] is None
    # A worker that stopped heartbeating no longer counts.
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE workers SET last_heartbeat_at = now() - interval '1 hour' WHERE name = %s",
            (name,),
        )
    models = client.get("/v1/models", headers=auth(api_key)).json()["data"]
    assert model_name not in [m["id"] for m in models]


def test_unserved_models_are_refused_when_the_server_says_so(
    settings: Settings, api_key: str, model_name: str
) -> None:
    """By default a job for a model no worker serves is accepted with a warning (and counts
    against the quotas); DOCQUEUE_REJECT_UNSERVED_MODELS makes it a 422 naming the served."""
    from service.store.engine import get_engine
    from service.store.registry import register_worker
    from tests.support.runs import local_client

    served = f"{model_name}-served"
    with get_engine(settings.database.url).begin() as conn:
        register_worker(conn, f"gpu0@{uuid.uuid4().hex[:6]}", served, "q", "cpu", 1, True)
    with local_client(settings, jobs={"reject_unserved_models": True}) as strict:
        resp = submit(strict, api_key, CSV, model=model_name)
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["field"] == "model" and repr(served) in error["message"]
        assert f"no live worker serves model {model_name!r}" in error["message"]
        assert submit(strict, api_key, CSV, model=served).status_code == 202
    with local_client(settings) as lenient:
        accepted = submit(lenient, api_key, CSV, model=model_name)
        assert accepted.status_code == 202 and accepted.json()["warning"]


def test_a_classifier_is_advertised_and_jobs_are_checked_against_its_labels(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A transformers worker serving a sequence classifier says so: /v1/models shows its one
    task and its labels, a job for another task is a 422, labels are optional and must be its
    own if given; the job gets them."""
    from service.store.engine import get_engine
    from service.store.registry import register_worker

    classifier = f"{model_name}-bert"
    caps = {"tasks": ["classify"], "labels": ["billing", "outage", "other"], "prompted": False}
    with get_engine(settings.database.url).begin() as conn:
        register_worker(
            conn, f"cpu-1@{uuid.uuid4().hex[:6]}", classifier, "q", "cpu", 1, True, 1, caps
        )
        register_worker(conn, f"cpu-2@{uuid.uuid4().hex[:6]}", model_name, "q", "cpu", 1, True)
    models = {m["id"]: m for m in client.get("/v1/models", headers=auth(api_key)).json()["data"]}
    assert models[classifier]["tasks"] == ["classify"]
    assert models[classifier]["labels"] == ["billing", "outage", "other"]
    assert models[model_name]["tasks"] == [
        "generate",
        "summarize",
        "classify",
        "chat",
        "completion",
    ]
    assert models[model_name]["labels"] is None

    refused = submit(client, api_key, CSV, model=classifier, task="generate")
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["field"] == "task"
    assert "is a classifier (labels ['billing', 'outage', 'other'])" in error["message"]
    assert "serves classify, not generate" in error["message"]

    wrong = submit(client, api_key, CSV, model=classifier, task="classify", labels="spam,ham")
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "labels"
    assert (
        "the classifier's own, ['billing', 'outage', 'other']" in wrong.json()["error"]["message"]
    )

    job = submit(client, api_key, CSV, model=classifier, task="classify")
    assert job.status_code == 202, job.text
    reordered = submit(
        client, api_key, CSV, model=classifier, task="classify", labels="other,outage,billing"
    )
    assert reordered.status_code == 202, reordered.text
    with pg(settings.database.url) as conn:
        row = conn.execute("SELECT params FROM jobs WHERE id = %s", (job.json()["id"],)).fetchone()
    assert row is not None and row[0]["labels"] == ["billing", "outage", "other"]
    # A causal model still needs labels to classify.
    needs = submit(client, api_key, CSV, model=model_name, task="classify")
    assert needs.status_code == 422 and needs.json()["error"]["field"] == "labels"

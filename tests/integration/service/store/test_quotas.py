"""Per-tenant quotas over the real app and store: past each quota a submission is a 429 with
Retry-After naming the quota, and once under it again the same submission is accepted."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from service.store.chunks import RowResult
from service.store.quotas import seconds_to_utc_midnight
from tests.support.helpers import auth, pg, submit, wait_enqueued
from tests.support.runs import local_client, new_admin_key, new_tenant, run_job

CSV3 = "text\none\ntwo\nthree\n"


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[TestClient]:
    with local_client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def admin_key(settings: Settings) -> str:
    return new_admin_key(settings)


def set_quotas(app: TestClient, admin_key: str, tenant: str, **quotas: int | None) -> Any:
    resp = app.put(f"/v1/tenants/{tenant}/quotas", headers=auth(admin_key), json=quotas)
    assert resp.status_code == 200, resp.text
    return resp.json()


def refused(resp: Any, quota: str) -> dict[str, Any]:
    """Asserts a 429 for ``quota`` with a Retry-After; returns the error body."""
    assert resp.status_code == 429, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == "quota_exceeded" and error["quota"] == quota
    assert f"quota {quota} exceeded" in error["message"]
    assert f"limit {error['limit']}" in error["message"]
    assert int(resp.headers["Retry-After"]) == error["retry_after_s"] > 0
    return error


def previous_day(settings: Settings, tenant: str) -> None:
    """The tenant's ledger as it will look tomorrow: today's usage becomes yesterday's."""
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE usage_daily SET day = day - 1 WHERE tenant_id = "
            "(SELECT id FROM tenants WHERE name = %s)",
            (tenant,),
        )


def test_running_jobs(app: TestClient, admin_key: str, settings: Settings, model_name: str) -> None:
    tenant, key = new_tenant(settings)
    set_quotas(app, admin_key, tenant, running_jobs=1)
    first = submit(app, key, CSV3, model=model_name)
    assert first.status_code == 202, first.text
    error = refused(submit(app, key, CSV3, model=model_name), "running_jobs")
    assert error["limit"] == 1 and error["used"] == 1
    assert error["retry_after_s"] == settings.quotas.retry_after_s
    # Refused before the body is read: an upload ingest would refuse (no text column) gets
    # the 429, not the 400 that reading it would have given.
    refused(submit(app, key, "title\nx\n", model=model_name), "running_jobs")
    # Another tenant is not held back by this one's quota.
    _, other = new_tenant(settings)
    assert submit(app, other, CSV3, model=model_name).status_code == 202
    # Cancelled, the first job no longer runs: the next one is accepted.
    cancel = app.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=auth(key))
    assert cancel.json()["status"] == "cancelled"
    assert submit(app, key, CSV3, model=model_name).status_code == 202


def test_queued_rows(app: TestClient, admin_key: str, settings: Settings, model_name: str) -> None:
    tenant, key = new_tenant(settings)
    set_quotas(app, admin_key, tenant, queued_rows=5)
    first = submit(app, key, CSV3, model=model_name, chunk_size=2)
    assert first.status_code == 202, first.text
    # 3 queued + 3 more > 5: known only once the upload is read, in the submit transaction.
    error = refused(submit(app, key, CSV3, model=model_name), "queued_rows")
    assert (error["limit"], error["used"], error["adding"]) == (5, 3, 3)
    assert "this job adds 3" in error["message"]
    # Nothing of the refused job stays behind.
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM jobs j JOIN tenants t ON t.id = j.tenant_id WHERE t.name = %s",
            (tenant,),
        ).fetchone()
    assert row is not None and row[0] == 1
    # Exactly at the limit is allowed: 3 + 2 = 5.
    second = submit(app, key, "text\na\nb\n", model=model_name)
    assert second.status_code == 202, second.text
    refused(submit(app, key, "text\na\n", model=model_name), "queued_rows")  # 5 >= 5
    # Rows with a result no longer wait: once both jobs ran, 3 rows fit again.
    run_job(settings, first.json()["id"], lambda idx: RowResult(idx=idx, output="x"))
    run_job(settings, second.json()["id"], lambda idx: RowResult(idx=idx, error="bad row"))
    assert submit(app, key, CSV3, model=model_name).status_code == 202


def test_upload_bytes_per_day(
    app: TestClient, admin_key: str, settings: Settings, model_name: str
) -> None:
    tenant, key = new_tenant(settings)
    size = len(CSV3.encode())
    set_quotas(app, admin_key, tenant, upload_bytes_per_day=2 * size - 1)
    assert submit(app, key, CSV3, model=model_name).status_code == 202
    error = refused(submit(app, key, CSV3, model=model_name), "upload_bytes_per_day")
    assert (error["used"], error["adding"]) == (size, size)
    assert "00:00 UTC" in error["message"]
    assert 0 < error["retry_after_s"] <= seconds_to_utc_midnight() + 1
    # The next UTC day the budget is fresh.
    previous_day(settings, tenant)
    assert submit(app, key, CSV3, model=model_name).status_code == 202


def test_output_tokens_per_day(
    app: TestClient, admin_key: str, settings: Settings, model_name: str
) -> None:
    tenant, key = new_tenant(settings)
    set_quotas(app, admin_key, tenant, output_tokens_per_day=100)
    first = submit(app, key, CSV3, model=model_name)
    assert first.status_code == 202
    assert submit(app, key, CSV3, model=model_name).status_code == 202  # 0 tokens so far
    run_job(settings, first.json()["id"], lambda idx: RowResult(idx=idx, completion_tokens=40))
    error = refused(submit(app, key, CSV3, model=model_name), "output_tokens_per_day")
    assert (error["limit"], error["used"]) == (100, 120)
    previous_day(settings, tenant)
    assert submit(app, key, CSV3, model=model_name).status_code == 202


def test_a_default_applies_until_a_tenant_has_its_own(
    settings: Settings, admin_key: str, model_name: str
) -> None:
    tenant, key = new_tenant(settings)
    with local_client(settings, quotas={"running_jobs": 1}) as app:
        assert submit(app, key, CSV3, model=model_name).status_code == 202
        error = refused(submit(app, key, CSV3, model=model_name), "running_jobs")
        assert "DOCQUEUE_QUOTA_RUNNING_JOBS" in error["message"]
        own = set_quotas(app, admin_key, tenant, running_jobs=2)
        assert own["quotas"]["running_jobs"] == {"limit": 2, "used": 1, "default": False}
        assert submit(app, key, CSV3, model=model_name).status_code == 202
        back = set_quotas(app, admin_key, tenant, running_jobs=None)
        assert back["quotas"]["running_jobs"] == {"limit": 1, "used": 2, "default": True}
        refused(submit(app, key, CSV3, model=model_name), "running_jobs")


def test_concurrent_submissions_cannot_both_slip_under_a_quota(
    client: TestClient, settings: Settings, admin_key: str
) -> None:
    """Two uploads at once against running_jobs=1 (pool processes, each its own transaction):
    the tenant row's lock makes the second check see the first's committed job."""
    tenant, key = new_tenant(settings)
    resp = client.put(
        f"/v1/tenants/{tenant}/quotas", headers=auth(admin_key), json={"running_jobs": 1}
    )
    assert resp.status_code == 200
    body = "text\n" + "".join(f"row {i}\n" for i in range(2000))
    responses: list[Any] = []
    start = threading.Barrier(4)

    def one() -> None:
        start.wait()
        model = f"race-{uuid.uuid4().hex[:6]}"
        responses.append(submit(client, key, body, model=model, chunk_size=10_000))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r in responses)
    assert codes == [202, 429, 429, 429], codes
    # Refused in a pool process or before the upload: the 429 is whole either way.
    for resp in responses:
        if resp.status_code == 429:
            refused(resp, "running_jobs")
    # The pool dispatches the accepted job's one chunk after the 202: let it finish here.
    (won,) = [r for r in responses if r.status_code == 202]
    wait_enqueued(settings, won.json()["id"], 1)


def test_a_refusal_in_a_pool_process_keeps_its_fields_and_retry_after(
    client: TestClient, settings: Settings, admin_key: str, model_name: str
) -> None:
    """queued_rows is only known after ingest, in the pool process: its error travels back as
    data, and the 429 still has every field and the Retry-After."""
    tenant, key = new_tenant(settings)
    set_quotas(client, admin_key, tenant, queued_rows=2)
    error = refused(submit(client, key, CSV3, model=model_name), "queued_rows")
    assert (error["limit"], error["used"], error["adding"]) == (2, 0, 3)
    assert error["retry_after_s"] == settings.quotas.retry_after_s


def test_an_idempotent_replay_is_answered_whatever_the_quotas(
    app: TestClient, admin_key: str, settings: Settings, model_name: str
) -> None:
    """A client retrying after a lost response gets its job back, not a 429 for the job
    itself holding the quota."""
    tenant, key = new_tenant(settings)
    set_quotas(app, admin_key, tenant, running_jobs=1)
    headers = {"Idempotency-Key": "upload-1"}
    first = submit(app, key, CSV3, model=model_name, headers=headers)
    assert first.status_code == 202
    again = submit(app, key, CSV3, model=model_name, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    refused(
        submit(app, key, CSV3, model=model_name, headers={"Idempotency-Key": "2"}), "running_jobs"
    )

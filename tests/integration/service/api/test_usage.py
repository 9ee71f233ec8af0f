"""``GET /v1/usage`` over the real app and store: its numbers are the sums of the results'
tokens, per UTC day and model, and they outlive the jobs they came from."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from service.store.chunks import RowResult
from tests.support.helpers import auth, pg, submit
from tests.support.runs import local_client, new_admin_key, new_tenant, run_job

TODAY = datetime.now(UTC).date().isoformat()


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[TestClient]:
    with local_client(settings) as client:
        yield client


def result(idx: int) -> RowResult:
    """Varied tokens per row, and every fourth row an error (no tokens)."""
    if idx % 4 == 0:
        return RowResult(idx=idx, error="bad row")
    return RowResult(idx=idx, output="ok", prompt_tokens=10 + idx, completion_tokens=3 * idx)


def results_sums(settings: Settings, tenant: str) -> dict[str, tuple[int, int, int, int]]:
    """Per model, from the results themselves: (documents, failed, prompt, completion)."""
    with pg(settings.database.url) as conn:
        rows = conn.execute(
            """
            SELECT j.model, count(*), count(*) FILTER (WHERE r.error IS NOT NULL),
                   sum(r.prompt_tokens), sum(r.completion_tokens)
            FROM results r JOIN jobs j ON j.id = r.job_id JOIN tenants t ON t.id = j.tenant_id
            WHERE t.name = %s GROUP BY j.model
            """,
            (tenant,),
        ).fetchall()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}


def usage(app: TestClient, key: str, **params: Any) -> dict[str, Any]:
    resp = app.get("/v1/usage", headers=auth(key), params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def two_models(app: TestClient, settings: Settings, key: str, model_name: str) -> list[str]:
    """Three jobs on two models, run through the store; returns the CSVs uploaded."""
    bodies = []
    for model, rows in ((model_name, 10), (model_name, 7), (model_name + "-b", 5)):
        body = "text\n" + "".join(f"document {i}\n" for i in range(rows))
        job = submit(app, key, body, model=model, chunk_size=4).json()
        run_job(settings, job["id"], result)
        bodies.append(body)
    return bodies


def test_usage_equals_the_sums_of_the_results(
    app: TestClient, settings: Settings, model_name: str
) -> None:
    tenant, key = new_tenant(settings)
    bodies = two_models(app, settings, key, model_name)
    sums = results_sums(settings, tenant)
    assert sums[model_name][0] == 17 and sums[model_name + "-b"][0] == 5

    body = usage(app, key, group_by="day,model")
    assert body["tenant"] == tenant and body["to"] == TODAY
    got = {
        r["model"]: (r["documents"], r["failed"], r["prompt_tokens"], r["output_tokens"])
        for r in body["data"]
    }
    assert got == sums
    assert {r["day"] for r in body["data"]} == {TODAY}
    totals = body["totals"]
    assert totals["prompt_tokens"] == sum(s[2] for s in sums.values())
    assert totals["output_tokens"] == sum(s[3] for s in sums.values())
    assert totals["documents"] == 22 and totals["failed"] == sum(s[1] for s in sums.values())
    assert totals["upload_bytes"] == sum(len(b.encode()) for b in bodies)

    by_day = usage(app, key, group_by="day")["data"]
    assert len(by_day) == 1 and by_day[0]["model"] is None
    assert by_day[0]["output_tokens"] == totals["output_tokens"]
    by_model = usage(app, key, group_by="model")["data"]
    assert [r["model"] for r in by_model] == sorted(sums) and by_model[0]["day"] is None

    # The quotas with their use: nothing open, today's bytes and tokens.
    quotas = body["quotas"]
    assert quotas["running_jobs"]["used"] == 0 and quotas["queued_rows"]["used"] == 0
    assert quotas["output_tokens_per_day"]["used"] == totals["output_tokens"]
    assert quotas["upload_bytes_per_day"]["used"] == totals["upload_bytes"]
    assert quotas["running_jobs"]["limit"] == settings.quotas.running_jobs
    assert quotas["running_jobs"]["default"] is True


def test_usage_outlives_its_jobs_and_ranges_by_day(
    app: TestClient, settings: Settings, model_name: str
) -> None:
    tenant, key = new_tenant(settings)
    two_models(app, settings, key, model_name)
    before = usage(app, key)["totals"]
    with pg(settings.database.url) as conn:  # as a deletion or retention's purge would
        conn.execute(
            "DELETE FROM jobs WHERE tenant_id = (SELECT id FROM tenants WHERE name = %s)",
            (tenant,),
        )
    assert results_sums(settings, tenant) == {}
    assert usage(app, key)["totals"] == before

    # Yesterday's usage is in a range that includes yesterday, and not in today's alone.
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE usage_daily SET day = day - 1 WHERE tenant_id = "
            "(SELECT id FROM tenants WHERE name = %s)",
            (tenant,),
        )
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    assert usage(app, key, **{"from": TODAY, "to": TODAY})["totals"]["documents"] == 0
    ranged = usage(app, key, **{"from": yesterday, "to": TODAY}, group_by="day")
    assert [r["day"] for r in ranged["data"]] == [yesterday]
    assert ranged["totals"] == before


def test_admin_sees_every_tenant_and_a_tenant_only_itself(
    app: TestClient, settings: Settings, model_name: str
) -> None:
    a, key_a = new_tenant(settings)
    b, key_b = new_tenant(settings)
    two_models(app, settings, key_a, model_name)
    run_job(
        settings,
        submit(app, key_b, "text\nx\n", model=model_name).json()["id"],
        lambda idx: RowResult(idx=idx, completion_tokens=5),
    )
    admin = new_admin_key(settings)
    everyone = usage(app, admin, group_by="model")
    assert everyone["tenant"] is None and everyone["quotas"] is None
    tenants = {r["tenant"] for r in everyone["data"]}
    assert {a, b} <= tenants
    one = usage(app, admin, tenant=b)
    assert one["tenant"] == b and one["totals"]["output_tokens"] == 5 and one["quotas"]
    assert usage(app, key_b)["totals"] == one["totals"]
    # A tenant key names no other tenant.
    resp = app.get("/v1/usage", headers=auth(key_b), params={"tenant": a})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    assert app.get("/v1/usage", headers=auth(admin), params={"tenant": "nobody"}).status_code == 404


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"group_by": "day,day"}, "group_by"),
        ({"from": "2026-12-02", "to": "2026-12-01"}, "from"),
        ({"from": "2020-01-01", "to": "2026-12-01"}, "from"),
        ({"from": "yesterday"}, "from"),
    ],
)
def test_bad_parameters_are_422(
    app: TestClient, settings: Settings, params: dict[str, str], field: str
) -> None:
    _, key = new_tenant(settings)
    resp = app.get("/v1/usage", headers=auth(key), params=params)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field

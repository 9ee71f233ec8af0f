"""Schedules and retention over the real app, Postgres and Redis. The worker's part is played by
the chunk state machine (claim, write results, close), as a chunk runner would call it."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.collections import schedules
from service.contract import queue_for_model
from service.settings import Settings
from service.store.chunks import PgChunkStore, RowResult
from service.store.engine import get_engine
from service.store.states import ChunkState
from tests.support.helpers import auth, override, pg, put, sha, submit
from workers.ops.retention import purge_expired


def add_schedule(client: TestClient, key: str, **body: Any) -> Any:
    body.setdefault("task", "summarize")
    body.setdefault("cron", "0 2 * * *")
    body.setdefault("timezone", "Europe/Berlin")
    return client.post("/v1/schedules", headers=auth(key), json=body)


def run_now(client: TestClient, key: str, schedule_id: str) -> Any:
    return client.post(f"/v1/schedules/{schedule_id}/run", headers=auth(key))


def job_documents(settings: Settings, job_id: str) -> list[str]:
    with pg(settings.database.url) as conn:
        rows = conn.execute(
            "SELECT external_id FROM documents WHERE job_id = %s ORDER BY idx", (job_id,)
        ).fetchall()
    return [r[0] for r in rows]


def finish_job(settings: Settings, job_id: str, fail: set[str] | None = None) -> None:
    """Runs every chunk of the job as a worker would: claim, write results, close."""
    db = get_engine(settings.database.url)
    with pg(settings.database.url) as conn:
        chunks = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM chunks WHERE job_id = %s ORDER BY seq", (job_id,)
            ).fetchall()
        ]
    store = PgChunkStore(db, lease_s=30, max_attempts=3)
    for cid in chunks:
        claim = store.claim(cid, "test-worker")
        assert claim.lease is not None
        results = [
            RowResult(idx=d.idx, error="boom")
            if d.external_id in (fail or set())
            else RowResult(idx=d.idx, output=f"summary of {d.text}", completion_tokens=3)
            for d in store.pending(claim.lease)
        ]
        store.write(claim.lease, results)
        store.close(claim.lease, ChunkState.DONE)


def tick(settings: Settings, schedule_id: str) -> list[schedules.RunResult]:
    """One beat tick; only this test's schedule's runs (others may be due in the shared db)."""
    results = schedules.tick(get_engine(settings.database.url), settings)
    return [r for r in results if str(r.schedule_id) == schedule_id]


def make_due(settings: Settings, schedule_id: str, minutes_ago: int = 1) -> datetime:
    due = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=minutes_ago)
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE schedules SET next_run_at = %s WHERE id = %s", (due, schedule_id))
    return due


def test_schedule_validation_names_the_field(
    client: TestClient, api_key: str, model_name: str
) -> None:
    put(client, api_key, "val", "id,text\n1,a\n")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"cron": "0 25 * * *"}, 422, "cron"),
        ({"cron": "every night"}, 422, "cron"),
        ({"timezone": "Mars/Olympus"}, 422, "timezone"),
        ({"task": "translate"}, 422, "task"),
        ({"task": "classify"}, 422, "labels"),
        ({"params": {"max_tokens": 0}}, 422, "max_tokens"),
        ({"params": {"colour": "red"}}, 422, "params.colour"),
        ({"priority": "urgent"}, 422, "priority"),
        ({"collection": "nope"}, 404, "collection"),
    ]
    for change, status, field in cases:
        body = {"collection": "val", "model": model_name, **change}
        resp = add_schedule(client, api_key, **body)
        assert resp.status_code == status, (override, resp.text)
        assert resp.json()["error"]["field"] == field, (override, resp.json())
    missing = client.post("/v1/schedules", headers=auth(api_key), json={"collection": "val"})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "cron"


def test_create_list_get_delete(client: TestClient, api_key: str, model_name: str) -> None:
    put(client, api_key, "crud", "id,text\n1,a\n")
    resp = add_schedule(
        client, api_key, collection="crud", model=model_name, params={"summary_words": 20}
    )
    assert resp.status_code == 201, resp.text
    s = resp.json()
    assert s["priority"] == "bulk" and s["timezone"] == "Europe/Berlin"
    next_run = datetime.fromisoformat(s["next_run_at"])
    # 02:00 in Berlin is 00:00 or 01:00 UTC, within the next day.
    assert next_run.astimezone(UTC).hour in (0, 1) and next_run.minute == 0
    assert next_run - datetime.now(UTC) <= timedelta(days=1)
    listed = client.get("/v1/schedules", headers=auth(api_key)).json()["data"]
    assert [x["id"] for x in listed] == [s["id"]]
    assert client.get(f"/v1/schedules/{s['id']}", headers=auth(api_key)).json()["cron"] == (
        "0 2 * * *"
    )
    assert client.delete(f"/v1/schedules/{s['id']}", headers=auth(api_key)).status_code == 200
    assert client.get(f"/v1/schedules/{s['id']}", headers=auth(api_key)).status_code == 404


def test_another_tenants_schedule_is_404(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    from service.store.engine import session_scope
    from service.store.keys import create_key

    with session_scope(settings.database.url) as session:
        other = create_key(session, f"sched-other-{uuid.uuid4().hex[:6]}")
    put(client, api_key, "mine", "id,text\n1,a\n")
    sid = add_schedule(client, api_key, collection="mine", model=model_name).json()["id"]
    for method, path in [
        ("GET", f"/v1/schedules/{sid}"),
        ("DELETE", f"/v1/schedules/{sid}"),
        ("POST", f"/v1/schedules/{sid}/run"),
    ]:
        assert client.request(method, path, headers=auth(other)).status_code == 404
    # Nor can the other tenant schedule this tenant's collection.
    resp = add_schedule(client, other, collection="mine", model=model_name)
    assert resp.status_code == 404


def test_run_now_twice_gives_one_bulk_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str, redis_client: Any
) -> None:
    put(client, api_key, "twice", "id,text\n" + "".join(f"d{i},text {i}\n" for i in range(5)))
    sid = add_schedule(
        client, api_key, collection="twice", model=model_name, params={"chunk_size": 2}
    ).json()["id"]
    first = run_now(client, api_key, sid)
    second = run_now(client, api_key, sid)
    assert first.status_code == 202, first.text
    assert first.json()["outcome"] == "created"
    assert second.status_code == 200 and second.json()["outcome"] in ("existing", "busy")
    job = first.json()["job"]
    assert second.json()["job"]["id"] == job["id"]
    assert job["counts"]["total"] == 5 and job["chunks"] == 3
    assert job["priority_class"] == "bulk" and job["queue"].endswith(".bulk")
    assert job["idempotency_key"].startswith(f"schedule:{sid}:")
    assert job["collection_id"] is not None
    with pg(settings.database.url) as conn:
        n = conn.execute(
            "SELECT count(*) FROM jobs WHERE idempotency_key LIKE %s", (f"schedule:{sid}:%",)
        ).fetchone()
    assert n is not None and n[0] == 1
    # Its chunk messages went to the model's bulk queue, not the interactive one.
    bulk = queue_for_model(model_name, -10)
    assert redis_client.llen(bulk) == 3
    assert redis_client.llen(queue_for_model(model_name)) == 0


def test_racing_beats_and_a_manual_run_create_one_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    put(client, api_key, "race", "id,text\na,1\nb,2\n")
    sid = add_schedule(client, api_key, collection="race", model=model_name).json()["id"]
    due = make_due(settings, sid, minutes_ago=0)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def beat() -> None:
        barrier.wait()
        outcomes.extend(r.outcome for r in tick(settings, sid))

    threads = [threading.Thread(target=beat) for _ in range(3)]
    for t in threads:
        t.start()
    barrier.wait()
    manual = run_now(client, api_key, sid).json()
    for t in threads:
        t.join()
    with pg(settings.database.url) as conn:
        keys = conn.execute(
            "SELECT idempotency_key FROM jobs WHERE idempotency_key LIKE %s",
            (f"schedule:{sid}:%",),
        ).fetchall()
    assert len(keys) == 1  # normally the due minute's key (the manual run may see the next)
    assert outcomes.count("created") + (manual["outcome"] == "created") == 1
    assert keys[0][0] in (
        schedules.idempotency_key(uuid.UUID(sid), due),
        manual["job"]["idempotency_key"],
    )
    # A later tick (if the manual run held the row while all three skipped it) changes nothing.
    assert all(r.outcome in ("existing", "busy") for r in tick(settings, sid))
    # The schedule moved on to its next run.
    s = client.get(f"/v1/schedules/{sid}", headers=auth(api_key)).json()
    assert datetime.fromisoformat(s["next_run_at"]) > datetime.now(UTC)


def test_next_run_covers_exactly_new_and_changed_documents(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    put(client, api_key, "nightly", "id,text\n" + "".join(f"n{i},text {i}\n" for i in range(6)))
    sid = add_schedule(client, api_key, collection="nightly", model=model_name).json()["id"]

    make_due(settings, sid, minutes_ago=2)
    (first,) = tick(settings, sid)
    assert first.outcome == "created" and first.job is not None
    finish_job(settings, str(first.job.id))
    job = client.get(f"/v1/jobs/{first.job.id}", headers=auth(api_key)).json()
    assert job["status"] == "completed" and job["counts"]["succeeded"] == 6
    coll = client.get("/v1/collections/nightly", headers=auth(api_key)).json()
    assert coll["counts"] == {"documents": 6, "summarized": 6, "pending": 0}
    docs = client.get("/v1/collections/nightly/documents", headers=auth(api_key)).json()["data"]
    d0 = docs[0]
    assert d0["summary"]["text"] == "summary of text 0"
    assert d0["summary"]["model"] == model_name
    assert d0["summary"]["content_hash"] == sha("text 0") == d0["content_hash"]
    assert d0["summary"]["job_id"] == str(first.job.id) and d0["summary"]["summarized_at"]

    # 3 new documents, 1 changed, 2 unchanged (sent again, same text).
    put(client, api_key, "nightly", "id,text\nn0,text 0\nn1,text 1 CHANGED\nn2,text 2\n")
    put(client, api_key, "nightly", "id,text\nx1,new 1\nx2,new 2\nx3,new 3\n")
    make_due(settings, sid, minutes_ago=1)
    (second,) = tick(settings, sid)
    assert second.outcome == "created" and second.job is not None
    assert job_documents(settings, str(second.job.id)) == ["n1", "x1", "x2", "x3"]

    # n1 changes again while its job runs: its summary (of the old text) is not applied.
    put(client, api_key, "nightly", "id,text\nn1,text 1 CHANGED TWICE\n")
    finish_job(settings, str(second.job.id), fail={"x3"})
    docs = {
        d["id"]: d
        for d in client.get("/v1/collections/nightly/documents", headers=auth(api_key)).json()[
            "data"
        ]
    }
    assert (
        docs["x1"]["status"] == "summarized" and docs["x1"]["summary"]["text"] == "summary of new 1"
    )
    assert docs["n1"]["status"] == "pending"
    assert docs["n1"]["summary"]["content_hash"] == sha("text 1")  # still the first summary
    assert docs["x3"]["status"] == "pending" and docs["x3"]["summary"] is None  # its row failed
    coll = client.get("/v1/collections/nightly", headers=auth(api_key)).json()
    assert coll["counts"] == {"documents": 9, "summarized": 7, "pending": 2}
    s = client.get(f"/v1/schedules/{sid}", headers=auth(api_key)).json()
    assert s["last_job_id"] == str(second.job.id)


def test_an_empty_run_creates_no_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    put(client, api_key, "quiet", "id,text\nq1,only one\n")
    sid = add_schedule(client, api_key, collection="quiet", model=model_name).json()["id"]
    make_due(settings, sid, minutes_ago=3)
    (run,) = tick(settings, sid)
    assert run.job is not None
    finish_job(settings, str(run.job.id))

    make_due(settings, sid, minutes_ago=1)
    (empty,) = tick(settings, sid)
    assert empty.outcome == "empty" and empty.job is None
    manual = run_now(client, api_key, sid)
    assert manual.status_code == 200 and manual.json() | {"scheduled_for": None} == {
        "object": "schedule_run",
        "schedule_id": sid,
        "scheduled_for": None,
        "outcome": "empty",
        "documents": 0,
        "job": None,
    }
    with pg(settings.database.url) as conn:
        n = conn.execute(
            "SELECT count(*) FROM jobs WHERE idempotency_key LIKE %s", (f"schedule:{sid}:%",)
        ).fetchone()
    assert n is not None and n[0] == 1
    s = client.get(f"/v1/schedules/{sid}", headers=auth(api_key)).json()
    assert s["last_run_outcome"] == "no new or changed documents; no job"


def test_runs_never_overlap(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    put(client, api_key, "slow", "id,text\ns1,a\n")
    sid = add_schedule(client, api_key, collection="slow", model=model_name).json()["id"]
    make_due(settings, sid, minutes_ago=5)
    (first,) = tick(settings, sid)
    put(client, api_key, "slow", "id,text\ns2,b\n")
    make_due(settings, sid, minutes_ago=1)
    (second,) = tick(settings, sid)  # the first job is still queued
    assert second.outcome == "busy" and second.job is not None
    assert first.job is not None and second.job.id == first.job.id


def test_retention_purges_rows_keeps_counts_and_answers_410(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    old = submit(client, api_key, "text\na\nb\nc\n", model=model_name, chunk_size=2).json()["id"]
    recent = submit(client, api_key, "text\nd\n", model=model_name).json()["id"]
    finish_job(settings, old)
    finish_job(settings, recent)
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE jobs SET finished_at = now() - interval '31 days' WHERE id = %s", (old,)
        )
    report = purge_expired(
        get_engine(settings.database.url), override(settings, retention={"batch_rows": 2})
    )
    assert old in report.job_ids and recent not in report.job_ids and report.complete
    job = client.get(f"/v1/jobs/{old}", headers=auth(api_key)).json()
    assert job["status"] == "completed" and job["results_expired_at"]
    assert job["counts"] == {"total": 3, "succeeded": 3, "failed": 0, "cancelled": 0}
    assert job["tokens"]["completion"] == 9
    gone = client.get(f"/v1/jobs/{old}/results", headers=auth(api_key))
    assert gone.status_code == 410
    err = gone.json()["error"]
    assert err["code"] == "results_expired" and "expired" in err["message"]
    assert "30 days" in err["message"]
    with pg(settings.database.url) as conn:
        for table in ("documents", "results", "chunks"):
            row = conn.execute(f"SELECT count(*) FROM {table} WHERE job_id = %s", (old,)).fetchone()
            assert row is not None and row[0] == 0, table
    fresh = client.get(f"/v1/jobs/{recent}/results?format=jsonl", headers=auth(api_key))
    assert fresh.status_code == 200 and len(fresh.text.splitlines()) == 1
    # A second pass has nothing to do.
    again = purge_expired(get_engine(settings.database.url), settings)
    assert old not in again.job_ids


def test_priority_form_accepts_names_and_legacy_integers(
    client: TestClient, api_key: str, model_name: str
) -> None:
    bulk = submit(client, api_key, "text\na\n", model=model_name, priority="bulk").json()
    assert bulk["priority_class"] == "bulk" and bulk["queue"] == queue_for_model(model_name, -10)
    default = submit(client, api_key, "text\na\n", model=model_name).json()
    assert default["priority_class"] == "interactive"
    assert default["queue"] == queue_for_model(model_name)
    bad = submit(client, api_key, "text\na\n", model=model_name, priority="urgent")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "priority"


def test_a_collection_takes_one_schedule(client: TestClient, api_key: str, model_name: str) -> None:
    """Two schedules would share (and race for) the collection's one pending state."""
    put(client, api_key, "single", "id,text\n1,a\n")
    first = add_schedule(client, api_key, collection="single", model=model_name).json()
    resp = add_schedule(client, api_key, collection="single", model=model_name, cron="0 3 * * *")
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["field"] == "collection" and first["id"] in err["message"]
    assert client.delete(f"/v1/schedules/{first['id']}", headers=auth(api_key)).status_code == 200
    again = add_schedule(client, api_key, collection="single", model=model_name, cron="0 3 * * *")
    assert again.status_code == 201, again.text


def test_clients_cannot_take_a_scheduled_runs_idempotency_key(
    client: TestClient, api_key: str, model_name: str
) -> None:
    resp = client.post(
        "/v1/jobs",
        headers={**auth(api_key), "Idempotency-Key": "schedule:abc:2026-11-23T02:00Z"},
        data={"task": "summarize", "model": model_name},
        files={"file": ("d.csv", b"text\nhello\n", "text/csv")},
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "Idempotency-Key"


def test_a_run_whose_params_no_longer_validate_fails_once_and_waits_for_its_next_time(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    put(client, api_key, "strict", "id,text\ns1,a\n")
    sid = add_schedule(
        client, api_key, collection="strict", model=model_name, params={"chunk_size": 50}
    ).json()["id"]
    due = make_due(settings, sid, minutes_ago=1)
    tighter = override(settings, jobs={"max_chunk_size": 10})  # an operator lowered a limit
    (run,) = [
        r
        for r in schedules.tick(get_engine(settings.database.url), tighter)
        if str(r.schedule_id) == sid
    ]
    assert run.outcome == "failed" and run.job is None
    s = client.get(f"/v1/schedules/{sid}", headers=auth(api_key)).json()
    assert s["last_run_outcome"].startswith("failed: chunk_size must be between 1 and 10")
    assert datetime.fromisoformat(s["next_run_at"]) > datetime.now(UTC) > due  # not every tick
    assert s["enabled"] is True  # a later run may succeed once the limit is back
    with pg(settings.database.url) as conn:
        n = conn.execute(
            "SELECT count(*) FROM jobs WHERE idempotency_key LIKE %s", (f"schedule:{sid}:%",)
        ).fetchone()
    assert n is not None and n[0] == 0
    assert tick(settings, sid) == []  # no longer due


def test_a_run_takes_at_most_max_rows_per_job_and_leaves_the_rest_pending(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    put(client, api_key, "big", "id,text\n" + "".join(f"b{i},text {i}\n" for i in range(5)))
    sid = add_schedule(client, api_key, collection="big", model=model_name).json()["id"]
    capped = override(settings, jobs={"max_rows_per_job": 3})
    engine = get_engine(settings.database.url)
    make_due(settings, sid, minutes_ago=2)
    (first,) = [r for r in schedules.tick(engine, capped) if str(r.schedule_id) == sid]
    assert first.job is not None and first.documents == 3
    assert job_documents(settings, str(first.job.id)) == ["b0", "b1", "b2"]
    finish_job(settings, str(first.job.id))
    make_due(settings, sid, minutes_ago=1)
    (second,) = [r for r in schedules.tick(engine, capped) if str(r.schedule_id) == sid]
    assert second.job is not None
    assert job_documents(settings, str(second.job.id)) == ["b3", "b4"]


def test_a_deleted_document_is_not_covered_by_the_next_run(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    put(client, api_key, "pruned", "id,text\np1,a\np2,b\np3,c\n")
    sid = add_schedule(client, api_key, collection="pruned", model=model_name).json()["id"]
    h = auth(api_key)
    assert client.delete("/v1/collections/pruned/documents/p2", headers=h).status_code == 200
    make_due(settings, sid, minutes_ago=1)
    (run,) = tick(settings, sid)
    assert run.job is not None
    assert job_documents(settings, str(run.job.id)) == ["p1", "p3"]


def test_a_run_over_its_tenants_quota_waits_and_runs_once_under_it(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A scheduled job counts against the tenant's quotas like any other: over one, the run
    creates nothing, says why, and is tried again after the quota's Retry-After (not at the
    next cron time, a day later); a manual run is the API's 429."""
    from service.errors import QuotaExceededError

    put(client, api_key, "quota", "id,text\nq1,a\nq2,b\nq3,c\n")
    sid = add_schedule(client, api_key, collection="quota", model=model_name).json()["id"]
    tight = override(settings, quotas={"queued_rows": 2, "retry_after_s": 120})
    engine = get_engine(settings.database.url)
    make_due(settings, sid)
    before = datetime.now(UTC)
    (run,) = [r for r in schedules.tick(engine, tight) if str(r.schedule_id) == sid]
    assert run.outcome == "quota" and run.job is None
    s = client.get(f"/v1/schedules/{sid}", headers=auth(api_key)).json()
    assert s["last_run_outcome"].startswith("waiting: ") and "queued_rows" in s["last_run_outcome"]
    retry_at = datetime.fromisoformat(s["next_run_at"])
    assert before + timedelta(seconds=100) < retry_at < datetime.now(UTC) + timedelta(seconds=121)
    with pg(settings.database.url) as conn:
        n = conn.execute(
            "SELECT count(*) FROM jobs WHERE idempotency_key LIKE %s", (f"schedule:{sid}:%",)
        ).fetchone()
    assert n is not None and n[0] == 0
    with pytest.raises(QuotaExceededError) as caught:  # a manual run: the API's 429
        schedules.run_now(engine, _tenant(settings, sid), sid, tight)
    assert caught.value.status_code == 429 and "queued_rows" in caught.value.message
    make_due(settings, sid)  # under the quota again (the defaults): the run goes ahead
    (again,) = tick(settings, sid)
    assert again.outcome == "created" and again.job is not None and again.documents == 3


def _tenant(settings: Settings, schedule_id: str) -> uuid.UUID:
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT tenant_id FROM schedules WHERE id = %s", (schedule_id,)
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))

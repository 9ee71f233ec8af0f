"""Prometheus metrics and JSON logs against real PostgreSQL and Redis: the API's /metrics after a
job is created and finished, and a chunk run through the real Celery task (the zero-cost bench
engine in this process) logging JSON lines with its job and chunk and moving worker metrics."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.contract import queue_for_model
from service.settings import Settings
from tests.support.helpers import override, pg, submit


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and labels -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_api_metrics_follow_jobs(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    before = scrape(client.get("/metrics").text)
    body = "text\n" + "".join(f"document {i}\n" for i in range(7))
    job = submit(client, api_key, body, model=model_name, chunk_size=3).json()
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    after = scrape(resp.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("docqueue_jobs", status="queued") == 1
    assert delta("docqueue_documents_ingested_total") == 7
    queue = queue_for_model(model_name)
    # The model is the test's own: its queue holds exactly this job's three chunk messages.
    assert value(after, "docqueue_queue_depth", model=model_name, queue=queue) == 3
    assert value(after, "docqueue_chunks_pending", model=model_name, state="queued") == 3
    assert value(after, "docqueue_up", dependency="postgres") == 1
    assert value(after, "docqueue_up", dependency="redis") == 1

    # The job finishes (as a worker would finish it) after 42 s: results and duration move.
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE jobs SET status = 'completed', succeeded = 6, failed = 1, "
            "completion_tokens = 70, finished_at = created_at + interval '42 seconds' "
            "WHERE id = %s",
            (uuid.UUID(job["id"]),),
        )
        conn.execute("UPDATE chunks SET state = 'done' WHERE job_id = %s", (uuid.UUID(job["id"]),))
    done = scrape(client.get("/metrics").text)

    def moved(name: str, **labels: str) -> float:
        return value(done, name, **labels) - value(after, name, **labels)

    assert moved("docqueue_jobs", status="queued") == -1
    assert moved("docqueue_jobs", status="completed") == 1
    assert moved("docqueue_results_written_total", outcome="succeeded") == 6
    assert moved("docqueue_results_written_total", outcome="failed") == 1
    assert moved("docqueue_tokens_total", kind="completion") == 70
    assert moved("docqueue_job_duration_seconds_count", task="summarize") == 1
    assert moved("docqueue_job_duration_seconds_sum", task="summarize") == pytest.approx(42)
    assert moved("docqueue_job_duration_seconds_bucket", task="summarize", le="30.0") == 0
    assert moved("docqueue_job_duration_seconds_bucket", task="summarize", le="60.0") == 1
    assert value(done, "docqueue_chunks_pending", model=model_name, state="queued") == 0


@pytest.fixture()
def bench_runtime(
    settings: Settings, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A worker runtime in this process: the bench engine serving the test's model."""
    from workers import runtime

    monkeypatch.delenv("DOCQUEUE_WORKER_MODEL", raising=False)
    local = override(settings, engine={"kind": "bench"}, jobs={"default_model": model_name})
    runtime.start(hostname=f"test-{model_name}@host", settings=local)
    try:
        yield
    finally:
        runtime.stop()


def test_chunk_task_logs_json_with_ids_and_moves_worker_metrics(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    bench_runtime: None,
    json_log_lines: io.StringIO,
) -> None:
    from workers import metrics as worker_metrics
    from workers.tasks import run_chunk

    before = scrape(generate_latest(worker_metrics.REGISTRY).decode())
    body = "text\n" + "".join(f"document number {i}\n" for i in range(5)) + '"  "\n'
    job = submit(client, api_key, body, model=model_name, task="generate", chunk_size=4).json()
    with pg(settings.database.url) as conn:
        chunks = conn.execute(
            "SELECT id, seq FROM chunks WHERE job_id = %s ORDER BY seq", (uuid.UUID(job["id"]),)
        ).fetchall()
    assert len(chunks) == 2
    for chunk_id, seq in chunks:
        # The real task, with the task id the producer gives it (service.contract.send_chunks).
        result = run_chunk.apply(kwargs={"chunk_id": str(chunk_id)}, task_id=f"{job['id']}:{seq}:t")
        assert result.get() == "done"

    lines = [json.loads(line) for line in json_log_lines.getvalue().splitlines()]
    done_lines = [r for r in lines if r["message"].endswith(": done")]
    assert {(r["job_id"], r["chunk_id"]) for r in done_lines} == {
        (job["id"], str(c)) for c, _ in chunks
    }
    assert all(r["worker"] == f"test-{model_name}@host" for r in done_lines)
    assert all(r["level"] == "INFO" and r["logger"] == "workers.tasks" for r in done_lines)

    after = scrape(generate_latest(worker_metrics.REGISTRY).decode())

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    m = model_name
    assert (
        delta("docqueue_worker_documents_total", model=m, task="generate", outcome="succeeded") == 5
    )
    assert delta("docqueue_worker_documents_total", model=m, task="generate", outcome="failed") == 1
    assert delta("docqueue_worker_output_tokens_total", model=m, task="generate") == 5  # 1 each
    assert delta("docqueue_worker_chunk_duration_seconds_count", model=m, outcome="done") == 2
    assert value(after, "docqueue_worker_engine_ready", model=m) == 1
    assert value(after, "docqueue_worker_chunks_in_flight", model=m) == 0
    assert value(after, "docqueue_worker_documents_per_second", model=m) > 0

    # A duplicate delivery of a finished chunk is timed but counts no documents twice.
    chunk_id, seq = chunks[0]
    assert (
        run_chunk.apply(kwargs={"chunk_id": str(chunk_id)}, task_id=f"{job['id']}:{seq}:u").get()
        == "done"
    )
    again = scrape(generate_latest(worker_metrics.REGISTRY).decode())
    assert value(
        again, "docqueue_worker_documents_total", model=m, task="generate", outcome="succeeded"
    ) == value(
        after, "docqueue_worker_documents_total", model=m, task="generate", outcome="succeeded"
    )


def test_api_side_job_logs_carry_the_job_id(
    client: TestClient, api_key: str, model_name: str, json_log_lines: io.StringIO
) -> None:
    """Not only chunk tasks: the API's own lines about a job (created, chunks enqueued) name it."""
    job = submit(client, api_key, "text\na\nb\nc\n", model=model_name, chunk_size=2).json()
    records = [json.loads(line) for line in json_log_lines.getvalue().splitlines() if line]
    created = [r for r in records if r["message"].startswith("job created")]
    assert len(created) == 1, records
    assert created[0]["job_id"] == job["id"]
    assert "3 documents in 2 chunks" in created[0]["message"]
    assert all(r["job_id"] in (None, job["id"]) for r in records)


def test_metrics_answers_from_memory_within_metrics_cache_s(
    settings: Settings, api_key: str, model_name: str
) -> None:
    """Several scrapers within metrics_cache_s cost one query set: the same body comes back."""
    from service.api.app import create_app

    cached = override(settings, api={"metrics_cache_s": 3600.0})
    with TestClient(create_app(cached)) as c:
        first = c.get("/metrics").text
        submit(c, api_key, "text\na\n", model=model_name)
        assert c.get("/metrics").text == first
    fresh = override(settings, api={"metrics_cache_s": 0.0})
    with TestClient(create_app(fresh)) as c:
        assert c.get("/metrics").text != first  # the job is counted once the cache is off


def test_a_served_models_bulk_queue_has_a_depth_series_with_no_bulk_job(
    client: TestClient, model_name: str, bench_runtime: None
) -> None:
    """Both queues of a model a worker serves are reported (0, not absent) before any job."""
    from service.contract import queues_for_model

    samples = scrape(client.get("/metrics").text)
    interactive, bulk = queues_for_model(model_name)
    for queue in (interactive, bulk):
        assert (
            "docqueue_queue_depth",
            tuple(sorted({"model": model_name, "queue": queue}.items())),
        ) in samples, queue
    assert value(samples, "docqueue_queue_depth", model=model_name, queue=bulk) == 0

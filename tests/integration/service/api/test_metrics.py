"""Prometheus metrics and JSON logs against real PostgreSQL and Redis: the API's /metrics after a
job is created and finished, and a chunk run through the real Celery task (the zero-cost bench
engine in this process) logging JSON lines with its job and chunk and moving worker metrics.
/metrics as an outsider and as a tenant would attack it: no token configured, a missing or wrong
token, model names chosen to forge series or to flood the label space."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from service.api.app import create_app
from service.contract import queue_for_model, queues_for_model
from service.settings import Settings
from tests.support.helpers import auth, override, pg, submit, wait_enqueued

TOKEN = "metrics-token-for-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def scraper(settings: Settings) -> Iterator[TestClient]:
    """The app with DOCQUEUE_METRICS_TOKEN set: /metrics answers Bearer TOKEN."""
    with TestClient(create_app(override(settings, api={"metrics_token": SecretStr(TOKEN)}))) as c:
        yield c


def metrics_text(c: TestClient) -> str:
    resp = c.get("/metrics", headers=BEARER)
    assert resp.status_code == 200, resp.text
    return resp.text


@pytest.fixture()
def served(settings: Settings, model_name: str) -> Iterator[str]:
    """``model_name`` in the workers registry, as a worker serving it puts it there."""
    from service.store.engine import get_engine
    from service.store.registry import register_worker, unregister_worker

    name = f"gpu0@{model_name}"
    with get_engine(settings.database.url).begin() as conn:
        queue = queue_for_model(model_name)
        register_worker(conn, name, model_name, queue, "cpu", 1, ready=True)
    yield model_name
    with get_engine(settings.database.url).begin() as conn:
        unregister_worker(conn, name)


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
    client: TestClient, scraper: TestClient, api_key: str, settings: Settings, served: str
) -> None:
    model_name = served
    before = scrape(metrics_text(scraper))
    body = "text\n" + "".join(f"document {i}\n" for i in range(7))
    job = submit(client, api_key, body, model=model_name, chunk_size=3).json()
    wait_enqueued(settings, job["id"], 3)
    resp = scraper.get("/metrics", headers=BEARER)
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
    done = scrape(metrics_text(scraper))

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

    token = SecretStr(TOKEN)
    cached = override(settings, api={"metrics_cache_s": 3600.0, "metrics_token": token})
    with TestClient(create_app(cached)) as c:
        first = metrics_text(c)
        submit(c, api_key, "text\na\n", model=model_name)
        assert metrics_text(c) == first
    fresh = override(settings, api={"metrics_cache_s": 0.0, "metrics_token": token})
    with TestClient(create_app(fresh)) as c:
        assert metrics_text(c) != first  # the job is counted once the cache is off


def test_a_served_models_bulk_queue_has_a_depth_series_with_no_bulk_job(
    scraper: TestClient, model_name: str, bench_runtime: None
) -> None:
    """Both queues of a model a worker serves are reported (0, not absent) before any job."""
    samples = scrape(metrics_text(scraper))
    interactive, bulk = queues_for_model(model_name)
    for queue in (interactive, bulk):
        assert (
            "docqueue_queue_depth",
            tuple(sorted({"model": model_name, "queue": queue}.items())),
        ) in samples, queue
    assert value(samples, "docqueue_queue_depth", model=model_name, queue=bulk) == 0


# --- /metrics under attack ---------------------------------------------------------------------


def test_metrics_is_not_served_without_a_token(client: TestClient) -> None:
    """No DOCQUEUE_METRICS_TOKEN: /metrics does not exist, whatever the caller sends."""
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers=BEARER).status_code == 404
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 404


def test_an_empty_token_is_no_token(settings: Settings) -> None:
    """A token set to blanks would let ``Bearer `` in: it counts as unset."""
    blank = override(settings, api={"metrics_token": SecretStr("  ")})
    with TestClient(create_app(blank)) as c:
        for header in ("Bearer ", "Bearer   ", "Bearer"):
            assert c.get("/metrics", headers={"Authorization": header}).status_code == 404


def test_metrics_refuses_a_missing_or_wrong_token(scraper: TestClient, api_key: str) -> None:
    """Only the exact token opens /metrics: not a prefix of it, not a longer string, not a
    tenant's API key, not another scheme; the refusal carries no figures."""
    wrong: list[bytes | None] = [
        h if h is None or isinstance(h, bytes) else h.encode()
        for h in [
            None,
            "",
            "Bearer",
            "Bearer ",
            "Bearer wrong",
            f"Bearer {TOKEN[:-1]}",
            f"Bearer {TOKEN}x",
            f"Basic {TOKEN}",
            TOKEN,
            auth(api_key)["Authorization"],
            "Bearer ünïcödé".encode("latin-1"),  # header bytes no token is made of
        ]
    ]
    for header in wrong:
        headers = {} if header is None else {b"Authorization": header}
        resp = scraper.get("/metrics", headers=headers)
        assert resp.status_code == 401, (header, resp.status_code)
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "unauthorized"
        assert "docqueue_" not in resp.text
    assert "docqueue_jobs" in metrics_text(scraper)
    ok = scraper.get("/metrics", headers={"Authorization": f"bearer  {TOKEN} "})
    assert ok.status_code == 200  # the scheme is case-insensitive, as RFC 7235 has it


def _model_labels(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {v for (_, labels), _ in samples.items() for k, v in labels if k == "model"}


def clone_jobs(settings: Settings, job_id: str, models: list[str]) -> None:
    """Copies of a job (and its chunks), one per model name, made in SQL: job rows the API's
    name rules did not see (rows from before them), or more than a test can upload."""
    with pg(settings.database.url) as conn:
        cols = {
            table: [
                c
                for (c,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                    "AND table_schema = 'public' ORDER BY ordinal_position",
                    (table,),
                )
            ]
            for table in ("jobs", "chunks")
        }
        jobs = {"id": "gen_random_uuid()", "model": "m.name"}
        chunks = {"id": "gen_random_uuid()", "job_id": "n.id"}
        conn.execute(
            f"WITH n AS (INSERT INTO jobs ({', '.join(cols['jobs'])}) "
            f"SELECT {', '.join(jobs.get(c, 'j.' + c) for c in cols['jobs'])} "
            "FROM jobs j, unnest(%(models)s::text[]) AS m(name) WHERE j.id = %(job)s "
            "RETURNING id) "
            f"INSERT INTO chunks ({', '.join(cols['chunks'])}) "
            f"SELECT {', '.join(chunks.get(c, 'c.' + c) for c in cols['chunks'])} "
            "FROM n, chunks c WHERE c.job_id = %(job)s",
            {"job": uuid.UUID(job_id), "models": models},
        )


def test_a_tenants_model_names_never_become_label_values(
    client: TestClient, scraper: TestClient, api_key: str, settings: Settings, served: str
) -> None:
    """A model name is the submitter's free text. Distinct names the API accepts, and job rows
    whose names would close the label and forge a series, reach no label value: their chunks
    count under ``other``, and only served models' queues are listed."""
    before = scrape(metrics_text(scraper))
    names = ["org/evil:1@x+~", "x" * 300] + [f"tenant-model-{i}" for i in range(30)]
    for name in names:
        assert submit(client, api_key, "text\na\n", model=name).status_code == 202, name
    served_job = submit(client, api_key, "text\na\n", model=served).json()
    forged = ['evil"} 1\nfake_metric{x="', "evil\\", "evil\u2028"]
    clone_jobs(settings, served_job["id"], forged)
    try:
        text = metrics_text(scraper)
    finally:
        with pg(settings.database.url) as conn:
            conn.execute("DELETE FROM jobs WHERE model = ANY(%s)", (forged,))
    after = scrape(text)
    allowed = {served, settings.jobs.default_model, "other"}
    assert _model_labels(after) - _model_labels(before) <= allowed
    assert "evil" not in text and "tenant-model" not in text and "x" * 300 not in text
    assert not any(f.name.startswith("fake_metric") for f in text_string_to_metric_families(text))
    pending = "docqueue_chunks_pending"
    other = value(after, pending, model="other", state="queued")
    assert other - value(before, pending, model="other", state="queued") == len(names) + 3
    assert value(after, pending, model=served, state="queued") == 1
    depth = "docqueue_queue_depth"
    queues = {dict(labels)["queue"] for name, labels in after if name == depth}
    known = {dict(labels)["queue"] for name, labels in before if name == depth}
    assert queues - known <= {q for m in allowed - {"other"} for q in queues_for_model(m)}


def test_ten_thousand_model_names_add_no_series(
    client: TestClient, scraper: TestClient, api_key: str, settings: Settings
) -> None:
    """Ten thousand jobs, each with its own model name (one submitted through the API, the rest
    cloned in SQL: ten thousand uploads would take minutes), add one ``other`` series, not ten
    thousand, and the scrape stays small."""
    before = scrape(metrics_text(scraper))
    job = submit(client, api_key, "text\na\n", model="flood-0").json()
    clone_jobs(settings, job["id"], [f"flood-{i}" for i in range(1, 10_000)])
    try:
        text = metrics_text(scraper)
    finally:
        with pg(settings.database.url) as conn:
            conn.execute("DELETE FROM jobs WHERE model LIKE 'flood-%'")
    after = scrape(text)
    assert "flood-" not in text
    assert len(_model_labels(after)) <= len(_model_labels(before)) + 1  # "other" at most
    assert len(after) <= len(before) + 1  # other's queued series, if it was not there yet
    pending = "docqueue_chunks_pending"
    grew = value(after, pending, model="other", state="queued") - value(
        before, pending, model="other", state="queued"
    )
    assert grew == 10_000
    assert len(text) < 20_000

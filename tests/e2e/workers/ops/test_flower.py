"""Operations end to end on real processes: `docqueue flower` watching a real `docqueue worker`
(real Celery, real vLLM on the tiny model) while a job runs through the real API; the worker's
Prometheus endpoint and its JSON log lines; Flower's refusal to run without credentials."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from tests.support.helpers import pg
from tests.support.models import tiny_model_alias
from tests.support.stack import (
    docqueue_bin,
    free_port,
    new_key,
    running_worker,
    stop_group,
    wait_job,
)

pytestmark = pytest.mark.e2e

AUTH = ("ops", "s3cret-pass")
METRICS_TOKEN = "e2e-metrics-token"  # the api_server fixture's DOCQUEUE_METRICS_TOKEN


@pytest.fixture(scope="module")
def model() -> str:
    return tiny_model_alias("flower")  # its own worker, not the session's shared one


@dataclass
class Flower:
    """A running `docqueue flower`; ``restart`` stops it and starts it again on its state."""

    env: dict[str, str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [docqueue_bin(), "flower", "--port", str(self.port), "--address", "127.0.0.1"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docqueue flower did not start:\n{self.log.read_text()}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)  # SIGTERM: Flower saves its state on the way out


@pytest.fixture(scope="module")
def flower(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """A real `docqueue flower` (basic auth; persistent state, its default), started before
    the worker so that it sees every task event."""
    tmp = tmp_path_factory.mktemp("flower")
    env = {
        **os.environ,
        "DOCQUEUE_REDIS_URL": settings.broker.url,
        "DOCQUEUE_FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}",
        "DOCQUEUE_FLOWER_DB_PATH": str(tmp / "flower.db"),
        "DOCQUEUE_FLOWER_MAX_TASKS": "1000",
    }
    env.pop("DOCQUEUE_FLOWER_PERSISTENT", None)
    f = Flower(env=env, port=free_port(), log=tmp / "flower.log")
    f.start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def worker(
    settings: Settings,
    api_server: str,
    model: str,
    flower: Flower,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, str]]:
    """One warm worker with a metrics port and JSON logs; yields (log file, metrics URL)."""
    log = tmp_path_factory.mktemp("ops-worker") / "worker.log"
    port = free_port()
    with running_worker(
        settings, model, log, "--metrics-port", str(port), DOCQUEUE_LOG_FORMAT="json"
    ):
        yield log, f"http://127.0.0.1:{port}/metrics"


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _get(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def finished_job(
    settings: Settings, api_server: str, worker: tuple[Path, str], model: str
) -> dict[str, Any]:
    """A 3-chunk job through the real API, with the worker's metrics before and after it."""
    _, metrics_url = worker
    before = _metrics(metrics_url)
    key = new_key(settings, api_server)
    body = "id,text\n" + "".join(f"d{i},Operations document number {i}.\n" for i in range(10))
    resp = httpx.post(
        f"{api_server}/v1/jobs",
        headers={"Authorization": f"Bearer {key}"},
        data={
            "task": "generate",
            "model": model,
            "id_column": "id",
            "max_tokens": "8",
            "chunk_size": "4",
        },
        files={"file": ("docs.csv", body.encode(), "text/csv")},
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(api_server, key, resp.json()["id"], timeout_s=180)
    assert job["status"] == "completed", job
    with pg(settings.database.url) as conn:
        row = conn.execute("SELECT name FROM workers WHERE model = %s", (model,)).fetchone()
    assert row is not None
    return {"job": job, "before": before, "after": _metrics(metrics_url), "worker": row[0]}


def _chunk_tasks(url: str, job_id: str) -> list[dict[str, Any]]:
    tasks = httpx.get(f"{url}/api/tasks", auth=AUTH, timeout=30).json()
    return [t for t in tasks.values() if t["uuid"].startswith(f"{job_id}:")]


def test_flower_shows_the_worker_and_the_chunk_tasks(
    flower: Flower, finished_job: dict[str, Any]
) -> None:
    url = flower.url
    job_id, worker_name = finished_job["job"]["id"], finished_job["worker"]
    assert worker_name.startswith("cpu-")
    workers = httpx.get(f"{url}/api/workers", params={"refresh": "1"}, auth=AUTH, timeout=30)
    assert workers.status_code == 200 and worker_name in workers.json()

    deadline = time.monotonic() + 30
    while True:  # events reach Flower asynchronously
        ours = _chunk_tasks(url, job_id)
        if (
            len(ours) == 3 and all(t["state"] == "SUCCESS" for t in ours)
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ours) == 3, ours
    for t in ours:
        assert t["name"] == "docqueue.run_chunk" and t["state"] == "SUCCESS"
        assert t["worker"] == worker_name
        assert f"'job': '{job_id}'" in t["kwargs"]
    chunks = sorted(t["kwargs"].split("'chunk': '")[1].split("'")[0] for t in ours)
    assert chunks == ["1/3", "2/3", "3/3"]
    # Tasks can be looked up by that readable id, and filtered by worker.
    one = ours[0]["uuid"]
    info = httpx.get(f"{url}/api/task/info/{one}", auth=AUTH, timeout=30)
    assert info.status_code == 200 and info.json()["uuid"] == one
    by_worker = httpx.get(
        f"{url}/api/tasks", params={"workername": worker_name}, auth=AUTH, timeout=30
    )
    assert {t["uuid"] for t in ours} <= set(by_worker.json())


def test_flower_answers_401_without_credentials(flower: Flower) -> None:
    for path in ("/api/workers", "/api/tasks", "/"):
        assert httpx.get(f"{flower.url}{path}", timeout=10).status_code == 401, path
        wrong = httpx.get(f"{flower.url}{path}", auth=(AUTH[0], "wrong"), timeout=10)
        assert wrong.status_code == 401, path


def test_flower_refuses_to_start_without_auth_config(settings: Settings) -> None:
    env = {
        **os.environ,
        "DOCQUEUE_REDIS_URL": settings.broker.url,
        "DOCQUEUE_FLOWER_BASIC_AUTH": "",
    }
    done = subprocess.run(
        [docqueue_bin(), "flower", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "DOCQUEUE_FLOWER_BASIC_AUTH" in done.stderr and "Traceback" not in done.stderr


def test_worker_metrics_move_with_the_job(finished_job: dict[str, Any], model: str) -> None:
    before, after = finished_job["before"], finished_job["after"]

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    assert _get(after, "docqueue_worker_engine_ready", model=model) == 1
    assert (
        delta("docqueue_worker_documents_total", model=model, task="generate", outcome="succeeded")
        == 10
    )
    tokens = delta("docqueue_worker_output_tokens_total", model=model, task="generate")
    assert 10 <= tokens <= 80  # 1 to 8 tokens per document
    assert tokens == finished_job["job"]["tokens"]["completion"]
    assert delta("docqueue_worker_chunk_duration_seconds_count", model=model, outcome="done") == 3
    assert delta("docqueue_worker_chunk_duration_seconds_sum", model=model, outcome="done") > 0
    assert _get(after, "docqueue_worker_documents_per_second", model=model) > 0
    assert _get(after, "docqueue_worker_output_tokens_per_second", model=model) > 0
    assert _get(after, "docqueue_worker_chunks_in_flight", model=model) == 0


def test_worker_logs_are_json_lines_with_job_and_chunk(
    settings: Settings, worker: tuple[Path, str], finished_job: dict[str, Any]
) -> None:
    log, _ = worker
    job_id = finished_job["job"]["id"]
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # every JSON-looking line parses
    ours = [r for r in records if r.get("job_id") == job_id]
    assert ours, "no log line carries the job id"
    with pg(settings.database.url) as conn:
        chunk_ids = {
            str(c) for (c,) in conn.execute("SELECT id FROM chunks WHERE job_id = %s", (job_id,))
        }
    assert {r["chunk_id"] for r in ours} == chunk_ids
    for r in ours:
        assert set(r) >= {"time", "level", "logger", "message", "job_id", "chunk_id", "worker"}
        assert r["worker"] == finished_job["worker"]
    assert any(r["message"].endswith(": done") for r in ours)


def test_api_metrics_over_http(api_server: str, finished_job: dict[str, Any], model: str) -> None:
    """A scrape as Prometheus makes it (the api_server fixture sets DOCQUEUE_METRICS_TOKEN);
    without the token the real server refuses it."""
    url = f"{api_server}/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    resp = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert resp.status_code == 200
    text = resp.text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert _get(samples, "docqueue_jobs", status="completed") >= 1
    assert _get(samples, "docqueue_workers", model=model) >= 1
    assert _get(samples, "docqueue_job_duration_seconds_count", task="generate") >= 1


def test_flower_keeps_the_task_history_across_a_restart(
    flower: Flower, finished_job: dict[str, Any]
) -> None:
    """Persistent by default: the chunk tasks seen before a restart are still listed after it,
    though no event about them reaches the new process. (Last in this module: it restarts the
    module's Flower.)"""
    job_id = finished_job["job"]["id"]
    deadline = time.monotonic() + 30
    while len(_chunk_tasks(flower.url, job_id)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    flower.stop()
    db = Path(flower.env["DOCQUEUE_FLOWER_DB_PATH"])
    assert list(db.parent.glob(db.name + "*")), "Flower wrote no state file"
    flower.start()
    ours = _chunk_tasks(flower.url, job_id)
    assert len(ours) == 3 and all(t["state"] == "SUCCESS" for t in ours), ours

"""End to end: `docqueue beat` runs a schedule whose job a real worker (real Celery, real vLLM,
tiny model) processes, and the summaries land in the collection; an interactive job overtakes
a running bulk one. One warm worker and one beat process serve the whole module."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.support.helpers import pg
from tests.support.stack import (
    cli,
    cli_env,
    docqueue_bin,
    new_key,
    stop_group,
    wait_job,
    worker_env,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model(tiny_model_path: str) -> str:
    return tiny_model_path


@pytest.fixture(scope="module")
def worker(tiny_worker: tuple[Any, Path]) -> Path:
    """The module's warm tiny-model worker; its log."""
    return tiny_worker[1]


@pytest.fixture(scope="module")
def beat(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`docqueue beat` as deployed: beat embedded in its ops worker, checking every second."""
    log = tmp_path_factory.mktemp("beat") / "beat.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [docqueue_bin(), "beat", "--loglevel", "info"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(settings, DOCQUEUE_SCHEDULE_TICK_S="1"),
            start_new_session=True,
        )
    try:
        yield log
    finally:
        stop_group(proc)


@pytest.fixture()
def key(settings: Settings, api_server: str) -> str:
    return new_key(settings, api_server)


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _put(api: str, key: str, name: str, body: str) -> dict[str, Any]:
    resp = httpx.put(
        f"{api}/v1/collections/{name}/documents",
        headers=_h(key),
        files={"file": ("docs.csv", body.encode(), "text/csv")},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _schedule(api: str, key: str, **body: Any) -> dict[str, Any]:
    resp = httpx.post(f"{api}/v1/schedules", headers=_h(key), json=body, timeout=30)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def test_beat_runs_a_due_schedule_and_summaries_land_in_the_collection(
    settings: Settings, api_server: str, worker: Path, beat: Path, model: str, key: str
) -> None:
    texts = {f"r{i}": f"Report {i}: the plant produced {i * 7} units." for i in range(40)}
    _put(api_server, key, "reports", "id,text\n" + "".join(f"{k},{v}\n" for k, v in texts.items()))
    s = _schedule(
        api_server,
        key,
        collection="reports",
        model=model,
        cron="0 3 * * *",
        timezone="America/New_York",
        params={"max_tokens": 8, "chunk_size": 16},
    )
    # Make it due now rather than at 03:00 New York time; beat (1 s ticks) takes it from here.
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE schedules SET next_run_at = date_trunc('minute', now()) WHERE id = %s",
            (s["id"],),
        )
    deadline = time.monotonic() + 60
    while True:
        got = httpx.get(f"{api_server}/v1/schedules/{s['id']}", headers=_h(key)).json()
        if got["last_job_id"]:
            break
        assert time.monotonic() < deadline, f"beat did not run the schedule:\n{beat.read_text()}"
        time.sleep(0.5)
    job = wait_job(api_server, key, got["last_job_id"], timeout_s=120)
    assert job["status"] == "completed" and job["counts"]["succeeded"] == 40, job
    assert job["priority_class"] == "bulk" and job["idempotency_key"].startswith("schedule:")
    # The next run is back on the cron, in UTC: 03:00 New York is 07:00 or 08:00 UTC.
    assert got["next_run_at"][11:16] in ("07:00", "08:00")

    coll = httpx.get(f"{api_server}/v1/collections/reports", headers=_h(key)).json()
    assert coll["counts"] == {"documents": 40, "summarized": 40, "pending": 0}
    docs = httpx.get(
        f"{api_server}/v1/collections/reports/documents?limit=100", headers=_h(key)
    ).json()["data"]
    for d in docs:
        summary = d["summary"]
        assert summary["text"] and summary["model"] == model
        assert summary["content_hash"] == hashlib.sha256(texts[d["id"]].encode()).hexdigest()
        assert summary["job_id"] == job["id"] and d["status"] == "summarized"


def test_interactive_job_finishes_before_a_running_bulk_job(
    settings: Settings, api_server: str, worker: Path, beat: Path, model: str, key: str
) -> None:
    n = 3000
    _put(
        api_server,
        key,
        "big",
        "id,text\n" + "".join(f"b{i},bulk document number {i} about nothing\n" for i in range(n)),
    )
    s = _schedule(
        api_server,
        key,
        collection="big",
        model=model,
        cron="@yearly",
        params={"max_tokens": 64, "chunk_size": 32},
    )
    env = cli_env(settings, api_server, key)
    ran = cli("schedules", "run-now", s["id"], "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    bulk = json.loads(ran.stdout)["job"]
    assert bulk["priority_class"] == "bulk" and bulk["counts"]["total"] == n
    again = cli("schedules", "run-now", s["id"], env=env)  # same minute: the same job
    assert again.returncode == 0 and bulk["id"] in again.stdout
    wait_job(api_server, key, bulk["id"], until=lambda j: j["counts"]["succeeded"] >= 96)

    resp = httpx.post(  # 12 one-document chunks, on the model's interactive queue
        f"{api_server}/v1/jobs",
        headers=_h(key),
        data={
            "task": "generate",
            "model": model,
            "max_tokens": "16",
            "chunk_size": "1",
            "priority": "interactive",
        },
        files={"file": ("small.csv", b"text\n" + b"quick question\n" * 12, "text/csv")},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    small = wait_job(api_server, key, resp.json()["id"], timeout_s=120)
    assert small["status"] == "completed" and small["counts"]["succeeded"] == 12
    # Strict order, not round robin: once the first interactive chunk was taken, the worker
    # took every other interactive chunk before the next bulk one (Celery logs each receipt;
    # task ids are "<job>:<seq>:..."). One bulk receipt is tolerated, for a poll that landed
    # between two of the interactive messages being published; round robin would give 11.
    received = re.findall(r"run_chunk\[([0-9a-f-]{36}):\d+:\w+\] received", worker.read_text())
    small_at = [i for i, job_id in enumerate(received) if job_id == small["id"]]
    assert len(small_at) == 12
    between = received[small_at[0] : small_at[-1]]
    assert between.count(bulk["id"]) <= 1, between
    big = httpx.get(f"{api_server}/v1/jobs/{bulk['id']}", headers=_h(key)).json()
    assert big["status"] == "running", big  # still going when the interactive job is done
    done = big["counts"]["succeeded"] + big["counts"]["failed"]
    assert done < n - 32 * 4, f"bulk job nearly done ({done}/{n}): the test proves nothing"
    httpx.post(f"{api_server}/v1/jobs/{bulk['id']}/cancel", headers=_h(key))  # save time
    wait_job(api_server, key, bulk["id"], timeout_s=120)

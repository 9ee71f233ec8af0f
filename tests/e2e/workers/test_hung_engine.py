"""End to end: a real `docqueue worker` whose engine hangs (alive, answering nothing).

The worker runs the zero-cost bench engine, which hangs on a batch with a document containing
``HANG_WORD`` (vLLM cannot be made to hang on demand). Without a progress deadline the
heartbeat would renew that chunk's lease for ever and the job would never end.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from service.settings import Settings
from tests.support.helpers import pg
from tests.support.stack import (
    job_results,
    new_key,
    post_job,
    running_worker,
    wait_for_worker,
    wait_job,
)
from workers.engines.bench import HANG_WORD

pytestmark = pytest.mark.e2e


def worker_pid(settings: Settings, model: str) -> int:
    with pg(settings.database.url) as conn:
        row = conn.execute("SELECT pid FROM workers WHERE model = %s", (model,)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_hung_engine_gives_its_chunk_back_restarts_and_the_job_ends(
    settings: Settings, api_server: str, tmp_path: Path
) -> None:
    """The hung chunk is given back after the deadline, each time with its attempt counted and
    the worker process restarted by the launcher with a fresh engine; out of attempts, its rows
    fail with the reason, while the job's other chunk completes and the job ends."""
    model = f"bench-hang-{uuid.uuid4().hex[:6]}"
    key = new_key(settings, api_server)
    body = f"text\nfirst fine doc\nsecond fine doc\nthis one {HANG_WORD}\nits neighbour\n"
    log = tmp_path / "worker.log"
    with running_worker(
        settings,
        model,
        log,
        startup_s=120,
        DOCQUEUE_ENGINE="bench",
        DOCQUEUE_PROGRESS_DEADLINE_S="2",
        DOCQUEUE_MAX_ATTEMPTS="2",
    ) as launcher:
        first_pid = worker_pid(settings, model)
        job = post_job(api_server, key, body, model=model, task="generate", chunk_size=2)
        done = wait_job(api_server, key, job["id"], timeout_s=240)
        wait_for_worker(settings, model, launcher, log, 120)  # the launcher restarted it
        restarted_pid = worker_pid(settings, model)
    assert done["status"] == "completed", done
    assert done["counts"] == {"total": 4, "succeeded": 2, "failed": 2, "cancelled": 0}
    rows = job_results(api_server, key, job["id"])
    assert [r["error"] is None for r in rows] == [True, True, False, False]
    for r in rows[2:]:
        assert r["error"].startswith("gave up after 2 attempts; last error: EngineStalledError")
    with pg(settings.database.url) as conn:
        chunks = conn.execute(
            "SELECT state, attempts FROM chunks WHERE job_id = %s ORDER BY seq", (job["id"],)
        ).fetchall()
    assert chunks == [("done", 1), ("failed", 2)]
    assert restarted_pid != first_pid  # a fresh process, with a fresh engine
    assert "engine made no progress" in log.read_text()

"""Real docqueue processes for end-to-end tests: a worker (real Celery, real vLLM) and helpers
to drive jobs through the real API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings


def docqueue_bin() -> str:
    """The installed console script next to this interpreter (falls back to PATH)."""
    candidate = Path(sys.executable).with_name("docqueue")
    return str(candidate) if candidate.exists() else shutil.which("docqueue") or "docqueue"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Short leases and a fast reconciler so recovery tests take seconds, not minutes.
FAST_RECOVERY = {
    "DOCQUEUE_LEASE_S": "6",
    "DOCQUEUE_RECONCILE_INTERVAL_S": "2",
    "DOCQUEUE_REQUEUE_AFTER_S": "5",
    "DOCQUEUE_WORKER_HEARTBEAT_S": "1",
    "DOCQUEUE_RETRY_BACKOFF_S": "1",
    "DOCQUEUE_VLLM_KV_CACHE_GIB": "1",
    "DOCQUEUE_VLLM_ENFORCE_EAGER": "true",  # a quick engine start (compiled is the default)
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DOCQUEUE_DATABASE_URL": settings.database.url,
        "DOCQUEUE_REDIS_URL": settings.broker.url,
        **FAST_RECOVERY,
        **extra,
    }


@contextmanager
def running_worker(
    settings: Settings, model: str, log: Path, *args: str, startup_s: float = 240, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`docqueue worker --model MODEL --gpus none`, ready once it has registered its model."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [docqueue_bin(), "worker", "--model", model, "--gpus", "none", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(settings, **env),
            start_new_session=True,
        )
    try:
        wait_for_worker(settings, model, proc, log, startup_s)
        yield proc
    finally:
        stop_group(proc)


def wait_for_worker(
    settings: Settings, model: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    from tests.support.helpers import pg

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        with pg(settings.database.url) as conn:
            row = conn.execute(
                "SELECT 1 FROM workers WHERE model = %s AND engine_ready "
                "AND last_heartbeat_at > now() - interval '30 seconds'",
                (model,),
            ).fetchone()
        if row:
            return
        time.sleep(0.5)
    raise RuntimeError(f"worker not ready after {timeout_s} s:\n{log.read_text()[-5000:]}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)  # then SIGKILL: a test's teardown need not wait for vLLM
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_job(
    api: str, key: str, job_id: str, timeout_s: float = 300, until: Any = None
) -> dict[str, Any]:
    """Polls until the job is terminal (or ``until(job)`` holds)."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if until is not None and until(job):
            return dict(job)
        if until is None and job["status"] in ("completed", "failed", "cancelled"):
            return dict(job)
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not finish in {timeout_s} s: {job}")
        time.sleep(0.3)


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docqueue_bin(), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def cli_env(settings: Settings, api_url: str, key: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "DOCQUEUE_DATABASE_URL": settings.database.url,
        "DOCQUEUE_REDIS_URL": settings.broker.url,
        "DOCQUEUE_API_URL": api_url,
        "COLUMNS": "200",
    }
    if key:
        env["DOCQUEUE_API_KEY"] = key
    return env


def new_key(settings: Settings, api_server: str) -> str:
    tenant = f"cli-{uuid.uuid4().hex[:6]}"
    done = cli("keys", "create", "--tenant", tenant, env=cli_env(settings, api_server))
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("dq_") and "not shown again" in done.stderr
    return key


def post_job(api: str, key: str, body: str, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(
        f"{api}/v1/jobs",
        headers={"Authorization": f"Bearer {key}"},
        data={k: str(v) for k, v in fields.items()},
        files={"file": ("docs.csv", body.encode(), "text/csv")},
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
    return dict(resp.json())


def job_results(api: str, key: str, job_id: str) -> list[dict[str, Any]]:
    text = httpx.get(
        f"{api}/v1/jobs/{job_id}/results?format=jsonl",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ).text
    return [json.loads(line) for line in text.splitlines()]

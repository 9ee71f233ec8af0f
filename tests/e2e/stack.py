"""Real docqueue processes for end-to-end tests: a worker (real Celery, real vLLM) and helpers
to drive jobs through the real API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings
from tests.e2e.conftest import docqueue_bin

#: Short leases and a fast reconciler so recovery tests take seconds, not minutes.
FAST_RECOVERY = {
    "DOCQUEUE_LEASE_S": "6",
    "DOCQUEUE_RECONCILE_INTERVAL_S": "2",
    "DOCQUEUE_REQUEUE_AFTER_S": "5",
    "DOCQUEUE_WORKER_HEARTBEAT_S": "1",
    "DOCQUEUE_RETRY_BACKOFF_S": "1",
    "DOCQUEUE_VLLM_KV_CACHE_GIB": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DOCQUEUE_DATABASE_URL": settings.database_url,
        "DOCQUEUE_REDIS_URL": settings.redis_url,
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
    from tests.helpers import pg

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        with pg(settings.database_url) as conn:
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
            proc.wait(timeout=60)
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

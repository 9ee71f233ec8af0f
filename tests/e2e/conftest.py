from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.support.models import tiny_model
from tests.support.stack import docqueue_bin, free_port, running_worker


@pytest.fixture(scope="session")
def api_server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `docqueue api` process on a free port, against the test database and Redis."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = {
        **os.environ,
        "DOCQUEUE_DATABASE_URL": settings.database.url,
        "DOCQUEUE_REDIS_URL": settings.broker.url,
        "DOCQUEUE_METRICS_TOKEN": "e2e-metrics-token",  # test_flower.py scrapes /metrics with it
        # OpenAI client code names an OpenAI model; the session's tiny worker serves it.
        "DOCQUEUE_MODEL_ALIASES": f"gpt-4o-mini={tiny_model()}",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [docqueue_bin(), "api", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docqueue api did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_worker(
    settings: Settings,
    api_server: str,
    tiny_model_path: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A warm `docqueue worker` on the tiny model, one for the whole session (engine start is
    the expensive part); yields the launcher process and its log. A module that runs its own
    worker of the tiny model names it through ``tiny_model_alias``, so this one never takes
    that worker's chunks."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with running_worker(settings, tiny_model_path, log) as proc:
        yield proc, log

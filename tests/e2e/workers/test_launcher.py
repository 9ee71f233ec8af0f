"""`docqueue worker --gpus all` starts one pinned Celery worker per GPU.

No GPU exists on CI hosts, so two things stand in for one (and only these): a fake
`nvidia-smi` on PATH that lists two GPUs, and the zero-cost bench engine instead of vLLM
(vLLM cannot start on a GPU that is not there). Everything else is real: the launcher, two
Celery worker processes, Redis, Postgres, the API.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from service.settings import Settings
from tests.support.gpus import fake_nvidia_smi
from tests.support.helpers import pg
from tests.support.stack import new_key, running_worker, wait_job


def test_one_worker_per_gpu_each_sees_its_own_device(
    settings: Settings, api_server: str, tmp_path: Path, model_name: str
) -> None:
    path = fake_nvidia_smi(tmp_path, 2)
    log = tmp_path / "worker.log"
    host = socket.gethostname()
    with running_worker(
        settings,
        model_name,
        log,
        "--gpus",
        "all",
        "--concurrency",
        "2",
        startup_s=60,
        PATH=path,
        DOCQUEUE_ENGINE="bench",
    ):
        # running_worker passes --gpus none first; the later --gpus all wins (Typer: last one).
        # Each child registers the CUDA_VISIBLE_DEVICES it sees in its own environment.
        rows: list[tuple[str, str]] = []
        for _ in range(120):
            with pg(settings.database.url) as conn:
                rows = conn.execute(
                    "SELECT name, device FROM workers WHERE model = %s ORDER BY name",
                    (model_name,),
                ).fetchall()
            if len(rows) == 2:
                break
            time.sleep(0.5)
        assert rows == [
            (f"gpu0@{host}", "bench (CUDA_VISIBLE_DEVICES=0)"),
            (f"gpu1@{host}", "bench (CUDA_VISIBLE_DEVICES=1)"),
        ]

        # Both pinned workers serve the model's queue and finish a job between them.
        key = new_key(settings, api_server)
        body = "text\n" + "".join(f"doc {i}\n" for i in range(400))
        resp = httpx.post(
            f"{api_server}/v1/jobs",
            headers={"Authorization": f"Bearer {key}"},
            data={"task": "summarize", "model": model_name, "chunk_size": "10"},
            files={"file": ("d.csv", body.encode(), "text/csv")},
        )
        job = wait_job(api_server, key, resp.json()["id"], timeout_s=60)
        assert job["status"] == "completed" and job["counts"]["succeeded"] == 400
        with pg(settings.database.url) as conn:
            workers = {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT worker FROM chunks WHERE job_id = %s", (job["id"],)
                ).fetchall()
            }
        assert workers <= {f"gpu0@{host}", f"gpu1@{host}"} and workers

"""``docqueue retry`` and ``docqueue delete`` against a real `docqueue api` process. No worker
runs: the real chunk store plays its part (claim, write, close) on the same database."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from service.settings import Settings
from service.store.chunks import PgChunkStore, RowResult
from service.store.engine import get_engine
from service.store.states import ChunkState
from tests.support.helpers import pg
from tests.support.stack import cli, cli_env, docqueue_bin, new_key, post_job


def work(settings: Settings, job_id: str, fail: set[int]) -> None:
    """Every chunk of the job, as a worker would run it: rows in ``fail`` get an error."""
    store = PgChunkStore(get_engine(settings.database.url), lease_s=30, max_attempts=3)
    with pg(settings.database.url) as conn:
        chunks = conn.execute(
            "SELECT id FROM chunks WHERE job_id = %s ORDER BY seq", (uuid.UUID(job_id),)
        ).fetchall()
    for (chunk_id,) in chunks:
        lease = store.claim(chunk_id, "cli-test").lease
        assert lease is not None
        store.write(
            lease,
            [
                RowResult(idx=d.idx, error="boom")
                if d.idx in fail
                else RowResult(idx=d.idx, output=f"out {d.idx}")
                for d in store.pending(lease)
            ],
        )
        store.close(lease, ChunkState.DONE)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_retry_then_delete(settings: Settings, api_server: str, model_name: str) -> None:
    key = new_key(settings, api_server)
    env = cli_env(settings, api_server, key)
    body = "id,text\n" + "".join(f"r{i},doc {i}\n" for i in range(1, 11))
    job_id = post_job(api_server, key, body, task="summarize", model=model_name, id_column="id")[
        "id"
    ]

    running = cli("retry", job_id, env=env)
    assert running.returncode == 1 and "HTTP 409" in running.stderr
    assert "only a finished job" in flat(running.stderr)

    work(settings, job_id, fail={3, 9})
    done = cli("retry", job_id, "--json", env=env)
    assert done.returncode == 0, done.stderr
    retry = json.loads(done.stdout)
    assert retry["retry_of"] == job_id and retry["counts"]["total"] == 2
    shown = cli("status", retry["id"], env=env)
    assert shown.returncode == 0 and f"retry of {job_id}" in flat(shown.stdout)
    plain = cli("retry", job_id, env=env)  # a second retry is another job; the id is printed
    assert plain.returncode == 0 and "documents in 1 chunks" in flat(plain.stdout)
    assert retry["id"] not in plain.stdout

    # Without --yes it asks; anything but yes leaves the job alone.
    declined = subprocess.run(
        [docqueue_bin(), "delete", job_id],
        env=env,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert declined.returncode == 1 and "Aborted" in declined.stderr
    assert json.loads(cli("status", job_id, "--json", env=env).stdout)["deleted_at"] is None

    deleted = cli("delete", job_id, "--yes", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert (
        f"job {job_id} deleted (completed: 8 succeeded, 2 failed, 0 cancelled); "
        "its rows are purged" in flat(deleted.stdout)
    )
    status = cli("status", job_id, env=env)
    assert status.returncode == 0 and "deleted" in status.stdout and "8 ok" in status.stdout
    listed = cli("jobs", env=env)
    assert listed.returncode == 0 and "completed (deleted)" in listed.stdout
    gone = cli("results", job_id, env=env)
    assert gone.returncode == 1 and "was deleted" in flat(gone.stderr)
    assert "HTTP 410" in gone.stderr
    again = cli("retry", job_id, env=env)
    assert again.returncode == 1 and "HTTP 410" in again.stderr
    # The retry outlives its original's delete.
    assert json.loads(cli("status", retry["id"], "--json", env=env).stdout)["retry_of"] == job_id


def test_retry_wait_follows_the_new_job(
    settings: Settings, api_server: str, model_name: str, tmp_path: Path
) -> None:
    key = new_key(settings, api_server)
    env = cli_env(settings, api_server, key)
    body = "text\n" + "".join(f"doc {i}\n" for i in range(1, 6))
    job_id = post_job(api_server, key, body, task="summarize", model=model_name)["id"]
    work(settings, job_id, fail={2, 5})
    proc = subprocess.Popen(
        [docqueue_bin(), "retry", job_id, "--wait", "--poll-s", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    retry_id = None
    deadline = time.monotonic() + 30
    while retry_id is None and time.monotonic() < deadline:
        with pg(settings.database.url) as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE retry_of = %s", (uuid.UUID(job_id),)
            ).fetchone()
        retry_id = str(row[0]) if row else None
        time.sleep(0.2)
    assert retry_id is not None
    time.sleep(1)
    assert proc.poll() is None  # following the queued retry
    work(settings, retry_id, fail=set())
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"job {retry_id} completed: 2 succeeded, 0 failed, 0 cancelled" in flat(stdout)
    assert "2/2" in stderr


def test_delete_is_refused_for_another_tenants_job(
    settings: Settings, api_server: str, model_name: str
) -> None:
    owner = new_key(settings, api_server)
    job_id = post_job(api_server, owner, "text\na\n", task="summarize", model=model_name)["id"]
    other = cli_env(settings, api_server, new_key(settings, api_server))
    for args in (("delete", job_id, "--yes"), ("retry", job_id)):
        done = cli(*args, env=other)
        assert done.returncode == 1 and "not found (HTTP 404)" in flat(done.stderr), args
    mine = json.loads(
        cli("status", job_id, "--json", env=cli_env(settings, api_server, owner)).stdout
    )
    assert mine["deleted_at"] is None and mine["status"] == "queued"

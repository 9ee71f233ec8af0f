"""The CLI against a real `docqueue api` process: submit, follow, list, download, cancel."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
import uuid
from pathlib import Path

from service.settings import Settings
from tests.support.helpers import pg
from tests.support.stack import cli, cli_env, docqueue_bin, new_key


def test_submit_status_jobs_results_cancel(
    settings: Settings, api_server: str, tmp_path: Path, model_name: str
) -> None:
    env = cli_env(settings, api_server, new_key(settings, api_server))
    src = tmp_path / "reviews.csv"
    src.write_text('id,text\nr1,great product\nr2,"awful,\nreally"\nr3,=SUM(A1)\n')
    done = cli(
        "submit",
        str(src),
        "--task",
        "classify",
        "--labels",
        "positive,negative",
        "--model",
        model_name,
        "--id-column",
        "id",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "queued" and job["counts"]["total"] == 3
    job_id = job["id"]

    status = cli("status", job_id, env=env)
    assert status.returncode == 0 and "queued" in status.stdout and job_id in status.stdout
    listing = cli("jobs", env=env)
    assert listing.returncode == 0 and job_id in listing.stdout

    # Results written as a worker would; the CLI downloads them in input order.
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output, label) SELECT job_id, idx, text, "
            "CASE idx WHEN 2 THEN 'negative' ELSE 'positive' END FROM documents "
            "WHERE job_id = %s",
            (uuid.UUID(job_id),),
        )
    out = tmp_path / "out.csv"
    got = cli("results", job_id, "-o", str(out), env=env)
    assert got.returncode == 0, got.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(r["id"], r["label"]) for r in rows] == [
        ("r1", "positive"),
        ("r2", "negative"),
        ("r3", "positive"),
    ]
    assert rows[2]["output"] == "'=SUM(A1)"
    jsonl = tmp_path / "out.jsonl"
    assert cli("results", job_id, "-o", str(jsonl), env=env).returncode == 0
    assert [json.loads(line)["id"] for line in jsonl.read_text().splitlines()] == ["r1", "r2", "r3"]

    cancelled = cli("cancel", job_id, env=env)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout


def test_wait_shows_progress_until_the_job_ends(
    settings: Settings, api_server: str, tmp_path: Path, model_name: str
) -> None:
    """No worker runs in this test, so the job ends when another client cancels it."""
    env = cli_env(settings, api_server, new_key(settings, api_server))
    src = tmp_path / "docs.csv"
    src.write_text("text\n" + "".join(f"doc {i}\n" for i in range(50)))
    proc = subprocess.Popen(
        [
            docqueue_bin(),
            "submit",
            str(src),
            "--task",
            "summarize",
            "--model",
            model_name,
            "--wait",
            "--poll-s",
            "0.2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_id = None
    deadline = time.monotonic() + 30
    while job_id is None and time.monotonic() < deadline:
        with pg(settings.database.url) as conn:
            row = conn.execute("SELECT id FROM jobs WHERE model = %s", (model_name,)).fetchone()
        job_id = str(row[0]) if row else None
        time.sleep(0.2)
    assert job_id is not None
    time.sleep(1)
    assert proc.poll() is None  # still following the queued job
    assert cli("cancel", job_id, env=env).returncode == 0
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1  # a job that did not complete is a failure for scripts
    assert f"job {job_id} cancelled: 0 succeeded, 0 failed, 50 cancelled" in " ".join(
        stdout.split()
    )
    assert "50/50" in stderr  # the progress bar's done/total


def test_errors_print_the_api_message_not_a_traceback(
    settings: Settings, api_server: str, tmp_path: Path
) -> None:
    env = cli_env(settings, api_server, new_key(settings, api_server))
    src = tmp_path / "bad.csv"
    src.write_text("id,body\n1,hello\n")
    done = cli("submit", str(src), "--task", "summarize", env=env)
    assert done.returncode == 1
    assert "text column 'text' not found; columns found: 'id', 'body'" in " ".join(
        done.stderr.split()
    )
    assert "Traceback" not in done.stderr

    missing = cli("status", str(uuid.uuid4()), env=env)
    assert missing.returncode == 1 and "not found (HTTP 404)" in missing.stderr

    no_key = cli("jobs", env=cli_env(settings, api_server))
    assert no_key.returncode == 1 and "DOCQUEUE_API_KEY" in no_key.stderr

    bad_key = cli("jobs", env={**env, "DOCQUEUE_API_KEY": "dq_wrong"})
    assert bad_key.returncode == 1 and "invalid or revoked API key" in bad_key.stderr

    down = cli("jobs", env={**env, "DOCQUEUE_API_URL": "http://127.0.0.1:9"})
    assert down.returncode == 1 and "cannot reach the docqueue API" in down.stderr
    assert "Traceback" not in down.stderr


def test_db_upgrade_is_idempotent(settings: Settings, api_server: str) -> None:
    done = cli("db", "upgrade", env=cli_env(settings, api_server))
    assert done.returncode == 0, done.stderr

"""Prompt templates against a real worker (real Celery, real vLLM on the tiny model): a row
whose rendered prompt is over DOCQUEUE_MAX_PROMPT_CHARS, and a job row holding a template the
rules refuse (stored before them), fail as row errors; the worker lives on."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from service.jobs import submit
from service.jobs.validate import JobRequest
from service.settings import Settings
from service.store.keys import hash_key
from tests.support.helpers import pg
from tests.support.stack import job_results, new_key, post_job, wait_job

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def worker(tiny_worker: tuple[Any, Path]) -> tuple[Any, Path]:
    return tiny_worker


@pytest.fixture()
def key(settings: Settings, api_server: str) -> str:
    return new_key(settings, api_server)


def test_rows_over_the_prompt_cap_fail_alone(
    settings: Settings,
    api_server: str,
    worker: tuple[Any, Path],
    tiny_model_path: str,
    key: str,
) -> None:
    """A 60,000-character template naming a column 10,000 times is fine for rows where that
    column is empty; where it holds 250 characters the prompt would be 2.5 M characters, over
    the 2 Mi default: those rows fail with the limit named, the others are answered."""
    limit = settings.jobs.max_prompt_chars
    template = "Repeat: {text}" + "{pad}" * 10_000
    assert len(template) <= settings.jobs.max_template_chars
    body = (
        "id,text,pad\n"
        "good-1,hello one,\n"
        f"big-1,hello two,{'p' * 250}\n"
        "good-2,hello three,\n"
        f"big-2,hello four,{'q' * 250}\n"
        "good-3,hello five,\n"
    )
    job = post_job(
        api_server,
        key,
        body,
        task="generate",
        model=tiny_model_path,
        id_column="id",
        prompt=template,
        max_tokens=4,
    )
    final = wait_job(api_server, key, job["id"])
    assert final["status"] == "completed", final
    assert final["counts"] == {"total": 5, "succeeded": 3, "failed": 2, "cancelled": 0}
    rows = {r["id"]: r for r in job_results(api_server, key, job["id"])}
    for big, text in (("big-1", "hello two"), ("big-2", "hello four")):
        error = rows[big]["error"]
        assert f"the limit is {limit} (DOCQUEUE_MAX_PROMPT_CHARS)" in error, error
        assert f"would be {len('Repeat: ' + text) + 250 * 10_000} characters" in error, error
    for good in ("good-1", "good-2", "good-3"):
        assert not rows[good]["error"] and rows[good]["output"], rows[good]
    proc, _ = worker
    assert proc.poll() is None  # the worker is alive


def test_an_old_job_row_with_a_format_spec_template_never_renders_reprs(
    settings: Settings,
    api_server: str,
    worker: tuple[Any, Path],
    tiny_model_path: str,
    key: str,
) -> None:
    """A job stored before the template rules with ``{text:{text.__class__.__mro__}}`` (the
    API refuses it now, so the row is written here as an old version would have): every row
    is a row error that names the template, no object repr reaches a prompt or a result, and
    the worker goes on to the next job."""
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT tenant_id FROM api_keys WHERE key_hash = %s", (hash_key(key),)
        ).fetchone()
    assert row is not None
    tenant_id: uuid.UUID = row[0]
    req = JobRequest(
        task="generate", model=tiny_model_path, id_column="id", prompt="{text}", max_tokens=4
    )
    upload = io.BytesIO(b"id,text\na,first document\nb,second document\n")
    job, created = submit.create_job(tenant_id, req, upload, settings)
    assert created
    old_template = "{text:{text.__class__.__mro__}}"
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE jobs SET params = params || %s::jsonb WHERE id = %s",
            (json.dumps({"prompt": old_template}), job.id),
        )
    assert submit.enqueue_job(job.id, settings) == 1

    final = wait_job(api_server, key, str(job.id))
    assert final["status"] == "failed", final
    assert final["counts"]["failed"] == 2
    results = job_results(api_server, key, str(job.id))
    assert len(results) == 2
    for r in results:
        assert "invalid prompt template" in r["error"], r
        assert "cannot nest" in r["error"], r
        assert not r["output"]
    assert "<class" not in json.dumps(results)

    ok = post_job(
        api_server, key, "text\nfine\n", task="generate", model=tiny_model_path, max_tokens=4
    )
    assert wait_job(api_server, key, ok["id"])["status"] == "completed"
    proc, _ = worker
    assert proc.poll() is None

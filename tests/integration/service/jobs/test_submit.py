"""Idempotency-Key replays through the real API: the same request gets its job back; another
request under the same key is a 409 that tells clients not to retry, never the old job."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.support.helpers import count_rows, pg, submit, tenant_totals

CSV = "id,text\na,first document\nb,second document\n"
KEY = {"Idempotency-Key": "batch-7"}


def _assert_conflict(resp: Any, key: str = "batch-7") -> None:
    assert resp.status_code == 409, resp.text
    assert resp.headers.get("x-should-retry") == "false"
    assert "Idempotent-Replayed" not in resp.headers
    error = resp.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert repr(key) in error["message"] and "different request" in error["message"]


def test_a_replay_of_the_same_request_returns_its_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """The same bytes and parameters (even under another file name) name the same job."""
    first = submit(client, api_key, CSV, model=model_name, id_column="id", headers=KEY)
    again = submit(
        client, api_key, CSV, model=model_name, id_column="id", headers=KEY, filename="copy.csv"
    )
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert tenant_totals(settings.database.url, api_key) == (1, 2, 1)


def test_the_same_key_with_another_file_is_409(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A client that reuses a key for new data must not be handed the old job's results."""
    first = submit(client, api_key, CSV, model=model_name, headers=KEY)
    assert first.status_code == 202
    other = CSV.replace("second", "another")
    _assert_conflict(submit(client, api_key, other, model=model_name, headers=KEY))
    # One more byte at the end is another file too; nothing of either attempt was stored.
    _assert_conflict(submit(client, api_key, CSV + "c,x\n", model=model_name, headers=KEY))
    assert tenant_totals(settings.database.url, api_key) == (1, 2, 1)
    assert count_rows(settings.database.url, "documents", first.json()["id"]) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"model": "another-model"},
        {"prompt": "Summarize in one line: {text}"},
        {"summary_words": 20},
        {"priority": "bulk"},
        {"chunk_size": 1},
        {"text_column": "id"},
        {"delimiter": ";"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_the_same_key_with_other_parameters_is_409(
    client: TestClient, api_key: str, settings: Settings, model_name: str, change: dict[str, Any]
) -> None:
    base: dict[str, Any] = {"model": model_name, "task": "summarize"}
    assert submit(client, api_key, CSV, headers=KEY, **base).status_code == 202
    _assert_conflict(submit(client, api_key, CSV, headers=KEY, **{**base, **change}))
    assert tenant_totals(settings.database.url, api_key)[0] == 1


def test_the_same_key_in_two_tenants_makes_two_jobs(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Keys are per tenant: another tenant's request under the same key is neither a replay of
    nor a conflict with this one."""
    from service.store.engine import session_scope
    from service.store.keys import create_key

    with session_scope(settings.database.url) as session:
        other = create_key(session, f"other-{uuid.uuid4().hex[:8]}")
    a = submit(client, api_key, CSV, model=model_name, headers=KEY)
    b = submit(client, other, CSV.replace("first", "1st"), model=model_name, headers=KEY)
    assert a.status_code == b.status_code == 202, b.text
    assert a.json()["id"] != b.json()["id"]
    assert "Idempotent-Replayed" not in b.headers


def test_concurrent_first_requests_with_one_key_make_one_job(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Several clients retrying at once: one job, and every one of them gets it."""
    body = "text\n" + "".join(f"document number {i}\n" for i in range(3000))
    start = threading.Barrier(6)

    def post(_: int) -> Any:
        start.wait()
        return submit(client, api_key, body, model=model_name, headers=KEY)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    assert [r.status_code for r in answers] == [202] * 6, [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in answers) == 1
    assert tenant_totals(settings.database.url, api_key)[:2] == (1, 3000)


def _tenant_id(url: str, key: str) -> uuid.UUID:
    from service.store.keys import hash_key

    with pg(url) as conn:
        row = conn.execute(
            "SELECT tenant_id FROM api_keys WHERE key_hash = %s", (hash_key(key),)
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def _race(
    client: TestClient, key: str, settings: Settings, winner_sha: str, body: str, model: str
) -> tuple[uuid.UUID, Any]:
    """A request that loses the race for its key to a job committed while its insert waits.

    The winner's job row is inserted (uncommitted) in a transaction of the test's own, so the
    request finds no job for the key, inserts its own, and blocks on the unique index; the
    winner then commits and the request's insert fails: the path two concurrent first
    requests take, every time.
    """
    url = settings.database.url
    winner = uuid.uuid4()
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
        conn.execute(
            "INSERT INTO jobs (id, tenant_id, task, model, queue, params, status, "
            "idempotency_key, chunk_size, request_sha256) "
            "VALUES (%s, %s, 'summarize', %s, 'q', '{}', 'queued', %s, 10, %s)",
            (winner, _tenant_id(url, key), model, KEY["Idempotency-Key"], winner_sha),
        )
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(submit, client, key, body, model=model, headers=KEY)
            deadline = time.monotonic() + 20
            with pg(url) as watch:
                while not watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO jobs%%'"
                ).fetchone():
                    assert not answer.done(), answer.result().text
                    assert time.monotonic() < deadline, "the request never waited on the key"
                    time.sleep(0.05)
            conn.commit()
            return winner, answer.result(timeout=30)


def test_the_loser_of_a_race_gets_the_winners_job_only_for_the_same_request(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    url = settings.database.url
    # The fingerprint of this request, as a first submission stores it.
    made = submit(client, api_key, CSV, model=model_name, headers=KEY).json()["id"]
    with pg(url) as conn:
        row = conn.execute("SELECT request_sha256 FROM jobs WHERE id = %s", (made,)).fetchone()
        assert row is not None and len(row[0]) == 64
        conn.execute("DELETE FROM jobs WHERE id = %s", (made,))

    winner, same = _race(client, api_key, settings, row[0], CSV, model_name)
    assert same.status_code == 202, same.text
    assert same.json()["id"] == str(winner) and same.headers["Idempotent-Replayed"] == "true"

    with pg(url) as conn:
        conn.execute("DELETE FROM jobs WHERE id = %s", (winner,))
    winner, other = _race(client, api_key, settings, row[0], CSV + "c,x\n", model_name)
    _assert_conflict(other)
    assert tenant_totals(url, api_key) == (1, 0, 0)  # the winner's row alone


def test_a_job_from_before_fingerprints_is_replayed_as_before(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Jobs made before migration 0006 have no fingerprint to compare: the key returns them."""
    first = submit(client, api_key, CSV, model=model_name, headers=KEY).json()["id"]
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE jobs SET request_sha256 = NULL WHERE id = %s", (first,))
    again = submit(client, api_key, "text\nsomething else\n", model=model_name, headers=KEY)
    assert again.status_code == 202 and again.json()["id"] == first
    assert again.headers.get("Idempotent-Replayed") == "true"


def test_a_large_job_without_a_chunk_size_gets_at_most_chunks_per_job_chunks(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Each chunk costs a row, a claim, a message and a dispatch pass: a job that names no
    chunk_size gets larger chunks once the default would make more than ``chunks_per_job``
    of them; a small one keeps the default, and a chunk_size given is kept as given."""
    from service.api.app import create_app
    from tests.support.helpers import chunk_rows, job_view, override

    s = override(
        settings,
        jobs={"default_chunk_size": 10, "chunks_per_job": 4},
        api={"submit_processes": 0},
    )
    body = "text\n" + "".join(f"row {i}\n" for i in range(101))
    with TestClient(create_app(s)) as c:
        large = submit(c, api_key, body, model=model_name).json()["id"]
        small = submit(c, api_key, "text\n" + "x\n" * 35, model=model_name).json()["id"]
        given = submit(c, api_key, body, model=model_name, chunk_size=10).json()["id"]
    with pg(settings.database.url) as conn:
        spans = conn.execute(
            "SELECT start_idx, end_idx FROM chunks WHERE job_id = %s ORDER BY seq", (large,)
        ).fetchall()
    assert spans == [(1, 27), (27, 53), (53, 79), (79, 102)]  # 101 rows: 4 chunks of <= 26
    assert job_view(client, api_key, large)["chunk_size"] == 26
    assert len(chunk_rows(settings, small)) == 4  # 35 rows in 10s: the default suffices
    assert len(chunk_rows(settings, given)) == 11

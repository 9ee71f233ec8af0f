"""Small helpers shared by the tests."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from service.settings import Settings


def auth(key: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {key}"}


def submit(
    client: TestClient,
    key: str,
    content: bytes | str,
    *,
    filename: str = "docs.csv",
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> Any:  # the test client's response (httpx or httpx2)
    body = content.encode("utf-8") if isinstance(content, str) else content
    fields.setdefault("task", "summarize")
    data = {k: str(v) for k, v in fields.items() if v is not None}
    return client.post(
        "/v1/jobs",
        headers={**auth(key), **(headers or {})},
        data=data,
        files={"file": (filename, body, "text/csv")},
    )


def pg(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True
    )


def documents(url: str, job_id: str) -> list[tuple[int, str | None, str, Any]]:
    with pg(url) as conn:
        return conn.execute(
            "SELECT idx, external_id, text, extra FROM documents WHERE job_id = %s ORDER BY idx",
            (uuid.UUID(job_id),),
        ).fetchall()


def count_rows(url: str, table: str, job_id: str | None = None) -> int:
    with pg(url) as conn:
        if job_id is None:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        else:
            row = conn.execute(
                f"SELECT count(*) FROM {table} WHERE job_id = %s", (uuid.UUID(job_id),)
            ).fetchone()
        assert row is not None
        return int(row[0])


def tenant_totals(url: str, key: str) -> tuple[int, int, int]:
    """(jobs, documents, chunks) belonging to the key's tenant."""
    from service.store.keys import hash_key

    with pg(url) as conn:
        row = conn.execute(
            """
            SELECT (SELECT count(*) FROM jobs j WHERE j.tenant_id = k.tenant_id),
                   (SELECT count(*) FROM documents d JOIN jobs j ON j.id = d.job_id
                     WHERE j.tenant_id = k.tenant_id),
                   (SELECT count(*) FROM chunks c JOIN jobs j ON j.id = c.job_id
                     WHERE j.tenant_id = k.tenant_id)
            FROM api_keys k WHERE k.key_hash = %s
            """,
            (hash_key(key),),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])


def chunk_rows(settings: Settings, job_id: str) -> list[Any]:
    with pg(settings.database.url) as conn:
        return conn.execute(
            "SELECT id, seq, state, attempts, worker, enqueued_at FROM chunks WHERE job_id = %s "
            "ORDER BY seq",
            (job_id,),
        ).fetchall()


def job_view(client: TestClient, key: str, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json())


def expire_lease(settings: Settings, chunk_id: uuid.UUID) -> None:
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE chunks SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
            (chunk_id,),
        )


def override(settings: Settings, **groups: dict[str, Any]) -> Settings:
    """A copy of ``settings`` with some fields of some groups changed:
    ``override(s, worker={"max_attempts": 2})``."""
    update = {
        name: getattr(settings, name).model_copy(update=changes) for name, changes in groups.items()
    }
    return settings.model_copy(update=update)


def put(client: TestClient, key: str, name: str, body: str, **fields: Any) -> Any:
    """PUT a CSV into a collection (created on first use)."""
    return client.put(
        f"/v1/collections/{name}/documents",
        headers=auth(key),
        data={k: str(v) for k, v in fields.items()},
        files={"file": ("docs.csv", body.encode(), "text/csv")},
    )


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def wait_enqueued(settings: Settings, job_id: str, chunks: int, timeout_s: float = 15.0) -> None:
    """The submit pool runs the dispatcher after the 202, as a real API does after its
    response: wait until ``chunks`` of the job's chunks are released (their messages sent)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with pg(settings.database.url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM chunks WHERE job_id = %s AND enqueued_at IS NOT NULL",
                (job_id,),
            ).fetchone()
        if row and row[0] == chunks:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: its {chunks} chunk messages were not sent")

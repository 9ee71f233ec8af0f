"""A batch's reading, off the request: one whose reader died (the API process stopped after
answering) is read again by the reconciler's sweep, once, and never twice at the same time."""

from __future__ import annotations

import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

from service.batches import finalize
from service.batches.lifecycle import create, validate_and_ingest
from service.files import store as files
from service.settings import Settings
from service.store.engine import get_engine, session_scope
from service.store.keys import create_key
from service.store.tables import Batch, Tenant
from tests.support.helpers import count_rows, pg


def _tenant(settings: Settings) -> uuid.UUID:
    name = f"lc-{uuid.uuid4().hex[:8]}"
    with session_scope(settings.database.url) as session:
        create_key(session, name)
    with session_scope(settings.database.url) as session:
        tenant = session.query(Tenant).filter_by(name=name).one()
        return tenant.id


def _orphan(settings: Settings, n: int) -> tuple[uuid.UUID, uuid.UUID]:
    """A batch made (``validating``) whose file nobody read, created 10 minutes ago."""
    tenant = _tenant(settings)
    raw = b"".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
                   ).encode() + b"\n"
        for i in range(n)
    )  # fmt: skip
    with session_scope(settings.database.url) as session:
        file = files.create(session, tenant, io.BytesIO(raw), filename="in.jsonl",
                            purpose="batch", expires_after_s=None, settings=settings)  # fmt: skip
        batch = create(
            session,
            tenant,
            input_file_id=files.public_id(file.id),
            endpoint="/v1/chat/completions",
            metadata=None,
            settings=settings,
        )
        batch_id, job_id = batch.id, batch.job_id
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE batches SET created_at = now() - interval '10 minutes' WHERE id = %s",
            (batch_id,),
        )
    return batch_id, job_id


def test_the_sweep_reads_an_orphaned_batch_and_two_readers_make_its_rows_once(
    settings: Settings,
) -> None:
    batch_id, job_id = _orphan(settings, 30)
    engine = get_engine(settings.database.url)
    finalize.sweep(engine, settings)  # (or a worker's own sweep, sharing this database)
    with session_scope(settings.database.url) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.status == "in_progress"
    assert count_rows(settings.database.url, "documents", str(job_id)) == 30

    other, other_job = _orphan(settings, 30)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: validate_and_ingest(other, settings), range(2)))
    # The loser found the batch taken ("gone") or already running; never a second set of rows.
    assert "in_progress" in outcomes and set(outcomes) <= {"in_progress", "gone"}
    assert count_rows(settings.database.url, "documents", str(other_job)) == 30
    assert count_rows(settings.database.url, "chunks", str(other_job)) >= 1

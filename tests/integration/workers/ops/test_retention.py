"""Retention's pass over the Files API: a file past its ``expires_at`` is purged (its parts
in batches), a file not yet expired is kept."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from service.files import store
from service.settings import Settings
from service.store.engine import get_engine, session_scope
from service.store.keys import authenticate, create_key
from tests.support.helpers import override, pg
from workers.ops.retention import purge_expired_files


def test_expired_files_are_purged_and_live_ones_kept(settings: Settings) -> None:
    small = override(settings, files={"part_bytes": 4096, "purge_batch_parts": 2})
    engine = get_engine(settings.database.url)
    with session_scope(settings.database.url) as session:
        key = create_key(session, f"ret-{uuid.uuid4().hex[:8]}")
        tenant = authenticate(session, f"Bearer {key}").tenant_id
    ids = []
    for life in (3600, 7200):
        with Session(engine, expire_on_commit=False) as session, session.begin():
            row = store.create(
                session,
                tenant,
                io.BytesIO(b"r" * 4096 * 5),
                filename="in.jsonl",
                purpose="batch",
                expires_after_s=life,
                settings=small,
            )
            ids.append(row.id)

    report = purge_expired_files(engine, small, now=datetime.now(UTC) + timedelta(seconds=5000))
    assert report.complete and report.files >= 1 and report.parts >= 5
    with pg(settings.database.url) as conn:
        left = conn.execute(
            "SELECT f.id, count(p.seq) FROM files f LEFT JOIN file_parts p ON p.file_id = f.id "
            "WHERE f.tenant_id = %s GROUP BY f.id",
            (tenant,),
        ).fetchall()
    assert left == [(ids[1], 5)]

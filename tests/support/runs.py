"""Helpers for quota, usage and admin tests: tenants with known names, and jobs run through the
real chunk store (claim, write, close) instead of a worker."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from service.store.chunks import PgChunkStore, RowResult
from service.store.engine import get_engine, session_scope
from service.store.keys import create_key
from service.store.states import ChunkState
from tests.support.helpers import chunk_rows, override


def new_tenant(settings: Settings, prefix: str = "t") -> tuple[str, str]:
    """(tenant name, a tenant key) for a fresh tenant."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with session_scope(settings.database.url) as session:
        return name, create_key(session, name)


def new_admin_key(settings: Settings) -> str:
    with session_scope(settings.database.url) as session:
        return create_key(session, f"ops-{uuid.uuid4().hex[:8]}", admin=True)


@contextmanager
def local_client(settings: Settings, **groups: dict[str, Any]) -> Iterator[TestClient]:
    """The real app with submissions in the serving thread (no pool processes): a submission's
    dispatch has run when its response arrives, so chunk states are settled for the test."""
    changes = {**groups, "api": {"submit_processes": 0, **groups.get("api", {})}}
    with TestClient(create_app(override(settings, **changes))) as client:
        yield client


def run_job(
    settings: Settings,
    job_id: str,
    result: Callable[[int], RowResult],
    close: bool = True,
) -> list[RowResult]:
    """Runs every chunk of the job through the real store as a worker would: claim, write
    ``result(idx)`` for each row (a redelivered write too, which must count once), close."""
    store = PgChunkStore(get_engine(settings.database.url), lease_s=30, max_attempts=3)
    written: list[RowResult] = []
    for chunk in chunk_rows(settings, job_id):
        lease = store.claim(chunk[0], "test-worker").lease
        assert lease is not None, chunk
        rows = [result(d.idx) for d in store.pending(lease)]
        store.write(lease, rows)
        store.write(lease, rows)  # redelivered: nothing more is counted
        written.extend(rows)
        if close:
            store.close(lease, ChunkState.DONE)
    return written

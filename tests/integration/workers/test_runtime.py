"""The worker's registration against real PostgreSQL: its slots (what the dispatcher counts)
and a row lost under it (a namesake's shutdown, an operator) taken back at the next beat."""

from __future__ import annotations

import uuid

from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from tests.support.helpers import pg
from workers.engines.bench import BenchEngine
from workers.runtime import Runtime


def _row(settings: Settings, name: str) -> tuple[str, int] | None:
    with pg(settings.database.url) as conn:
        row = conn.execute("SELECT model, slots FROM workers WHERE name = %s", (name,)).fetchone()
    return None if row is None else (row[0], row[1])


def test_a_worker_registers_its_slots_and_takes_its_row_back_when_it_is_gone(
    settings: Settings,
) -> None:
    model, name = f"rt-model-{uuid.uuid4().hex[:6]}", f"cpu-{uuid.uuid4().hex[:6]}@test"
    db = get_engine(settings.database.url)
    rt = Runtime(
        settings=settings,
        model=model,
        name=name,
        engine=BenchEngine(model),
        db=db,
        store=PgChunkStore.from_settings(settings, db),
        slots=5,
    )
    rt.start()
    try:
        assert _row(settings, name) == (model, 5)
        with pg(settings.database.url) as conn:
            conn.execute("DELETE FROM workers WHERE name = %s", (name,))
        rt.beat_once()
        assert _row(settings, name) == (model, 5)
    finally:
        rt.shutdown()
    assert _row(settings, name) is None

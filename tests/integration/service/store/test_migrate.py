"""`alembic upgrade head` on an empty database builds exactly what the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect

from service.settings import Settings
from service.store.tables import Base
from tests.support.databases import create_database, drop_database


def test_upgraded_database_equals_the_models() -> None:
    from service.store.migrate import upgrade

    name, url = create_database()
    engine = create_engine(url)
    try:
        upgrade(url)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
            tables = set(inspect(conn).get_table_names())
        assert diff == [], diff
        assert {"tenants", "api_keys", "jobs", "documents", "results", "chunks"} <= tables
    finally:
        engine.dispose()
        drop_database(name)


def test_compare_detects_a_difference() -> None:
    """The comparison above is not vacuous: a schema missing a column is reported."""
    from service.store.migrate import upgrade

    name, url = create_database()
    engine = create_engine(url)
    try:
        upgrade(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN error")
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert any(d[0] == "add_column" and d[3].name == "error" for d in diff), diff
    finally:
        engine.dispose()
        drop_database(name)


def test_deleting_a_job_deletes_its_documents_and_results(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    """Documents and results carry no per-row foreign key (ingest and results-write speed); the
    job-delete trigger keeps the cascade."""
    from tests.support.helpers import count_rows, pg, submit

    job_id = submit(client, api_key, "text\na\nb\n", model="cascade-test").json()["id"]
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output) SELECT job_id, idx, 'x' FROM documents "
            "WHERE job_id = %s",
            (job_id,),
        )
        assert count_rows(settings.database.url, "results", job_id) == 2
        conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
    assert count_rows(settings.database.url, "documents", job_id) == 0
    assert count_rows(settings.database.url, "results", job_id) == 0
    assert count_rows(settings.database.url, "chunks", job_id) == 0

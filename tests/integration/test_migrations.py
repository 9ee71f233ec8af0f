"""`alembic upgrade head` on an empty database builds exactly what the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.models import Base
from tests.conftest import _create_database, drop_database


def test_upgraded_database_equals_the_models() -> None:
    from service.migrate import upgrade

    name, url = _create_database()
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
    from service.migrate import upgrade

    name, url = _create_database()
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

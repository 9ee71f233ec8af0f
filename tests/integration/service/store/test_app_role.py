"""The application's database role, as `docqueue db upgrade` makes it: the app (API, chunk store,
workers registry, reconciler, retention) runs on it, and a process holding it, as an attacker
who took one over would, cannot change the schema, drop a table or make itself a superuser.

Roles are cluster-wide: each run makes its own (random names) and drops them afterwards."""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import errors
from sqlalchemy import make_url

from service.api.app import create_app
from service.errors import ConfigError
from service.settings import Settings
from service.store.chunks import ClaimOutcome, PgChunkStore, RowResult
from service.store.states import ChunkState
from tests.support.databases import PG_ADMIN, create_database, drop_database
from tests.support.helpers import auth, override, put, submit
from tests.support.stack import docqueue_bin


@dataclass
class AppDb:
    owner_url: str  # the database's owner (migrations)
    app_url: str  # the application role
    role: str


def _psycopg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _drop_role(role: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def _upgrade(owner_url: str, role: str, password: str) -> subprocess.CompletedProcess[str]:
    """The real `docqueue db upgrade`, as compose's migrate service runs it."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DOCQUEUE_DATABASE_URL": owner_url,
        "DOCQUEUE_DB_APP_ROLE": role,
        "DOCQUEUE_DB_APP_PASSWORD": password,
    }
    return subprocess.run(
        [docqueue_bin(), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def app_db() -> Iterator[AppDb]:
    """A fresh database migrated by its owner, and its application role."""
    name, owner_url = create_database()
    role = f"docqueue_app_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(24)
    try:
        done = _upgrade(owner_url, role, password)
        assert done.returncode == 0, done.stderr
        app_url = (
            make_url(owner_url)
            .set(username=role, password=password)
            .render_as_string(hide_password=False)
        )
        yield AppDb(owner_url, app_url, role)
    finally:
        from service.store.engine import get_engine

        get_engine.cache_clear()
        drop_database(name)
        _drop_role(role)


@pytest.fixture()
def as_role(app_db: AppDb) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(_psycopg(app_db.app_url), autocommit=True) as conn:
        yield conn


def test_the_role_has_no_powers_beyond_rows(app_db: AppDb) -> None:
    with psycopg.connect(PG_ADMIN) as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
            "rolbypassrls FROM pg_roles WHERE rolname = %s",
            (app_db.role,),
        ).fetchone()
    assert row == (True, False, False, False, False, False)
    with psycopg.connect(_psycopg(app_db.owner_url)) as conn:
        owned = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relowner = "
            "(SELECT oid FROM pg_roles WHERE rolname = %s)",
            (app_db.role,),
        ).fetchone()
    assert owned == (0,)


def test_the_app_runs_on_the_role(app_db: AppDb, settings: Settings) -> None:
    """Keys, submit, list, get, cancel, a collection upsert (a temporary table), a chunk claimed,
    written and closed, the workers registry, the reconciler's expiry pass and retention: all
    of it on the role's connection."""
    from service.store.engine import get_engine, session_scope
    from service.store.keys import create_key
    from service.store.registry import heartbeat, register_worker, unregister_worker
    from workers.ops.retention import purge_expired

    local = override(settings, database={"url": app_db.app_url})
    engine = get_engine(app_db.app_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT current_user").scalar() == app_db.role
    with session_scope(app_db.app_url) as session:
        key = create_key(session, f"tenant-{uuid.uuid4().hex[:8]}")

    with TestClient(create_app(local)) as client:
        job = submit(client, key, "text\na\nb\nc\n", model="role-model", chunk_size=2)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        other = submit(client, key, "text\nx\n", model="role-model").json()["id"]
        listed = client.get("/v1/jobs", headers=auth(key))
        assert listed.status_code == 200 and {j["id"] for j in listed.json()["data"]} == {
            job_id,
            other,
        }
        assert client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["counts"]["total"] == 3
        cancelled = client.post(f"/v1/jobs/{other}/cancel", headers=auth(key))
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        upsert = put(client, key, "news", "id,text\n1,one\n2,two\n", id_column="id")
        assert upsert.status_code == 200, upsert.text

        store = PgChunkStore.from_settings(local, engine)
        with engine.connect() as conn:
            chunk_id = conn.exec_driver_sql(
                "SELECT id FROM chunks WHERE job_id = %(j)s ORDER BY seq LIMIT 1",
                {"j": uuid.UUID(job_id)},
            ).scalar_one()
        claim = store.claim(chunk_id, "gpu0@role")
        assert claim.outcome == ClaimOutcome.LEASED and claim.lease is not None
        written = store.write(claim.lease, [RowResult(idx=1, output="A"), RowResult(idx=2)])
        assert written.succeeded == 2
        store.close(claim.lease, ChunkState.DONE)
        view = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        assert view["counts"]["succeeded"] == 2
        assert not store.expire().skipped

    with engine.begin() as conn:
        register_worker(conn, "gpu0@role", "role-model", "q", "cpu", 1, ready=True)
        heartbeat(conn, "gpu0@role", ready=True)
        unregister_worker(conn, "gpu0@role")
    purge_expired(engine, local)


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE stolen (x int)",
        "DROP TABLE documents",
        "ALTER TABLE jobs ADD COLUMN x int",
        "TRUNCATE jobs",
        "CREATE INDEX ON jobs (model)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "UPDATE alembic_version SET version_num = 'x'",
        "ALTER ROLE {role} SUPERUSER",
        "ALTER ROLE {role} CREATEDB",
        "CREATE ROLE intruder LOGIN",
        "CREATE DATABASE intruder",
        "GRANT pg_read_server_files TO {role}",
    ],
)
def test_the_role_cannot_change_the_schema_or_itself(
    app_db: AppDb, as_role: psycopg.Connection[Any], statement: str
) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        as_role.execute(statement.format(role=f'"{app_db.role}"'))


def test_upgrading_again_puts_the_role_back_in_line(app_db: AppDb) -> None:
    """A role someone widened by hand is narrowed again by the next `db upgrade`; tables a later
    migration creates (as the owner) are the role's to use without a new grant."""
    from service.store.migrate import ensure_app_role

    password = make_url(app_db.app_url).password
    assert password is not None
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{app_db.role}" CREATEDB CREATEROLE')
    with psycopg.connect(_psycopg(app_db.owner_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE later_migration (id bigserial PRIMARY KEY, v text)")
    ensure_app_role(app_db.owner_url, app_db.role, password)
    with psycopg.connect(PG_ADMIN) as conn:
        row = conn.execute(
            "SELECT rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = %s", (app_db.role,)
        ).fetchone()
    assert row == (False, False)
    with psycopg.connect(_psycopg(app_db.app_url), autocommit=True) as conn:
        conn.execute("INSERT INTO later_migration (v) VALUES ('ok')")
        assert conn.execute("SELECT v FROM later_migration").fetchone() == ("ok",)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("DROP TABLE later_migration")


@pytest.fixture()
def scratch_role() -> Iterator[str]:
    role = f"docqueue_scratch_{secrets.token_hex(4)}"
    try:
        yield role
    finally:
        _drop_role(role)


def test_a_superuser_is_never_taken_for_the_app_role(app_db: AppDb, scratch_role: str) -> None:
    """Naming an existing superuser (or the owner itself) is refused, not demoted: demoting it
    could lock the operator out."""
    from service.store.migrate import ensure_app_role

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{scratch_role}" SUPERUSER LOGIN')
    with pytest.raises(ConfigError, match="superuser"):
        ensure_app_role(app_db.owner_url, scratch_role, "a-long-random-password")
    owner = make_url(app_db.owner_url).username
    assert owner is not None
    with pytest.raises(ConfigError, match="migrations run as"):
        ensure_app_role(app_db.owner_url, owner, "a-long-random-password")
    with psycopg.connect(PG_ADMIN) as conn:
        row = conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (scratch_role,)
        ).fetchone()
    assert row == (True,)


def test_a_role_that_owns_tables_or_holds_another_is_refused(
    app_db: AppDb, scratch_role: str
) -> None:
    """An owner may drop and alter its tables; a member may act as the role it holds."""
    from service.store.migrate import ensure_app_role

    with psycopg.connect(_psycopg(app_db.owner_url), autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{scratch_role}" LOGIN')
        conn.execute("CREATE TABLE owned_by_scratch (x int)")
        conn.execute(f'ALTER TABLE owned_by_scratch OWNER TO "{scratch_role}"')
        with pytest.raises(ConfigError, match="owns owned_by_scratch"):
            ensure_app_role(app_db.owner_url, scratch_role, "a-long-random-password")
        conn.execute("DROP TABLE owned_by_scratch")
        conn.execute(f'GRANT pg_read_server_files TO "{scratch_role}"')
        with pytest.raises(ConfigError, match="member of pg_read_server_files"):
            ensure_app_role(app_db.owner_url, scratch_role, "a-long-random-password")


def test_db_upgrade_with_a_role_and_no_password_changes_nothing(scratch_role: str) -> None:
    name, owner_url = create_database()
    try:
        done = _upgrade(owner_url, scratch_role, "")
        assert done.returncode == 2
        assert "DOCQUEUE_DB_APP_PASSWORD" in done.stderr
        with psycopg.connect(_psycopg(owner_url)) as conn:
            tables = conn.execute("SELECT to_regclass('jobs') IS NULL").fetchone()
            role = conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname = %s", (scratch_role,)
            ).fetchone()
        assert tables == (True,) and role == (0,)
    finally:
        drop_database(name)


def test_an_owner_that_is_no_superuser_can_set_up_the_role(scratch_role: str) -> None:
    """A managed database's admin (CREATEROLE, owns the database, no superuser) runs the same
    upgrade: the attributes only a superuser may name are left out, and the role is as narrow."""
    from service.store.migrate import ensure_app_role, upgrade

    owner = f"docqueue_owner_{secrets.token_hex(4)}"
    name = f"docqueue_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{owner}" LOGIN CREATEROLE')
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    owner_url = (
        make_url(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1))
        .set(username=owner, database=name)
        .render_as_string(hide_password=False)
    )
    try:
        upgrade(owner_url)
        ensure_app_role(owner_url, scratch_role, "a-long-random-password")
        ensure_app_role(owner_url, scratch_role, "another-long-password")  # a second upgrade
        app_url = make_url(owner_url).set(username=scratch_role)
        with psycopg.connect(_psycopg(app_url.render_as_string(False)), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE stolen (x int)")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("DROP TABLE documents")
    finally:
        drop_database(name)
        _drop_role(scratch_role)
        _drop_role(owner)

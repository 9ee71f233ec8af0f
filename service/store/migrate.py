"""Alembic from code, so `docqueue db upgrade` needs no alembic.ini in the working directory; and
the application's own database role.

Migrations run as the schema's owner (in compose, the one-shot ``migrate`` service connects as
``postgres``). The API, workers and beat connect as another role, which ``ensure_app_role``
creates or brings back into line after each upgrade: it may log in, read and write rows and use
sequences, and nothing else. It is no superuser, cannot create databases or roles, owns no table
(so it can neither drop nor alter one) and may not create objects in the schema. A process that
falls to an attacker then holds the rows docqueue keeps, not the database server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from service.errors import ConfigError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
#: The schema docqueue's tables live in.
SCHEMA = "public"
#: Taken for the transaction that sets up the role: two migrate runs at once apply in turn.
_ROLE_LOCK_KEY = 0x646F6371_726F6C65  # "docq" "role"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def ensure_app_role(database_url: str, role: str, password: str) -> None:
    """Creates the LOGIN role ``role`` (or resets an existing one's password and attributes) and
    grants it exactly what the application needs in this database, connected as the owner
    ``database_url`` names.

    Granted: CONNECT and TEMPORARY (collection upserts stage rows in a temporary table) on the
    database, USAGE on the schema, SELECT/INSERT/UPDATE/DELETE on every table, USAGE/SELECT on
    every sequence, and the same by default on tables and sequences later migrations create.
    ``alembic_version`` stays read-only to it. The password goes to the server as a SCRAM
    verifier, never in clear text (a statement log shows no password).

    Refused (``ConfigError``, nothing changed): the role is the connecting user, an existing
    superuser (this would demote it), a member of another role (it could act as that role), or
    owns a table or sequence in the schema.
    """
    if not password:
        raise ConfigError(f"database role {role!r} needs a password (DOCQUEUE_DB_APP_PASSWORD)")
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            raw: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
            _apply_role(raw, role, password)
    finally:
        engine.dispose()


def _apply_role(conn: psycopg.Connection[Any], role: str, password: str) -> None:
    name = sql.Identifier(role)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ROLE_LOCK_KEY,))
    owner = _one(conn, "SELECT current_user")
    if role == owner:
        raise ConfigError(
            f"the application role {role!r} is the role migrations run as: give "
            "DOCQUEUE_DB_APP_ROLE a name of its own"
        )
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    if row is not None and row[0]:
        raise ConfigError(
            f"the application role {role!r} exists and is a superuser; docqueue will not demote "
            "it: give DOCQUEUE_DB_APP_ROLE a name of its own"
        )
    owned = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = %s) "
        "ORDER BY c.relname LIMIT 5",
        (SCHEMA, role),
    ).fetchall()
    if owned:
        raise ConfigError(
            f"the application role {role!r} owns {', '.join(r[0] for r in owned)}: an owner can "
            f"drop and alter them. Run `REASSIGN OWNED BY {role} TO {owner}` first"
        )
    member_of = conn.execute(
        "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
        "WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = %s) ORDER BY 1",
        (role,),
    ).fetchall()
    if member_of:
        raise ConfigError(
            f"the application role {role!r} is a member of {', '.join(r[0] for r in member_of)} "
            "and may act as it: revoke the membership or give DOCQUEUE_DB_APP_ROLE a new name"
        )
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    # Only a superuser may name SUPERUSER, REPLICATION or BYPASSRLS at all, even to switch them
    # off; an owner that is not one (a managed database's admin with CREATEROLE) cannot have
    # given them to the role either, and a new role starts without them.
    restricted = (
        "NOSUPERUSER NOREPLICATION NOBYPASSRLS " if _one(conn, "SHOW is_superuser") == "on" else ""
    )
    attrs = sql.SQL("LOGIN NOCREATEDB NOCREATEROLE " + restricted + "PASSWORD {}").format(
        sql.Literal(verifier.decode())
    )
    verb = "CREATE" if row is None else "ALTER"
    conn.execute(sql.SQL(verb + " ROLE {} {}").format(name, attrs))

    database = sql.Identifier(_one(conn, "SELECT current_database()"))
    schema = sql.Identifier(SCHEMA)
    for stmt in (
        "GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role}",
        # Before PostgreSQL 15 every role could create tables in public.
        "REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC",
        "REVOKE CREATE ON SCHEMA {schema} FROM {role}",
        "GRANT USAGE ON SCHEMA {schema} TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
        "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
        # Tables and sequences that later migrations (run as this owner) create.
        "ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} "
        "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
        "ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {role}",
    ):
        conn.execute(sql.SQL(stmt).format(db=database, schema=schema, role=name))
    version = _one(conn, "SELECT to_regclass('alembic_version')::text")
    if version is not None:
        conn.execute(
            sql.SQL("REVOKE INSERT, UPDATE, DELETE ON {} FROM {}").format(
                sql.Identifier(SCHEMA, "alembic_version"), name
            )
        )


def _one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]

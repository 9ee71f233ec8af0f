"""Throwaway PostgreSQL databases on the shared server, one per test run (dropped after)."""

from __future__ import annotations

import os
import secrets

import psycopg
import pytest

PG_ADMIN = os.environ.get("DOCQUEUE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
START_HINT = (
    "start them with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start; "
    'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
)


def create_database() -> tuple[str, str]:
    name = f"docqueue_test_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.exit(f"PostgreSQL is not reachable ({exc}); {START_HINT}", returncode=3)
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

"""Shared fixtures: a fresh PostgreSQL database per run (dropped afterwards) and a Redis db.

Real services only. If PostgreSQL or Redis is down the suite fails at once and says how to start
them, rather than skipping.
"""

from __future__ import annotations

import io
import logging
import logging.config
import os
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib

from service.settings import Settings, get_settings
from tests.support.databases import START_HINT, create_database, drop_database

REDIS_BASE = os.environ.get("DOCQUEUE_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("DOCQUEUE_TEST_REDIS_DB", "15"))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated, empty database for this test run."""
    from service.store.migrate import upgrade

    name, url = create_database()
    try:
        upgrade(url)
        yield url
    finally:
        from service.store.engine import get_engine

        get_engine.cache_clear()
        drop_database(name)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = f"{REDIS_BASE}/{REDIS_DB}"
    client = redis_lib.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis_lib.ConnectionError as exc:
        pytest.exit(f"Redis is not reachable ({exc}); {START_HINT}", returncode=3)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str) -> Iterator[Settings]:
    """Settings for the test run, also exported as DOCQUEUE_* for code that reads the env."""
    env = {
        "DOCQUEUE_DATABASE_URL": database_url,
        "DOCQUEUE_REDIS_URL": redis_url,
        "DOCQUEUE_METRICS_CACHE_S": "0",  # tests read /metrics right after each change
        # Tests make many chunks from a few rows (chunk_size 1 or 2); the default minimum (8)
        # has its own test.
        "DOCQUEUE_MIN_CHUNK_SIZE": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    yield get_settings()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def api_key(settings: Settings) -> str:
    """A key for a fresh tenant, so tests never see each other's jobs."""
    from service.store.engine import session_scope
    from service.store.keys import create_key

    with session_scope(settings.database.url) as session:
        return create_key(session, f"tenant-{uuid.uuid4().hex[:8]}")


@pytest.fixture()
def model_name() -> str:
    """A model name unique to the test, so its queue in Redis is the test's own."""
    return f"test-model-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def json_log_lines() -> Iterator[io.StringIO]:
    """docqueue's JSON logging (the real dictConfig) into a buffer; the root logger restored."""
    from service import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buf = io.StringIO()
    config = logs.dict_config("INFO", "json")
    config["handlers"]["stderr"]["stream"] = buf
    logging.config.dictConfig(config)
    yield buf
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])

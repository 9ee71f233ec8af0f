"""Engine and session factory, one per process and database URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from service.settings import get_settings


@lru_cache(maxsize=8)
def get_engine(
    url: str | None = None,
    lock_timeout_s: float | None = None,
    idle_in_transaction_s: float | None = None,
) -> Engine:
    """The process's engine for ``url``. Every connection waits at most ``lock_timeout_s``
    (default ``settings.database.lock_timeout_s``) for a row or table lock, then fails with
    a driver ``OperationalError`` (the store's ``StoreUnavailableError``, the API's 503): a
    lock held long by one transaction never stalls every other one behind it. Statement
    parameters (document texts, outputs, keys) never appear in SQLAlchemy's errors or logs.

    ``idle_in_transaction_s`` (workers: a quarter of the lease) ends a session that sits in a
    transaction without sending anything for that long: a worker frozen (SIGSTOP, a partition)
    between two statements would otherwise keep its job row locked, and every other worker's
    claims and writes on that job, and the reconciler, would wait on it."""
    settings = get_settings()
    url = url or settings.database.url
    if lock_timeout_s is None:
        lock_timeout_s = settings.database.lock_timeout_s
    options = f"-c lock_timeout={max(1, round(lock_timeout_s * 1000))}"
    connect_args: dict[str, Any] = {}
    if idle_in_transaction_s is not None:
        idle_ms = max(1000, round(idle_in_transaction_s * 1000))
        options += f" -c idle_in_transaction_session_timeout={idle_ms}"
        # The worker's side of a partition: data unacknowledged for as long (and keepalives
        # unanswered) fails the connection, so the worker reconnects once the link heals
        # instead of waiting out TCP's retransmission backoff (minutes).
        connect_args |= {
            "tcp_user_timeout": idle_ms,
            "keepalives": 1,
            "keepalives_idle": max(1, idle_ms // 1000),
            "keepalives_interval": max(1, idle_ms // 3000),
            "keepalives_count": 3,
            "connect_timeout": max(2, idle_ms // 1000),
        }
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        hide_parameters=True,
        connect_args={"options": options, **connect_args},
    )


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any exception."""
    factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session

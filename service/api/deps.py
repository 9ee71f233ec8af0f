"""Dependencies every route shares: the app's settings and store, a transaction, the caller.

``create_app`` puts the settings, the database engine and the chunk store on ``app.state``;
routers are module-level and reach them through these dependencies, so no route is a closure.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.errors import ForbiddenError
from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.keys import Principal, authenticate

# These three are async although they do no I/O: FastAPI runs a sync dependency in its thread
# pool, and three thread hops per request were a measurable part of a status poll.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_db(request: Request) -> Engine:
    db: Engine = request.app.state.db
    return db


async def get_store(request: Request) -> PgChunkStore:
    store: PgChunkStore = request.app.state.store
    return store


@contextmanager
def tx(db: Engine) -> Iterator[Session]:
    """One transaction, committed when the block ends: before the response is built, so the
    client's next request sees what this one wrote."""
    with Session(db, expire_on_commit=False) as session, session.begin():
        yield session


@contextmanager
def read(db: Engine) -> Iterator[Session]:
    """Reads without a transaction (autocommit): no BEGIN and COMMIT round trips, for routes
    that read one consistent row or accept rows read a moment apart (status polls)."""
    with Session(_autocommit(db)) as session:
        yield session


@lru_cache(maxsize=16)
def _autocommit(db: Engine) -> Engine:
    return db.execution_options(isolation_level="AUTOCOMMIT")


#: Where ``service.api.app.Boundary`` leaves the caller's tenant in ``scope["state"]``.
PRINCIPAL = "principal"


async def principal(
    request: Request,
    db: Annotated[Engine, Depends(get_db)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    """The caller's tenant, from ``Authorization: Bearer <key>``; 401 otherwise. The app's
    ``Boundary`` checked the key before the body was read and left the tenant in the request's
    state; without it (an app built without ``Boundary``) the key is checked here."""
    who = getattr(request.state, PRINCIPAL, None)
    if isinstance(who, Principal):
        return who
    return await run_in_threadpool(_authenticate, db, authorization)


def _authenticate(db: Engine, authorization: str | None) -> Principal:
    with read(db) as session:
        return authenticate(session, authorization)


SettingsDep = Annotated[Settings, Depends(get_settings)]
Db = Annotated[Engine, Depends(get_db)]
Store = Annotated[PgChunkStore, Depends(get_store)]
Auth = Annotated[Principal, Depends(principal)]


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    """The caller, if its key is an admin key (``docqueue keys create --admin``); 403 else."""
    if not who.admin:
        raise ForbiddenError("this route needs an admin key (docqueue keys create --admin)")
    return who


Admin = Annotated[Principal, Depends(admin)]

"""Dependencies every route shares: the app's settings and store, a transaction, the caller.

``create_app`` puts the settings, the database engine and the chunk store on ``app.state``;
routers are module-level and reach them through these dependencies, so no route is a closure.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.keys import Principal, authenticate


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Engine:
    db: Engine = request.app.state.db
    return db


def get_store(request: Request) -> PgChunkStore:
    store: PgChunkStore = request.app.state.store
    return store


@contextmanager
def tx(db: Engine) -> Iterator[Session]:
    """One transaction, committed when the block ends: before the response is built, so the
    client's next request sees what this one wrote."""
    with Session(db, expire_on_commit=False) as session, session.begin():
        yield session


#: Where ``service.api.app.Boundary`` leaves the caller's tenant in ``scope["state"]``.
PRINCIPAL = "principal"


def principal(
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
    with Session(db) as session:
        return authenticate(session, authorization)


SettingsDep = Annotated[Settings, Depends(get_settings)]
Db = Annotated[Engine, Depends(get_db)]
Store = Annotated[PgChunkStore, Depends(get_store)]
Auth = Annotated[Principal, Depends(principal)]

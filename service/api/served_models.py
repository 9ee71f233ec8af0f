"""``/v1/models``: the models (LLMs) live workers serve. A tenant key sees their names and
readiness; an admin key also sees the workers (hosts, devices) and queues."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

from fastapi import APIRouter

from service.api.deps import Auth, Db, SettingsDep, tx
from service.api.schemas import ERRORS, ServedModelList
from service.jobs import queries

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)


@router.get("", response_model=ServedModelList)
def list_models(who: Auth, settings: SettingsDep, db: Db) -> ServedModelList:
    """Models served by live workers (recent heartbeat); for an admin key, with those
    workers."""
    with tx(db) as session:
        return ServedModelList.of(queries.live_workers(session, settings), detail=who.admin)

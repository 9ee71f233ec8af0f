"""Liveness and readiness probes (no API key: they say nothing about any tenant)."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import Db, SettingsDep
from service.api.schemas import Health, Readiness

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up (no dependency checked)."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(settings: SettingsDep, db: Db) -> JSONResponse:
    """PostgreSQL and Redis are both reachable; 503 names the one that is not."""
    checks: dict[str, str] = {}
    try:
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"error: {type(exc).__name__}"
    try:
        client = redis.Redis.from_url(settings.broker.url, socket_connect_timeout=2)
        client.ping()
        client.close()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    body = Readiness(status="ok" if ok else "unavailable", **checks)
    return JSONResponse(status_code=200 if ok else 503, content=body.model_dump())

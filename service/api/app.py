"""The HTTP API (FastAPI): wiring only. Routes live in one module-level router per resource
(``jobs``, ``served_models``, ``collections``, ``schedules``, ``health``); everything under
``/v1`` needs ``Authorization: Bearer <key>``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from service.api import collections, health, jobs, metrics, schedules, served_models
from service.errors import DocqueueError, PayloadTooLargeError, StoreUnavailableError
from service.settings import Settings, get_settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="docqueue",
        version="0.1.0",
        description="Bulk LLM work over documents as asynchronous jobs.",
    )
    db = get_engine(settings.database.url)
    app.state.settings = settings
    app.state.db = db
    app.state.store = PgChunkStore.from_settings(settings, db)
    app.add_exception_handler(DocqueueError, _docqueue_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _db_down)
    app.add_exception_handler(InterfaceError, _db_down)

    @app.middleware("http")
    async def _upload_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.jobs.max_upload_bytes:
            exc = PayloadTooLargeError(
                f"upload of {int(length)} bytes exceeds the limit of "
                f"{settings.jobs.max_upload_bytes} bytes"
            )
            return _error(exc.status_code, exc.to_dict())
        return await call_next(request)

    for module in (health, jobs, served_models, collections, schedules):
        app.include_router(module.router)
    metrics.install(app, settings, db)  # GET /metrics (Prometheus)
    return app


def _error(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": body})


async def _docqueue_error(_: Request, exc: DocqueueError) -> JSONResponse:
    resp = _error(exc.status_code, exc.to_dict())
    resp.headers.update(exc.headers)
    if exc.status_code == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every field at fault, and the first one as ``field``."""
    errors = exc.errors()
    problems = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        problems.append(f"{where}: {err.get('msg')}")
    field = str(errors[0].get("loc", ("", ""))[-1]) if errors else None
    return _error(
        422, {"code": "invalid_parameter", "message": "; ".join(problems), "field": field}
    )


async def _db_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    err = StoreUnavailableError("database unavailable; retry later")
    return _error(err.status_code, err.to_dict())

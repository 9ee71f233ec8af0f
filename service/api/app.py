"""The HTTP API (FastAPI): wiring only. Routes live in one module-level router per resource
(``jobs``, ``served_models``, ``collections``, ``schedules``, ``health``); everything under
``/v1`` needs ``Authorization: Bearer <key>``, checked (by ``Boundary``) before any body is read,
and every body is counted against its limit as it arrives."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import (
    admin,
    batches,
    collections,
    files,
    health,
    jobs,
    metrics,
    openai_errors,
    schedules,
    served_models,
    usage,
)
from service.api.deps import PRINCIPAL, read
from service.errors import (
    AuthError,
    DocqueueError,
    PayloadTooLargeError,
    StoreUnavailableError,
)
from service.jobs import pool
from service.settings import Settings, get_settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from service.store.keys import Principal, authenticate

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
    pool.shared(settings)  # the submit processes start now, not under the first uploads
    app.add_exception_handler(DocqueueError, _docqueue_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _db_down)
    app.add_exception_handler(InterfaceError, _db_down)
    app.add_middleware(Boundary, settings=settings, db=db)

    for module in (
        health,
        jobs,
        served_models,
        collections,
        schedules,
        usage,
        admin,
        files,
        batches,
    ):
        app.include_router(module.router)
    metrics.install(app, settings, db)  # GET /metrics (Prometheus)
    return app


#: Routes that take a multipart upload (``settings.jobs.max_upload_bytes``); every other body
#: is held whole in memory, so it gets ``settings.api.max_json_bytes``.
_UPLOAD_ROUTES = (
    ("POST", re.compile(r"/v1/jobs/?")),
    ("PUT", re.compile(r"/v1/collections/[^/]+/documents/?")),
    ("POST", re.compile(r"/v1/files/?")),
)


class Boundary:
    """What a request must pass before the app reads a byte of its body (pure ASGI: FastAPI
    parses a body before any route dependency runs).

    - ``/v1/...``: the API key is checked first; without a valid one the answer is 401 and
      nothing of the body is read. The caller's tenant goes to ``scope["state"]`` for the
      ``principal`` dependency (one query per request).
    - Every body is counted as it arrives, chunked or not, whatever ``Content-Length`` says:
      past the limit the app reads nothing more (the multipart parser spools nothing more) and
      the client gets a 413 naming the limit. A declared length over the limit is a 413 at once.

    Its own answers close the connection: the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, settings: Settings, db: Engine) -> None:
        self.app = app
        self.settings = settings  # read per request: tests change limits on the live object
        self.db = db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            try:
                who = await run_in_threadpool(self._authenticate, headers.get("authorization"))
            except AuthError as exc:
                await _refuse(scope, send, exc)
                return
            except (OperationalError, InterfaceError) as exc:
                log.warning("database unavailable: %s", exc)
                await _refuse(
                    scope, send, StoreUnavailableError("database unavailable; retry later")
                )
                return
            scope.setdefault("state", {})[PRINCIPAL] = who
        limit, setting = self._limit(scope["method"], path, headers.get("content-type", ""))
        declared = headers.get("content-length")
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and (len(declared) > 18 or int(declared) > limit)  # int() of 5,000 digits raises
        ):
            too_large = PayloadTooLargeError(
                f"request body of {declared[:20]} bytes exceeds the limit of {limit} bytes "
                f"({setting})",
                limit=limit,
            )
            await _refuse(scope, send, too_large)
            return

        received = 0
        started = False  # the app's response began
        answered = False  # this middleware answered (413); the app's messages are dropped

        async def counted() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            if received <= limit:
                return message
            answered = True
            if not started:
                await _refuse(
                    scope,
                    send,
                    PayloadTooLargeError(
                        f"request body exceeds the limit of {limit} bytes ({setting}); "
                        f"stopped reading after {received} bytes",
                        limit=limit,
                    ),
                )
            return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped

        async def guarded(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = True
            await send(message)

        await self.app(scope, counted, guarded)

    def _authenticate(self, authorization: str | None) -> Principal:
        with read(self.db) as session:  # one round trip: no BEGIN/COMMIT around the lookup
            return authenticate(session, authorization)

    def _limit(self, method: str, path: str, content_type: str) -> tuple[int, str]:
        multipart = content_type.lower().startswith("multipart/form-data")
        if multipart and any(m == method and r.fullmatch(path) for m, r in _UPLOAD_ROUTES):
            return self.settings.jobs.max_upload_bytes, "DOCQUEUE_MAX_UPLOAD_BYTES"
        return self.settings.api.max_json_bytes, "DOCQUEUE_MAX_JSON_BYTES"


async def _refuse(scope: Scope, send: Send, exc: DocqueueError) -> None:
    """Answers ``exc`` as the error handlers would, and closes the connection (the request's
    body, if any, is left unread)."""
    resp = _error(exc.status_code, exc.to_dict(), scope["path"], exc.headers)
    if exc.status_code == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    resp.headers["Connection"] = "close"

    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    await resp(scope, nothing, send)


def _error(
    status: int, body: dict[str, Any], path: str = "", headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """docqueue's error shape, or OpenAI's on the routes the ``openai`` SDK calls."""
    if openai_errors.applies(path):
        return JSONResponse(
            status_code=status,
            content={"error": openai_errors.body(status, body)},
            headers=openai_errors.headers(status, headers),
        )
    return JSONResponse(status_code=status, content={"error": body}, headers=dict(headers or {}))


async def _docqueue_error(request: Request, exc: DocqueueError) -> JSONResponse:
    resp = _error(exc.status_code, exc.to_dict(), request.url.path, exc.headers)
    if exc.status_code == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method, a body it cannot parse) in the
    same shape as every other error."""
    codes = {400: "bad_input", 404: "not_found", 405: "method_not_allowed"}
    body = {"code": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)}
    return _error(exc.status_code, body, request.url.path, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming every field at fault, and the first one as ``field`` (OpenAI's routes: 400,
    the field as ``param``)."""
    errors = exc.errors()
    problems = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        problems.append(f"{where}: {err.get('msg')}")
    field = str(errors[0].get("loc", ("", ""))[-1]) if errors else None
    path = request.url.path
    status = 400 if openai_errors.applies(path) else 422
    body = {"code": "invalid_parameter", "message": "; ".join(problems), "field": field}
    return _error(status, body, path)


async def _db_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    err = StoreUnavailableError("database unavailable; retry later")
    return _error(err.status_code, err.to_dict(), request.url.path)

"""The HTTP API (FastAPI). Everything under /v1 needs ``Authorization: Bearer <key>``."""
# No `from __future__ import annotations` here: FastAPI resolves the handlers' Annotated
# dependencies (defined inside create_app) at definition time.

import base64
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import redis
from fastapi import (
    BackgroundTasks,
    Depends,
    FastAPI,
    File,
    Form,
    Header,
    Query,
    Request,
    UploadFile,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.api import collections as collections_api
from service.api import metrics
from service.contract import parse_priority
from service.errors import (
    DocqueueError,
    InvalidParameterError,
    PayloadTooLargeError,
    ResultsExpiredError,
)
from service.jobs import export, queries, submit, validate
from service.settings import Settings, get_settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from service.store.keys import Principal, authenticate
from service.store.states import JobStatus

log = logging.getLogger(__name__)


def _error(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": body})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = get_engine(settings.database_url)
    store = PgChunkStore(engine, lease_s=settings.lease_s, max_attempts=settings.max_attempts)
    app = FastAPI(
        title="docqueue",
        version="0.1.0",
        description="Bulk LLM work over documents as asynchronous jobs.",
    )

    @contextmanager
    def tx() -> Iterator[Session]:
        """One transaction per handler, committed before the response is built."""
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    def principal(
        authorization: Annotated[str | None, Header()] = None,
    ) -> Principal:
        with Session(engine) as session:
            return authenticate(session, authorization)

    Auth = Annotated[Principal, Depends(principal)]

    @app.exception_handler(DocqueueError)
    async def _docqueue_error(_: Request, exc: DocqueueError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        resp = _error(exc.status_code, exc.to_dict())
        if headers:
            resp.headers.update(headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            problems.append(f"{where}: {err.get('msg')}")
        first = exc.errors()[0] if exc.errors() else {}
        field = str(first.get("loc", ("", ""))[-1]) if first else None
        return _error(
            422, {"code": "invalid_parameter", "message": "; ".join(problems), "field": field}
        )

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return _error(503, {"code": "unavailable", "message": "database unavailable; retry later"})

    @app.middleware("http")
    async def _upload_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes:
            exc = PayloadTooLargeError(
                f"upload of {int(length)} bytes exceeds the limit of "
                f"{settings.max_upload_bytes} bytes"
            )
            return _error(exc.status_code, exc.to_dict())
        return await call_next(request)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up (no dependency checked)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Postgres and Redis are both reachable."""
        checks: dict[str, str] = {}
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {type(exc).__name__}"
        try:
            client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
            client.ping()
            client.close()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            status_code=200 if ok else 503,
            content={"status": "ok" if ok else "unavailable", **checks},
        )

    @app.post("/v1/jobs", status_code=202, tags=["jobs"])
    def submit_job(
        who: Auth,
        background: BackgroundTasks,
        file: Annotated[UploadFile, File(description="CSV of documents, UTF-8, with a header")],
        task: Annotated[str, Form(description="generate | summarize | classify")],
        model: Annotated[str | None, Form()] = None,
        text_column: Annotated[str, Form()] = "text",
        id_column: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form(description="template with {text} and columns")] = None,
        labels: Annotated[str | None, Form(description="a,b,c or a JSON list")] = None,
        max_tokens: Annotated[int | None, Form()] = None,
        temperature: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        chunk_size: Annotated[int | None, Form()] = None,
        priority: Annotated[str | None, Form(description="interactive (default) | bulk")] = None,
        delimiter: Annotated[str | None, Form()] = None,
        summary_words: Annotated[int | None, Form(description="summarize: length")] = None,
        language: Annotated[str | None, Form(description="summarize: output language")] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        """Submit a CSV of documents; answers 202 with the queued job."""
        try:
            prio = parse_priority(priority)
        except ValueError as exc:
            raise InvalidParameterError(str(exc), field="priority") from None
        if idempotency_key and idempotency_key.startswith(validate.RESERVED_KEY_PREFIX):
            # Scheduled runs own these keys; a client's job must never stand in for one.
            raise InvalidParameterError(
                f"Idempotency-Key must not start with {validate.RESERVED_KEY_PREFIX!r} "
                "(reserved for scheduled runs)",
                field="Idempotency-Key",
            )
        req = validate.JobRequest(
            task=task.strip().lower(),
            model=(model or settings.default_model).strip(),
            text_column=text_column,
            id_column=id_column or None,
            prompt=prompt or None,
            labels=validate.parse_labels(labels),
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            chunk_size=chunk_size,
            priority=prio,
            delimiter=delimiter or None,
            idempotency_key=idempotency_key or None,
            source_name=file.filename,
            extra_params={
                k: v
                for k, v in (("summary_words", summary_words), ("language", language))
                if v is not None
            },
        )
        job, created = submit.create_job(who.tenant_id, req, file.file, settings)
        if created:
            # Messages go out after the response: the client does not wait on Redis, and a
            # crash in between leaves enqueued_at NULL for the reconciler to send.
            background.add_task(submit.enqueue_job, job.id, settings)
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        with tx() as session:
            served = {w.model for w in queries.live_workers(session, settings)}
        view = queries.with_serving(queries.job_view(job), served)
        return JSONResponse(status_code=202, content=view, headers=headers)

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(
        who: Auth,
        status: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        page_token: Annotated[str | None, Query()] = None,
    ) -> dict[str, Any]:
        """The tenant's jobs, newest first; pass ``next_page_token`` back for the next page."""
        if status is not None and status not in list(JobStatus):
            raise InvalidParameterError(
                f"unknown status {status!r}; expected one of: {', '.join(JobStatus)}",
                field="status",
            )
        before = _decode_token(page_token) if page_token else None
        with tx() as session:
            rows = queries.list_jobs(
                session, who.tenant_id, status=status, limit=limit, before=before
            )
            served = {w.model for w in queries.live_workers(session, settings)}
        token = _encode_token(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
        return {
            "object": "list",
            "data": [queries.with_serving(queries.job_view(j), served) for j in rows],
            "next_page_token": token,
        }

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, who: Auth) -> dict[str, Any]:
        """Status, counts, percent, tokens and, while running, documents/s and ETA."""
        with tx() as session:
            job = queries.get_job(session, who.tenant_id, job_id)
            served = {w.model for w in queries.live_workers(session, settings)}
        return queries.with_serving(queries.job_view(job), served)

    @app.get("/v1/models", tags=["models"])
    def list_models(who: Auth) -> dict[str, Any]:
        """Models served by live workers (recent heartbeat), with those workers."""
        with tx() as session:
            workers = queries.live_workers(session, settings)
        models: dict[str, dict[str, Any]] = {}
        for w in workers:
            entry = models.setdefault(w.model, {"id": w.model, "queue": w.queue, "workers": []})
            entry["workers"].append(
                {
                    "name": w.name,
                    "device": w.device,
                    "ready": w.engine_ready,
                    "started_at": w.started_at.isoformat(),
                    "last_heartbeat_at": w.last_heartbeat_at.isoformat(),
                }
            )
        return {"object": "list", "data": list(models.values())}

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel_job(job_id: str, who: Auth) -> dict[str, Any]:
        """Queued chunks never start; results so far are kept."""
        with tx() as session:
            job = queries.get_job(session, who.tenant_id, job_id)
        store.cancel(job.id)
        with tx() as session:
            job = queries.get_job(session, who.tenant_id, job.id)
        return queries.job_view(job)

    @app.get("/v1/jobs/{job_id}/results", tags=["jobs"])
    def job_results(
        job_id: str,
        who: Auth,
        format: Annotated[export.Format, Query()] = "csv",
    ) -> StreamingResponse:
        """Results in input order, streamed; while the job runs, the rows done so far."""
        with tx() as session:
            job = queries.get_job(session, who.tenant_id, job_id)
        if job.results_expired_at is not None:  # purged by retention: 410, the job stays
            raise ResultsExpiredError.for_job(
                job.id, job.results_expired_at, settings.retention_days
            )
        return StreamingResponse(
            export.stream_results(engine, job.id, format),
            media_type=export.MEDIA_TYPES[format],
            headers={
                "Content-Disposition": f'attachment; filename="{job.id}.{format}"',
                "X-Job-Status": job.status,
            },
        )

    metrics.install(app, settings, engine)  # GET /metrics (Prometheus)
    app.include_router(collections_api.router(settings, engine, principal))  # + schedules
    return app


def _encode_token(created: datetime, job_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created.isoformat()}|{job_id}".encode()).decode()


def _decode_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, _, jid = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(jid)
    except Exception:
        raise InvalidParameterError("invalid page_token", field="page_token") from None

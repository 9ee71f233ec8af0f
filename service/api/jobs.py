"""``/v1/jobs``: submit a file of documents, follow the job, download results, cancel."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

import base64
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Form, Header, Query, Response, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, Field, field_validator
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from service.api import schemas
from service.api.deps import Auth, Db, SettingsDep, Store, read, tx
from service.api.downloads import ExportResponse, Slots
from service.api.quota_gate import QuotaGatedRoute, quota_gated
from service.api.schemas import ERRORS, JobList, JobOut
from service.contract import parse_priority
from service.errors import (
    ForbiddenError,
    InvalidParameterError,
    JobDeletedError,
    ResultsExpiredError,
)
from service.jobs import export, lifecycle, pool, queries, submit, validate
from service.settings import Settings
from service.store import quotas
from service.store.states import JobStatus
from service.store.tables import Job

# QuotaGatedRoute: the submit route (marked quota_gated) checks quotas before its body is read.
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS, route_class=QuotaGatedRoute)


class JobForm(BaseModel):
    """The form fields of ``POST /v1/jobs`` next to the file. Ranges and hostile values (too
    long, control characters) are refused here, a 422 naming the field; checks that span
    fields or need the settings are in ``service.jobs.validate``."""

    file: UploadFile = Field(
        description="documents: CSV (UTF-8, with a header), JSON Lines or Parquet"
    )
    task: str = Field(max_length=32, description="generate | summarize | classify")
    model: str | None = Field(
        default=None,
        max_length=schemas.MAX_MODEL_CHARS,
        description="a hub id or a local path a worker serves; default: the server's",
    )
    text_column: Annotated[str, AfterValidator(schemas.no_control)] = Field(
        default="text", max_length=schemas.MAX_COLUMN_CHARS
    )
    id_column: Annotated[str, AfterValidator(schemas.no_control)] | None = Field(
        default=None, max_length=schemas.MAX_COLUMN_CHARS
    )
    prompt: Annotated[str, AfterValidator(schemas.no_nul)] | None = Field(
        default=None, description="template with {text} and columns"
    )
    labels: str | None = Field(
        default=None, max_length=64 * 1024, description="a,b,c or a JSON list"
    )
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = Field(default=None, ge=0, le=schemas.MAX_SEED)
    chunk_size: int | None = None
    priority: str | None = Field(
        default=None, max_length=32, description="interactive (default) | bulk"
    )
    delimiter: str | None = Field(
        default=None, max_length=8, description="',', ';' or tab; default: sniffed"
    )
    format: str | None = Field(
        default=None,
        max_length=16,
        description="csv | jsonl | parquet; default: from the file name, else the content",
    )
    summary_words: int | None = Field(default=None, description="summarize: length")
    language: Annotated[str, AfterValidator(schemas.no_control)] | None = Field(
        default=None, max_length=schemas.MAX_LANGUAGE_CHARS, description="summarize: language"
    )

    @field_validator("file")
    @classmethod
    def _file_name(cls, file: UploadFile) -> UploadFile:
        file.filename = schemas.upload_name(file.filename)
        return file

    @field_validator("model")
    @classmethod
    def _model(cls, model: str | None) -> str | None:
        return schemas.model_name(model) if model else None  # "" or none: the default

    @field_validator("labels")
    @classmethod
    def _labels(cls, raw: str | None) -> str | None:
        try:
            labels = validate.parse_labels(raw)
        except InvalidParameterError as exc:
            raise ValueError(exc.message) from None
        schemas.check_labels(labels or [])
        return raw


@router.post("", status_code=202, response_model=JobOut)
@quota_gated
async def submit_job(
    who: Auth,
    settings: SettingsDep,
    db: Db,
    response: Response,
    background: BackgroundTasks,
    form: Annotated[JobForm, Form(media_type="multipart/form-data")],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobOut:
    """Submit a CSV of documents; answers 202 with the queued job. 429 with ``Retry-After``
    past one of the tenant's quotas (checked before the upload is read, and again with its
    rows and bytes)."""
    idempotency_key = schemas.check_idempotency_key(idempotency_key)
    try:
        priority = parse_priority(form.priority)
    except ValueError as exc:
        raise InvalidParameterError(str(exc), field="priority") from None
    if idempotency_key and idempotency_key.startswith(validate.RESERVED_KEY_PREFIX):
        # Scheduled runs own these keys; a client's job must never stand in for one.
        raise InvalidParameterError(
            f"Idempotency-Key must not start with {validate.RESERVED_KEY_PREFIX!r} "
            "(reserved for scheduled runs)",
            field="Idempotency-Key",
        )
    extra = {"summary_words": form.summary_words, "language": form.language}
    req = validate.JobRequest(
        task=form.task.strip().lower(),
        model=(form.model or settings.jobs.default_model).strip(),
        text_column=form.text_column,
        id_column=form.id_column or None,
        prompt=form.prompt or None,
        labels=validate.parse_labels(form.labels),
        max_tokens=form.max_tokens,
        temperature=form.temperature,
        seed=form.seed,
        chunk_size=form.chunk_size,
        priority=priority,
        delimiter=form.delimiter or None,
        format=form.format or None,
        idempotency_key=idempotency_key or None,
        source_name=form.file.filename,
        extra_params={k: v for k, v in extra.items() if v is not None},
    )
    if settings.jobs.reject_unserved_models:
        await run_in_threadpool(_refuse_unserved, db, req.model, settings)
    # What the model's workers say it can do: the submit process checks the job against it
    # (validate.check_capabilities) before it reads a row.
    req.capabilities = await run_in_threadpool(_capabilities, db, req.model, settings)
    # Async, and parsed in a pool process: an upload neither holds the GIL here nor one of the
    # threads that status polls are served from while it waits for its turn to be parsed.
    submissions = pool.shared(settings)
    job_id, created = await submissions.create_job_async(
        who.tenant_id, req, form.file.file, settings
    )
    job, served = await run_in_threadpool(_job_and_served, db, who.tenant_id, job_id, settings)
    if created:
        # The dispatcher runs after the response: the client does not wait on Redis, and a
        # crash in between leaves the chunks waiting for the next pass (service/dispatcher.py).
        if not submissions.enqueue_later(job.id, settings):
            background.add_task(submit.enqueue_job, job.id, settings)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job, served)


def _refuse_unserved(db: Engine, model: str, settings: Settings) -> None:
    """DOCQUEUE_REJECT_UNSERVED_MODELS: a model no live worker serves is a 422 naming the
    served ones (by default such a job is accepted with a warning: workers may start later)."""
    with read(db) as session:
        served = sorted({w.model for w in queries.live_workers(session, settings)})
    if model not in served:
        listing = ", ".join(repr(m) for m in served) if served else "none"
        raise InvalidParameterError(
            f"no live worker serves model {model!r}; served models: {listing} "
            "(this server refuses unserved models: DOCQUEUE_REJECT_UNSERVED_MODELS)",
            field="model",
        )


def _capabilities(db: Engine, model: str, settings: Settings) -> validate.ModelCapabilities | None:
    with read(db) as session:
        return queries.model_capabilities(session, settings, model)


def _job_and_served(
    db: Engine, tenant_id: uuid.UUID, job_id: uuid.UUID, settings: Settings
) -> tuple[Job, frozenset[str]]:
    with tx(db) as session:
        job = queries.get_job(session, tenant_id, job_id)
        served = queries.served_models(session, settings)
    return job, served


@router.get("", response_model=JobList)
def list_jobs(
    who: Auth,
    settings: SettingsDep,
    db: Db,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    page_token: Annotated[str | None, Query(max_length=200)] = None,
    tenant: Annotated[
        str | None, Query(max_length=200, description="admin keys: only this tenant's jobs")
    ] = None,
) -> JobList:
    """The tenant's jobs, newest first; pass ``next_page_token`` back for the next page. An
    admin key sees every tenant's (or ``tenant=``'s), each naming its tenant."""
    before = _decode_token(page_token) if page_token else None
    if tenant is not None and not who.admin:
        raise ForbiddenError("tenant= needs an admin key")
    with tx(db) as session:
        scope: uuid.UUID | None = who.tenant_id
        if who.admin:
            scope = quotas.get_tenant(session, tenant).id if tenant is not None else None
        rows = queries.list_jobs(session, scope, status=status, limit=limit, before=before)
        served = queries.served_models(session, settings)
        names = queries.tenant_names(session, rows) if who.admin else {}
    token = _encode_token(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
    return JobList(
        data=[JobOut.of(j, served, names.get(j.tenant_id)) for j in rows], next_page_token=token
    )


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, who: Auth, settings: SettingsDep, db: Db) -> JobOut:
    """Status, counts, percent, tokens and, while running, documents/s and ETA. An admin key
    sees any tenant's job, naming its tenant."""
    with read(db) as session:  # one row: no transaction needed, and none is paid for
        job = queries.get_job(session, None if who.admin else who.tenant_id, job_id)
        served = queries.served_models(session, settings)
        name = queries.tenant_names(session, [job])[job.tenant_id] if who.admin else None
    return JobOut.of(job, served, name)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, who: Auth, db: Db, store: Store) -> JobOut:
    """Queued chunks never start; results so far are kept."""
    with tx(db) as session:
        job = queries.get_job(session, who.tenant_id, job_id)
    store.cancel(job.id)
    with tx(db) as session:
        return JobOut.of(queries.get_job(session, who.tenant_id, job.id))


@router.get(
    "/{job_id}/results",
    response_class=StreamingResponse,
    responses={200: {"content": {t: {} for t in export.MEDIA_TYPES.values()}}},
)
def job_results(
    job_id: str,
    who: Auth,
    settings: SettingsDep,
    db: Db,
    slots: Slots,
    format: Annotated[export.Format, Query()] = "csv",
) -> StreamingResponse:
    """Results in input order, streamed; while the job runs, the rows done so far. At most
    ``max_concurrent_exports`` at once per API process (503 with ``Retry-After`` past that); a
    client that takes nothing for ``export_send_timeout_s`` is cut off."""
    with tx(db) as session:
        job = queries.get_job(session, who.tenant_id, job_id)
    if job.deleted_at is not None:  # deleted: 410, the tombstone stays
        raise JobDeletedError.for_job(job.id, job.deleted_at)
    if job.results_expired_at is not None:  # purged by retention: 410, the job stays
        raise ResultsExpiredError.for_job(job.id, job.results_expired_at, settings.retention.days)
    slots.acquire(settings.api.max_concurrent_exports)  # released when the response ends
    return ExportResponse(
        export.stream_results(db, job.id, format),
        slots=slots,
        send_timeout_s=settings.api.export_send_timeout_s,
        what=f"job {job.id}",
        media_type=export.MEDIA_TYPES[format],
        headers={
            "Content-Disposition": f'attachment; filename="{job.id}.{format}"',
            "X-Job-Status": job.status,
        },
    )


def _encode_token(created: datetime, job_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created.isoformat()}|{job_id}".encode()).decode()


def _decode_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, _, jid = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(jid)
    except Exception:
        raise InvalidParameterError("invalid page_token", field="page_token") from None


# --- a job's life cycle: delete, retry ---------------------------------------------------------


@router.delete("/{job_id}", response_model=schemas.JobDeleted)
def delete_job(
    job_id: str,
    who: Auth,
    settings: SettingsDep,
    db: Db,
    store: Store,
    background: BackgroundTasks,
) -> schemas.JobDeleted:
    """Deletes a job's documents and results, cancelling it first if it runs; the job stays as
    a tombstone with its counts (``deleted_at``). Deleting it again answers the same. A job of
    more than ``retention_batch_rows`` documents is purged in batches after the response
    (``purge: pending``); its rows are unreachable from the moment it answers."""
    with read(db) as session:
        job = queries.get_job(session, who.tenant_id, job_id)
    erased = store.erase(job.id, purge_rows=settings.retention.batch_rows)
    if not erased.purged:
        background.add_task(lifecycle.purge_deleted, db, job.id, settings)
    with read(db) as session:
        job = queries.get_job(session, who.tenant_id, job.id)
    return schemas.JobDeleted(
        id=job.id, purge="done" if erased.purged else "pending", job=JobOut.of(job)
    )


@router.post("/{job_id}/retry", status_code=202, response_model=JobOut)
def retry_job(
    job_id: str,
    who: Auth,
    settings: SettingsDep,
    db: Db,
    response: Response,
    background: BackgroundTasks,
    body: schemas.RetryIn | None = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobOut:
    """Runs a finished job's failed rows again, as a new job (``retry_of`` the original) with
    the same task, model and parameters; answers 202 with it. Its rows keep the original's ids
    (``external_id``, else the original row number), so results match row for row. 409 for a
    job still running or with no failed row; 410 for a deleted or expired one."""
    idempotency_key = schemas.check_idempotency_key(idempotency_key)
    if idempotency_key and idempotency_key.startswith(validate.RESERVED_KEY_PREFIX):
        raise InvalidParameterError(
            f"Idempotency-Key must not start with {validate.RESERVED_KEY_PREFIX!r} "
            "(reserved for scheduled runs)",
            field="Idempotency-Key",
        )
    with read(db) as session:
        original = queries.get_job(session, who.tenant_id, job_id)
    job, created = lifecycle.retry_job(
        db,
        who.tenant_id,
        original.id,
        settings,
        include_cancelled=body.include_cancelled if body is not None else False,
        idempotency_key=idempotency_key,
    )
    if created:
        background.add_task(submit.enqueue_job, job.id, settings)  # after the commit
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    with read(db) as session:
        return JobOut.of(queries.get_job(session, who.tenant_id, job.id))

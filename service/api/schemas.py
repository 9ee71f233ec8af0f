"""Request and response bodies of the HTTP API, as pydantic models.

Every route declares its response model, so ``/openapi.json`` describes every body a client
gets. The models are built from the store's rows here, in one place, and instants are written
the way they always were (``datetime.isoformat()``, an explicit ``+00:00`` offset).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from datetime import UTC, date, datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer

from service.collections.documents import CollectionCounts, UpsertCounts
from service.contract import priority_class
from service.errors import InvalidParameterError
from service.jobs.queries import progress, served_capabilities
from service.jobs.validate import CAUSAL_TASKS
from service.store.states import JobStatus, Task
from service.store.tables import Collection, CollectionDocument, Job, Schedule, Worker
from service.store.tables import File as FileRow

#: An instant, written as ``isoformat()`` (what clients have always parsed).
Instant = Annotated[datetime, PlainSerializer(lambda d: d.isoformat(), return_type=str)]
PriorityClass = Literal["interactive", "bulk"]


# --- field checks: hostile values are a 422 naming the field, before anything is stored --------

MAX_MODEL_CHARS = 500  # jobs.model, schedules.model, workers.model
MAX_COLLECTION_CHARS = 128  # collections.name
MAX_FILENAME_CHARS = 255
MAX_IDEMPOTENCY_KEY_CHARS = 255  # jobs.idempotency_key
MAX_LABELS = 256
MAX_LABEL_CHARS = 200
MAX_LANGUAGE_CHARS = 64
MAX_COLUMN_CHARS = 256
MAX_SEED = 2**63 - 1  # what the engine's generator takes (a larger int overflows there)

# A hub id (org/name-1.5b) or a local path, in ASCII: what a worker's --model can be.
_MODEL = re.compile(r"[A-Za-z0-9._/:@+~-]+")
_COLLECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL; PostgreSQL refuses NUL
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")  # printable ASCII


def no_control(value: str) -> str:
    """Refuses control characters: NUL cannot be stored, the others are never meant."""
    bad = _CONTROL.search(value)
    if bad is not None:
        raise ValueError(
            f"control character {bad.group()!r} at position {bad.start()} is not allowed"
        )
    return value


def no_nul(value: str) -> str:
    """Refuses NUL only (a prompt may hold newlines and tabs)."""
    if "\x00" in value:
        raise ValueError(f"NUL character at position {value.index(chr(0))} is not allowed")
    return value


def model_name(value: str) -> str:
    if not _MODEL.fullmatch(value):
        raise ValueError(
            "a model is a hub id (org/name-1.5b) or a local path: ASCII letters, digits and "
            "'._/:@+~-', no spaces or control characters"
        )
    return value


def collection_name(value: str) -> str:
    if not _COLLECTION.fullmatch(value):
        raise ValueError(
            f"a collection name is 1-{MAX_COLLECTION_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_labels(labels: Sequence[str]) -> None:
    """Labels reach every prompt of a classify job: a bounded list of short, printable ones."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels; at most {MAX_LABELS}")
    for label in labels:
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"label {label[:40]!r}... is longer than {MAX_LABEL_CHARS} characters")
        no_control(label)


def check_idempotency_key(key: str | None) -> str | None:
    """1-255 printable ASCII characters (a header value; the column holds 255)."""
    if key is None:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidParameterError(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters "
            f"(got {len(key)} characters)",
            field="Idempotency-Key",
        )
    return key


def upload_name(filename: str | None) -> str | None:
    """The upload's name as stored: its last path component (a client's paths are none of our
    business), at most 255 characters, no control characters."""
    if filename is None:
        return None
    no_control(filename)
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if len(base) > MAX_FILENAME_CHARS:
        raise ValueError(f"file name longer than {MAX_FILENAME_CHARS} characters")
    return base or None


def check_schedule_params(params: dict[str, Any]) -> None:
    """A schedule's parameters are JSON scalars (labels: a list of strings); the labels and the
    language get the same bounds as a job's. Raises a 422 naming the parameter."""
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidParameterError(
                f"params.{key} must be a finite number", field=f"params.{key}"
            )
        if key == "seed" and isinstance(value, int | float) and not 0 <= value <= MAX_SEED:
            raise InvalidParameterError(f"seed must be between 0 and {MAX_SEED}", field="seed")
        listed = key == "labels" and isinstance(value, list)
        if isinstance(value, dict) or (isinstance(value, list) and not listed):
            raise InvalidParameterError(
                f"params.{key} must be a string or a number", field=f"params.{key}"
            )
    try:
        labels = params.get("labels")
        if isinstance(labels, list):
            check_labels([str(v) for v in labels])
        elif isinstance(labels, str):
            check_labels(labels.split(","))
    except ValueError as exc:
        raise InvalidParameterError(f"labels: {exc}", field="labels") from None
    language = params.get("language")
    if isinstance(language, str):
        try:
            no_control(language)
            if len(language) > MAX_LANGUAGE_CHARS:
                raise ValueError(f"longer than {MAX_LANGUAGE_CHARS} characters")
        except ValueError as exc:
            raise InvalidParameterError(f"language: {exc}", field="language") from None


ModelName = Annotated[
    str, Field(min_length=1, max_length=MAX_MODEL_CHARS), AfterValidator(model_name)
]
CollectionName = Annotated[
    str, Field(min_length=1, max_length=MAX_COLLECTION_CHARS), AfterValidator(collection_name)
]


# --- errors ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong and where: ``field``, ``row``, ``line``, ``column`` when they apply."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


#: Error answers every route may give, for the OpenAPI document.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 410, 413, 422, 503)
}


# --- operations --------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    postgres: str
    redis: str


# --- jobs --------------------------------------------------------------------------------------


class JobCounts(BaseModel):
    total: int
    succeeded: int
    failed: int
    cancelled: int


class JobTokens(BaseModel):
    prompt: int
    completion: int


class JobOut(BaseModel):
    """A job: status, counts, progress and, while it runs, documents/s and ETA."""

    id: uuid.UUID
    object: Literal["job"] = "job"
    status: JobStatus
    task: Task
    model: str
    queue: str
    params: dict[str, Any]
    priority: int
    priority_class: PriorityClass
    collection_id: uuid.UUID | None
    source_name: str | None
    idempotency_key: str | None
    chunk_size: int
    chunks: int
    counts: JobCounts
    percent: float
    tokens: JobTokens
    documents_per_s: float | None
    eta_s: float | None
    created_at: Instant
    started_at: Instant | None
    finished_at: Instant | None
    error: str | None
    results_expired_at: Instant | None = Field(
        description="set once retention purged the job's documents and results (counts stay)"
    )
    deleted_at: Instant | None = Field(
        default=None,
        description="set once the job was deleted: a tombstone (counts stay, rows are gone)",
    )
    retry_of: uuid.UUID | None = Field(
        default=None, description="the job whose failed rows this job retries"
    )
    model_served: bool | None = Field(
        default=None, description="a live worker serves the job's model (None: not looked up)"
    )
    warning: str | None = None
    tenant: str | None = Field(
        default=None, description="the job's tenant (in an admin key's views only)"
    )

    @classmethod
    def of(
        cls, job: Job, served: AbstractSet[str] | None = None, tenant: str | None = None
    ) -> JobOut:
        """The job as the API shows it; with ``served``, whether a live worker serves its
        model (an unserved open job waits, and says so)."""
        p = progress(job, datetime.now(UTC))
        model_served = None if served is None else job.model in served
        warning = None
        if model_served is False and JobStatus(job.status).open:
            warning = (
                f"no live worker serves model {job.model!r}; the job waits until one starts "
                f"(docqueue worker --model {job.model!r})"
            )
        return cls(
            id=job.id,
            status=JobStatus(job.status),
            task=Task(job.task),
            model=job.model,
            queue=job.queue,
            params=job.params,
            priority=job.priority,
            priority_class=priority_class(job.priority),
            collection_id=job.collection_id,
            source_name=job.source_name,
            idempotency_key=job.idempotency_key,
            chunk_size=job.chunk_size,
            chunks=job.n_chunks,
            counts=JobCounts(
                total=job.total,
                succeeded=job.succeeded,
                failed=job.failed,
                cancelled=job.cancelled,
            ),
            percent=p.percent,
            tokens=JobTokens(prompt=job.prompt_tokens, completion=job.completion_tokens),
            documents_per_s=p.documents_per_s,
            eta_s=p.eta_s,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=job.error,
            results_expired_at=job.results_expired_at,
            deleted_at=job.deleted_at,
            retry_of=job.retry_of,
            model_served=model_served,
            warning=warning,
            tenant=tenant,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    next_page_token: str | None = Field(description="pass back as page_token for the next page")


# --- a job's life cycle: retry, delete ---------------------------------------------------------


class RetryIn(BaseModel):
    """``POST /v1/jobs/{id}/retry``; the body may be left out (failed rows only)."""

    model_config = ConfigDict(extra="forbid")

    include_cancelled: bool = Field(
        default=False,
        description="also retry the rows that never got a result (the job was cancelled)",
    )


class JobDeleted(BaseModel):
    """``DELETE /v1/jobs/{id}``: the job's tombstone. ``purge`` is ``pending`` while a large
    job's rows are deleted in batches after the response (they are unreachable already)."""

    id: uuid.UUID
    object: Literal["job"] = "job"
    deleted: Literal[True] = True
    purge: Literal["done", "pending"]
    job: JobOut


# --- models (LLMs) served by live workers -------------------------------------------------------


class WorkerOut(BaseModel):
    name: str
    device: str
    ready: bool
    started_at: Instant
    last_heartbeat_at: Instant


class ServedModel(BaseModel):
    """A served model. Tenants see its name and readiness; where it runs (hosts, devices) is
    for admin keys only."""

    id: str
    served: bool = True
    ready: bool = Field(description="a live worker's engine is loaded")
    tasks: list[str] = Field(
        default_factory=lambda: list(CAUSAL_TASKS), description="the tasks it serves"
    )
    labels: list[str] | None = Field(
        default=None, description="a classifier's own labels (classify without labels uses them)"
    )
    queue: str | None = Field(default=None, description="admin keys only")
    workers: list[WorkerOut] | None = Field(default=None, description="admin keys only")


class ServedModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]

    @classmethod
    def of(cls, workers: list[Worker], detail: bool = True) -> ServedModelList:
        """``detail``: with queues and workers (an admin key); else names and readiness."""
        models: dict[str, ServedModel] = {}
        capabilities = served_capabilities(workers)
        for w in workers:
            caps = capabilities.get(w.model)
            entry = models.setdefault(
                w.model,
                ServedModel(id=w.model, ready=False)
                if caps is None
                else ServedModel(
                    id=w.model,
                    ready=False,
                    tasks=list(caps.tasks),
                    labels=None if caps.labels is None else list(caps.labels),
                ),
            )
            entry.ready = entry.ready or w.engine_ready
            if not detail:
                continue
            entry.queue = w.queue
            entry.workers = entry.workers or []
            entry.workers.append(
                WorkerOut(
                    name=w.name,
                    device=w.device,
                    ready=w.engine_ready,
                    started_at=w.started_at,
                    last_heartbeat_at=w.last_heartbeat_at,
                )
            )
        return cls(data=list(models.values()))


# --- collections -------------------------------------------------------------------------------


class CollectionCountsOut(BaseModel):
    documents: int
    summarized: int = Field(description="documents whose summary is of their current text")
    pending: int = Field(description="new, changed, or whose last run failed")


class UpsertedOut(BaseModel):
    inserted: int
    updated: int
    unchanged: int


class CollectionOut(BaseModel):
    object: Literal["collection"] = "collection"
    id: uuid.UUID
    name: str
    counts: CollectionCountsOut
    created_at: Instant
    updated_at: Instant
    upserted: UpsertedOut | None = Field(default=None, description="what an upload changed")

    @classmethod
    def of(
        cls, row: tuple[Collection, CollectionCounts], upserted: UpsertCounts | None = None
    ) -> CollectionOut:
        coll, counts = row
        return cls(
            id=coll.id,
            name=coll.name,
            counts=CollectionCountsOut(
                documents=counts.documents,
                summarized=counts.summarized,
                pending=counts.documents - counts.summarized,
            ),
            created_at=coll.created_at,
            updated_at=coll.updated_at,
            upserted=None
            if upserted is None
            else UpsertedOut(
                inserted=upserted.inserted,
                updated=upserted.updated,
                unchanged=upserted.unchanged,
            ),
        )


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionOut]


class SummaryOut(BaseModel):
    text: str | None
    model: str | None
    summarized_at: Instant | None
    content_hash: str = Field(description="the hash of the text that was summarized")
    job_id: uuid.UUID | None


class DocumentOut(BaseModel):
    object: Literal["document"] = "document"
    id: str
    text: str
    extra: dict[str, Any] | None
    content_hash: str
    status: Literal["summarized", "pending"]
    summary: SummaryOut | None
    updated_at: Instant

    @classmethod
    def of(cls, d: CollectionDocument) -> DocumentOut:
        summary = None
        if d.summary_hash is not None:
            summary = SummaryOut(
                text=d.summary,
                model=d.summary_model,
                summarized_at=d.summarized_at,
                content_hash=d.summary_hash,
                job_id=d.summary_job_id,
            )
        return cls(
            id=d.external_id,
            text=d.text,
            extra=d.extra,
            content_hash=d.content_hash,
            status="summarized" if d.summary_hash == d.content_hash else "pending",
            summary=summary,
            updated_at=d.updated_at,
        )


class DocumentPage(BaseModel):
    object: Literal["list"] = "list"
    collection: str
    data: list[DocumentOut]
    next_page_token: str | None


class DocumentDeleted(BaseModel):
    object: Literal["document"] = "document"
    collection: str
    id: str
    deleted: Literal[True] = True


class CollectionDeleted(BaseModel):
    object: Literal["collection"] = "collection"
    name: str
    deleted: Literal[True] = True


# --- schedules ---------------------------------------------------------------------------------


class ScheduleIn(BaseModel):
    """A schedule: run ``task`` over the collection's new and changed documents at ``cron``."""

    collection: CollectionName
    task: Task = Task.SUMMARIZE
    model: ModelName | None = Field(default=None, description="default: the server's default model")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="job parameters: prompt, labels, max_tokens, temperature, seed, "
        "chunk_size, summary_words, language",
    )
    cron: str = Field(description="five fields, in `timezone`, e.g. '0 2 * * *' or @daily")
    timezone: str = Field(default="UTC", description="IANA name, e.g. Europe/Berlin")
    priority: str = Field(
        default="bulk", max_length=32, description="bulk (default) or interactive"
    )


class ScheduleOut(BaseModel):
    id: uuid.UUID
    object: Literal["schedule"] = "schedule"
    collection: str
    task: Task
    model: str
    params: dict[str, Any]
    priority: PriorityClass
    cron: str
    timezone: str
    enabled: bool
    next_run_at: Instant | None
    last_run_at: Instant | None
    last_job_id: uuid.UUID | None
    last_run_outcome: str | None
    created_at: Instant | None

    @classmethod
    def of(cls, s: Schedule, collection: str) -> ScheduleOut:
        return cls(
            id=s.id,
            collection=collection,
            task=Task(s.task),
            model=s.model,
            params=s.params,
            priority=priority_class(s.priority),
            cron=s.cron,
            timezone=s.timezone,
            enabled=s.enabled,
            next_run_at=s.next_run_at,
            last_run_at=s.last_run_at,
            last_job_id=s.last_job_id,
            last_run_outcome=s.last_run_outcome,
            created_at=s.created_at,
        )


class ScheduleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScheduleOut]


class ScheduleDeleted(BaseModel):
    object: Literal["schedule"] = "schedule"
    id: str
    deleted: Literal[True] = True


class ScheduleRun(BaseModel):
    """A run started by hand: the job it created or found, or none when nothing was new."""

    object: Literal["schedule_run"] = "schedule_run"
    schedule_id: str
    scheduled_for: Instant
    outcome: str
    documents: int
    job: JobOut | None


# --- usage, quotas and administration ------------------------------------------------------------

#: The longest range ``GET /v1/usage`` answers in one request (a row per day and model).
MAX_USAGE_DAYS = 366
UsageGroup = Literal["day", "model"]


class UsageRow(BaseModel):
    """What was used in one group (a day, a model, or both; a tenant in an admin's view of
    all tenants). ``documents`` counts results written (``failed`` of them row errors)."""

    day: date | None = None
    model: str | None = None
    tenant: str | None = None
    documents: int
    failed: int
    prompt_tokens: int
    output_tokens: int
    upload_bytes: int


class QuotaOut(BaseModel):
    limit: int
    used: int = Field(description="now (running_jobs, queued_rows) or today, UTC (per_day)")
    default: bool = Field(description="the limit is the default (settings), not the tenant's own")


class UsageOut(BaseModel):
    object: Literal["usage"] = "usage"
    tenant: str | None = Field(description="None: every tenant (an admin key without tenant=)")
    from_: date = Field(alias="from", serialization_alias="from")
    to: date
    group_by: list[UsageGroup]
    data: list[UsageRow]
    totals: UsageRow
    quotas: dict[str, QuotaOut] | None = Field(
        default=None, description="the tenant's quotas and their use (one tenant only)"
    )

    model_config = ConfigDict(populate_by_name=True)


class QuotasIn(BaseModel):
    """``PUT /v1/tenants/{name}/quotas``: the quotas named change (null: back to the default);
    the others keep their values."""

    model_config = ConfigDict(extra="forbid")

    running_jobs: int | None = Field(default=None, gt=0, le=2**31 - 1)
    queued_rows: int | None = Field(default=None, gt=0, le=2**63 - 1)
    upload_bytes_per_day: int | None = Field(default=None, gt=0, le=2**63 - 1)
    output_tokens_per_day: int | None = Field(default=None, gt=0, le=2**63 - 1)


class TenantOut(BaseModel):
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: Instant
    quotas: dict[str, QuotaOut]


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantOut]


class WorkerDetail(BaseModel):
    """A registered worker as an admin sees it: host (in its name), device, model, liveness."""

    name: str
    model: str
    queue: str
    device: str
    pid: int
    slots: int
    ready: bool
    live: bool = Field(description="its heartbeat is recent enough to count it as serving")
    started_at: Instant
    last_heartbeat_at: Instant


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerDetail]


class QueueDepth(BaseModel):
    """A model's open chunks: ``waiting`` in PostgreSQL for the dispatcher, ``released`` to
    Redis and not yet claimed, ``leased`` running on a worker."""

    model: str
    waiting: int
    released: int
    leased: int
    open_jobs: int
    live_workers: int


class QueueList(BaseModel):
    object: Literal["list"] = "list"
    data: list[QueueDepth]


# --- the Files API (OpenAI's shapes) -----------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error: what the official SDK reads into ``APIStatusError.body``."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


#: Error answers of the OpenAI-compatible routes (/v1/files), for the OpenAPI document.
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody} for code in (400, 401, 404, 413, 429, 503)
}


class Identified(BaseModel):
    """An OpenAI object a list pages by (``after=<id>``)."""

    id: str


class FileObject(Identified):
    """OpenAI's FileObject. Times are Unix seconds."""

    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, row: FileRow) -> FileObject:
        return cls(
            id=f"file-{row.id.hex}",
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            expires_at=int(row.expires_at.timestamp()) if row.expires_at is not None else None,
        )


Item = TypeVar("Item", bound="Identified")


class CursorPage(BaseModel, Generic[Item]):
    """OpenAI's list page: ``first_id`` and ``last_id`` are what ``after`` pages on."""

    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[Item], has_more: bool) -> Self:
        return cls(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )


class FileList(CursorPage[FileObject]):
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- batches (OpenAI's Batch API) --------------------------------------------------------------

#: OpenAI's bounds on a batch's ``metadata``.
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def _metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} keys (got {len(value)})")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"a key is at most {MAX_METADATA_KEY_CHARS} characters: {key[:80]!r}")
        if len(item) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"the value of {key!r} is over {MAX_METADATA_VALUE_CHARS} characters")
    return value


class BatchCreate(BaseModel):
    """``POST /v1/batches``, as the SDK's ``batches.create`` sends it."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=100)
    endpoint: str = Field(max_length=100)
    completion_window: Literal["24h"]
    metadata: Annotated[dict[str, str] | None, AfterValidator(_metadata)] = None
    output_expires_after: dict[str, Any] | None = None  # accepted: output files get the default


class BatchError(BaseModel):
    code: str
    line: int | None = None
    message: str
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


class BatchObject(Identified):
    """OpenAI's Batch. Times are Unix seconds. ``job_id`` is docqueue's own: the batch's job,
    whose partial results ``GET /v1/jobs/{id}/results`` serves while it runs."""

    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None
    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    expires_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    job_id: uuid.UUID


class BatchList(CursorPage[BatchObject]):
    pass

"""Request and response bodies of the HTTP API, as pydantic models.

Every route declares its response model, so ``/openapi.json`` describes every body a client
gets. The models are built from the store's rows here, in one place, and instants are written
the way they always were (``datetime.isoformat()``, an explicit ``+00:00`` offset).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from service.collections.documents import CollectionCounts, UpsertCounts
from service.contract import priority_class
from service.jobs.queries import progress
from service.store.states import JobStatus, Task
from service.store.tables import Collection, CollectionDocument, Job, Schedule, Worker

#: An instant, written as ``isoformat()`` (what clients have always parsed).
Instant = Annotated[datetime, PlainSerializer(lambda d: d.isoformat(), return_type=str)]
PriorityClass = Literal["interactive", "bulk"]


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
    model_served: bool | None = Field(
        default=None, description="a live worker serves the job's model (None: not looked up)"
    )
    warning: str | None = None

    @classmethod
    def of(cls, job: Job, served: set[str] | None = None) -> JobOut:
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
            model_served=model_served,
            warning=warning,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    next_page_token: str | None = Field(description="pass back as page_token for the next page")


# --- models (LLMs) served by live workers -------------------------------------------------------


class WorkerOut(BaseModel):
    name: str
    device: str
    ready: bool
    started_at: Instant
    last_heartbeat_at: Instant


class ServedModel(BaseModel):
    id: str
    queue: str
    workers: list[WorkerOut]


class ServedModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]

    @classmethod
    def of(cls, workers: list[Worker]) -> ServedModelList:
        models: dict[str, ServedModel] = {}
        for w in workers:
            entry = models.setdefault(w.model, ServedModel(id=w.model, queue=w.queue, workers=[]))
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

    collection: str = Field(max_length=128)
    task: Task = Task.SUMMARIZE
    model: str | None = Field(
        default=None, max_length=500, description="default: the server's default model"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="job parameters: prompt, labels, max_tokens, temperature, seed, "
        "chunk_size, summary_words, language",
    )
    cron: str = Field(description="five fields, in `timezone`, e.g. '0 2 * * *' or @daily")
    timezone: str = Field(default="UTC", description="IANA name, e.g. Europe/Berlin")
    priority: str = Field(default="bulk", description="bulk (default) or interactive")


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

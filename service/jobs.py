"""Job repository: create (ingest + chunks + enqueue), read, list, cancel."""

from __future__ import annotations

import json
import logging
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any, cast

import psycopg
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import logs
from service.db import get_engine
from service.errors import ConflictError, InvalidParameterError, NotFoundError
from service.ingest import IngestOptions, ingest_csv
from service.models import TASKS, TERMINAL_STATUSES, Chunk, Job, Worker
from service.queue import ChunkMessage, make_celery, priority_class, queue_for_model, send_chunks
from service.settings import Settings
from service.work import apply_to_collection

log = logging.getLogger(__name__)


@dataclass
class JobRequest:
    """A validated job submission, independent of how it arrived (HTTP form, CLI, schedule)."""

    task: str
    model: str
    text_column: str = "text"
    id_column: str | None = None
    prompt: str | None = None
    labels: list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    chunk_size: int | None = None
    priority: int = 0
    delimiter: str | None = None
    idempotency_key: str | None = None
    source_name: str | None = None
    extra_params: dict[str, Any] = field(default_factory=dict)


def parse_labels(raw: str | None) -> list[str] | None:
    """Labels as a JSON list or comma-separated text; blanks dropped, order kept, duplicates out."""
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    if raw.startswith("["):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidParameterError(
                f"labels: invalid JSON list ({exc.msg})", field="labels"
            ) from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidParameterError(
                "labels: a JSON list of strings is expected", field="labels"
            )
        items = value
    else:
        items = raw.split(",")
    labels = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    return labels or None


def template_fields(prompt: str) -> frozenset[str]:
    """Field names a ``str.format`` template uses; a malformed template is a 422.

    Only plain names are allowed: ``{a.b}`` or ``{a[0]}`` would reach into Python objects.
    """
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    except ValueError as exc:
        raise InvalidParameterError(f"prompt: invalid template ({exc})", field="prompt") from exc
    for name in names:
        if not name or name.isdigit() or "." in name or "[" in name:
            raise InvalidParameterError(
                f"prompt: template field {{{name}}} must name a column, e.g. {{text}}",
                field="prompt",
            )
    return frozenset(names)


#: Idempotency keys of scheduled runs (service.schedules); clients may not use the prefix.
RESERVED_KEY_PREFIX = "schedule:"


def validate(req: JobRequest, settings: Settings) -> None:
    if req.task not in TASKS:
        raise InvalidParameterError(
            f"unknown task {req.task!r}; expected one of: {', '.join(TASKS)}", field="task"
        )
    if not req.model.strip():
        raise InvalidParameterError("model must not be empty", field="model")
    if req.task == "classify" and not req.labels:
        raise InvalidParameterError(
            "classify needs labels: comma-separated (a,b,c) or a JSON list", field="labels"
        )
    if req.task == "classify" and req.labels is not None and len(req.labels) < 2:
        raise InvalidParameterError("classify needs at least two labels", field="labels")
    if req.prompt is not None and req.task != "generate" and "{text}" not in req.prompt:
        raise InvalidParameterError(f"prompt for {req.task} must contain {{text}}", field="prompt")
    words = req.extra_params.get("summary_words")
    if words is not None and not 1 <= int(words) <= 10_000:
        raise InvalidParameterError(
            "summary_words must be between 1 and 10000", field="summary_words"
        )
    if req.max_tokens is not None and not 1 <= req.max_tokens <= 1_000_000:
        raise InvalidParameterError("max_tokens must be between 1 and 1000000", field="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 10.0:
        raise InvalidParameterError("temperature must be between 0 and 10", field="temperature")
    size = req.chunk_size
    if size is not None and not 1 <= size <= settings.max_chunk_size:
        raise InvalidParameterError(
            f"chunk_size must be between 1 and {settings.max_chunk_size}", field="chunk_size"
        )
    if req.delimiter is not None and req.delimiter not in (",", ";", "\t", "tab"):
        raise InvalidParameterError(
            "delimiter must be ',', ';' or tab ('\\t' or 'tab')", field="delimiter"
        )


def _params(req: JobRequest) -> dict[str, Any]:
    params: dict[str, Any] = {
        "text_column": req.text_column,
        "id_column": req.id_column,
        "prompt": req.prompt,
        "labels": req.labels,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        **req.extra_params,
    }
    return {k: v for k, v in params.items() if v is not None}


def find_idempotent(session: Session, tenant_id: uuid.UUID, key: str | None) -> Job | None:
    if not key:
        return None
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def create_job(
    tenant_id: uuid.UUID, req: JobRequest, upload: IO[bytes], settings: Settings
) -> tuple[Job, bool]:
    """Ingests the upload and queues its chunks. Returns (job, created).

    Everything up to the chunk rows happens in one transaction, so a rejected upload leaves
    nothing behind. Messages go to Redis only after the commit: a worker can never receive a
    chunk whose rows are not yet visible.
    """
    validate(req, settings)
    delimiter = "\t" if req.delimiter == "tab" else req.delimiter
    fields = template_fields(req.prompt) if req.prompt else frozenset()
    chunk_size = req.chunk_size or settings.default_chunk_size
    engine = get_engine(settings.database_url)

    with Session(engine, expire_on_commit=False) as session:
        existing = find_idempotent(session, tenant_id, req.idempotency_key)
        if existing is not None:
            return existing, False

    job_id = uuid.uuid4()
    queue = queue_for_model(req.model, req.priority)  # interactive or bulk queue, per job
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            job = Job(
                id=job_id,
                tenant_id=tenant_id,
                task=req.task,
                model=req.model,
                queue=queue,
                params=_params(req),
                status="validating",
                priority=req.priority,
                idempotency_key=req.idempotency_key,
                source_name=req.source_name,
                chunk_size=chunk_size,
            )
            session.add(job)
            session.flush()  # the documents' foreign key needs the job row
            # The psycopg connection under the session's transaction, for COPY.
            raw = cast("psycopg.Connection[Any]", session.connection().connection.dbapi_connection)
            opts = IngestOptions(
                text_column=req.text_column,
                id_column=req.id_column,
                delimiter=delimiter,
                template_fields=fields,
                max_rows=settings.max_rows_per_job,
                max_document_bytes=settings.max_document_bytes,
            )
            result = ingest_csv(raw, job_id, upload, opts)
            chunks = _chunk_rows(job_id, result.rows, chunk_size)
            with (
                raw.cursor() as cur,
                cur.copy(
                    "COPY chunks (id, job_id, seq, start_idx, end_idx, state) FROM STDIN"
                ) as cp,
            ):
                for chunk_id, seq, start, end in chunks:
                    cp.write_row((chunk_id, job_id, seq, start, end, "queued"))
            job.total = result.rows
            job.n_chunks = len(chunks)
            job.status = "queued"
            job.params = {**job.params, "extra_columns": result.extra_columns}
    except IntegrityError as exc:
        # A concurrent request with the same idempotency key won the race: return its job.
        if req.idempotency_key and "uq_jobs_tenant_idempotency_key" in str(exc.orig):
            with Session(engine, expire_on_commit=False) as session:
                existing = find_idempotent(session, tenant_id, req.idempotency_key)
            if existing is not None:
                return existing, False
        raise

    with logs.log_context(job_id=job.id):
        log.info(
            "job created: %d documents in %d chunks on %s (%s)",
            job.total,
            job.n_chunks,
            job.queue,
            job.task,
        )
    return job, True


def _chunk_rows(job_id: uuid.UUID, rows: int, size: int) -> list[tuple[uuid.UUID, int, int, int]]:
    """(chunk id, seq, start idx, end idx) covering document idx 1..rows in order."""
    return [
        (uuid.uuid4(), seq, start, min(start + size, rows + 1))
        for seq, start in enumerate(range(1, rows + 1, size))
    ]


def enqueue_job(job_id: uuid.UUID, settings: Settings) -> int:
    """Sends the messages of a job's chunks that have not been sent yet (after the commit)."""
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        if job is None:
            return 0
        pending = session.execute(
            select(Chunk.id, Chunk.seq)
            .where(Chunk.job_id == job_id, Chunk.state == "queued", Chunk.enqueued_at.is_(None))
            .order_by(Chunk.seq)
        ).all()
    return enqueue_job_chunks(job, [(cid, seq) for cid, seq in pending], settings)


def enqueue_job_chunks(
    job: Job, chunks: Sequence[tuple[uuid.UUID, int]], settings: Settings
) -> int:
    """Sends the chunk messages and stamps ``enqueued_at``.

    If Redis is unreachable the job stays queued with ``enqueued_at`` NULL: Postgres holds the
    work and the reconciler sends the messages later. The submission itself still succeeds.
    """
    with logs.log_context(job_id=job.id):
        return _enqueue_job_chunks(job, chunks, settings)


def _enqueue_job_chunks(
    job: Job, chunks: Sequence[tuple[uuid.UUID, int]], settings: Settings
) -> int:
    app = make_celery(settings)
    messages = (
        ChunkMessage(
            chunk_id=cid,
            job_id=job.id,
            seq=seq,
            n_chunks=job.n_chunks,
            queue=job.queue,
            priority=job.priority,
        )
        for cid, seq in chunks
    )
    try:
        sent = send_chunks(app, messages)
    except Exception:  # broker down: the reconciler re-sends from Postgres
        log.exception("could not enqueue chunks of job %s; they stay queued in Postgres", job.id)
        return 0
    finally:
        app.close()
    with get_engine(settings.database_url).begin() as conn:
        # = ANY(array): one parameter however many chunks (IN (...) stops at 65,535).
        conn.execute(
            text("UPDATE chunks SET enqueued_at = now() WHERE id = ANY(:ids)"),
            {"ids": [cid for cid, _ in chunks]},
        )
    return sent


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID | str) -> Job:
    """The tenant's job or 404: another tenant's job is indistinguishable from none."""
    try:
        jid = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        raise NotFoundError(f"job {job_id} not found") from None
    job = session.scalar(select(Job).where(Job.id == jid, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    tenant_id: uuid.UUID,
    status: str | None = None,
    limit: int = 20,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[Job]:
    """Newest first; keyset pagination on (created_at, id) so pages never skip or repeat."""
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    if before is not None:
        q = q.where(
            text("(jobs.created_at, jobs.id) < (:b_created, :b_id)").bindparams(
                b_created=before[0], b_id=before[1]
            )
        )
    return list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def cancel_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID | str) -> Job:
    """Queued chunks never start; running ones finish and the worker then completes the cancel.

    Results so far are kept. With no chunk running the job is ``cancelled`` at once, otherwise
    ``cancelling`` until the last running chunk ends.
    """
    job = get_job(session, tenant_id, job_id)
    job = session.scalar(select(Job).where(Job.id == job.id).with_for_update()) or job
    if job.status in ("cancelled", "cancelling"):
        return job
    if job.status in TERMINAL_STATUSES:
        raise ConflictError(f"job {job.id} is already {job.status}; nothing to cancel")
    cancelled_docs = session.execute(
        text(
            "WITH c AS (UPDATE chunks SET state = 'cancelled', updated_at = now() "
            "WHERE job_id = :j AND state = 'queued' RETURNING start_idx, end_idx) "
            "SELECT coalesce(sum(end_idx - start_idx), 0) FROM c"
        ),
        {"j": job.id},
    ).scalar_one()
    running = session.execute(
        text("SELECT count(*) FROM chunks WHERE job_id = :j AND state = 'leased'"), {"j": job.id}
    ).scalar_one()
    job.cancelled += int(cancelled_docs)
    if running:
        job.status = "cancelling"
    else:
        job.status = "cancelled"
        job.finished_at = datetime.now(UTC)
        session.flush()
        apply_to_collection(session.connection(), job.id)  # results so far, if scheduled
    session.flush()
    return job


def live_workers(session: Session, settings: Settings) -> list[Worker]:
    """Workers whose heartbeat is recent enough to count them as serving their model."""
    horizon = 3 * max(settings.worker_heartbeat_s, settings.lease_s / 3.0)
    return list(
        session.scalars(
            select(Worker)
            .where(Worker.last_heartbeat_at > func.now() - timedelta(seconds=horizon))
            .order_by(Worker.model, Worker.name)
        )
    )


def with_serving(view: dict[str, Any], served: set[str]) -> dict[str, Any]:
    """Adds whether a live worker serves the job's model; an unserved job waits, and says so."""
    view["model_served"] = view["model"] in served
    if view["status"] in ("queued", "running") and not view["model_served"]:
        view["warning"] = (
            f"no live worker serves model {view['model']!r}; the job waits until one starts "
            f"(docqueue worker --model {view['model']!r})"
        )
    return view


def job_view(job: Job, now: datetime | None = None) -> dict[str, Any]:
    """The job as the API shows it, with percent, rate and ETA derived from the counters."""
    now = now or datetime.now(UTC)
    done = job.succeeded + job.failed + job.cancelled
    percent = round(100.0 * done / job.total, 2) if job.total else 0.0
    docs_per_s: float | None = None
    eta_s: float | None = None
    if job.status in ("running", "cancelling") and job.started_at is not None:
        elapsed = (now - job.started_at).total_seconds()
        processed = job.succeeded + job.failed
        if elapsed > 0 and processed > 0:
            docs_per_s = round(processed / elapsed, 2)
            eta_s = round((job.total - done) / docs_per_s, 1)
    return {
        "id": str(job.id),
        "object": "job",
        "status": job.status,
        "task": job.task,
        "model": job.model,
        "queue": job.queue,
        "params": job.params,
        "priority": job.priority,
        "priority_class": priority_class(job.priority),
        "collection_id": str(job.collection_id) if job.collection_id else None,
        "source_name": job.source_name,
        "idempotency_key": job.idempotency_key,
        "chunk_size": job.chunk_size,
        "chunks": job.n_chunks,
        "counts": {
            "total": job.total,
            "succeeded": job.succeeded,
            "failed": job.failed,
            "cancelled": job.cancelled,
        },
        "percent": percent,
        "tokens": {"prompt": job.prompt_tokens, "completion": job.completion_tokens},
        "documents_per_s": docs_per_s,
        "eta_s": eta_s,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": job.error,
        # Set once retention purged the job's documents and results (counts stay).
        "results_expired_at": _iso(job.results_expired_at),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None

"""A batch from ``batches.create`` to its rows running: made at once, read off the request.

``create`` answers in milliseconds whatever the file's size: it checks the file and the
tenant's quotas and writes the batch (``validating``) and its job. ``validate_and_ingest`` then
reads the file line by line (``service.batches.requests``): a faulty file fails the batch with
its lines named; a good one becomes the job's documents (one per request, in line order, the
``custom_id`` as the document's id and the body in ``extra``) and chunks, the batch goes
``in_progress`` and the dispatcher releases its chunks. The SDK's own retries of a slow
``batches.create`` would otherwise make duplicate batches.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.orm import Session

from service.batches.requests import ENDPOINTS, LineError, display_text, parse_lines
from service.contract import PRIORITIES, queue_for_model
from service.errors import BadInputError, ConflictError, NotFoundError, QuotaExceededError
from service.files import store as files
from service.jobs.submit import chunk_rows, enqueue_job
from service.jobs.validate import auto_chunk_size
from service.settings import Settings
from service.store import quotas
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from service.store.states import JobStatus
from service.store.tables import Batch, Chunk, Document, Job

log = logging.getLogger(__name__)

_PUBLIC_ID = re.compile(r"batch_([0-9a-f]{32})")
#: OpenAI's only completion window.
WINDOW = timedelta(hours=24)
#: Rows written per statement while a batch is ingested.
_INSERT_ROWS = 1000


def public_id(batch_id: uuid.UUID) -> str:
    return f"batch_{batch_id.hex}"


def parse_id(value: str) -> uuid.UUID:
    """The uuid behind ``batch_<hex>``; anything else names no batch (404, never a 500)."""
    match = _PUBLIC_ID.fullmatch(value)
    if match is None:
        raise NotFoundError(f"No such Batch object: {value[:100]}", param="batch_id")
    return uuid.UUID(match.group(1))


def get(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> tuple[Batch, Job]:
    """The tenant's batch and its job; another tenant's is a 404 like a missing one."""
    row = session.execute(
        select(Batch, Job)
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    ).first()
    if row is None:
        raise NotFoundError(f"No such Batch object: {public_id(batch_id)}", param="batch_id")
    return row[0], row[1]


@dataclass
class Page:
    rows: list[tuple[Batch, Job]]
    has_more: bool


def page(session: Session, tenant_id: uuid.UUID, *, limit: int, after: uuid.UUID | None) -> Page:
    """The tenant's batches, newest first; ``after`` (a batch id) continues a listing."""
    query = (
        select(Batch, Job)
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.tenant_id == tenant_id)
        .order_by(Batch.created_at.desc(), Batch.id.desc())
    )
    if after is not None:
        mark = session.execute(
            select(Batch.created_at, Batch.id).where(
                Batch.id == after, Batch.tenant_id == tenant_id
            )
        ).first()
        if mark is None:
            raise BadInputError(f"after: no batch {public_id(after)}", param="after")
        query = query.where(
            (Batch.created_at < mark[0]) | ((Batch.created_at == mark[0]) & (Batch.id < mark[1]))
        )
    rows = [(r[0], r[1]) for r in session.execute(query.limit(limit + 1)).all()]
    return Page(rows[:limit], len(rows) > limit)


def create(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    input_file_id: str,
    endpoint: str,
    metadata: dict[str, str] | None,
    settings: Settings,
) -> Batch:
    """The batch (``validating``) and its job, in the caller's transaction. The file is only
    looked up here; it is read by ``validate_and_ingest``."""
    if endpoint not in ENDPOINTS:
        hint = " (no embedding task yet)" if endpoint == "/v1/embeddings" else ""
        raise BadInputError(
            f"endpoint {endpoint[:100]!r} is not supported{hint}; expected one of: "
            + ", ".join(ENDPOINTS),
            param="endpoint",
        )
    file = files.get(session, tenant_id, files.parse_id(input_file_id))
    if file.purpose != "batch":
        raise BadInputError(
            f"{input_file_id} has purpose {file.purpose!r}; a batch reads a file uploaded with "
            "purpose 'batch'",
            param="input_file_id",
        )
    quotas.check_before_upload(session, tenant_id, settings)
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=ENDPOINTS[endpoint],
        model="",  # named by the file's requests, once read
        queue="",
        params={"default_max_tokens": settings.openai.batch_default_max_tokens},
        status=JobStatus.VALIDATING,
        priority=PRIORITIES["bulk"],  # a 24-hour window: interactive jobs go first
        source_name=file.filename,
        chunk_size=settings.jobs.default_chunk_size,
    )
    session.add(job)
    session.flush()
    batch = Batch(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        job_id=job.id,
        input_file_id=file.id,
        endpoint=endpoint,
        completion_window="24h",
        metadata_=metadata,
        status="validating",
        expires_at=func.now() + WINDOW,
    )
    session.add(batch)
    session.flush()
    session.refresh(batch)
    return batch


def validate_and_ingest(batch_id: uuid.UUID, settings: Settings) -> str:
    """Reads the batch's file and makes its rows, or fails it naming the faulty lines.
    Returns the batch's status afterwards. Safe to run twice: only a ``validating`` batch is
    read, and its job is locked while its rows are written."""
    engine = get_engine(settings.database.url, settings.database.lock_timeout_s)
    with Session(engine) as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status != "validating":
            return "gone" if batch is None else batch.status
        tenant_id, file_id, endpoint = batch.tenant_id, batch.input_file_id, batch.endpoint
    limit = min(settings.openai.batch_max_requests, settings.jobs.max_rows_per_job)
    try:
        lines = files.open_lines(
            engine, tenant_id, file_id, max_line_bytes=settings.openai.batch_max_line_bytes
        )
        parsed = parse_lines(
            lines,
            endpoint,
            max_requests=limit,
            max_line_bytes=settings.openai.batch_max_line_bytes,
        )
    except BadInputError as exc:  # a line too long to read, the file deleted meanwhile
        line = exc.where.get("line")
        return _fail(engine, batch_id, [LineError(int(line) if line else 0, exc.code, exc.message)])
    if not parsed.ok:
        return _fail(engine, batch_id, parsed.errors)
    if not parsed.requests:
        return _fail(engine, batch_id, [LineError(0, "empty_file", "the file holds no requests")])
    assert parsed.model is not None
    model = settings.openai.resolve_model(parsed.model)
    try:
        job_id = _ingest(engine, batch_id, parsed.requests, parsed.model, model, settings)
    except QuotaExceededError as exc:
        return _fail(engine, batch_id, [LineError(0, exc.code, exc.message)])
    if job_id is None:
        return "gone"
    enqueue_job(job_id, settings)  # the dispatcher releases what the workers can take
    return "in_progress"


def _ingest(
    engine: Engine,
    batch_id: uuid.UUID,
    requests: list[Any],
    asked_model: str,
    model: str,
    settings: Settings,
) -> uuid.UUID | None:
    """The job's documents, chunks and counts, and the batch ``in_progress``, in one
    transaction (a quota it would pass fails the batch instead)."""
    with Session(engine) as session, session.begin():
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None or batch.status != "validating":
            return None
        job = session.get(Job, batch.job_id, with_for_update=True)
        assert job is not None
        rows = [
            {
                "job_id": job.id,
                "idx": n,
                "external_id": r.custom_id,
                "text": display_text(r.raw_body),
                "extra": {"body": dict(r.raw_body)},
            }
            for n, r in enumerate(requests, 1)
        ]
        for start in range(0, len(rows), _INSERT_ROWS):
            session.execute(insert(Document), rows[start : start + _INSERT_ROWS])
        job.chunk_size = auto_chunk_size(len(rows), settings)
        chunks = chunk_rows(job.id, len(rows), job.chunk_size)
        session.execute(
            insert(Chunk),
            [
                {"id": cid, "job_id": job.id, "seq": seq, "start_idx": s, "end_idx": e}
                for cid, seq, s, e in chunks
            ],
        )
        quotas.check_submission(session, job.tenant_id, job.id, len(rows), 0, settings)
        job.model = model
        job.queue = queue_for_model(model, job.priority)
        job.total = len(rows)
        job.n_chunks = len(chunks)
        job.status = JobStatus.QUEUED
        batch.model = asked_model
        batch.status = "in_progress"
        batch.in_progress_at = func.now()
        return job.id


def _fail(engine: Engine, batch_id: uuid.UUID, errors: list[LineError]) -> str:
    """The file is refused: the batch ``failed`` with its errors (OpenAI's), its job too."""
    data = [
        {"code": e.code, "line": e.line or None, "message": e.message, "param": e.param}
        for e in errors
    ]
    with Session(engine) as session, session.begin():
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None or batch.status != "validating":
            return "gone" if batch is None else batch.status
        batch.status = "failed"
        batch.errors = data
        batch.failed_at = func.now()
        session.execute(
            update(Job)
            .where(Job.id == batch.job_id)
            .values(
                status=JobStatus.FAILED,
                finished_at=func.now(),
                error=f"the batch's input file was refused: {data[0]['message']}"[:2000],
            )
        )
    log.info("batch %s failed validation: %d errors", public_id(batch_id), len(data))
    return "failed"


def cancel(
    session: Session, store: PgChunkStore, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> Batch:
    """``cancelling``: its rows stop being released and running ones finish their step (the
    job's cancel); the batch is then finalized ``cancelled`` with what finished. A batch that
    is still being read is cancelled before it starts."""
    batch, job = get(session, tenant_id, batch_id)
    session.refresh(batch, with_for_update=True)
    if batch.status == "cancelling":  # a second cancel while the first takes effect
        return batch
    if batch.status not in ("validating", "in_progress"):
        raise ConflictError(
            f"{public_id(batch_id)} is {batch.status}; only a validating or in-progress batch "
            "can be cancelled",
            param="batch_id",
        )
    if batch.status == "validating":  # the file was never read: nothing runs
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.VALIDATING)
            .values(status=JobStatus.CANCELLED, finished_at=func.now())
        )
    else:
        try:
            store.cancel(job.id)
        except ConflictError:  # every row already ended: it finalizes as completed
            return batch
    batch.status = "cancelling"
    batch.cancelling_at = func.now()
    session.flush()
    session.refresh(batch)
    return batch

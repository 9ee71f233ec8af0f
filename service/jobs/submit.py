"""Submission: ingest the upload, create the job and its chunks in one transaction; after the
commit the dispatcher releases the chunks workers can take now (the rest wait in PostgreSQL)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, cast

import psycopg
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import logs
from service.contract import queue_for_model
from service.errors import IdempotencyConflictError
from service.jobs.formats import ingest_upload, resolve_format
from service.jobs.ingest import IngestOptions, PgCopySink, parse_delimiter
from service.jobs.validate import (
    JobRequest,
    auto_chunk_size,
    job_params,
    template_fields,
    validate,
)
from service.settings import Settings
from service.store import quotas
from service.store.engine import get_engine
from service.store.states import ChunkState, JobStatus
from service.store.tables import Job

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)

#: Bytes per read when an upload is hashed without being ingested (a replay).
_HASH_READ_BYTES = 1 << 20


def find_idempotent(session: Session, tenant_id: uuid.UUID, key: str | None) -> Job | None:
    if not key:
        return None
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def request_hash(req: JobRequest, delimiter: str | None, chunk_size: int) -> _Hash:
    """A sha256 started over the job's canonical parameters; the upload's bytes follow.

    The parameters are the ones that shape the job (as validated: the parsed delimiter, the
    chunk size in effect), in canonical JSON, length-prefixed so no upload can imitate them.
    The file's name is not among them: the same bytes under another name are the same request.
    """
    canonical = {
        "task": req.task,
        "model": req.model,
        "params": job_params(req),
        "priority": req.priority,
        "text_column": req.text_column,
        "id_column": req.id_column,
        "delimiter": delimiter,
        "chunk_size": chunk_size,
    }
    # The format the upload is read as (create_job resolves it first): the same bytes read as
    # another format are another job. CSV is left out, so CSV fingerprints are what they were.
    if req.format not in (None, "csv"):
        canonical["format"] = req.format
    head = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    sha = hashlib.sha256(len(head).to_bytes(8, "big"))
    sha.update(head)
    return sha


class HashingReader(io.RawIOBase):
    """The upload as ingest reads it, hashed on the way through (it is never held whole).

    ``drain`` hashes whatever ingest left unread, so the digest always covers every byte of the
    upload. Closing this reader (ingest's text wrapper does) leaves the caller's upload open.
    """

    def __init__(self, upload: IO[bytes], sha: _Hash) -> None:
        super().__init__()
        self._upload = upload
        self._sha = sha
        self.bytes_read = 0  # the upload's size once drained (the upload-bytes quota)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._upload.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._sha.update(data)
        self.bytes_read += n
        return n

    def drain(self) -> str:
        """Hashes the rest of the upload; returns the hex digest of all of it."""
        while data := self._upload.read(_HASH_READ_BYTES):
            self._sha.update(data)
            self.bytes_read += len(data)
        return self._sha.hexdigest()


def replay(existing: Job, key: str, request_sha256: str) -> Job:
    """The job an ``Idempotency-Key`` already names, if this request is the one that made it.

    Another file or other parameters under the same key is a 409 that tells clients not to
    retry: returning the old job would pass off its results as this request's. A job made
    before fingerprints were kept (``request_sha256`` NULL) cannot be compared and is returned.
    """
    if existing.request_sha256 is not None and existing.request_sha256 != request_sha256:
        raise IdempotencyConflictError(
            f"Idempotency-Key {key!r} was already used for job {existing.id} with a different "
            "request (another file or other parameters); send the same request to get that "
            "job back, or a new key for a new job",
            field="Idempotency-Key",
        )
    return existing


def create_job(
    tenant_id: uuid.UUID, req: JobRequest, upload: IO[bytes], settings: Settings
) -> tuple[Job, bool]:
    """Ingests the upload and queues its chunks. Returns (job, created).

    Everything up to the chunk rows happens in one transaction, so a rejected upload leaves
    nothing behind. Messages go to Redis only after the commit: a worker can never receive a
    chunk whose rows are not yet visible.
    """
    validate(req, settings)
    req.format = resolve_format(upload, req.format, req.source_name)  # named, else peeked
    delimiter = parse_delimiter(req.delimiter)
    fields = template_fields(req.prompt) if req.prompt else frozenset()
    asked_chunk_size = req.chunk_size or settings.jobs.default_chunk_size
    engine = get_engine(settings.database.url)
    # The upload is hashed while ingest reads it, or in its own streamed pass for a replay.
    hashing = HashingReader(upload, request_hash(req, delimiter, asked_chunk_size))

    if req.idempotency_key:
        with Session(engine, expire_on_commit=False) as session:
            existing = find_idempotent(session, tenant_id, req.idempotency_key)
        if existing is not None:
            return replay(existing, req.idempotency_key, hashing.drain()), False

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
                params=job_params(req),
                status=JobStatus.VALIDATING,
                priority=req.priority,
                idempotency_key=req.idempotency_key,
                source_name=req.source_name,
                chunk_size=asked_chunk_size,
            )
            session.add(job)
            session.flush()  # the documents' foreign key needs the job row
            # The psycopg connection under the session's transaction, for COPY.
            raw = cast("psycopg.Connection[Any]", session.connection().connection.dbapi_connection)
            opts = IngestOptions.from_settings(
                settings,
                text_column=req.text_column,
                id_column=req.id_column,
                delimiter=delimiter,
                template_fields=fields,
                format=req.format,
                file_name=req.source_name,
            )
            # CSV and JSON Lines are read (and hashed) through `hashing`; Parquet, which needs
            # random access, from the upload itself, left at its start for the hash.
            with PgCopySink(raw, job_id, opts.id_column) as sink:
                result = ingest_upload(sink, upload, io.BufferedReader(hashing, 1 << 16), opts)
            job.request_sha256 = hashing.drain()
            job.chunk_size = req.chunk_size or auto_chunk_size(result.rows, settings)
            chunks = chunk_rows(job_id, result.rows, job.chunk_size)
            with (
                raw.cursor() as cur,
                cur.copy(
                    "COPY chunks (id, job_id, seq, start_idx, end_idx, state, updated_at) "
                    "FROM STDIN"
                ) as cp,
            ):
                # The clock now, not the transaction's start (now()): a long upload must not
                # look to the reconciler as if its messages had been due long ago.
                queued_at = datetime.now(UTC)
                for chunk_id, seq, start, end in chunks:
                    cp.write_row((chunk_id, job_id, seq, start, end, ChunkState.QUEUED, queued_at))
            job.total = result.rows
            job.n_chunks = len(chunks)
            job.status = JobStatus.QUEUED
            job.params = {**job.params, "extra_columns": result.extra_columns}
            # Only now are its rows and bytes known; the tenant's row stays locked to the
            # commit, so its concurrent submissions are checked one after another.
            quotas.check_submission(
                session, tenant_id, job_id, result.rows, hashing.bytes_read, settings
            )
            quotas.record_upload(session, tenant_id, job_id, req.model, hashing.bytes_read)
    except IntegrityError as exc:
        # A concurrent request with the same idempotency key won the race: its job, if this
        # is the same request (the winner committed before this insert could go on).
        if req.idempotency_key and "uq_jobs_tenant_idempotency_key" in str(exc.orig):
            with Session(engine, expire_on_commit=False) as session:
                existing = find_idempotent(session, tenant_id, req.idempotency_key)
            if existing is not None:
                return replay(existing, req.idempotency_key, hashing.drain()), False
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


def chunk_rows(job_id: uuid.UUID, rows: int, size: int) -> list[tuple[uuid.UUID, int, int, int]]:
    """(chunk id, seq, start idx, end idx) covering document idx 1..rows in order."""
    return [
        (uuid.uuid4(), seq, start, min(start + size, rows + 1))
        for seq, start in enumerate(range(1, rows + 1, size))
    ]


def enqueue_job(job_id: uuid.UUID, settings: Settings) -> int:
    """After the commit: the dispatcher releases the job's model's next chunks (as many as its
    workers can take; the rest wait in PostgreSQL). Returns the messages sent. With Redis
    away nothing is released and the submission still stands: the next pass sends them."""
    from service.dispatcher import dispatch_job

    with Session(get_engine(settings.database.url)) as session:
        model = session.scalar(select(Job.model).where(Job.id == job_id))
    if model is None:
        return 0
    return dispatch_job(job_id, model, settings)

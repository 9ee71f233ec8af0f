"""The tables (SQLAlchemy ORM): the schema of record. Alembic revisions must match these exactly."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy import (
    false as sa_false,
)
from sqlalchemy import (
    text as sa_text,
)
from sqlalchemy import (
    true as sa_true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.store.states import NATIVE_TASKS, ChunkState, JobStatus, Task, sql_in

# Stable constraint names so migrations can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL, plain JSON elsewhere (embedded mode runs on SQLite).
JsonDoc = JSON().with_variant(JSONB(), "postgresql")


def _utcnow() -> Any:
    return func.now()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    # The tenant's own quotas, set by an admin; NULL: the default (settings.quotas).
    quota_running_jobs: Mapped[int | None] = mapped_column(Integer)
    quota_queued_rows: Mapped[int | None] = mapped_column(BigInteger)
    quota_upload_bytes_per_day: Mapped[int | None] = mapped_column(BigInteger)
    quota_output_tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # sha256 of the key: keys are 256-bit random, so a fast hash is enough and lookups are exact.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell keys apart
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # An admin key sees every tenant's jobs, usage, workers and queues, and sets quotas.
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())

    __table_args__ = (Index(None, "tenant_id"),)


class UsageDaily(Base):
    """What a tenant used, per UTC day and job: the ledger usage and the daily quotas read.

    Written in the statements that insert results (service.store.chunks) and at submit (upload
    bytes), under the job's row lock, so no two writers ever wait on one ledger row. No foreign
    key to jobs: usage outlives a job's deletion and retention's purges.
    """

    __tablename__ = "usage_daily"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(Date, primary_key=True)  # UTC
    job_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(500))
    documents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # results
    failed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of those
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Every usage query names one tenant (or all, for admins) and a range of days.
    __table_args__ = (Index("ix_usage_daily_day", "day"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(500))
    queue: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    status: Mapped[str] = mapped_column(
        String(16), default="validating", server_default="validating"
    )
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # sha256 over the job's parameters and uploaded bytes: a replay of the idempotency key
    # with another request is refused. NULL for jobs from before migration 0006 and schedules.
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    source_name: Mapped[str | None] = mapped_column(String(500))
    chunk_size: Mapped[int] = mapped_column(Integer)
    n_chunks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    succeeded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancelled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    # A scheduled job's collection: its results flow back there when the job ends.
    collection_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("collections.id", ondelete="SET NULL")
    )
    # Retention purged the documents and results; the row and its counts stay.
    results_expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Deleted by its tenant (DELETE /v1/jobs/{id}): a tombstone. Documents and results are
    # gone (or being purged in batches); the row, its counts and its tokens stay.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A retry's original (POST /v1/jobs/{id}/retry); NULL once that job row itself is gone.
    retry_of: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))

    __table_args__ = (
        CheckConstraint(sql_in("status", JobStatus), name="status"),
        CheckConstraint(sql_in("task", Task), name="task"),
        # The same key from the same tenant names the same job.
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status", "status"),
        # Deleting a collection sets its jobs' collection_id NULL: find them without a scan.
        Index(
            "ix_jobs_collection",
            "collection_id",
            postgresql_where=sa_text("collection_id IS NOT NULL"),
            sqlite_where=sa_text("collection_id IS NOT NULL"),
        ),
        # A job's retries, and what ON DELETE SET NULL must find when a job row goes.
        Index(
            "ix_jobs_retry_of",
            "retry_of",
            postgresql_where=sa_text("retry_of IS NOT NULL"),
            sqlite_where=sa_text("retry_of IS NOT NULL"),
        ),
    )


class Document(Base):
    __tablename__ = "documents"

    # No foreign key to jobs: documents are only ever written by the COPY in their job's own
    # creating transaction, and a per-row key check would cost a third of ingest time. Deleting
    # a job deletes its documents through the trigger made in migration 0003.
    job_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    # 1-based data row number in the upload: input order, and the id when no id column is given.
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    external_id: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)

    __table_args__ = (
        # Only jobs with an id column store external ids; the partial index costs nothing otherwise.
        Index(
            "uq_documents_job_external_id",
            "job_id",
            "external_id",
            unique=True,
            postgresql_where=sa_text("external_id IS NOT NULL"),
            sqlite_where=sa_text("external_id IS NOT NULL"),
        ),
    )


class Result(Base):
    __tablename__ = "results"

    job_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    output: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    latency_ms: Mapped[float | None] = mapped_column(Float)
    # An OpenAI request's every choice (n > 1, or with logprobs): [{index, text, finish_reason,
    # completion_tokens, logprobs}]; ``output`` is the first one's. NULL for native tasks.
    choices: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())

    # One result per document at most: the primary key makes redelivered chunks harmless. No
    # foreign key to documents (migration 0013): its per-row check was half of PostgreSQL's
    # CPU for a results write. Results are written only for rows their chunk's lease read;
    # erase, purge and retention delete results before documents, and deleting a job row
    # deletes both through the trigger of migrations 0003 and 0013.


class Chunk(Base):
    __tablename__ = "chunks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)  # 0-based chunk number within the job
    start_idx: Mapped[int] = mapped_column(Integer)  # first document idx, inclusive
    end_idx: Mapped[int] = mapped_column(Integer)  # last document idx, exclusive
    state: Mapped[str] = mapped_column(String(16), default="queued", server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(255))
    # The fence: drawn anew by each claim, required by every write under that lease.
    lease_token: Mapped[uuid.UUID | None] = mapped_column()
    # Set when the dispatcher released the chunk (its message was sent); NULL: it waits in
    # PostgreSQL for the dispatcher.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())

    __table_args__ = (
        CheckConstraint(sql_in("state", ChunkState), name="state"),
        UniqueConstraint("job_id", "seq", name="uq_chunks_job_seq"),
        Index("ix_chunks_state_lease", "state", "lease_expires_at"),
        # The dispatcher's two questions: which chunks wait (not yet released, in job and seq
        # order), and how many released ones no worker has claimed yet.
        Index(
            "ix_chunks_waiting",
            "job_id",
            "seq",
            postgresql_where=sa_text("state = 'queued' AND enqueued_at IS NULL"),
            sqlite_where=sa_text("state = 'queued' AND enqueued_at IS NULL"),
        ),
        Index(
            "ix_chunks_released",
            "job_id",
            postgresql_where=sa_text("state = 'queued' AND enqueued_at IS NOT NULL"),
            sqlite_where=sa_text("state = 'queued' AND enqueued_at IS NOT NULL"),
        ),
    )


class Worker(Base):
    """A live worker process: what it serves and when it last said so."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery hostname
    model: Mapped[str] = mapped_column(String(500))
    queue: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(100))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    last_heartbeat_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=_utcnow()
    )
    engine_ready: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # Chunks it runs at once (its Celery slots): the dispatcher keeps this many released.
    slots: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # What its engine says the model can do (validate.ModelCapabilities); NULL: every task.
    capabilities: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc, nullable=True)

    __table_args__ = (Index("ix_workers_model_heartbeat", "model", "last_heartbeat_at"),)


class Collection(Base):
    """Documents kept between jobs, per tenant, for scheduled work (nightly summaries)."""

    __tablename__ = "collections"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())

    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_collections_tenant_name"),)


class CollectionDocument(Base):
    """A kept document and its latest summary. ``summary_hash`` is the content hash of the text
    that was summarized: a document is pending while it differs from ``content_hash``."""

    __tablename__ = "collection_documents"

    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True
    )
    external_id: Mapped[str] = mapped_column(Text, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the UTF-8 text
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    summary: Mapped[str | None] = mapped_column(Text)
    summary_model: Mapped[str | None] = mapped_column(String(500))
    summarized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    summary_hash: Mapped[str | None] = mapped_column(String(64))
    summary_job_id: Mapped[uuid.UUID | None] = mapped_column()  # no key: jobs may be deleted


class Schedule(Base):
    """A cron schedule that runs a task over a collection's new and changed documents."""

    __tablename__ = "schedules"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE")
    )
    task: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(500))
    params: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=-10, server_default="-10")  # bulk
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    # All instants in UTC; the cron is evaluated in ``timezone``.
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL")
    )
    last_run_outcome: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())

    __table_args__ = (
        CheckConstraint(sql_in("task", NATIVE_TASKS), name="task"),
        # A collection keeps one latest result per document and one pending state, so one
        # schedule per collection: two would share (and race for) the same pending documents.
        UniqueConstraint("collection_id", name="uq_schedules_collection"),
        Index("ix_schedules_due", "enabled", "next_run_at"),
        Index("ix_schedules_tenant", "tenant_id"),
    )


#: A file's purposes: ``batch`` (a batch's input, uploaded) and ``batch_output`` (a batch's
#: output and error files, written by docqueue), as OpenAI names them.
FILE_PURPOSES = ("batch", "batch_output")
#: ``uploaded``: still being written (invisible to clients); ``processed``: complete.
FILE_STATUSES = ("uploaded", "processed")


class File(Base):
    """A file of the Files API (``/v1/files``). Its bytes are in ``file_parts``: API processes
    on several hosts share no disk, so the database holds them, in bounded pieces."""

    __tablename__ = "files"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)  # file-<hex>
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    sha256: Mapped[str | None] = mapped_column(String(64))  # hex, set when complete
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(f"purpose IN {FILE_PURPOSES!r}", name="purpose"),
        CheckConstraint(f"status IN {FILE_STATUSES!r}", name="status"),
        # A tenant's list, newest first, paged by (created_at, id).
        Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_files_expires_at", "expires_at"),
    )


class FilePart(Base):
    """One piece of a file (at most ``DOCQUEUE_FILE_PART_BYTES``), in order of ``seq``."""

    __tablename__ = "file_parts"

    file_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


#: A batch's life, as OpenAI names it: ``validating → in_progress → finalizing → completed``,
#: or ``failed`` (its file was refused), ``cancelling → cancelled``, or ``expired``.
BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)


class Batch(Base):
    """An OpenAI batch: a job (its rows are the input file's requests) with OpenAI's view of
    it (status, timestamps, files). One per job; deleting the job deletes it."""

    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)  # batch_<hex>
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    input_file_id: Mapped[uuid.UUID] = mapped_column()  # no key: files expire on their own
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(500))  # as the requests name it
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JsonDoc)
    status: Mapped[str] = mapped_column(String(16), default="validating")
    # OpenAI's errors list: [{code, line, message, param}] (a failed batch's faulty lines).
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc)
    output_file_id: Mapped[uuid.UUID | None] = mapped_column()
    error_file_id: Mapped[uuid.UUID | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_utcnow())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(f"status IN {BATCH_STATUSES!r}", name="status"),
        # A tenant's list, newest first, paged by (created_at, id).
        Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),
        # The sweep's questions: batches not yet final (validating, running, finalizing).
        Index(
            "ix_batches_open",
            "status",
            postgresql_where=sa_text(
                "status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
            ),
            sqlite_where=sa_text(
                "status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
            ),
        ),
    )

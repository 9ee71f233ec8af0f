"""Collections: documents kept between jobs, each with its latest summary.

Uploads upsert by external id (the id column is required). A document whose text changed gets
a new ``content_hash`` and is pending again until a job summarizes that text; its previous
summary stays readable meanwhile. Scheduled runs turn the pending documents into an ordinary
job (``create_collection_job``), whose results come back when the job ends
(the chunk state machine's finalization in ``service.store.chunks``).
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, NamedTuple, cast

import psycopg
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from service.contract import queue_for_model
from service.errors import InvalidParameterError, NotFoundError
from service.jobs import submit
from service.jobs import validate as jobs
from service.jobs.formats import ingest_upload, parse_format
from service.jobs.ingest import IngestOptions, PgCopySink, parse_delimiter
from service.settings import Settings
from service.store.engine import get_engine
from service.store.tables import Chunk, Collection, CollectionDocument, Job, Schedule

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: The content hash, computed by Postgres from the stored text, so that the hash written at
#: upload and the one checked when results come back can never disagree.
CONTENT_HASH_SQL = "encode(sha256(convert_to({col}, 'UTF8')), 'hex')"


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidParameterError(
            f"collection name {name!r}: 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field="name",
        )
    return name


@dataclass(frozen=True)
class UpsertCounts:
    inserted: int
    updated: int
    unchanged: int


class CollectionCounts(NamedTuple):
    documents: int
    summarized: int  # whose summary is of the current text; the rest are pending


class DocumentPage(NamedTuple):
    collection: str
    documents: list[CollectionDocument]
    next_page_token: str | None  # None on the last page


def upsert_documents(
    tenant_id: uuid.UUID,
    name: str,
    upload: IO[bytes],
    settings: Settings,
    *,
    text_column: str = "text",
    id_column: str = "id",
    delimiter: str | None = None,
    format: str | None = None,
    file_name: str | None = None,
) -> UpsertCounts:
    """Streams the CSV (or JSON Lines, or Parquet: ``format``, else the file name or the
    content) into the collection, creating the collection on first use.

    The upload goes through the very parser and checks that job uploads use
    (``service.jobs.ingest.ingest_csv``: same errors with row and column, same limits, duplicate ids
    caught by a unique index) into a transaction-local TEMP table that shadows ``documents``
    for this transaction only (Postgres searches the temporary schema first), and from there
    one ``INSERT ... ON CONFLICT`` upserts it. A rejected upload changes nothing.

    The collection's row lock (which serializes uploads, and which a scheduled job's
    finalization takes to write its summaries back) is taken only after the whole upload is
    ingested, for the short merge: a slow upload never holds it while it streams, so a job's
    finalization, and the chunk it closes, never wait on a client's upload speed.
    """
    validate_name(name)
    if not id_column:
        raise InvalidParameterError("id_column is required for collections", field="id_column")
    delimiter = parse_delimiter(delimiter)
    engine = get_engine(settings.database.url)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        raw = cast("psycopg.Connection[Any]", session.connection().connection.dbapi_connection)
        raw.execute(
            "CREATE TEMP TABLE documents (LIKE public.documents INCLUDING DEFAULTS "
            "INCLUDING INDEXES) ON COMMIT DROP"
        )
        opts = IngestOptions.from_settings(
            settings,
            text_column=text_column,
            id_column=id_column,
            delimiter=delimiter,
            format=parse_format(format),
            file_name=file_name,
        )
        with PgCopySink(raw, uuid.uuid4(), opts.id_column) as sink:
            result = ingest_upload(sink, upload, upload, opts)
        # Only now the collection: created on first use, then locked for the merge, so that
        # concurrent uploads to one collection apply one after the other.
        session.execute(
            pg_insert(Collection)
            .values(id=uuid.uuid4(), tenant_id=tenant_id, name=name)
            .on_conflict_do_nothing(constraint="uq_collections_tenant_name")
        )
        coll = session.scalars(
            select(Collection)
            .where(Collection.tenant_id == tenant_id, Collection.name == name)
            .with_for_update()
        ).one()
        hash_sql = CONTENT_HASH_SQL.format(col="d.text")
        row = session.execute(
            text(
                f"""
                WITH up AS (
                  INSERT INTO public.collection_documents AS cd
                    (collection_id, external_id, text, extra, content_hash)
                  SELECT :c, d.external_id, d.text, d.extra, {hash_sql}
                  FROM pg_temp.documents d
                  ON CONFLICT (collection_id, external_id) DO UPDATE SET
                    text = excluded.text, extra = excluded.extra,
                    content_hash = excluded.content_hash, updated_at = now()
                  WHERE cd.content_hash <> excluded.content_hash
                     OR cd.extra IS DISTINCT FROM excluded.extra
                  RETURNING (xmax = 0) AS inserted
                )
                SELECT count(*) FILTER (WHERE inserted) AS inserted,
                       count(*) FILTER (WHERE NOT inserted) AS updated
                FROM up
                """
            ),
            {"c": coll.id},
        ).one()
        session.execute(
            text("UPDATE collections SET updated_at = now() WHERE id = :c"), {"c": coll.id}
        )
    return UpsertCounts(
        inserted=int(row.inserted),
        updated=int(row.updated),
        unchanged=result.rows - int(row.inserted) - int(row.updated),
    )


def get_collection(session: Session, tenant_id: uuid.UUID, name: str) -> Collection:
    """The tenant's collection or 404 (another tenant's is indistinguishable from none)."""
    coll = session.scalar(
        select(Collection).where(Collection.tenant_id == tenant_id, Collection.name == name)
    )
    if coll is None:
        raise NotFoundError(f"collection {name!r} not found")
    return coll


def _counts_query() -> Any:
    cd = CollectionDocument
    current = cd.summary_hash == cd.content_hash
    return (
        select(
            Collection,
            func.count(cd.external_id).label("documents"),
            func.count(cd.external_id).filter(current).label("summarized"),
        )
        .outerjoin(cd, cd.collection_id == Collection.id)
        .group_by(Collection.id)
    )


def describe(
    session: Session, tenant_id: uuid.UUID, name: str
) -> tuple[Collection, CollectionCounts]:
    """The tenant's collection (or 404) with its counts."""
    coll = get_collection(session, tenant_id, name)
    row = session.execute(_counts_query().where(Collection.id == coll.id)).one()
    return row[0], CollectionCounts(int(row.documents), int(row.summarized))


def list_collections(
    session: Session, tenant_id: uuid.UUID
) -> list[tuple[Collection, CollectionCounts]]:
    rows = session.execute(
        _counts_query().where(Collection.tenant_id == tenant_id).order_by(Collection.name)
    ).all()
    return [(r[0], CollectionCounts(int(r.documents), int(r.summarized))) for r in rows]


def delete_collection(session: Session, tenant_id: uuid.UUID, name: str) -> None:
    """Deletes its documents and schedules; jobs already made from it stay (results kept)."""
    coll = get_collection(session, tenant_id, name)
    session.execute(delete(Collection).where(Collection.id == coll.id))


def list_documents(
    session: Session,
    tenant_id: uuid.UUID,
    name: str,
    limit: int = 100,
    page_token: str | None = None,
    status: str | None = None,
) -> DocumentPage:
    """One page in external id order; ``next_page_token`` continues after the last id."""
    coll = get_collection(session, tenant_id, name)
    cd = CollectionDocument
    q = select(cd).where(cd.collection_id == coll.id)
    if status == "pending":
        q = q.where(cd.summary_hash.is_distinct_from(cd.content_hash))
    elif status == "summarized":
        q = q.where(cd.summary_hash == cd.content_hash)
    elif status is not None:
        raise InvalidParameterError(
            f"unknown status {status!r}; expected pending or summarized", field="status"
        )
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
        except Exception:
            raise InvalidParameterError("invalid page_token", field="page_token") from None
        if "\x00" in after:  # PostgreSQL text cannot hold it: a 500 otherwise
            raise InvalidParameterError("invalid page_token", field="page_token")
        q = q.where(cd.external_id > after)
    docs = list(session.scalars(q.order_by(cd.external_id).limit(limit)))
    token = None
    if len(docs) == limit:
        token = base64.urlsafe_b64encode(docs[-1].external_id.encode()).decode()
    return DocumentPage(coll.name, docs, token)


def get_document(
    session: Session, tenant_id: uuid.UUID, name: str, external_id: str
) -> CollectionDocument:
    coll = get_collection(session, tenant_id, name)
    doc = session.get(CollectionDocument, (coll.id, external_id))
    if doc is None:
        raise NotFoundError(f"document {external_id!r} not found in collection {name!r}")
    return doc


def delete_document(session: Session, tenant_id: uuid.UUID, name: str, external_id: str) -> None:
    """Removes one document (gone upstream): later runs no longer cover it. A job that already
    copied it keeps its copy and result; the write-back then finds no document and skips it."""
    coll = get_collection(session, tenant_id, name)
    session.refresh(coll, with_for_update=True)  # the upload / write-back lock order
    gone = session.scalar(
        delete(CollectionDocument)
        .where(
            CollectionDocument.collection_id == coll.id,
            CollectionDocument.external_id == external_id,
        )
        .returning(CollectionDocument.external_id)
    )
    if gone is None:
        raise NotFoundError(f"document {external_id!r} not found in collection {name!r}")
    coll.updated_at = datetime.now(UTC)


def create_collection_job(
    session: Session, schedule: Schedule, req: jobs.JobRequest, settings: Settings
) -> Job | None:
    """One job over the collection's pending documents, in the caller's transaction (which
    holds the schedule's lock). None, and nothing written, when nothing is pending.

    Documents are copied with one ``INSERT ... SELECT`` (input order: external id), so the job
    is an ordinary one: same chunks, same workers, same results and exports.
    """
    jobs.validate(req, settings)
    chunk_size = req.chunk_size or settings.jobs.default_chunk_size
    job_id = uuid.uuid4()
    inserted = session.execute(
        pg_insert(Job)
        .values(
            id=job_id,
            tenant_id=schedule.tenant_id,
            task=req.task,
            model=req.model,
            queue=queue_for_model(req.model, req.priority),
            params={
                **jobs.job_params(req),
                "text_column": "text",
                "id_column": "id",
                "schedule_id": str(schedule.id),
            },
            status="validating",
            priority=req.priority,
            idempotency_key=req.idempotency_key,
            source_name=f"schedule {schedule.id}",
            chunk_size=chunk_size,
            collection_id=schedule.collection_id,
        )
        .on_conflict_do_nothing(constraint="uq_jobs_tenant_idempotency_key")
        .returning(Job.id)
    ).scalar()
    if inserted is None:  # the same run was created meanwhile
        return submit.find_idempotent(session, schedule.tenant_id, req.idempotency_key)
    n = (
        session.connection()
        .execute(
            text(
                """
            INSERT INTO documents (job_id, idx, external_id, text, extra)
            SELECT :j, row_number() OVER (ORDER BY external_id), external_id, text, extra
            FROM collection_documents
            WHERE collection_id = :c AND summary_hash IS DISTINCT FROM content_hash
            ORDER BY external_id
            LIMIT :n
            """
            ),
            # At most max_rows_per_job, like any job; the rest stay pending for the next run.
            {"j": job_id, "c": schedule.collection_id, "n": settings.jobs.max_rows_per_job},
        )
        .rowcount
    )
    if not n:
        session.execute(delete(Job).where(Job.id == job_id))  # never visible: same transaction
        return None
    if not req.chunk_size:  # the rows are known only now
        chunk_size = jobs.auto_chunk_size(n, settings)
        session.execute(update(Job).where(Job.id == job_id).values(chunk_size=chunk_size))
    chunks = submit.chunk_rows(job_id, n, chunk_size)
    session.execute(
        insert(Chunk),
        [
            {"id": cid, "job_id": job_id, "seq": seq, "start_idx": s, "end_idx": e}
            for cid, seq, s, e in chunks
        ],
    )
    job = session.get(Job, job_id)
    assert job is not None
    job.total = n
    job.n_chunks = len(chunks)
    job.status = "queued"
    session.flush()
    return job


def collection_name(session: Session, collection_id: uuid.UUID) -> str:
    return str(session.scalar(select(Collection.name).where(Collection.id == collection_id)))

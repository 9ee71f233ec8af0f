"""``/v1/batches``: OpenAI's Batch API on docqueue's jobs, for code written against the
official ``openai`` SDK with only ``base_url`` changed. A batch is a job: the same tenants,
keys, quotas, priorities, workers and Flower view; its partial results are also at
``GET /v1/jobs/{job_id}/results`` while it runs. Errors are in OpenAI's shape.

``POST /v1/batches`` answers at once (``validating``): the file is read off the request
(``service.batches.lifecycle.validate_and_ingest``, in a submit process), so a large file never
holds the POST until the SDK's timeout, after which the SDK would retry and make a duplicate.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query

from service.api.deps import Auth, Db, SettingsDep, Store, read, tx
from service.api.schemas import (
    OPENAI_ERRORS,
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchRequestCounts,
    BatchUsage,
)
from service.batches import lifecycle
from service.errors import BadInputError, NotFoundError
from service.files.store import public_id as file_public_id
from service.jobs import pool
from service.settings import Settings
from service.store.states import JobStatus
from service.store.tables import Batch, Job

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=OPENAI_ERRORS)

#: OpenAI's bounds on a list's ``limit``.
MAX_LIST = 100


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def batch_object(batch: Batch, job: Job) -> BatchObject:
    """The batch as OpenAI shows it, its counts and usage from its job."""
    final = batch.status in ("completed", "cancelled", "expired", "failed")
    failed = job.failed + (job.cancelled if final else 0)
    return BatchObject(
        id=lifecycle.public_id(batch.id),
        endpoint=batch.endpoint,
        input_file_id=file_public_id(batch.input_file_id),
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=file_public_id(batch.output_file_id) if batch.output_file_id else None,
        error_file_id=file_public_id(batch.error_file_id) if batch.error_file_id else None,
        errors=(
            BatchErrors(data=[BatchError.model_validate(e) for e in batch.errors])
            if batch.errors
            else None
        ),
        request_counts=BatchRequestCounts(total=job.total, completed=job.succeeded, failed=failed),
        metadata=batch.metadata_,
        model=batch.model,
        usage=BatchUsage(
            input_tokens=job.prompt_tokens,
            output_tokens=job.completion_tokens,
            total_tokens=job.prompt_tokens + job.completion_tokens,
        ),
        created_at=int(batch.created_at.timestamp()),
        in_progress_at=_ts(batch.in_progress_at),
        finalizing_at=_ts(batch.finalizing_at),
        completed_at=_ts(batch.completed_at),
        failed_at=_ts(batch.failed_at),
        expired_at=_ts(batch.expired_at),
        expires_at=_ts(batch.expires_at),
        cancelling_at=_ts(batch.cancelling_at),
        cancelled_at=_ts(batch.cancelled_at),
        job_id=job.id,
    )


def _finalize_later(background: BackgroundTasks, batch_id: uuid.UUID, settings: Settings) -> None:
    """A batch whose job ended at its cancel (nothing was running) is finalized after the
    response; otherwise the worker that ends its last chunk, or the reconciler, does it."""
    background.add_task(_finalize, batch_id, settings)


def _finalize(batch_id: uuid.UUID, settings: Settings) -> None:
    from service.batches import finalize
    from service.store.engine import get_engine

    finalize.finalize(get_engine(settings.database.url), batch_id, settings)


@router.post("", response_model=BatchObject)
async def create_batch(
    body: BatchCreate,
    who: Auth,
    db: Db,
    settings: SettingsDep,
    background: BackgroundTasks,
) -> BatchObject:
    """Makes the batch (``validating``) and answers at once; the file is read after."""
    from starlette.concurrency import run_in_threadpool

    def make() -> BatchObject:
        with tx(db) as session:
            batch = lifecycle.create(
                session,
                who.tenant_id,
                input_file_id=body.input_file_id,
                endpoint=body.endpoint,
                metadata=body.metadata,
                settings=settings,
            )
            job = session.get(Job, batch.job_id)
            assert job is not None
            return batch_object(batch, job)

    made = await run_in_threadpool(make)
    batch_id = lifecycle.parse_id(made.id)
    if not pool.shared(settings).later(lifecycle.validate_and_ingest, batch_id, settings):
        background.add_task(lifecycle.validate_and_ingest, batch_id, settings)
    return made


@router.get("", response_model=BatchList)
def list_batches(
    who: Auth,
    db: Db,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20,
) -> BatchList:
    """The tenant's batches, newest first; ``after`` (a batch id) pages on."""
    try:
        mark = None if after is None else lifecycle.parse_id(after)
    except NotFoundError:
        raise BadInputError(
            f"after: {str(after)[:100]!r} is not a batch id", param="after"
        ) from None
    with read(db) as session:
        found = lifecycle.page(session, who.tenant_id, limit=limit, after=mark)
        data = [batch_object(b, j) for b, j in found.rows]
    return BatchList.of(data, found.has_more)


@router.get("/{batch_id}", response_model=BatchObject)
def retrieve_batch(batch_id: str, who: Auth, db: Db) -> BatchObject:
    with read(db) as session:
        batch, job = lifecycle.get(session, who.tenant_id, lifecycle.parse_id(batch_id))
        return batch_object(batch, job)


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(
    batch_id: str,
    who: Auth,
    db: Db,
    store: Store,
    settings: SettingsDep,
    background: BackgroundTasks,
) -> BatchObject:
    """``cancelling``; what finished is kept in its output file, the rest get
    ``batch_cancelled``. A finished batch is a 409 (not retried: ``x-should-retry: false``)."""
    uid = lifecycle.parse_id(batch_id)
    with tx(db) as session:
        lifecycle.cancel(session, store, who.tenant_id, uid)
    with read(db) as session:
        batch, job = lifecycle.get(session, who.tenant_id, uid)
        view = batch_object(batch, job)
        ended = JobStatus(job.status).terminal
    if ended and batch.status == "cancelling":
        _finalize_later(background, uid, settings)
    return view

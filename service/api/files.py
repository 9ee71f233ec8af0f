"""``/v1/files``: OpenAI's Files API, so code written against the official ``openai`` SDK
uploads a batch's input with only ``base_url`` changed. Errors are in OpenAI's shape
(``service.api.openai_errors``); another tenant's file is a 404 like a missing one.

An upload (``max_upload_bytes``, counted by ``Boundary`` as it arrives) is spooled by the
multipart parser, then read from the spool a part at a time into PostgreSQL
(``service.files.store``), so memory holds one part. A tenant already at its daily upload quota
is refused before the body is read (``UploadGatedRoute``); the exact check is in the upload's
transaction.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from service.api import schemas
from service.api.deps import PRINCIPAL, Auth, Db, SettingsDep, read, tx
from service.api.downloads import ExportResponse, Slots
from service.api.schemas import OPENAI_ERRORS, FileDeleted, FileList, FileObject
from service.errors import BadInputError, NotFoundError
from service.files import store
from service.settings import Settings
from service.store.keys import Principal
from service.store.quotas import check_file_upload

#: OpenAI's bounds on ``expires_after[seconds]``: an hour to 30 days.
MIN_EXPIRES_S, MAX_EXPIRES_S = 3600, 2_592_000
#: OpenAI's bound on a list's ``limit`` (and its default).
MAX_LIST = 10_000


class UploadGatedRoute(APIRoute):
    """For ``POST``, refuses a tenant already at its daily upload quota before FastAPI reads
    (and spools) the body; other methods pass through."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if "POST" not in self.methods:
            return handler

        async def gated(request: Request) -> Response:
            who = getattr(request.state, PRINCIPAL, None)
            if isinstance(who, Principal):  # without Boundary the handler's own auth answers
                settings: Settings = request.app.state.settings
                await run_in_threadpool(_check_quota, request.app.state.db, who, settings)
            return await handler(request)

        return gated


def _check_quota(db: Any, who: Principal, settings: Settings) -> None:
    with read(db) as session:
        check_file_upload(session, who.tenant_id, None, settings)


router = APIRouter(
    prefix="/v1/files", tags=["files"], responses=OPENAI_ERRORS, route_class=UploadGatedRoute
)


@router.post("", response_model=FileObject)
def upload_file(
    who: Auth,
    settings: SettingsDep,
    db: Db,
    file: Annotated[UploadFile, File(description="the file (a batch's JSONL input)")],
    purpose: Annotated[Literal["batch"], Form(description="only `batch` is accepted")],
    anchor: Annotated[
        Literal["created_at"] | None,
        Form(alias="expires_after[anchor]", description="`created_at`"),
    ] = None,
    seconds: Annotated[
        int | None,
        Form(
            alias="expires_after[seconds]",
            ge=MIN_EXPIRES_S,
            le=MAX_EXPIRES_S,
            description="the file's life after its creation (default: "
            "DOCQUEUE_FILE_DEFAULT_EXPIRES_S)",
        ),
    ] = None,
) -> FileObject:
    """Stores an upload (a batch's input) and answers its FileObject."""
    if (anchor is None) != (seconds is None):
        missing = "expires_after[seconds]" if seconds is None else "expires_after[anchor]"
        raise BadInputError(f"{missing} is required with expires_after", param=missing)
    try:
        filename = schemas.upload_name(file.filename) or "upload"
    except ValueError as exc:
        raise BadInputError(f"file name: {exc}", param="file") from None
    with tx(db) as session:
        row = store.create(
            session,
            who.tenant_id,
            file.file,
            filename=filename,
            purpose=purpose,
            expires_after_s=seconds,
            settings=settings,
        )
        return FileObject.of(row)


def _after(value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return store.parse_id(value)
    except NotFoundError:
        raise BadInputError(f"after: {value[:100]!r} is not a file id", param="after") from None


@router.get("", response_model=FileList)
def list_files(
    who: Auth,
    db: Db,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    purpose: Annotated[Literal["batch", "batch_output"] | None, Query()] = None,
) -> FileList:
    """The tenant's files by ``created_at`` (``desc`` by default); ``after`` a file id pages on."""
    with read(db) as session:
        page = store.list_files(
            session, who.tenant_id, limit=limit, after=_after(after), order=order, purpose=purpose
        )
        data = [FileObject.of(f) for f in page.files]
    return FileList.of(data, page.has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, who: Auth, db: Db) -> FileObject:
    with read(db) as session:
        return FileObject.of(store.get(session, who.tenant_id, store.parse_id(file_id)))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def file_content(file_id: str, who: Auth, db: Db, settings: SettingsDep, slots: Slots) -> Response:
    """The file's bytes, streamed a part at a time (each part its own short query); counts as
    a download (``DOCQUEUE_MAX_CONCURRENT_EXPORTS``, ``DOCQUEUE_EXPORT_SEND_TIMEOUT_S``)."""
    with read(db) as session:
        row = store.get(session, who.tenant_id, store.parse_id(file_id))
        session.expunge(row)
    slots.acquire(settings.api.max_concurrent_exports)
    return ExportResponse(
        store.iter_parts(db, row),
        slots=slots,
        send_timeout_s=settings.api.export_send_timeout_s,
        what=store.public_id(row.id),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(row.bytes),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename, safe='')}",
        },
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, who: Auth, db: Db, settings: SettingsDep) -> FileDeleted:
    """Deletes the file and its bytes."""
    uid = store.parse_id(file_id)
    store.delete_file(db, who.tenant_id, uid, settings)
    return FileDeleted(id=store.public_id(uid))

"""``/v1/collections``: documents kept between jobs, upserted by id, for scheduled work."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from pydantic import AfterValidator

from service.api.deps import Auth, Db, SettingsDep, tx
from service.api.schemas import (
    ERRORS,
    MAX_COLUMN_CHARS,
    CollectionDeleted,
    CollectionList,
    CollectionName,
    CollectionOut,
    DocumentDeleted,
    DocumentOut,
    DocumentPage,
    no_control,
    no_nul,
)
from service.collections import documents

router = APIRouter(prefix="/v1/collections", tags=["collections"], responses=ERRORS)

#: Path parameters, refused with a 422 naming them before any query (NUL cannot reach SQL).
Name = Annotated[CollectionName, Path(description="1-128 letters, digits, '.', '_' or '-'")]
ExternalId = Annotated[str, Path(min_length=1), AfterValidator(no_nul)]
Column = Annotated[str, Form(max_length=MAX_COLUMN_CHARS), AfterValidator(no_control)]


@router.put("/{name}/documents", response_model=CollectionOut)
def put_documents(
    name: Name,
    who: Auth,
    settings: SettingsDep,
    db: Db,
    file: Annotated[
        UploadFile, File(description="CSV, JSON Lines or Parquet with an id and a text column")
    ],
    text_column: Column = "text",
    id_column: Column = "id",
    delimiter: Annotated[str | None, Form(max_length=8)] = None,
    format: Annotated[
        str | None,
        Form(max_length=16, description="csv | jsonl | parquet; default: file name, content"),
    ] = None,
) -> CollectionOut:
    """Upsert documents by id; the collection is created on first use. A changed text makes
    the document pending (summarized again at the next scheduled run)."""
    counts = documents.upsert_documents(
        who.tenant_id,
        name,
        file.file,
        settings,
        text_column=text_column,
        id_column=id_column,
        delimiter=delimiter or None,
        format=format or None,
        file_name=file.filename,  # only its extension is read
    )
    with tx(db) as session:
        return CollectionOut.of(documents.describe(session, who.tenant_id, name), counts)


@router.get("", response_model=CollectionList)
def list_collections(who: Auth, db: Db) -> CollectionList:
    """The tenant's collections with counts (documents, summarized, pending)."""
    with tx(db) as session:
        rows = documents.list_collections(session, who.tenant_id)
        return CollectionList(data=[CollectionOut.of(r) for r in rows])


@router.get("/{name}", response_model=CollectionOut)
def get_collection(name: Name, who: Auth, db: Db) -> CollectionOut:
    with tx(db) as session:
        return CollectionOut.of(documents.describe(session, who.tenant_id, name))


@router.get("/{name}/documents", response_model=DocumentPage)
def list_documents(
    name: Name,
    who: Auth,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: Annotated[str | None, Query(max_length=2000)] = None,
    status: Annotated[Literal["pending", "summarized"] | None, Query()] = None,
) -> DocumentPage:
    """Documents in id order with their latest summary; ``next_page_token`` pages on."""
    with tx(db) as session:
        page = documents.list_documents(
            session, who.tenant_id, name, limit=limit, page_token=page_token, status=status
        )
        return DocumentPage(
            collection=page.collection,
            data=[DocumentOut.of(d) for d in page.documents],
            next_page_token=page.next_page_token,
        )


@router.get("/{name}/documents/{external_id:path}", response_model=DocumentOut)
def get_document(name: Name, external_id: ExternalId, who: Auth, db: Db) -> DocumentOut:
    """One document with its text and latest summary (``:path``: ids may contain "/")."""
    with tx(db) as session:
        return DocumentOut.of(documents.get_document(session, who.tenant_id, name, external_id))


@router.delete("/{name}/documents/{external_id:path}", response_model=DocumentDeleted)
def delete_document(name: Name, external_id: ExternalId, who: Auth, db: Db) -> DocumentDeleted:
    """Removes one document (deleted upstream); later scheduled runs no longer cover it."""
    with tx(db) as session:
        documents.delete_document(session, who.tenant_id, name, external_id)
    return DocumentDeleted(collection=name, id=external_id)


@router.delete("/{name}", response_model=CollectionDeleted)
def delete_collection(name: Name, who: Auth, db: Db) -> CollectionDeleted:
    """Deletes the collection, its documents and its schedules (jobs made from it stay)."""
    with tx(db) as session:
        documents.delete_collection(session, who.tenant_id, name)
    return CollectionDeleted(name=name)

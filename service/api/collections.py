"""HTTP routes for collections and schedules (included by ``service.api.app.create_app``)."""
# No `from __future__ import annotations`: FastAPI resolves the Annotated dependencies at
# definition time (see service/api.py).

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.collections import documents as collections
from service.collections import schedules
from service.jobs import queries, submit
from service.settings import Settings
from service.store.keys import Principal


class ScheduleIn(BaseModel):
    """A schedule: run ``task`` over the collection's new and changed documents at ``cron``."""

    collection: str
    task: str = "summarize"
    model: str | None = Field(default=None, description="default: the server's default model")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="job parameters: prompt, labels, max_tokens, temperature, seed, "
        "chunk_size, summary_words, language",
    )
    cron: str = Field(description="five fields, in `timezone`, e.g. '0 2 * * *' or @daily")
    timezone: str = Field(default="UTC", description="IANA name, e.g. Europe/Berlin")
    priority: str = Field(default="bulk", description="bulk (default) or interactive")


def router(settings: Settings, engine: Engine, principal: Callable[..., Principal]) -> APIRouter:
    """The routes, bound to the app's settings, database and authentication dependency."""
    api = APIRouter(prefix="/v1")
    Auth = Annotated[Principal, Depends(principal)]

    @contextmanager
    def tx() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    @api.put("/collections/{name}/documents", tags=["collections"])
    def put_documents(
        name: str,
        who: Auth,
        file: Annotated[UploadFile, File(description="CSV with an id and a text column")],
        text_column: Annotated[str, Form()] = "text",
        id_column: Annotated[str, Form()] = "id",
        delimiter: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        """Upsert documents by id; the collection is created on first use. A changed text
        makes the document pending (summarized again at the next scheduled run)."""
        counts = collections.upsert_documents(
            who.tenant_id,
            name,
            file.file,
            settings,
            text_column=text_column,
            id_column=id_column,
            delimiter=delimiter or None,
        )
        with tx() as session:
            view = collections.describe(session, who.tenant_id, name)
        view["upserted"] = {
            "inserted": counts.inserted,
            "updated": counts.updated,
            "unchanged": counts.unchanged,
        }
        return view

    @api.get("/collections", tags=["collections"])
    def list_collections(who: Auth) -> dict[str, Any]:
        """The tenant's collections with counts (documents, summarized, pending)."""
        with tx() as session:
            return {"object": "list", "data": collections.list_collections(session, who.tenant_id)}

    @api.get("/collections/{name}", tags=["collections"])
    def get_collection(name: str, who: Auth) -> dict[str, Any]:
        with tx() as session:
            return collections.describe(session, who.tenant_id, name)

    @api.get("/collections/{name}/documents", tags=["collections"])
    def list_documents(
        name: str,
        who: Auth,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        page_token: Annotated[str | None, Query()] = None,
        status: Annotated[str | None, Query(description="pending | summarized")] = None,
    ) -> dict[str, Any]:
        """Documents in id order with their latest summary; ``next_page_token`` pages on."""
        with tx() as session:
            return collections.list_documents(
                session, who.tenant_id, name, limit=limit, page_token=page_token, status=status
            )

    @api.get("/collections/{name}/documents/{external_id:path}", tags=["collections"])
    def get_document(name: str, external_id: str, who: Auth) -> dict[str, Any]:
        """One document with its text and latest summary (``:path``: ids may contain "/")."""
        with tx() as session:
            doc = collections.get_document(session, who.tenant_id, name, external_id)
            return {"object": "document", **collections.document_view(doc)}

    @api.delete("/collections/{name}/documents/{external_id:path}", tags=["collections"])
    def delete_document(name: str, external_id: str, who: Auth) -> dict[str, Any]:
        """Removes one document (deleted upstream); later scheduled runs no longer cover it."""
        with tx() as session:
            collections.delete_document(session, who.tenant_id, name, external_id)
        return {"object": "document", "collection": name, "id": external_id, "deleted": True}

    @api.delete("/collections/{name}", tags=["collections"])
    def delete_collection(name: str, who: Auth) -> dict[str, Any]:
        """Deletes the collection, its documents and its schedules (jobs made from it stay)."""
        with tx() as session:
            collections.delete_collection(session, who.tenant_id, name)
        return {"object": "collection", "name": name, "deleted": True}

    @api.post("/schedules", status_code=201, tags=["schedules"])
    def create_schedule(body: ScheduleIn, who: Auth) -> dict[str, Any]:
        """Validates cron and timezone (422 naming the field) and the job parameters."""
        with tx() as session:
            s = schedules.create_schedule(
                session,
                who.tenant_id,
                collection=body.collection,
                task=body.task,
                model=body.model or settings.default_model,
                params=body.params,
                cron=body.cron,
                timezone=body.timezone,
                priority=body.priority,
                settings=settings,
            )
            return schedules.schedule_view(s, body.collection)

    @api.get("/schedules", tags=["schedules"])
    def list_schedules(who: Auth) -> dict[str, Any]:
        with tx() as session:
            rows = schedules.list_schedules(session, who.tenant_id)
            return {"object": "list", "data": [schedules.schedule_view(s, c) for s, c in rows]}

    @api.get("/schedules/{schedule_id}", tags=["schedules"])
    def get_schedule(schedule_id: str, who: Auth) -> dict[str, Any]:
        with tx() as session:
            s = schedules.get_schedule(session, who.tenant_id, schedule_id)
            name = collections.collection_name(session, s.collection_id)
            return schedules.schedule_view(s, name)

    @api.delete("/schedules/{schedule_id}", tags=["schedules"])
    def delete_schedule(schedule_id: str, who: Auth) -> dict[str, Any]:
        """Stops future runs; jobs already created carry on."""
        with tx() as session:
            s = schedules.get_schedule(session, who.tenant_id, schedule_id)
            session.delete(s)
        return {"object": "schedule", "id": schedule_id, "deleted": True}

    @api.post("/schedules/{schedule_id}/run", tags=["schedules"])
    def run_schedule(schedule_id: str, who: Auth, background: BackgroundTasks) -> JSONResponse:
        """Run now (for the current UTC minute): 202 with the job created, 200 with the job
        this minute's run already has (or an earlier run still has open), or 200 with no job
        when nothing is new or changed."""
        result = schedules.run_now(engine, who.tenant_id, schedule_id, settings)
        if result.created and result.job is not None:
            background.add_task(submit.enqueue_job, result.job.id, settings)
        body = {
            "object": "schedule_run",
            "schedule_id": schedule_id,
            "scheduled_for": result.scheduled_for.isoformat(),
            "outcome": result.outcome,
            "documents": result.documents,
            "job": queries.job_view(result.job) if result.job is not None else None,
        }
        return JSONResponse(status_code=202 if result.created else 200, content=body)

    return api

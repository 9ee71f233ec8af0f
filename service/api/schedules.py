"""``/v1/schedules``: cron schedules that run a task over a collection's new documents."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at import.

from fastapi import APIRouter, BackgroundTasks, Response

from service.api.deps import Auth, Db, SettingsDep, tx
from service.api.schemas import (
    ERRORS,
    JobOut,
    ScheduleDeleted,
    ScheduleIn,
    ScheduleList,
    ScheduleOut,
    ScheduleRun,
    check_schedule_params,
)
from service.collections import documents, schedules
from service.jobs import submit

router = APIRouter(prefix="/v1/schedules", tags=["schedules"], responses=ERRORS)


@router.post("", status_code=201, response_model=ScheduleOut)
def create_schedule(body: ScheduleIn, who: Auth, settings: SettingsDep, db: Db) -> ScheduleOut:
    """Validates cron and timezone (422 naming the field) and the job parameters."""
    check_schedule_params(body.params)
    with tx(db) as session:
        s = schedules.create_schedule(
            session,
            who.tenant_id,
            collection=body.collection,
            task=body.task,
            model=body.model or settings.jobs.default_model,
            params=body.params,
            cron=body.cron,
            timezone=body.timezone,
            priority=body.priority,
            settings=settings,
        )
        return ScheduleOut.of(s, body.collection)


@router.get("", response_model=ScheduleList)
def list_schedules(who: Auth, db: Db) -> ScheduleList:
    with tx(db) as session:
        rows = schedules.list_schedules(session, who.tenant_id)
        return ScheduleList(data=[ScheduleOut.of(s, c) for s, c in rows])


@router.get("/{schedule_id}", response_model=ScheduleOut)
def get_schedule(schedule_id: str, who: Auth, db: Db) -> ScheduleOut:
    with tx(db) as session:
        s = schedules.get_schedule(session, who.tenant_id, schedule_id)
        return ScheduleOut.of(s, documents.collection_name(session, s.collection_id))


@router.delete("/{schedule_id}", response_model=ScheduleDeleted)
def delete_schedule(schedule_id: str, who: Auth, db: Db) -> ScheduleDeleted:
    """Stops future runs; jobs already created carry on."""
    with tx(db) as session:
        session.delete(schedules.get_schedule(session, who.tenant_id, schedule_id))
    return ScheduleDeleted(id=schedule_id)


@router.post(
    "/{schedule_id}/run",
    response_model=ScheduleRun,
    responses={202: {"model": ScheduleRun, "description": "a job was created"}},
)
def run_schedule(
    schedule_id: str,
    who: Auth,
    settings: SettingsDep,
    db: Db,
    response: Response,
    background: BackgroundTasks,
) -> ScheduleRun:
    """Run now (for the current UTC minute): 202 with the job created, 200 with the job this
    minute's run already has (or an earlier run still has open), or 200 with no job when
    nothing is new or changed."""
    result = schedules.run_now(db, who.tenant_id, schedule_id, settings)
    if result.created and result.job is not None:
        background.add_task(submit.enqueue_job, result.job.id, settings)
        response.status_code = 202
    return ScheduleRun(
        schedule_id=schedule_id,
        scheduled_for=result.scheduled_for,
        outcome=result.outcome,
        documents=result.documents,
        job=JobOut.of(result.job) if result.job is not None else None,
    )

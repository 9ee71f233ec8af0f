"""Schedules: a cron (in the schedule's own timezone) that runs a task over a collection.

A due run creates one ordinary job over the collection's new and changed documents (see
``service.collections.documents.create_collection_job``); the job's results flow back into the
collection when it ends (the chunk state machine's finalization, ``service.store.chunks``).
Every instant is stored in UTC.

Exactly one job per run, however many beat processes or manual triggers race: the run's
idempotency key is ``schedule:<id>:<scheduled UTC minute>`` (unique per tenant on ``jobs``), and
the schedule row is locked while its run is decided.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import logs
from service.contract import parse_priority
from service.errors import (
    ConflictError,
    InvalidParameterError,
    NotFoundError,
    QuotaExceededError,
)
from service.jobs import submit
from service.jobs import validate as jobs
from service.settings import Settings
from service.store import quotas
from service.store.states import TERMINAL_STATUSES
from service.store.tables import Collection, Job, Schedule

log = logging.getLogger(__name__)

# --- cron -------------------------------------------------------------------------------------

# cronsim reads the fields (numbers, names such as mon-fri or jan, 7 as Sunday, lists, ranges,
# steps, and its L / LW / nth-weekday extensions); it has no macros, and it would take a sixth
# (seconds) field, which a schedule does not have.
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MAX_CRON = 200  # the length of schedules.cron
# (name, lowest, highest): only to say which value cronsim rejected, which it does not say.
_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
# Local times more than this apart cannot swap order in UTC (no zone shifts by more).
_DST_SLACK = timedelta(hours=3)
_EPOCH = datetime(2000, 1, 1)  # any start will do: parse_cron only asks cronsim to read


@dataclass(frozen=True)
class Cron:
    """A five-field cron expression (minute hour day-of-month month day-of-week) that cronsim
    accepts, with the minutes, hours, months and weekdays it names."""

    expr: str  # as given, whitespace normalized: what the schedule stores
    fields: str  # the five fields cronsim reads (a macro expanded)
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: frozenset[int]
    # 0 = Sunday (7 too); (day, n) for day#n, (day, CronSim.LAST) for dayL
    weekdays: frozenset[int | tuple[int, int]]


def _cron_error(expr: str, why: str) -> InvalidParameterError:
    shown = expr if len(expr) <= 60 else expr[:60] + "..."
    return InvalidParameterError(
        f"cron {shown!r}: {why} (five fields: minute hour day-of-month month day-of-week, "
        "e.g. '0 2 * * *', or @daily/@hourly/@weekly/@monthly/@yearly)",
        field="cron",
    )


def _field_error(name: str, lo: int, hi: int, part: str) -> str:
    """Why cronsim rejected one field, in words (cronsim only says 'Bad minute')."""
    for item in part.split(","):
        base, slash, step = item.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            return f"{name}: step {step!r} must be a positive number"
        ends = base.split("-")
        for end in ends:
            if end.isdigit() and not lo <= int(end) <= hi:
                return f"{name}: {int(end)} is outside {lo}-{hi}"
        if len(ends) == 2 and all(e.isdigit() for e in ends) and int(ends[0]) > int(ends[1]):
            return f"{name}: range {base!r} runs backwards"
    return f"{name}: {part!r} is not a number, name, range, list or step within {lo}-{hi}"


def parse_cron(expr: str) -> Cron:
    """Parses ``expr`` or raises a 422 naming the ``cron`` field and what is wrong."""
    if len(expr) > _MAX_CRON:
        raise _cron_error(expr, f"longer than {_MAX_CRON} characters")
    odd = next((c for c in expr if not c.isascii() or not (c.isprintable() or c.isspace())), None)
    if odd is not None:
        raise _cron_error(expr, f"character {odd!r} is not allowed (printable ASCII only)")
    text = " ".join(expr.split())
    fields = _MACROS.get(text.lower(), text)
    parts = fields.split(" ")
    if len(parts) != 5:
        raise _cron_error(expr, f"expected 5 fields, got {len(parts)}")
    try:
        sim = CronSim(fields, _EPOCH)
    except CronSimError:
        for i, (name, lo, hi) in enumerate(_FIELDS):
            alone = " ".join(parts[i] if j == i else "*" for j in range(5))
            try:
                CronSim(alone, _EPOCH)
            except CronSimError:
                raise _cron_error(expr, _field_error(name, lo, hi, parts[i])) from None
        # Every field is fine alone: the days named do not exist in the months named.
        raise _cron_error(expr, "it never fires (no month named has that day)") from None
    return Cron(
        expr=text,
        fields=fields,
        minutes=tuple(sorted(sim.minutes)),
        hours=tuple(sorted(sim.hours)),
        months=frozenset(sim.months),
        weekdays=frozenset(d % 7 if isinstance(d, int) else (d[0] % 7, d[1]) for d in sim.weekdays),
    )


_MAX_TIMEZONE = 64  # the length of schedules.timezone
# IANA names: Europe/Berlin, America/Port-au-Prince, Etc/GMT+5. ZoneInfo opens the name as a
# path under TZPATH and tzdata: no dots ('..'), no NUL, nothing a filesystem would refuse.
_TIMEZONE = re.compile(r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*")


def parse_timezone(name: str) -> ZoneInfo:
    """The zone named, or a 422 naming ``timezone``: never the OSError (a name too long for the
    filesystem, a directory such as 'Europe') or ValueError ZoneInfo raises on hostile names."""
    key = name.strip()
    shown = key if len(key) <= 60 else key[:60] + "..."
    unknown = InvalidParameterError(
        f"unknown timezone {shown!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'",
        field="timezone",
    )
    if len(key) > _MAX_TIMEZONE or not _TIMEZONE.fullmatch(key):
        raise unknown
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise unknown from None


def next_run(cron: Cron, tz: ZoneInfo, after: datetime) -> datetime:
    """The first instant strictly after ``after`` at which ``cron`` fires in ``tz``, in UTC.

    Wall-clock times are matched in the schedule's zone. A time skipped by a daylight-saving
    jump runs at the same instant as the hour after it (02:30 on a night that jumps from 02:00
    to 03:00 runs at 03:30); a time that occurs twice runs once, at its first occurrence.
    """
    # cronsim's own DST handling differs: with a fixed minute and hour it runs a skipped time
    # at the end of the jump (02:30 at 03:00, not 03:30), and with '*' in the minute or hour it
    # skips it and runs a repeated time twice. So cronsim walks naive wall-clock times here
    # (given a naive start it applies no zone rules), and each maps to UTC with fold=0: a
    # skipped time at the offset before the jump (02:30 is 03:30), a repeated one at its first
    # occurrence. That mapping is not monotonic around a jump (02:30 is later than 03:00), so
    # the walk starts _DST_SLACK early and takes the earliest instant after ``after``.
    after = after.astimezone(UTC)
    start = (after.astimezone(tz) - _DST_SLACK).replace(tzinfo=None)
    best: datetime | None = None
    best_local = start
    try:
        for local in CronSim(cron.fields, start):
            if best is not None and local > best_local + _DST_SLACK:
                break
            instant = local.replace(tzinfo=tz).astimezone(UTC)  # fold=0: the first one
            if instant > after and (best is None or instant < best):
                best, best_local = instant, local
    except OverflowError:  # past the year 9999
        pass
    if best is None:  # cronsim gives up after 50 years without a match
        raise _cron_error(cron.expr, "it never fires")
    return best


def run_minute(instant: datetime) -> str:
    """A run's UTC minute, as it appears in the idempotency key."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def idempotency_key(schedule_id: uuid.UUID, scheduled_for: datetime) -> str:
    return f"{jobs.RESERVED_KEY_PREFIX}{schedule_id}:{run_minute(scheduled_for)}"


# --- schedules --------------------------------------------------------------------------------

#: Job parameters a schedule may carry (the same meaning as in POST /v1/jobs).
PARAM_KEYS = (
    "prompt",
    "labels",
    "max_tokens",
    "temperature",
    "seed",
    "chunk_size",
    "summary_words",
    "language",
)


def job_request(
    task: str, model: str, params: dict[str, Any], priority: int, key: str | None = None
) -> jobs.JobRequest:
    """The job a schedule's run creates, validated exactly like an uploaded job's."""
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise InvalidParameterError(
            f"params: unknown key {unknown[0]!r}; allowed: {', '.join(PARAM_KEYS)}",
            field=f"params.{unknown[0]}",
        )
    labels = params.get("labels")
    if isinstance(labels, list):
        labels = jobs.parse_labels(_json_list(labels))
    elif labels is not None:
        labels = jobs.parse_labels(str(labels))

    def num(name: str, kind: type) -> Any:
        value = params.get(name)
        if value is None:
            return None
        if isinstance(value, str) and not (value.isascii() and value.strip()):
            # int() and float() take Unicode digits ("٣"); a stored schedule takes ASCII only.
            raise InvalidParameterError(
                f"params.{name} must be a {kind.__name__}", field=f"params.{name}"
            )
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidParameterError(
                f"params.{name} must be a {kind.__name__}", field=f"params.{name}"
            ) from None

    def text(name: str) -> str | None:
        """A text parameter: the prompt template or the summary language, never an object
        whose repr would reach a prompt. The template itself is checked by ``jobs.validate``
        (the rules of ``service.jobs.templates``), here and again at every run."""
        value = params.get(name)
        if value is None or isinstance(value, str):
            return value
        raise InvalidParameterError(f"params.{name} must be a string", field=f"params.{name}")

    prompt = text("prompt")
    extra = {k: params[k] for k in ("summary_words", "language") if params.get(k) is not None}
    if "summary_words" in extra:
        extra["summary_words"] = num("summary_words", int)
    if "language" in extra:
        extra["language"] = text("language")
    return jobs.JobRequest(
        task=task.strip().lower(),
        model=model.strip(),
        prompt=prompt,
        labels=labels,
        max_tokens=num("max_tokens", int),
        temperature=num("temperature", float),
        seed=num("seed", int),
        chunk_size=num("chunk_size", int),
        priority=priority,
        idempotency_key=key,
        extra_params=extra,
    )


def _json_list(items: list[Any]) -> str:
    return json.dumps([str(i) for i in items])


def create_schedule(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    collection: str,
    task: str,
    model: str,
    params: dict[str, Any],
    cron: str,
    timezone: str,
    priority: str | None,
    settings: Settings,
    now: datetime | None = None,
) -> Schedule:
    parsed = parse_cron(cron)
    tz = parse_timezone(timezone)
    try:
        prio = parse_priority(priority if priority is not None else "bulk")
    except ValueError as exc:
        raise InvalidParameterError(str(exc), field="priority") from None
    req = job_request(task, model, params, prio)
    jobs.validate(req, settings)
    coll = session.scalar(
        select(Collection).where(Collection.tenant_id == tenant_id, Collection.name == collection)
    )
    if coll is None:
        raise NotFoundError(f"collection {collection!r} not found", field="collection")
    taken = session.scalar(select(Schedule.id).where(Schedule.collection_id == coll.id))
    if taken is not None:  # uq_schedules_collection also guards a concurrent create
        raise ConflictError(
            f"collection {collection!r} already has schedule {taken}: a collection keeps one "
            "result per document, so it takes one schedule; remove that one first",
            field="collection",
        )
    schedule = Schedule(
        tenant_id=tenant_id,
        collection_id=coll.id,
        task=req.task,
        model=req.model,
        params=dict(params),
        priority=prio,
        cron=parsed.expr,
        timezone=tz.key,
        next_run_at=next_run(parsed, tz, now or datetime.now(UTC)),
    )
    session.add(schedule)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        if "uq_schedules_collection" not in str(exc.orig):
            raise
        raise ConflictError(
            f"collection {collection!r} already has a schedule", field="collection"
        ) from None
    return schedule


def get_schedule(session: Session, tenant_id: uuid.UUID, schedule_id: str) -> Schedule:
    try:
        sid = uuid.UUID(str(schedule_id))
    except ValueError:
        raise NotFoundError(f"schedule {schedule_id} not found") from None
    found = session.scalar(
        select(Schedule).where(Schedule.id == sid, Schedule.tenant_id == tenant_id)
    )
    if found is None:
        raise NotFoundError(f"schedule {schedule_id} not found")
    return found


def list_schedules(session: Session, tenant_id: uuid.UUID) -> list[tuple[Schedule, str]]:
    rows = session.execute(
        select(Schedule, Collection.name)
        .join(Collection, Collection.id == Schedule.collection_id)
        .where(Schedule.tenant_id == tenant_id)
        .order_by(Schedule.created_at, Schedule.id)
    ).all()
    return [(s, name) for s, name in rows]


# --- runs -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one run of a schedule did. ``job`` is set when a job exists for the run."""

    schedule_id: uuid.UUID
    scheduled_for: datetime
    outcome: str  # created | existing | empty | busy | quota | failed
    job: Job | None = None
    documents: int = 0

    @property
    def created(self) -> bool:
        return self.outcome == "created"


def _run_locked(
    session: Session, schedule: Schedule, scheduled_for: datetime, settings: Settings
) -> RunResult:
    """Decides and creates a run while the schedule row is locked by the caller."""
    from service.collections.documents import create_collection_job

    key = idempotency_key(schedule.id, scheduled_for)
    existing = submit.find_idempotent(session, schedule.tenant_id, key)
    if existing is not None:
        return RunResult(schedule.id, scheduled_for, "existing", existing, existing.total)
    if schedule.last_job_id is not None:
        last = session.get(Job, schedule.last_job_id)
        # Runs never overlap: the previous job's documents would be summarized twice.
        if last is not None and last.status not in TERMINAL_STATUSES:
            schedule.last_run_at = scheduled_for
            schedule.last_run_outcome = f"skipped: job {last.id} of an earlier run is {last.status}"
            return RunResult(schedule.id, scheduled_for, "busy", last, last.total)
    req = job_request(schedule.task, schedule.model, schedule.params, schedule.priority, key)
    job = create_collection_job(session, schedule, req, settings)
    if job is not None:  # a scheduled job counts against its tenant's quotas like any other
        quotas.check_submission(session, schedule.tenant_id, job.id, job.total, 0, settings)
    schedule.last_run_at = scheduled_for
    if job is None:
        schedule.last_run_outcome = "no new or changed documents; no job"
        return RunResult(schedule.id, scheduled_for, "empty")
    schedule.last_job_id = job.id
    schedule.last_run_outcome = f"job {job.id}: {job.total} documents"
    return RunResult(schedule.id, scheduled_for, "created", job, job.total)


def run_now(
    engine: Engine,
    tenant_id: uuid.UUID,
    schedule_id: str,
    settings: Settings,
    now: datetime | None = None,
) -> RunResult:
    """A manual run for the current UTC minute. Two triggers in the same minute (or one racing
    the beat's run of that minute) give one job. The caller enqueues a created job."""
    scheduled_for = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        schedule = get_schedule(session, tenant_id, schedule_id)
        session.refresh(schedule, with_for_update=True)
        return _run_locked(session, schedule, scheduled_for, settings)


def tick(engine: Engine, settings: Settings, now: datetime | None = None) -> list[RunResult]:
    """Runs every due schedule once (beat calls this every ``schedule_tick_s``) and enqueues
    the jobs created. A run missed while beat was down runs once, late; the next one is
    computed from now. Locked rows are skipped: another beat process is running them."""
    now = now or datetime.now(UTC)
    with Session(engine) as session:
        due = list(
            session.scalars(
                select(Schedule.id)
                .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
                .order_by(Schedule.next_run_at)
                .limit(1000)
            )
        )
    results: list[RunResult] = []
    for sid in due:
        try:
            result = _tick_one(engine, sid, settings, now)
        except Exception:  # one broken schedule must not stop the others
            log.exception("schedule %s: run failed; retried at the next tick", sid)
            continue
        if result is None:
            continue
        results.append(result)
        with logs.log_context(job_id=result.job.id if result.job is not None else None):
            if result.created and result.job is not None:
                submit.enqueue_job(result.job.id, settings)
            log.info(
                "schedule %s run for %s: %s (%d documents)",
                sid,
                run_minute(result.scheduled_for),
                result.outcome,
                result.documents,
            )
    return results


def _tick_one(
    engine: Engine, sid: uuid.UUID, settings: Settings, now: datetime
) -> RunResult | None:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        schedule = session.scalar(
            select(Schedule)
            .where(Schedule.id == sid, Schedule.enabled.is_(True), Schedule.next_run_at <= now)
            .with_for_update(skip_locked=True)
        )
        if schedule is None:  # taken by another beat, or no longer due
            return None
        scheduled_for = schedule.next_run_at
        try:
            cron, tz = parse_cron(schedule.cron), parse_timezone(schedule.timezone)
        except InvalidParameterError as exc:  # stored before a rule changed: disable, say why
            schedule.enabled = False
            schedule.last_run_outcome = f"disabled: {exc.message}"[:200]
            return None
        try:
            with session.begin_nested():  # a failed run leaves nothing half-written
                result = _run_locked(session, schedule, scheduled_for, settings)
        except QuotaExceededError as exc:
            # Over a quota now, not for good: tried again once it may allow the run (its
            # Retry-After), or at the next cron time if that comes first. Nothing was created.
            log.warning("schedule %s: run for %s waits: %s", sid, scheduled_for, exc.message)
            schedule.last_run_at = scheduled_for
            schedule.last_run_outcome = f"waiting: {exc.message}"[:200]
            retry_at = now + timedelta(seconds=int(exc.where.get("retry_after_s", 60)))
            schedule.next_run_at = min(next_run(cron, tz, max(now, scheduled_for)), retry_at)
            return RunResult(schedule.id, scheduled_for, "quota")
        except InvalidParameterError as exc:
            # Parameters valid when stored but not now (a limit was lowered, a model renamed):
            # say so on the schedule and wait for its next time, never retry every tick.
            log.warning("schedule %s: run for %s failed: %s", sid, scheduled_for, exc.message)
            schedule.last_run_at = scheduled_for
            schedule.last_run_outcome = f"failed: {exc.message}"[:200]
            result = RunResult(schedule.id, scheduled_for, "failed")
        schedule.next_run_at = next_run(cron, tz, max(now, scheduled_for))
        return result

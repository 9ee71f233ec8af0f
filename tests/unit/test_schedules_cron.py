"""Cron parsing and due-time computation in the schedule's timezone (stored in UTC)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from service.collections.schedules import idempotency_key, next_run, parse_cron, parse_timezone
from service.contract import PRIORITIES, parse_priority, priority_class, queue_for_model
from service.errors import InvalidParameterError

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_nightly_in_a_timezone_is_stored_in_utc() -> None:
    cron = parse_cron("0 2 * * *")
    # Winter: Berlin is UTC+1, so 02:00 local is 01:00 UTC.
    assert next_run(cron, BERLIN, utc(2026, 1, 10, 12, 0)) == utc(2026, 1, 11, 1, 0)
    # Summer: UTC+2.
    assert next_run(cron, BERLIN, utc(2026, 7, 10, 12, 0)) == utc(2026, 7, 11, 0, 0)
    # Strictly after: a run at exactly the due instant gives the next day's.
    assert next_run(cron, BERLIN, utc(2026, 7, 11, 0, 0)) == utc(2026, 7, 12, 0, 0)
    # New York, 02:00 EST = 07:00 UTC.
    assert next_run(cron, NEW_YORK, utc(2026, 1, 10, 12, 0)) == utc(2026, 1, 11, 7, 0)


def test_dst_gap_runs_an_hour_later_and_overlap_runs_once() -> None:
    cron = parse_cron("30 2 * * *")
    # 2026-03-29 02:30 does not exist in Berlin (clocks jump 02:00 -> 03:00): it runs at
    # 03:30 CEST = 01:30 UTC, once.
    assert next_run(cron, BERLIN, utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 29, 1, 30)
    assert next_run(cron, BERLIN, utc(2026, 3, 29, 1, 30)) == utc(2026, 3, 30, 0, 30)
    # 2026-10-25 02:30 happens twice (CEST then CET): the first one only.
    first = next_run(cron, BERLIN, utc(2026, 10, 24, 12, 0))
    assert first == utc(2026, 10, 25, 0, 30)
    assert next_run(cron, BERLIN, first) == utc(2026, 10, 26, 1, 30)


def test_hourly_across_the_spring_gap_never_goes_backwards() -> None:
    cron = parse_cron("30 * * * *")
    t = utc(2026, 3, 28, 23, 0)
    seen = []
    for _ in range(6):
        t = next_run(cron, BERLIN, t)
        seen.append(t)
    assert seen == sorted(set(seen))
    assert seen[0] == utc(2026, 3, 28, 23, 30)


def test_fields_lists_ranges_steps_names_and_macros() -> None:
    c = parse_cron("*/15 9-17 * * mon-fri")
    assert c.minutes == (0, 15, 30, 45) and c.hours == tuple(range(9, 18))
    assert c.weekdays == frozenset({1, 2, 3, 4, 5})
    # Saturday 2026-01-10 -> Monday 2026-01-12 09:00 UTC.
    assert next_run(c, ZoneInfo("UTC"), utc(2026, 1, 10, 12, 0)) == utc(2026, 1, 12, 9, 0)
    assert parse_cron("@daily").minutes == (0,) and parse_cron("@daily").hours == (0,)
    assert parse_cron("0 0 * * 7").weekdays == frozenset({0})  # 7 is Sunday
    assert parse_cron("0 0 1 jan,jul *").months == frozenset({1, 7})
    # Both day fields restricted: either matches (classic cron).
    either = parse_cron("0 0 13 * fri")
    assert next_run(either, ZoneInfo("UTC"), utc(2026, 2, 1)) == utc(2026, 2, 6)  # a Friday
    # 29 February is found years ahead.
    assert next_run(parse_cron("0 0 29 2 *"), ZoneInfo("UTC"), utc(2026, 3, 1)) == utc(2028, 2, 29)


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("0 2 * *", "expected 5 fields"),
        ("61 * * * *", "minute: 61 is outside 0-59"),
        ("0 24 * * *", "hour: 24 is outside 0-23"),
        ("0 0 * * funday", "day of week: 'funday' is not a number"),
        ("*/0 * * * *", "step '0'"),
        ("0 0 5-1 * *", "runs backwards"),
        ("0 0 31 2 *", "never fires"),
    ],
)
def test_bad_cron_is_a_422_naming_the_field(expr: str, says: str) -> None:
    cron = None
    with pytest.raises(InvalidParameterError) as info:
        cron = parse_cron(expr)
        next_run(cron, ZoneInfo("UTC"), utc(2026, 1, 1))
    assert info.value.status_code == 422
    assert info.value.where["field"] == "cron"
    assert says in info.value.message


def test_bad_timezone_is_a_422_naming_the_field() -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_timezone("Mars/Olympus")
    assert info.value.where["field"] == "timezone"
    assert parse_timezone("Europe/Berlin").key == "Europe/Berlin"


def test_idempotency_key_is_the_schedule_and_its_utc_minute() -> None:
    import uuid

    sid = uuid.UUID(int=7)
    local = datetime(2026, 1, 11, 2, 0, 59, tzinfo=BERLIN)
    assert idempotency_key(sid, local) == f"schedule:{sid}:2026-01-11T01:00Z"


def test_priorities_and_their_queues() -> None:
    assert parse_priority(None) == parse_priority("interactive") == PRIORITIES["interactive"]
    assert parse_priority("BULK") == PRIORITIES["bulk"]
    assert parse_priority("3") == 3 and priority_class(3) == "interactive"
    assert priority_class(-1) == "bulk"
    with pytest.raises(ValueError, match="interactive, bulk"):
        parse_priority("urgent")
    interactive = queue_for_model("org/model")
    assert queue_for_model("org/model", PRIORITIES["bulk"]) == interactive + ".bulk"

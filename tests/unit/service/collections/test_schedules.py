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


# --- cronsim reads the fields; these pin what a schedule accepts and when it runs -----------


def test_a_too_long_cron_is_a_422_that_does_not_echo_it_all() -> None:
    expr = "0 2 * * " + ",".join(["1"] * 100)
    with pytest.raises(InvalidParameterError) as info:
        parse_cron(expr)
    assert info.value.where["field"] == "cron"
    assert "longer than 200 characters" in info.value.message
    assert len(info.value.message) < 300


@pytest.mark.parametrize(
    "expr",
    ["0\x00 2 * * *", "\uff10 2 * * *", "0 2 * * \u0661", "0 2 * * mon\u200b", "0 2\x01 * * *"],
)
def test_nul_control_and_non_ascii_characters_are_a_422(expr: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_cron(expr)
    assert info.value.where["field"] == "cron"
    assert "is not allowed" in info.value.message


def test_whitespace_is_normalized_and_six_fields_are_refused() -> None:
    assert parse_cron("\t0  2 * *\n*").expr == "0 2 * * *"
    assert parse_cron("@DAILY").expr == "@DAILY"  # stored as given; read as 0 0 * * *
    with pytest.raises(InvalidParameterError, match="expected 5 fields, got 6"):
        parse_cron("0 0 2 * * *")  # cronsim would read a seconds field
    with pytest.raises(InvalidParameterError, match="expected 5 fields, got 1"):
        parse_cron("")


def test_day_and_month_names_in_any_case() -> None:
    weekdays = parse_cron("0 9 * jan MON-Fri")
    assert weekdays.months == frozenset({1}) and weekdays.weekdays == frozenset({1, 2, 3, 4, 5})
    # Friday 2026-01-30 09:00 -> Friday 2027-01-01 (February to December are not January).
    assert next_run(weekdays, ZoneInfo("UTC"), utc(2026, 1, 30, 9, 0)) == utc(2027, 1, 1, 9, 0)
    # Both day fields restricted: the 1st or any Sunday of July.
    sundays = parse_cron("0 0 1 JUL sun")
    assert next_run(sundays, ZoneInfo("UTC"), utc(2026, 7, 1)) == utc(2026, 7, 5)


def test_seven_is_sunday_too() -> None:
    sunday = utc(2026, 1, 11)  # a Sunday
    for expr in ("0 0 * * 7", "0 0 * * 0", "0 0 * * sun", "0 0 * * 6-7"):
        c = parse_cron(expr)
        assert 0 in c.weekdays and 7 not in c.weekdays
        assert next_run(c, ZoneInfo("UTC"), utc(2026, 1, 10, 12, 0)) == sunday, expr


def test_cronsim_extensions_last_day_and_nth_weekday() -> None:
    assert next_run(parse_cron("0 0 L 2 *"), ZoneInfo("UTC"), utc(2026, 1, 1)) == utc(2026, 2, 28)
    # The second Sunday of March 2026 (7#2 is 0#2).
    assert parse_cron("0 0 * 3 7#2").weekdays == frozenset({(0, 2)})
    assert next_run(parse_cron("0 0 * 3 7#2"), ZoneInfo("UTC"), utc(2026, 1, 1)) == utc(2026, 3, 8)


@pytest.mark.parametrize("expr", ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 30-31 2 *"])
def test_a_cron_that_never_fires_is_a_422_when_parsed(expr: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_cron(expr)
    assert info.value.status_code == 422 and info.value.where["field"] == "cron"
    assert "never fires" in info.value.message


def test_an_impossible_day_of_month_with_a_weekday_still_fires_on_the_weekday() -> None:
    # Either day field matching is enough, so 30 February or Monday means every Monday of
    # February (cronsim before 2.8 refused this as a bad day-of-month).
    cron = parse_cron("0 0 30 2 mon")
    assert next_run(cron, ZoneInfo("UTC"), utc(2026, 1, 1)) == utc(2026, 2, 2)


def test_no_run_left_before_the_year_10000_is_a_422_not_a_loop() -> None:
    cron = parse_cron("0 0 29 2 *")  # 29 February: 9996 is the last leap year
    with pytest.raises(InvalidParameterError) as info:
        next_run(cron, ZoneInfo("UTC"), utc(9997, 1, 1))
    assert info.value.where["field"] == "cron" and "never fires" in info.value.message


@pytest.mark.parametrize(
    "expr",
    [
        "@often",
        "* * * * * * *",
        "1- * * * *",
        "*/ * * * *",
        ", * * * *",
        "0 0 * * 5#9",
        "0 0 * * L",
        "0 0 LL * *",
        "0 0 * 0 *",
        "0 0 0 * *",
        "0 0 * * 8",
        "0 0 * * fri-mon",
        "1/0 * * * *",
        "9" * 199 + " * * * *",
    ],
)
def test_anything_cronsim_refuses_is_a_422_naming_the_cron(expr: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_cron(expr)
    assert info.value.status_code == 422 and info.value.where["field"] == "cron"
    assert "e.g. '0 2 * * *'" in info.value.message


def test_dst_with_a_star_in_minute_or_hour_keeps_the_same_rules() -> None:
    # cronsim alone would skip 02:00 and 02:30 on the night clocks jump, and run the repeated
    # hour twice; a schedule runs the skipped times as the hour after, and repeated ones once.
    half_hourly_at_two = parse_cron("*/30 2 * * *")
    t = utc(2026, 3, 28, 12, 0)
    spring = [t := next_run(half_hourly_at_two, BERLIN, t) for _ in range(3)]
    assert spring == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 1, 30), utc(2026, 3, 30, 0, 0)]
    t = utc(2026, 10, 24, 12, 0)
    autumn = [t := next_run(half_hourly_at_two, BERLIN, t) for _ in range(3)]
    assert autumn == [utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 0)]
    hourly = parse_cron("30 * * * *")
    t = utc(2026, 10, 24, 23, 0)  # 01:00 CEST
    autumn = [t := next_run(hourly, BERLIN, t) for _ in range(3)]
    # 01:30 CEST, 02:30 CEST, then 03:30 CET: the second 02:30 (CET) does not run.
    assert autumn == [utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 2, 30)]


def test_a_skipped_time_is_found_after_the_jump_and_runs_once() -> None:
    # On 2026-03-29 Berlin skips 02:00-03:00: 02:00 runs as 03:00 CEST (01:00 UTC) and 02:30 as
    # 03:30, the instants 03:00 and 03:30 have anyway, so each runs once.
    cron = parse_cron("0,30 2,3 29 3 *")
    t = utc(2026, 3, 29, 0, 0)
    runs = [t := next_run(cron, BERLIN, t) for _ in range(3)]
    assert runs == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 1, 30), utc(2027, 3, 29, 0, 0)]
    # Asked at 03:10 CEST, the skipped 02:30 (as 03:30) is still to come that night.
    assert next_run(parse_cron("30 2 * * *"), BERLIN, utc(2026, 3, 29, 1, 10)) == utc(
        2026, 3, 29, 1, 30
    )

"""Periodic schedules: cron parsing, ticks in a timezone, and one message id per (schedule, tick)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from worker.schedules import Schedule, schedules_of


def test_a_bad_expression_or_timezone_fails_where_it_is_declared() -> None:
    with pytest.raises(ValueError, match="not a cron expression"):
        Schedule("61 * * * *")
    with pytest.raises(ValueError, match="unknown timezone"):
        Schedule("0 * * * *", timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="cron string, a Schedule"):
        schedules_of({"periodic": 5})
    with pytest.raises(ValueError, match="share a name"):
        schedules_of({"periodic": ["0 * * * *", Schedule("0 * * * *")]})


def test_ticks_follow_the_schedule_in_its_timezone() -> None:
    nine_in_paris = Schedule("0 9 * * MON-FRI", timezone="Europe/Paris")
    now = datetime(2026, 12, 2, 7, 30, tzinfo=UTC)  # Wednesday 8:30 in Paris (UTC+1)

    assert nine_in_paris.next_tick(now) == datetime(2026, 12, 2, 9, 0, tzinfo=ZoneInfo("Europe/Paris"))
    assert nine_in_paris.last_tick(now) == datetime(2026, 12, 1, 9, 0, tzinfo=ZoneInfo("Europe/Paris"))
    assert Schedule("*/10 * * * * *").next_tick(now) == datetime(2026, 12, 2, 7, 30, 10, tzinfo=UTC)


def test_a_tick_has_one_message_id_in_every_process_and_schedules_do_not_share_them() -> None:
    tick = datetime(2026, 12, 2, 9, 0, tzinfo=ZoneInfo("Europe/Paris"))
    daily = Schedule("0 9 * * *", args=("daily",), timezone="Europe/Paris")

    assert daily.message_id("report", tick) == Schedule("0 9 * * *", args=("daily",)).message_id(
        "report", tick.astimezone(UTC)
    )
    others = {
        Schedule("0 9 * * *", args=("weekly",)).message_id("report", tick),
        daily.message_id("other_actor", tick),
        daily.message_id("report", tick.replace(day=3)),
    }
    assert daily.message_id("report", tick) not in others and len(others) == 3


def test_the_option_takes_a_string_a_schedule_or_a_list() -> None:
    assert schedules_of({}) == []
    assert schedules_of({"periodic": "* * * * *"}) == [Schedule("* * * * *")]
    both = [Schedule("0 * * * *", name="hourly"), "30 * * * *"]
    assert [s.cron for s in schedules_of({"periodic": both})] == ["0 * * * *", "30 * * * *"]

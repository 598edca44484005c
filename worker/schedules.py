"""Periodic jobs' schedules: cron expressions declared on actors, their ticks, and one message id per tick.

Cron expressions are parsed and evaluated by cronsim (Healthchecks' parser: it matches Debian cron, DST
transitions included, and takes an optional leading seconds field). A tick's message id is derived from
the schedule and the tick's time, so every worker process that enqueues the same tick enqueues the same row
id, and the queue keeps the first (enqueue_jobs ignores an id it has seen): one job per tick, however many
schedulers run.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

#: The actor option that declares schedules: a cron string, a Schedule, or a list of them.
PERIODIC_OPTION = "periodic"
#: Namespace of the message ids of periodic jobs (uuid5 of the schedule's name and the tick).
TICK_NAMESPACE = uuid.UUID("7d6f5e2c-2b8a-4a61-9c55-1f0b7a4c9e11")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When to enqueue an actor, with which arguments.

    `cron` has five fields (minute hour day month weekday) or six (a leading seconds field). `timezone` is
    an IANA name: "0 9 * * MON-FRI" in "Europe/Paris" runs at 9:00 Paris time, summer and winter. `name`
    tells two schedules of one actor apart; by default it is made of the cron expression and the arguments.
    """

    cron: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timezone: str = "UTC"
    name: str | None = None

    def __post_init__(self) -> None:
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"periodic schedule {self.cron!r}: unknown timezone {self.timezone!r}") from None
        try:
            CronSim(self.cron, datetime.now(zone))
        except CronSimError as exc:
            raise ValueError(f"periodic schedule {self.cron!r} is not a cron expression: {exc}") from None

    def last_tick(self, now: datetime) -> datetime | None:
        """The latest tick at or before `now` (an aware datetime), or None when there has been none."""
        try:
            return next(CronSim(self.cron, now.astimezone(ZoneInfo(self.timezone)), reverse=True))
        except StopIteration:
            return None

    def next_tick(self, now: datetime) -> datetime | None:
        """The first tick after `now` (an aware datetime), or None when there will be none."""
        try:
            return next(CronSim(self.cron, now.astimezone(ZoneInfo(self.timezone))))
        except StopIteration:
            return None

    @property
    def key(self) -> str:
        """The schedule's name within its actor, as it goes into the tick's message id."""
        return self.name or f"{self.cron} {self.args!r} {sorted(self.kwargs.items())!r}"

    def message_id(self, actor_name: str, tick: datetime) -> str:
        """The message id of the job this schedule enqueues for `tick`: the same in every process."""
        instant = tick.astimezone(ZoneInfo("UTC")).isoformat()
        return str(uuid.uuid5(TICK_NAMESPACE, f"{actor_name}\x00{self.key}\x00{instant}"))


def schedules_of(options: Mapping[str, Any]) -> list[Schedule]:
    """The schedules an actor's options declare; raises ValueError for anything that is not one."""
    declared = options.get(PERIODIC_OPTION)
    if declared is None:
        return []
    items = declared if isinstance(declared, list | tuple) else [declared]
    schedules = []
    for item in items:
        if isinstance(item, str):
            schedules.append(Schedule(item))
        elif isinstance(item, Schedule):
            schedules.append(item)
        else:
            raise ValueError(
                f"the {PERIODIC_OPTION} option takes a cron string, a Schedule or a list of them, "
                f"got {item!r}"
            )
    names = [schedule.key for schedule in schedules]
    if len(set(names)) != len(names):
        raise ValueError(f"two schedules of one actor share a name: {names}")
    return schedules

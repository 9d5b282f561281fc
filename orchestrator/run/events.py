"""Typed progress events: what the engine tells a reporter (bars, log lines, the demo) while
it works. They are not the control schema's event log, which is durable; these are not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rows:
    """A loop stage committed a batch: rows done of an estimate, at a rate."""

    table: str
    stage: str
    rows_done: int
    rows_estimated: int
    rate: float
    part: str | None = None  # the partition this batch was in, for a partitioned table


@dataclass(frozen=True)
class StageChanged:
    """A stage committed its new status (done, rolled_back)."""

    table: str
    stage: str
    status: str


@dataclass(frozen=True)
class StageStarted:
    """A stage is about to run (forward), or to be undone (`reverse`)."""

    table: str
    stage: str
    reverse: bool = False


@dataclass(frozen=True)
class StageFailed:
    """A stage failed and recorded it (its transaction rolled back)."""

    table: str
    stage: str
    error: str


@dataclass(frozen=True)
class LockWait:
    """A locked transaction gave way after lock_timeout; these sessions held the locks."""

    table: str
    stage: str
    attempt: int
    blockers: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Paused:
    """A stage waits: the copy for the server (replication lag, WAL rate, the load probe), a
    swap for a clear stall forecast, a cutover window or a postpone file."""

    table: str
    stage: str
    reason: str


Event = Rows | StageStarted | StageChanged | StageFailed | LockWait | Paused
Progress = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The reporter of a caller that shows nothing."""

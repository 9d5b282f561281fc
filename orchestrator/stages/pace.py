"""How fast background work goes beside the application: flat out, at a fixed rate, or
yielding to it. The replayer (`apply --follow`) yields by default; the copy when the plan
asks for it (`throttle.adaptive`).

Yielding is a duty cycle: after a batch that took t seconds the worker rests t·(1-d)/d, so it
works at most a share d of the time. Every window the pace compares the application's write
rate while we work with its rate in the last quiet window (one window in `QUIET_EVERY` we do
nothing): below `goal` of it, d halves; at or above, d grows by a step. An idle application
(a quiet rate under `IDLE_TPS`) gets d = 1, so the backlog is caught up while nobody writes.

The application's write rate is the cluster's transaction-id counter, read as
`pg_snapshot_xmax(pg_current_snapshot())`: every writing transaction takes one id when it
first writes, and the counter moves the moment it does (pg_stat_database's commit counts
reach shared memory up to a second late, too coarse for windows of a few seconds). Our own
writing transactions, one per batch, are subtracted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.db import Conn

WINDOW_S = 2.0  # one measurement of the application's rate
QUIET_EVERY = 6  # every this many windows, one without our work: the application's own rate
IDLE_TPS = 20.0  # below this, the application is idle: work flat out
MIN_DUTY = 0.05  # never stop entirely: a log that only grows makes the cutover wait
STEP = 0.1  # additive increase of the duty per good window
# A cautious start: the first windows cost the application little while the pace learns its
# rate, and an idle application lifts the duty to 1 at the first measurement anyway.
START_DUTY = 0.25

_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid"


@dataclass(frozen=True)
class Policy:
    """What the operator asked for: `rate` work units per second at most (fixed), or, without
    a rate, yielding (`adaptive`) or flat out."""

    adaptive: bool = True
    rate: float | None = None
    goal: float = 0.85
    start: float = START_DUTY  # the duty before the first measurement says more

    @property
    def mode(self) -> str:
        return "fixed" if self.rate else "adaptive" if self.adaptive else "full"


@dataclass(frozen=True)
class Reading:
    """The pace's last measurements, for status and the benchmark."""

    mode: str
    duty: float
    app_tps: float | None  # the application's write rate while we worked (last window)
    quiet_tps: float | None  # ... and in the last quiet window
    done_per_s: float  # our work units per second over the last window


class Pace:
    """Rests between batches so background work keeps to its policy. Thread-safe: the copy's
    workers share one. `probe` runs the counter query; it must not be inside a transaction."""

    def __init__(self, probe: Conn | None, policy: Policy,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._reset(probe, policy)

    def _reset(self, probe: Conn | None, policy: Policy) -> None:
        self.policy = policy
        self._probe = probe if policy.mode == "adaptive" else None
        self.duty = policy.start if policy.mode == "adaptive" else 1.0
        self._start = self._clock()  # the current window's start
        self._xid: int | None = None  # the counter at the window's start
        self._ours = 0  # our writing transactions in this window
        self._done = 0  # work units in this window
        self._windows = 0
        self._quiet_until = 0.0
        self._quiet_tps: float | None = None
        self._app_tps: float | None = None
        self._done_per_s = 0.0

    def retune(self, policy: Policy, probe: Conn | None) -> None:
        """The operator changed the policy (`set`): start over with the new one."""
        with self._lock:
            if policy != self.policy:
                self._reset(probe, policy)

    def reading(self) -> Reading:
        with self._lock:
            return Reading(self.policy.mode, self.duty, self._app_tps, self._quiet_tps,
                           self._done_per_s)

    def rest(self, units: int, took_s: float, commits: int = 1) -> None:
        """After a batch of `units` (rows, log entries) that took `took_s` and committed
        `commits` writing transactions: sleep as the policy says."""
        with self._lock:
            self._ours += commits
            self._done += units
            now = self._clock()
            if self.policy.rate:
                pause = max(0.0, units / self.policy.rate - took_s)
            elif self._probe is not None:
                pause = took_s * (1 - self.duty) / self.duty
            else:
                pause = 0.0
            quiet = self._close_window(now, quiet=False)
            if quiet:
                self._quiet_until = now + WINDOW_S
            wait = max(pause, self._quiet_until - now)
        if wait > 0:
            self._sleep(wait)
        if quiet:
            with self._lock:
                self._close_window(self._clock(), quiet=True)

    def _counter(self) -> int | None:
        if self._probe is None:
            return None
        r = self._probe.execute(_XID).fetchone()
        return int(r["xid"]) if r else None

    def _close_window(self, now: float, *, quiet: bool) -> bool:
        """End the window if it is over (a quiet one always): measure and adjust the duty.
        True when a quiet window starts now."""
        elapsed = now - self._start
        if not quiet and elapsed < WINDOW_S and self._xid is not None:
            return False
        if self._probe is None:
            if elapsed >= WINDOW_S:
                self._done_per_s = self._done / elapsed
                self._start, self._done = now, 0
            return False
        xid = self._counter()
        first = self._xid is None
        if xid is not None and not first and elapsed > 0:
            app = max(0, xid - (self._xid or 0) - self._ours) / elapsed
            if quiet:
                self._quiet_tps = app
            else:
                self._app_tps = app
                self._done_per_s = self._done / elapsed
                self._adjust(app)
        self._xid, self._start, self._ours = xid, now, 0
        if not quiet:
            self._done = 0
        if quiet:
            return False
        self._windows += 1
        # The first window, and one in QUIET_EVERY after it, measures the application alone.
        return first or self._windows % QUIET_EVERY == 0

    def _adjust(self, app: float) -> None:
        quiet = self._quiet_tps
        if quiet is None or quiet < IDLE_TPS:
            self.duty = 1.0  # nobody else writes: catch up
        elif app < self.policy.goal * quiet:
            self.duty = max(MIN_DUTY, self.duty / 2)
        else:
            self.duty = min(1.0, self.duty + STEP)

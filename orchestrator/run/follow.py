"""Replay of the capture logs between commands: forward while the target follows the source
(after the copy, until cutover), reverse while the retired table follows the target (after
cutover, until finalize). Whichever command runs replays (docs/design.md, invariant 10).

`apply --follow` keeps replaying at the pace the plan asks for (stages/pace.py): yielding to
the application by default, at `throttle.replay_rate` keys per second when set. It records,
per table, what it replays and what the application logs, so `status` can say when the log
will be caught up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator.db import Conn
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.sql import capture
from orchestrator.stages import proof
from orchestrator.stages.copy import COPY
from orchestrator.stages.pace import Pace, Policy
from orchestrator.stages.registry import COPY_STRATEGY

REPLAYER_KEY = "replayer"  # saved per table: the replayer's last measurements (status reads)
PACED_BATCH = 1_000  # entries per batch when pacing: a short batch, a fine-grained rest
RECORD_EVERY_S = 5.0


def active(ctx: Ctx, done: Callable[[str, str], bool]) -> list[tuple[TableMove,
                                                                    capture.Direction]]:
    """The logs to replay now: forward between copy and cutover, reverse after cutover."""
    copied, swapped = COPY.name, COPY_STRATEGY.swap.name
    final = COPY_STRATEGY.final.name
    out = []
    for m in ctx.moves.values():
        if m.strategy != COPY_STRATEGY.name:
            continue  # only the copy strategy captures changes
        if done(m.label, copied) and not done(m.label, swapped):
            out.append((m, capture.forward(m)))
        elif done(m.label, swapped) and not done(m.label, final):
            out.append((m, capture.reverse(m)))
    return out


def drain(conn: Conn, d: capture.Direction, pace: Pace | None = None,
          batch: int = 10_000, max_batches: int | None = None) -> int:
    """Replay committed batches until one comes back short (or after `max_batches`),
    resting after each as `pace` says; the entries replayed."""
    total = batches = 0
    while True:
        began = time.monotonic()
        n = capture.replay_batch(conn, d, batch)
        total += n
        batches += 1
        if pace is not None and n:
            pace.rest(n, time.monotonic() - began)
        if n < batch or (max_batches is not None and batches >= max_batches):
            return total


def replay_once(ctx: Ctx, done: Callable[[str, str], bool]) -> int:
    """Replay every active log once, flat out; the number of log entries replayed."""
    return sum(drain(ctx.conn, d) for _, d in active(ctx, done))


def policy(ctx: Ctx, rate: float | None = None) -> Policy:
    """The replayer's policy: the command's rate, else the operator's `set`, else the plan's
    (a rate of 0 means adaptive)."""
    t = ctx.plan.defaults.throttle
    cfg = ctx.store.settings("*")
    chosen = rate if rate is not None else cfg.get("replay_rate", t.replay_rate)
    return Policy(adaptive=True, rate=float(chosen) if chosen else None,
                  goal=float(cfg.get("yield_goal", t.yield_goal)))


def keep_replaying(
    context: Callable[[], Ctx], done: Callable[[str, str], bool],
    until: Callable[[], bool] | None = None, *, idle_s: float = 1.0, recheck_s: float = 10.0,
    rate: float | None = None,
) -> None:
    """`apply --follow`: replay until `until()` (or Ctrl-C) at the plan's pace, one batch per
    log in turn; every few seconds record the rates and take the operator's `set` values;
    every `recheck_s` bring the proof of each table waiting for its cutover up to date, so
    the cutover's own re-check finds little left."""
    ctx = context()
    pace = Pace(ctx.conn, policy(ctx, rate))
    meter = _Meter()
    logs = active(ctx, done)  # ours to change only: the plan's advisory lock is held
    last_check = last_look = time.monotonic()
    while until is None or not until():
        now = time.monotonic()
        if now - last_check >= recheck_s:
            proof.recheck_waiting(context(), done)
            last_check = now
        if now - last_look >= RECORD_EVERY_S:
            meter.record(ctx, logs, pace)
            ctx = context()
            pace.retune(policy(ctx, rate), ctx.conn)  # `set replay_rate` takes effect here
            logs = active(ctx, done)
            last_look = now
        replayed = 0
        for m, d in logs:
            n = drain(ctx.conn, d, pace, PACED_BATCH, max_batches=1)
            meter.counts[m.label] = meter.counts.get(m.label, 0) + n
            replayed += n
        if replayed == 0:
            time.sleep(idle_s)


class _Meter:
    """Per table, the keys replayed and logged per second since the last record, written to
    the control schema every few seconds."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.at = time.monotonic()
        self.logged: dict[str, int] = {}

    def record(self, ctx: Ctx, logs: list[tuple[TableMove, capture.Direction]],
               pace: Pace) -> None:
        now = time.monotonic()
        names = {m.label: d.log.as_string(ctx.conn) for m, d in logs}
        inserted = _inserted(ctx.conn, names)
        reading = pace.reading()
        elapsed = max(now - self.at, 1e-6)
        with ctx.conn.transaction():
            for table in names:
                before = self.logged.get(table)
                logged = (None if before is None or table not in inserted
                          else max(0, inserted[table] - before) / elapsed)
                value: dict[str, Any] = {
                    "mode": reading.mode, "duty": round(reading.duty, 3),
                    "replayed_per_s": round(self.counts.get(table, 0) / elapsed, 1),
                    "logged_per_s": None if logged is None else round(logged, 1),
                    "app_tps": reading.app_tps, "quiet_tps": reading.quiet_tps,
                    "at": time.time(),
                }
                ctx.store.save(table, REPLAYER_KEY, value)
        self.logged = inserted
        self.counts, self.at = {}, now


def _inserted(conn: Conn, logs: dict[str, str]) -> dict[str, int]:
    """Rows ever inserted into each log, from the statistics (a counter, no scan)."""
    if not logs:
        return {}
    names = sorted(logs)
    rows = conn.execute(
        "SELECT t, pg_stat_get_tuples_inserted(to_regclass(l))::bigint AS n "
        "FROM unnest(%s::text[], %s::text[]) AS x(t, l)",
        (names, [logs[t] for t in names]),
    ).fetchall()
    return {str(r["t"]): int(r["n"]) for r in rows if r["n"] is not None}

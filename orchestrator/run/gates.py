"""Cutover gates: what holds a swap until the operator's conditions hold.

A window (`--window 02:00-04:00`, or the plan's `cutover_window`) holds it outside those
hours, a postpone file (`--postpone-file PATH`, gh-ost's habit) while the file exists, and
`--when-ready` until the unit is verified, its capture log is short and the stall forecast is
clear. The wait is stateless: each look reads the clock, the file and the database, so a
command killed while waiting resumes by being run again, and Ctrl-C cancels it with nothing
changed. Each new reason to wait is recorded in the event log, where `status` shows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.run import forecast
from orchestrator.run.events import Paused
from orchestrator.sql import capture
from orchestrator.stages import cutover, registry

Window = tuple[dtime, dtime]


@dataclass(frozen=True)
class Gates:
    """The operator's conditions for a swap (none by default)."""

    window: Window | None = None
    postpone_file: Path | None = None
    when_ready: bool = False
    ready_max_log: int = 1000  # --when-ready: at most this many capture-log entries
    poll_s: float = 1.0
    # The operator's own check (the before-cutover hooks, run/hooks.py): given the unit's
    # tables and the swap stage, None to go or why to wait.
    check: Callable[[list[str], str], str | None] | None = None


def parse_window(text: str) -> Window:
    """'HH:MM-HH:MM' (local time of the machine running the orchestrator; may wrap past
    midnight, as 23:00-01:00)."""
    try:
        start, end = (datetime.strptime(p.strip(), "%H:%M").time() for p in text.split("-"))
    except ValueError:
        raise OrchestratorError(
            f"cutover window {text!r}: not HH:MM-HH:MM",
            hint="write it as 02:00-04:00 (local time; 23:00-01:00 wraps past midnight)",
        ) from None
    return start, end


def in_window(now: dtime, window: Window) -> bool:
    start, end = window
    if start <= end:
        return start <= now < end
    return now >= start or now < end


def reasons(ctx: Ctx, gates: Gates, moves: list[TableMove], done: set[str]) -> list[str]:
    """Why the unit's swap must wait now (empty: go). `done` holds the labels whose verify
    is done."""
    why: list[str] = []
    window = gates.window or next(
        (parse_window(m.options.cutover_window) for m in moves if m.options.cutover_window),
        None)
    if window is not None and not in_window(datetime.now().time(), window):
        why.append(f"outside the cutover window {window[0]:%H:%M}-{window[1]:%H:%M}")
    if gates.postpone_file is not None and gates.postpone_file.exists():
        why.append(f"postponed while {gates.postpone_file} exists")
    if gates.when_ready:
        why += _unready(ctx, gates, moves, done)
    if gates.check is not None and not why:  # the hook runs only when nothing else holds
        held = gates.check([m.label for m in moves], registry.strategy_of(moves[0]).swap.name)
        if held:
            why.append(held)
    return why


def _unready(ctx: Ctx, gates: Gates, moves: list[TableMove], done: set[str]) -> list[str]:
    why = [f"{m.label}: not verified yet" for m in moves
           if m.strategy == "copy" and m.label not in done]
    for m in moves:
        if m.strategy != "copy":
            continue
        depth = capture.backlog(ctx.conn, capture.forward(m))
        if depth > gates.ready_max_log:
            why.append(f"{m.label}: {depth} changes to replay (over {gates.ready_max_log})")
    fc = forecast.read(ctx.conn, cutover.lock_relations(moves, ctx.catalog),
                       ctx.policy(moves[0]).lock_timeout_ms)
    if not fc.clear:
        why.append(fc.describe())
    return why


def wait(ctx: Ctx, gates: Gates, moves: list[TableMove], done: set[str]) -> None:
    """Hold until no reason is left; record and report each new set of reasons."""
    label = ",".join(m.label for m in moves)
    shown: list[str] = []
    while True:
        why = reasons(ctx, gates, moves, done)
        if not why:
            if shown:
                with ctx.conn.transaction():
                    ctx.store.log("cutover", "gate_open", table=label, stage="cutover")
            return
        if why != shown:
            shown = why
            with ctx.conn.transaction():
                ctx.store.log("cutover", "waiting", table=label, stage="cutover",
                              detail={"gates": why})
            ctx.progress(Paused(label, "cutover", "; ".join(why)))
        time.sleep(gates.poll_s)

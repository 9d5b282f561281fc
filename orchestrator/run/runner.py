"""The step runner: every locked transaction on a user's relations goes through `Runner.run`.

A DDL waiting for ACCESS EXCLUSIVE blocks every later reader of the table while it waits, so
each transaction runs under `SET LOCAL lock_timeout`, the statement that takes the stage's
locks (`Step.bounded`) has its whole wait bounded by one lock_timeout, and when the wait
expires we give way: record who held the conflicting locks (from the relations the action
declares), cancel an autovacuum in the way, back off with jitter and try again. Each
statement's time is measured; the status change and the event commit in the same transaction
as the statements (docs/design.md: state commits with its work).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, sql

from orchestrator.db import Conn
from orchestrator.errors import LockTimeoutExhausted
from orchestrator.model.context import LockPolicy
from orchestrator.run import forecast
from orchestrator.run.events import LockWait, Paused, Progress
from orchestrator.sql.compose import render
from orchestrator.stages.base import Action, GiveWay
from orchestrator.state.store import Store

_BLOCKERS = """
SELECT DISTINCT a.pid, a.usename AS role, a.application_name, a.state, a.backend_type,
       (now() - a.xact_start)::text AS xact_age, left(a.query, 300) AS query,
       l.mode, c.relname AS relation, l.relation::bigint AS relation_oid
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN pg_class c ON c.oid = l.relation
WHERE l.granted AND l.pid <> pg_backend_pid() AND l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation = ANY(%s::regclass[])
ORDER BY a.pid
"""


def blockers(conn: Conn, relations: list[str]) -> list[dict[str, Any]]:
    """Sessions holding locks on the relations we wanted (who made us wait)."""
    rels = [r for r in relations if r]
    if not rels:
        return []
    try:
        rows = conn.execute(sql.SQL(_BLOCKERS), (rels,)).fetchall()
    except psycopg.Error:
        return []
    return [dict(r) for r in rows]


def autovacuums_to_cancel(who: list[dict[str, Any]]) -> list[int]:
    """The blockers that are autovacuum workers, except an anti-wraparound one (which must
    finish, and which PostgreSQL itself never cancels)."""
    return sorted({
        int(b["pid"]) for b in who
        if b.get("backend_type") == "autovacuum worker"
        and "to prevent wraparound" not in (b.get("query") or "")
    })


def cancel_autovacuums(conn: Conn, pids: list[int]) -> dict[str, list[int]]:
    """Cancel autovacuum workers in our way, as PostgreSQL's deadlock detector would once a
    lock waiter had waited deadlock_timeout (1 s by default): our lock_timeout gives up sooner,
    so without this a long autovacuum keeps every try failing. The worker comes back later.
    Needs superuser (or pg_signal_autovacuum_worker on PostgreSQL 18); what was refused is
    reported, not raised."""
    done: dict[str, list[int]] = {"cancelled": [], "refused": []}
    for pid in pids:
        try:
            with conn.transaction():
                r = conn.execute("SELECT pg_cancel_backend(%s) AS ok", (pid,)).fetchone()
            done["cancelled" if r and r["ok"] else "refused"].append(pid)
        except psycopg.errors.InsufficientPrivilege:
            done["refused"].append(pid)
    return done


class LockWaitExceeded(Exception):
    """The bounded lock statement ran out of its lock_timeout budget (a statement_timeout
    set only around it), as opposed to any other statement running too long."""


class StepFailed(Exception):
    """A statement of an action failed; its transaction was rolled back."""

    def __init__(self, statement: str, error: psycopg.Error) -> None:
        super().__init__(statement)
        self.statement = statement
        self.error = error


@dataclass(frozen=True)
class Runner:
    """Runs actions on one autocommit connection, recording into one plan's control store."""

    conn: Conn
    store: Store
    progress: Progress

    def run(
        self,
        action: Action,
        *,
        tables: list[str],
        stage: str,
        policy: LockPolicy,
        status: Callable[[Store, str], None] | None = None,
        between_tries: Callable[[], None] | None = None,
    ) -> None:
        """Run the action's steps in one transaction under lock_timeout, then `status` for
        each table, `action.record` and the event, all in that transaction; retry on a lock
        timeout. A failed statement raises `StepFailed` (nothing of it committed)."""
        label = ",".join(tables)

        def work() -> None:
            t0 = time.monotonic()
            texts, timings, lock_wait_ms = self._execute(action, policy)
            if action.inside is not None:
                try:
                    action.inside()
                except psycopg.Error as exc:
                    raise StepFailed(f"({action.name}: its work on the other server)",
                                     exc) from exc
            if status is not None:
                for name in tables:
                    status(self.store, name)
            if action.record is not None:
                action.record(self.store)
            slowest = sorted(zip(timings, texts, strict=True), key=lambda t: -t[0])[:3]
            self.store.log(
                action.name,
                "ok",
                table=label or None,
                stage=stage or None,
                statement=";\n".join(texts) + ";" if texts else None,
                duration_ms=(time.monotonic() - t0) * 1000,
                detail={
                    "lock_wait_ms": round(lock_wait_ms, 1),
                    "slowest_ms": [[round(ms, 1), text[:160]] for ms, text in slowest],
                },
            )

        self._with_retries(action, label, stage, policy, work, between_tries)

    def _execute(self, action: Action, policy: LockPolicy) -> tuple[list[str], list[float], float]:
        """The action's statements, each timed; the bounded LOCK's time is its wait."""
        texts: list[str] = []
        timings: list[float] = []
        lock_wait_ms = 0.0
        for step in action.steps:
            texts.append(render(self.conn, step.sql))
            try:
                if step.bounded:
                    _set_local(self.conn, "statement_timeout", f"{policy.try_ms}ms")
                s0 = time.monotonic()
                self.conn.execute(step.sql)
                timings.append((time.monotonic() - s0) * 1000)
                if step.bounded:
                    # The LOCK statement: its time is the wait before the grant; the hold is
                    # the event's duration minus this.
                    lock_wait_ms = timings[-1]
                    _set_local(self.conn, "statement_timeout", f"{policy.statement_timeout_ms}ms")
            except psycopg.errors.LockNotAvailable:
                raise
            except psycopg.errors.QueryCanceled as exc:
                if step.bounded:
                    raise LockWaitExceeded(str(exc)) from exc
                raise StepFailed(texts[-1], exc) from exc
            except psycopg.Error as exc:
                raise StepFailed(texts[-1], exc) from exc
        return texts, timings, lock_wait_ms

    def _with_retries(
        self,
        action: Action,
        label: str,
        stage: str,
        policy: LockPolicy,
        work: Callable[[], None],
        between_tries: Callable[[], None] | None,
    ) -> None:
        attempt = 0
        first = time.monotonic()
        swap = any(step.bounded for step in action.steps)
        while True:
            attempt += 1
            if swap:
                self._await_clear(action, label, stage, policy, first, between_tries)
            started = time.monotonic()
            try:
                with self.conn.transaction():
                    _set_local(self.conn, "lock_timeout", f"{policy.lock_timeout_ms}ms")
                    if policy.statement_timeout_ms:
                        _set_local(
                            self.conn, "statement_timeout", f"{policy.statement_timeout_ms}ms"
                        )
                    work()
                    return
            except (errors.LockNotAvailable, LockWaitExceeded, GiveWay) as exc:
                who = self._gave_way(action, label, stage, attempt, started, exc)
                self.progress(LockWait(label, stage, attempt, who))
                if attempt > policy.retries:
                    who_ = label or self.store.plan
                    if isinstance(exc, GiveWay):  # the other server, not a lock holder
                        raise LockTimeoutExhausted(
                            f"{who_}: {action.name} gave way after {attempt} tries, nothing "
                            f"was changed: {exc}",
                            hint="the other server does not keep up with the writes: rerun "
                            "at a quieter time, or allow more per try with --lock-timeout",
                        ) from exc
                    raise _exhausted(action, who_, policy, attempt, who) from exc
                if between_tries is not None:
                    # Writes go on while we back off: drain them outside the lock again, so
                    # the try that succeeds has only a short tail to drain inside it.
                    between_tries()
                delay = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + random.random()))

    def _await_clear(
        self, action: Action, label: str, stage: str, policy: LockPolicy, since: float,
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        """Before a swap's try: wait until the stall forecast is clear, so the try does not
        queue the application behind a long transaction. Ends the sessions in the way only
        if the operator asked (and the rules allow); gives up, changing nothing, after
        forecast_wait_s."""
        ctl = policy.swap
        shown: list[tuple[int, str, str]] = []
        while True:
            fc = forecast.read(self.conn, action.locks, policy.lock_timeout_ms)
            self._cancel_autovacuums(action, label, stage, fc)
            if fc.clear:
                return
            waited_ms = (time.monotonic() - since) * 1000
            if ctl.terminate_after_ms is not None and waited_ms >= ctl.terminate_after_ms:
                ended = forecast.terminate(self.conn, fc, ctl)
                with self.conn.transaction():
                    self.store.log("terminate_blockers", "terminated" if any(
                        e["terminated"] for e in ended) else "spared", table=label or None,
                        stage=stage or None, duration_ms=waited_ms, detail={"sessions": ended})
                if any(e["terminated"] for e in ended):
                    time.sleep(0.1)  # their locks go as the backends exit
                    continue
            if not ctl.forecast:
                return  # the operator asked to try regardless
            text = fc.describe()
            who = sorted((h.pid, h.mode, h.relation or "") for h in fc.stalling)
            if who != shown:  # new sessions in the way (not merely older ones)
                shown = who
                with self.conn.transaction():
                    self.store.log(action.name, "waiting", table=label or None,
                                   stage=stage or None, detail={
                                       "forecast": text,
                                       "blockers": [h.as_dict() for h in fc.stalling]})
                self.progress(Paused(label, stage, text))
            if waited_ms >= ctl.forecast_wait_s * 1000:
                raise LockTimeoutExhausted(
                    f"{label or self.store.plan}: {action.name} did not try its lock, nothing "
                    f"was changed: after {waited_ms / 1000:.0f} s the stall forecast is still "
                    f"not clear: {text}",
                    hint="wait for those transactions to end and rerun; or let the swap end "
                    "them with --terminate-blockers-after MS (runbook: \"Blockers\"); or try "
                    "anyway with --ignore-forecast",
                )
            if meanwhile is not None:
                # Writes go on while we wait: drain them outside the lock, or the try that
                # follows would replay all of them inside it (the application waiting).
                meanwhile()
            time.sleep(0.2)

    def _cancel_autovacuums(
        self, action: Action, label: str, stage: str, fc: forecast.Forecast
    ) -> None:
        vacuums = autovacuums_to_cancel([h.as_dict() for h in fc.holders])
        if vacuums:
            done = cancel_autovacuums(self.conn, vacuums)
            with self.conn.transaction():
                self.store.log(action.name, "autovacuum", table=label or None,
                               stage=stage or None, detail={"autovacuum": done})

    def _gave_way(
        self, action: Action, label: str, stage: str, attempt: int, started: float, exc: Exception
    ) -> list[dict[str, Any]]:
        """Record a try that timed out on its locks, with who held them."""
        waited = (time.monotonic() - started) * 1000
        who = blockers(self.conn, action.locks)
        detail: dict[str, Any] = {"attempt": attempt, "error": str(exc).strip(), "blockers": who}
        vacuums = autovacuums_to_cancel(who)
        if vacuums:
            detail["autovacuum"] = cancel_autovacuums(self.conn, vacuums)
        with self.conn.transaction():
            self.store.log(
                action.name, "lock_timeout", table=label or None, stage=stage or None,
                duration_ms=waited, detail=detail,
            )
        return who


def _exhausted(
    action: Action, label: str, policy: LockPolicy, attempt: int, who: list[dict[str, Any]]
) -> LockTimeoutExhausted:
    names = "; ".join(
        f"pid {b['pid']} ({b['role']}, {b['application_name'] or '-'}, {b['state']}, "
        f"holds {b['mode']} on {b['relation']}): {b['query']}"
        for b in who
    ) or "a session that has ended"
    tries = "1 try" if attempt == 1 else f"{attempt} tries"
    return LockTimeoutExhausted(
        f"{label}: {action.name} could not get its locks within {policy.try_ms} ms "
        f"after {tries}; nothing was changed. Blocking: {names}",
        hint="wait for that transaction to end and rerun, raise the timeout with "
        "--lock-timeout, or end the blocker with SELECT pg_terminate_backend(pid)",
    )


def _set_local(conn: Conn, name: str, value: str) -> None:
    conn.execute(
        sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(name), sql.Literal(value))
    )

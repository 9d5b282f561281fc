"""Short locks: every DDL transaction runs under lock_timeout and is retried with backoff.

A DDL waiting for ACCESS EXCLUSIVE blocks every later reader of the table while it waits, so
the wait is bounded (lock_timeout) and, when it expires, we give way, record who held the
conflicting lock, back off with jitter and try again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import errors, sql

from orchestrator.db import Conn
from orchestrator.errors import LockTimeoutExhausted
from orchestrator.state import store as control

T = TypeVar("T")

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
    if not relations:
        return []
    rels = [r for r in relations if r]
    try:
        rows = conn.execute(
            sql.SQL(_BLOCKERS),
            (rels,),
        ).fetchall()
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


@dataclass
class LockPolicy:
    lock_timeout_ms: int
    statement_timeout_ms: int
    retries: int
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0


def run_locked(
    conn: Conn,
    *,
    plan: str,
    control_schema: str,
    table: str | None,
    stage: str,
    action: str,
    policy: LockPolicy,
    relations: list[str],
    work: Callable[[Conn], T],
    on_retry: Callable[[int, list[dict[str, Any]]], None] | None = None,
) -> T:
    """Run `work` in one transaction under lock_timeout, retrying on lock timeouts.

    `relations` (regclass texts) name what the work locks, so a failed try can record who
    held those locks. The work's own control-schema writes commit with it.
    """
    attempt = 0
    while True:
        attempt += 1
        started = time.monotonic()
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(
                        sql.Literal(f"{policy.lock_timeout_ms}ms")
                    )
                )
                if policy.statement_timeout_ms:
                    conn.execute(
                        sql.SQL("SET LOCAL statement_timeout = {}").format(
                            sql.Literal(f"{policy.statement_timeout_ms}ms")
                        )
                    )
                return work(conn)
        except (errors.LockNotAvailable, LockWaitExceeded) as exc:
            waited = (time.monotonic() - started) * 1000
            who = blockers(conn, relations)
            detail: dict[str, Any] = {
                "attempt": attempt, "error": str(exc).strip(), "blockers": who}
            vacuums = autovacuums_to_cancel(who)
            if vacuums:
                detail["autovacuum"] = cancel_autovacuums(conn, vacuums)
            with conn.transaction():
                control.log_event(
                    conn,
                    control_schema,
                    plan,
                    action,
                    "lock_timeout",
                    table=table,
                    stage=stage,
                    duration_ms=waited,
                    detail=detail,
                )
            if on_retry is not None:
                on_retry(attempt, who)
            if attempt > policy.retries:
                names = (
                    "; ".join(
                        f"pid {b['pid']} ({b['role']}, {b['application_name'] or '-'}, "
                        f"{b['state']}, holds {b['mode']} on {b['relation']}): "
                        f"{b['query']}"
                        for b in who
                    )
                    or "a session that has ended"
                )
                tries = "1 try" if attempt == 1 else f"{attempt} tries"
                raise LockTimeoutExhausted(
                    f"{table or plan}: {action} could not get its locks within "
                    f"{policy.lock_timeout_ms} ms after {tries}; "
                    f"nothing was changed. "
                    f"Blocking: {names}",
                    hint="wait for that transaction to end and rerun, raise the timeout with "
                    "--lock-timeout, or end the blocker with SELECT pg_terminate_backend(pid)",
                ) from exc
            delay = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random()))

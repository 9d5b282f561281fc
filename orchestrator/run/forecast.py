"""The stall forecast: before a swap tries its lock, who would make it (and the application
queued behind it) wait, and, only when the operator asks, ending those sessions under rules.

A swap that queues for ACCESS EXCLUSIVE behind a long transaction makes every later statement
on the table wait its whole lock_timeout (docs/design.md, "The lock queue"). The forecast reads
pg_locks and pg_stat_activity for every relation the swap will lock; a session there in a
transaction already older than lock_timeout (idle in it, or running a long statement) makes
the forecast unclear, and the runner waits instead of trying
(run/runner.py). Termination is off unless the operator sets `--terminate-blockers-after`; it
ends only sessions the forecast named, never a superuser's, a replication or background
process, one whose transaction has written (unless allowed) or one older than a limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.db import Conn
from orchestrator.model.context import SwapControls

_HOLDERS = """
SELECT DISTINCT a.pid, a.usename AS role, a.application_name, a.state, a.backend_type,
       -- A walsender running SQL reports no xact_start: its state's age stands in.
       coalesce(extract(epoch FROM now() - coalesce(a.xact_start, a.state_change)), 0)::float8
         AS xact_age_s,
       left(a.query, 300) AS query, l.mode, l.granted, c.relname AS relation,
       coalesce(r.rolsuper, false) AS superuser, a.backend_xid IS NOT NULL AS wrote
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN pg_roles r ON r.oid = a.usesysid
LEFT JOIN pg_class c ON c.oid = l.relation
WHERE l.pid <> pg_backend_pid() AND l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation = ANY(%s::regclass[])
ORDER BY a.pid
"""

IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


@dataclass(frozen=True)
class Holder:
    """A session holding (or queued for) a lock on a relation the swap will lock. Every mode
    conflicts with the swap's ACCESS EXCLUSIVE."""

    pid: int
    role: str | None
    application_name: str | None
    state: str | None
    backend_type: str | None
    xact_age_s: float
    query: str | None
    mode: str
    granted: bool
    relation: str | None
    superuser: bool
    wrote: bool

    @property
    def idle_in_transaction(self) -> bool:
        return (self.state or "") in IDLE_IN_TRANSACTION

    @property
    def autovacuum(self) -> bool:
        return self.backend_type == "autovacuum worker"

    def describe(self) -> str:
        state = self.state or "-"
        return (f"pid {self.pid}, {state} for {_age(self.xact_age_s)}, role {self.role or '-'}"
                f" ({self.application_name or '-'}), {'holds' if self.granted else 'awaits'} "
                f"{self.mode} on {self.relation}: {self.query or ''}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "role": self.role, "application_name": self.application_name,
            "state": self.state, "backend_type": self.backend_type,
            "xact_age": _age(self.xact_age_s), "query": self.query, "mode": self.mode,
            "relation": self.relation, "granted": self.granted, "wrote": self.wrote,
        }


def _age(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s"


@dataclass(frozen=True)
class Forecast:
    """Who would stall a swap tried now."""

    holders: tuple[Holder, ...]
    lock_timeout_ms: int

    @property
    def stalling(self) -> tuple[Holder, ...]:
        """Sessions in a transaction already older than lock_timeout: a try now would likely
        wait its whole lock_timeout behind them, and the application behind the try. A
        younger transaction, even one idle between two statements (an application under
        load always has some), is not: it ends sooner, or the try gives way and retries.
        Autovacuum workers are the runner's to cancel, not a reason to wait."""
        return tuple(
            h for h in self.holders
            if not h.autovacuum and h.xact_age_s * 1000 >= self.lock_timeout_ms
        )

    @property
    def clear(self) -> bool:
        return not self.stalling

    def describe(self) -> str:
        if self.clear:
            return "clear: no session would hold the swap past lock_timeout"
        return "; ".join(f"will wait behind {h.describe()}" for h in self.stalling)


def read(conn: Conn, relations: list[str], lock_timeout_ms: int) -> Forecast:
    """The forecast for a swap that locks `relations` (regclass texts)."""
    rels = [r for r in relations if r]
    if not rels:
        return Forecast((), lock_timeout_ms)
    rows = conn.execute(sql.SQL(_HOLDERS), (rels,)).fetchall()
    return Forecast(tuple(Holder(**dict(r)) for r in rows), lock_timeout_ms)


def refusal(h: Holder, controls: SwapControls) -> str | None:
    """Why this session must not be ended, or None when it may be."""
    if h.superuser:
        return "a superuser's session"
    if h.backend_type != "client backend":
        return f"a {h.backend_type or 'background'} process, not a client"
    if h.wrote and not controls.terminate_writers:
        return "its transaction has written (allow with --terminate-writers)"
    if h.xact_age_s > controls.terminate_max_age_s:
        return f"its transaction is older than {controls.terminate_max_age_s:g} s"
    return None


def terminate(conn: Conn, fc: Forecast, controls: SwapControls) -> list[dict[str, Any]]:
    """End the stalling sessions the rules allow, idle-in-transaction ones first; what was
    done to each (terminated, refused by a rule, or refused by the server)."""
    done: list[dict[str, Any]] = []
    seen: set[int] = set()
    for h in sorted(fc.stalling, key=lambda h: (not h.idle_in_transaction, h.pid)):
        if h.pid in seen:
            continue
        seen.add(h.pid)
        why = refusal(h, controls)
        record = {**h.as_dict(), "terminated": False}
        if why is not None:
            done.append({**record, "spared": why})
            continue
        try:
            r = conn.execute("SELECT pg_terminate_backend(%s) AS ok", (h.pid,)).fetchone()
            record["terminated"] = bool(r and r["ok"])
        except psycopg.errors.InsufficientPrivilege as exc:
            record["spared"] = f"not allowed: {str(exc).strip()}"
        done.append(record)
    return done

"""One operator at a time: session advisory locks on the plan and on each table it moves.

These are the only locks the orchestrator takes outside the step runner (run/runner.py), and
they lock no relation: they keep two orchestrators off the same plan or table.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.errors import LockHeld


def lock_key(kind: str, name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a plan or a table."""
    raw = f"orchestrator:{kind}:{name}".encode()
    hi = zlib.crc32(raw)
    lo = zlib.crc32(raw[::-1])
    key = (hi << 32) | lo
    return key - (1 << 64) if key >= (1 << 63) else key


def schema_lock(name: str) -> sql.Composed:
    """A transaction-level advisory lock on a target schema: jobs preparing tables of one
    schema side by side (`apply --jobs`) take turns, since two CREATE SCHEMA IF NOT EXISTS
    (or two GRANTs on it) at once fail on the catalog's unique index (or row)."""
    return sql.SQL("SELECT pg_advisory_xact_lock({})").format(
        sql.Literal(lock_key("schema", name)))


_HOLDER = """
SELECT a.pid, a.usename AS role, a.application_name, a.client_addr::text AS client_addr,
       a.state, a.backend_start, now() - a.xact_start AS xact_age, left(a.query, 200) AS query
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
        SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = ((%(key)s::bigint >> 32) & 4294967295)::oid
  AND l.objid = (%(key)s::bigint & 4294967295)::oid AND l.objsubid = 1
  AND a.pid <> pg_backend_pid()
"""


def lock_holder(conn: Conn, key: int) -> dict[str, Any] | None:
    row = conn.execute(_HOLDER, {"key": key}).fetchone()
    return None if row is None else dict(row)


def describe_holder(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another session (it ended before we could name it)"
    return (
        f"pid {holder['pid']} (role {holder['role']}, application "
        f"{holder['application_name'] or '-'}, client {holder['client_addr'] or 'local'}, "
        f"{holder['state']}, connected since {holder['backend_start']:%Y-%m-%d %H:%M:%S})"
    )


@contextmanager
def operator_lock(conn: Conn, plan: str, tables: list[str]) -> Iterator[None]:
    """Hold the plan's and each table's session advisory lock, or refuse naming the holder.

    `conn` must be autocommit: session locks outlive transactions, and this connection is kept
    only for the locks. If the process is SIGKILLed, the server drops them when it notices the
    dead client (client_connection_check_interval).
    """
    taken: list[int] = []
    try:
        for kind, name in [("plan", plan)] + [("table", t) for t in sorted(tables)]:
            key = lock_key(kind, name)
            row = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (key,)).fetchone()
            if not (row and row["ok"]):
                holder = lock_holder(conn, key)
                what = f"plan {plan}" if kind == "plan" else f"table {name}"
                raise LockHeld(
                    f"{what} is being worked on by another orchestrator: {describe_holder(holder)}",
                    hint="wait for it to finish (`orchestrator status PLAN`), or if that session "
                    "is stale, end it with SELECT pg_terminate_backend(pid)",
                )
            taken.append(key)
        yield
    finally:
        for key in reversed(taken):
            # The connection may be gone; the server then frees the locks itself.
            with suppress(Exception):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))



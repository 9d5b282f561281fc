"""Our publications, replication slots and subscriptions, each made and dropped by name so
that every call is idempotent (a rerun after a SIGKILL finds what exists and does the rest).

Slots are made apart from subscriptions: `pg_create_logical_replication_slot` is not
transactional, while `CREATE SUBSCRIPTION ... (create_slot = false)` is, and can run inside
the transaction that records it. A subscription is dropped in the one order that always
works: DISABLE, SET (slot_name = NONE), DROP, then its slot by name on the other server.
"""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from orchestrator.db import Conn


def publication_exists(conn: Conn, name: str) -> bool:
    r = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    return r is not None


def ensure_publication(conn: Conn, name: str, table: sql.Identifier | None) -> None:
    """A publication of one table (or of none yet)."""
    if publication_exists(conn, name):
        return
    tables = sql.SQL(" FOR TABLE {}").format(table) if table is not None else sql.SQL("")
    conn.execute(sql.SQL("CREATE PUBLICATION {}{}").format(sql.Identifier(name), tables))


def drop_publication(conn: Conn, name: str) -> None:
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


def slot_exists(conn: Conn, name: str) -> bool:
    r = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                     (name,)).fetchone()
    return r is not None


def ensure_slot(conn: Conn, name: str) -> None:
    """A logical slot for pgoutput. Making one waits for the transactions running on that
    server to end (it needs a consistent start): call it outside any lock of ours."""
    if not slot_exists(conn, name):
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))


def drop_slot(conn: Conn, name: str, *, wait_s: float = 30.0) -> None:
    """Drop a slot by name, ending the walsender that still streams from it (its subscription
    is gone or disabled; the walsender notices late)."""
    deadline = time.monotonic() + wait_s
    while True:
        r = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                         (name,)).fetchone()
        if r is None:
            return
        if r["active_pid"] is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (r["active_pid"],))
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            return
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        except psycopg.errors.UndefinedObject:
            return


def drop_sync_slots(conn: Conn, suboid: int | None) -> None:
    """The initial sync's own slots (`pg_<suboid>_sync_<relid>_<sysid>`), which a subscription
    dropped during its sync leaves behind on the source."""
    if suboid is None:
        return
    rows = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                        (f"pg\\_{suboid}\\_sync\\_%",)).fetchall()
    for r in rows:
        drop_slot(conn, str(r["slot_name"]))


def subscription(conn: Conn, name: str) -> dict[str, object] | None:
    """The subscription's oid and whether it is enabled, if it exists in this database."""
    r = conn.execute(
        "SELECT s.oid::bigint AS oid, s.subenabled AS enabled, s.subslotname AS slot "
        "FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
        "WHERE d.datname = current_database() AND s.subname = %s", (name,)).fetchone()
    return dict(r) if r is not None else None


def create_subscription(
    conn: Conn, name: str, source: str, *, enabled: bool, copy_data: bool,
    binary: bool = False,
) -> None:
    """A subscription to the publication and slot of the same name (made beforehand). Runs in
    a transaction block (create_slot = false): the caller's, when it has one.

    `synchronous_commit = on`: the apply worker flushes each transaction it applies, so its
    slot's confirmed_flush_lsn (what a swap waits on, holding its lock) follows within
    milliseconds; with the default (off) it lags by up to wal_writer_delay (200 ms).
    `binary`: rows (and, from PostgreSQL 16 on both sides, the initial copy) in binary form,
    for tables whose types are the same on both servers (ours are made so)."""
    conn.execute(sql.SQL(
        "CREATE SUBSCRIPTION {name} CONNECTION {info} PUBLICATION {name} WITH (connect = true, "
        "create_slot = false, slot_name = {slot}, enabled = {enabled}, copy_data = {copy}, "
        "disable_on_error = false, synchronous_commit = on, binary = {binary})").format(
            name=sql.Identifier(name), info=sql.Literal(source), slot=sql.Literal(name),
            enabled=sql.Literal(enabled), copy=sql.Literal(copy_data),
            binary=sql.Literal(binary)))


def advance(conn: Conn, slot: str) -> None:
    """Move a logical slot past everything written so far: what it would have sent until now
    is skipped."""
    conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (slot,))


def ensure_subscription(conn: Conn, name: str, source: str, *, enabled: bool,
                        copy_data: bool, binary: bool = False) -> int:
    """The subscription, made if missing; its oid."""
    sub = subscription(conn, name)
    if sub is None:
        create_subscription(conn, name, source, enabled=enabled, copy_data=copy_data,
                            binary=binary)
        sub = subscription(conn, name)
    assert sub is not None
    return int(str(sub["oid"]))


def set_enabled(conn: Conn, name: str, enabled: bool) -> None:
    sub = subscription(conn, name)
    if sub is not None and bool(sub["enabled"]) != enabled:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} {}").format(
            sql.Identifier(name), sql.SQL("ENABLE" if enabled else "DISABLE")))


def detach_subscription(conn: Conn, name: str) -> bool:
    """Disable the subscription and forget its slot (both transactional, so they may run in
    the caller's transaction); then DROP SUBSCRIPTION needs no connection. True if it
    exists."""
    sub = subscription(conn, name)
    if sub is None:
        return False
    ident = sql.Identifier(name)
    if sub["enabled"]:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
    if sub["slot"] is not None:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
    return True


def drop_subscription(conn: Conn, name: str) -> None:
    """Drop the subscription (its slot stays: drop it with `drop_slot` on the other side)."""
    if detach_subscription(conn, name):
        conn.execute(sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(sql.Identifier(name)))


def current_lsn(conn: Conn) -> str:
    r = conn.execute("SELECT pg_current_wal_lsn()::text AS lsn").fetchone()
    assert r is not None
    return str(r["lsn"])


def applied(conn: Conn, slot: str, lsn: str) -> bool:
    """Whether the subscriber has committed and flushed everything up to `lsn`: its slot's
    confirmed_flush_lsn (never the lag columns, which are NULL when idle)."""
    r = conn.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn AS ok FROM pg_replication_slots "
                     "WHERE slot_name = %s", (lsn, slot)).fetchone()
    return bool(r and r["ok"])


def wait_applied(conn: Conn, slot: str, lsn: str, timeout_s: float) -> bool:
    """Poll until `applied`, at most `timeout_s`. Reads shared memory, so it sees progress
    from inside a transaction too (the swap waits while it holds its lock)."""
    deadline = time.monotonic() + timeout_s
    while not applied(conn, slot, lsn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)  # a swap waits here holding its lock: look often
    return True


def lag_bytes(conn: Conn, slot: str) -> int | None:
    r = conn.execute("SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag "
                     "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return int(r["lag"]) if r and r["lag"] is not None else None


def sync_state(conn: Conn, name: str, schema: str, table: str) -> str | None:
    """The table's state in the subscription: i init, d copying, f/s syncing, r ready."""
    r = conn.execute(
        "SELECT sr.srsubstate AS state FROM pg_subscription_rel sr "
        "JOIN pg_subscription s ON s.oid = sr.srsubid "
        "JOIN pg_class c ON c.oid = sr.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE s.subname = %s AND n.nspname = %s AND c.relname = %s",
        (name, schema, table)).fetchone()
    return str(r["state"]) if r else None


def copy_progress(conn: Conn, schema: str, table: str) -> tuple[int, int] | None:
    """Rows and bytes the initial sync's COPY has written so far, while it runs."""
    r = conn.execute(
        "SELECT p.tuples_processed AS n, p.bytes_processed AS b FROM pg_stat_progress_copy p "
        "JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace s ON s.oid = c.relnamespace "
        "WHERE s.nspname = %s AND c.relname = %s", (schema, table)).fetchone()
    return (int(r["n"]), int(r["b"])) if r else None


def errors(conn: Conn, name: str) -> int:
    """How often the subscription's workers failed (initial sync and apply), from
    pg_stat_subscription_stats (PostgreSQL 15+)."""
    r = conn.execute("SELECT coalesce(sum(sync_error_count + apply_error_count), 0)::bigint AS n "
                     "FROM pg_stat_subscription_stats WHERE subname = %s", (name,)).fetchone()
    return int(r["n"]) if r else 0

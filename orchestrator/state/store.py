"""The control schema: plan registry, per-(table, stage) status, settings, saved state, events.

Every write here is made on the caller's connection, inside the caller's transaction, so a
status change commits with the work it records. The schema is versioned: `MIGRATIONS[i]` takes
version i to i+1, and `ensure_schema` applies what is missing.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from orchestrator.db import Conn
from orchestrator.errors import LockHeld, StageError
from orchestrator.plan import LoadedPlan

STAGES = ("prepare", "dual_write", "copy", "verify", "cutover", "finalize")
RENAME_STAGES = ("rename", "finalize")
STATUSES = ("pending", "running", "done", "failed", "rolled_back")

# One fixed key serialises control-schema creation and upgrades across plans.
_BOOTSTRAP_LOCK = 0x6F726368  # "orch"

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE {s}.meta (
            id boolean PRIMARY KEY DEFAULT true CHECK (id), version int NOT NULL)""",
        """CREATE TABLE {s}.plans (
            name text PRIMARY KEY, checksum text NOT NULL, yaml text NOT NULL,
            path text, registered_by text NOT NULL DEFAULT current_user,
            registered_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE {s}.stages (
            plan text NOT NULL REFERENCES {s}.plans ON DELETE CASCADE,
            table_name text NOT NULL, stage text NOT NULL,
            status text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending','running','done','failed','rolled_back')),
            started_at timestamptz, finished_at timestamptz,
            attempts int NOT NULL DEFAULT 0,
            rows_done bigint NOT NULL DEFAULT 0, rows_estimated bigint,
            rows_per_s double precision,
            checkpoint jsonb, last_error text,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (plan, table_name, stage))""",
        """CREATE TABLE {s}.settings (
            plan text NOT NULL, table_name text NOT NULL DEFAULT '*', key text NOT NULL,
            value jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (plan, table_name, key))""",
        """CREATE TABLE {s}.saved (
            plan text NOT NULL, table_name text NOT NULL, key text NOT NULL,
            value jsonb NOT NULL, PRIMARY KEY (plan, table_name, key))""",
        """CREATE TABLE {s}.events (
            id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(),
            plan text NOT NULL, table_name text, stage text, action text NOT NULL,
            outcome text NOT NULL, sql text, duration_ms double precision,
            detail jsonb, operator text NOT NULL DEFAULT current_user,
            client_addr text DEFAULT inet_client_addr()::text,
            backend_pid int DEFAULT pg_backend_pid())""",
        "CREATE INDEX ON {s}.events (plan, table_name, id)",
        # The event log is append-only: refuse updates and deletes outright.
        """CREATE FUNCTION {s}.events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'the orchestrator event log is append-only'; END $$""",
        """CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON {s}.events
           FOR EACH ROW EXECUTE FUNCTION {s}.events_append_only()""",
        # TRUNCATE fires no row trigger: refuse it with a statement trigger.
        """CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {s}.events
           FOR EACH STATEMENT EXECUTE FUNCTION {s}.events_append_only()""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class StageRow:
    plan: str
    table_name: str
    stage: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    rows_done: int
    rows_estimated: int | None
    rows_per_s: float | None
    checkpoint: dict[str, Any] | None
    last_error: str | None
    updated_at: datetime


def _q(schema: str, template: str) -> sql.Composed:
    return sql.SQL(template).format(s=sql.Identifier(schema))


def schema_exists(conn: Conn, schema: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.meta', %s::text)) IS NOT NULL AS ok", (schema,)
    ).fetchone()
    return bool(row and row["ok"])


def ensure_schema(conn: Conn, schema: str) -> None:
    """Create or upgrade the control schema, in its own committed transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_BOOTSTRAP_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        version = 0
        if schema_exists(conn, schema):
            row = conn.execute(_q(schema, "SELECT version FROM {s}.meta")).fetchone()
            version = int(row["version"]) if row else 0
        for step in MIGRATIONS[version:]:
            for stmt in step:
                conn.execute(_q(schema, stmt))
        if version < SCHEMA_VERSION:
            conn.execute(
                _q(
                    schema,
                    "INSERT INTO {s}.meta (version) VALUES (%s) "
                    "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                ),
                (SCHEMA_VERSION,),
            )


def register_plan(conn: Conn, loaded: LoadedPlan, stages: dict[str, tuple[str, ...]]) -> None:
    """Record the plan text and make sure every (table, stage) row exists (in the caller's txn)."""
    p = loaded.plan
    s = p.control_schema
    conn.execute(
        _q(
            s,
            """INSERT INTO {s}.plans (name, checksum, yaml, path) VALUES (%s, %s, %s, %s)
                 ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum,
                   yaml = excluded.yaml, path = excluded.path, updated_at = now()
                 WHERE {s}.plans.checksum IS DISTINCT FROM excluded.checksum""",
        ),
        (p.name, loaded.checksum, loaded.text, loaded.path),
    )
    rows = [(p.name, table, stage) for table, names in stages.items() for stage in names]
    with conn.cursor() as cur:
        cur.executemany(
            _q(
                s,
                "INSERT INTO {s}.stages (plan, table_name, stage) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
            ),
            rows,
        )


def stage_rows(conn: Conn, schema: str, plan: str) -> list[StageRow]:
    if not schema_exists(conn, schema):
        return []
    rows = conn.execute(
        _q(schema, "SELECT * FROM {s}.stages WHERE plan = %s ORDER BY table_name, stage"), (plan,)
    ).fetchall()
    return [StageRow(**r) for r in rows]


def get_stage(
    conn: Conn, schema: str, plan: str, table: str, stage: str, *, for_update: bool = False
) -> StageRow:
    q = "SELECT * FROM {s}.stages WHERE plan = %s AND table_name = %s AND stage = %s"
    if for_update:
        q += " FOR UPDATE"
    row = conn.execute(_q(schema, q), (plan, table, stage)).fetchone()
    if row is None:
        raise StageError(
            f"{table}: no {stage} stage recorded for plan {plan}",
            hint="run `orchestrator apply PLAN` to register the plan first",
        )
    return StageRow(**row)


def set_status(
    conn: Conn,
    schema: str,
    plan: str,
    table: str,
    stage: str,
    status: str,
    *,
    error: str | None = None,
    rows_done: int | None = None,
    rows_estimated: int | None = None,
    checkpoint: dict[str, Any] | None = None,
    reset_checkpoint: bool = False,
) -> None:
    """Change a stage's status (in the caller's transaction, with the work it records)."""
    assert status in STATUSES
    conn.execute(
        _q(
            schema,
            """UPDATE {s}.stages SET status = %(status)s, updated_at = now(),
            started_at = CASE WHEN %(status)s = 'running' AND status <> 'running' THEN now()
                              ELSE started_at END,
            finished_at = CASE WHEN %(status)s IN ('done','failed','rolled_back') THEN now()
                               WHEN %(status)s = 'running' THEN NULL ELSE finished_at END,
            attempts = attempts + CASE WHEN %(status)s = 'running' AND status <> 'running'
                                       THEN 1 ELSE 0 END,
            last_error = %(error)s,
            rows_done = coalesce(%(rows_done)s, CASE WHEN %(reset)s THEN 0 ELSE rows_done END),
            rows_estimated = coalesce(%(rows_est)s, rows_estimated),
            checkpoint = CASE WHEN %(reset)s THEN NULL
                              ELSE coalesce(%(checkpoint)s, checkpoint) END
            WHERE plan = %(plan)s AND table_name = %(table)s AND stage = %(stage)s""",
        ),
        {
            "status": status,
            "error": error,
            "rows_done": rows_done,
            "rows_est": rows_estimated,
            "checkpoint": Jsonb(checkpoint) if checkpoint is not None else None,
            "reset": reset_checkpoint,
            "plan": plan,
            "table": table,
            "stage": stage,
        },
    )


def set_error(conn: Conn, schema: str, plan: str, table: str, stage: str, error: str) -> None:
    conn.execute(
        _q(schema, "UPDATE {s}.stages SET last_error = %s, updated_at = now() "
           "WHERE plan = %s AND table_name = %s AND stage = %s"),
        (error, plan, table, stage),
    )


def record_progress(
    conn: Conn,
    schema: str,
    plan: str,
    table: str,
    stage: str,
    *,
    rows_done: int,
    checkpoint: dict[str, Any] | None,
    rows_per_s: float | None,
) -> None:
    """Advance a running stage's checkpoint (in the same transaction as the batch)."""
    conn.execute(
        _q(
            schema,
            """UPDATE {s}.stages SET rows_done = %s, checkpoint = %s, rows_per_s = %s,
                      updated_at = now()
                      WHERE plan = %s AND table_name = %s AND stage = %s""",
        ),
        (
            rows_done,
            Jsonb(checkpoint) if checkpoint is not None else None,
            rows_per_s,
            plan,
            table,
            stage,
        ),
    )


def log_event(
    conn: Conn,
    schema: str,
    plan: str,
    action: str,
    outcome: str,
    *,
    table: str | None = None,
    stage: str | None = None,
    statement: str | None = None,
    duration_ms: float | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        _q(
            schema,
            """INSERT INTO {s}.events (plan, table_name, stage, action, outcome, sql,
                      duration_ms, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
        ),
        (
            plan,
            table,
            stage,
            action,
            outcome,
            statement,
            duration_ms,
            Jsonb(detail) if detail is not None else None,
        ),
    )


def events(
    conn: Conn, schema: str, plan: str, table: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    if not schema_exists(conn, schema):
        return []
    rows = conn.execute(
        _q(
            schema,
            """SELECT * FROM (SELECT * FROM {s}.events WHERE plan = %s
                      AND (%s::text IS NULL OR %s = ANY(string_to_array(table_name, ',')))
                      ORDER BY id DESC LIMIT %s) e
                      ORDER BY id""",
        ),
        (plan, table, table, limit),
    ).fetchall()
    return list(rows)


def save(conn: Conn, schema: str, plan: str, table: str, key: str, value: Any) -> None:
    """Keep something a rollback will need (a dropped definition, an ACL), in the caller's txn."""
    conn.execute(
        _q(
            schema,
            """INSERT INTO {s}.saved VALUES (%s, %s, %s, %s)
                      ON CONFLICT (plan, table_name, key) DO UPDATE SET value = excluded.value""",
        ),
        (plan, table, key, Jsonb(value)),
    )


def load_saved(conn: Conn, schema: str, plan: str, table: str, key: str) -> Any:
    row = conn.execute(
        _q(schema, "SELECT value FROM {s}.saved WHERE plan = %s AND table_name = %s AND key = %s"),
        (plan, table, key),
    ).fetchone()
    return None if row is None else row["value"]


def setting(conn: Conn, schema: str, plan: str, table: str, key: str, default: Any) -> Any:
    """A value an operator may change while a stage runs (table-specific beats plan-wide)."""
    row = conn.execute(
        _q(
            schema,
            """SELECT value FROM {s}.settings WHERE plan = %s AND key = %s
                      AND table_name IN (%s, '*')
                      ORDER BY (table_name = '*') LIMIT 1""",
        ),
        (plan, key, table),
    ).fetchone()
    return default if row is None else row["value"]


def settings(conn: Conn, schema: str, plan: str, table: str) -> dict[str, Any]:
    """Every value set for a table, in one query (table-specific beats plan-wide): the copy
    reads them before each batch, where a query per key cost a round trip each."""
    rows = conn.execute(
        _q(
            schema,
            """SELECT DISTINCT ON (key) key, value FROM {s}.settings
                      WHERE plan = %s AND table_name IN (%s, '*')
                      ORDER BY key, (table_name = '*')""",
        ),
        (plan, table),
    ).fetchall()
    return {r["key"]: r["value"] for r in rows}


def put_setting(conn: Conn, schema: str, plan: str, key: str, value: Any, table: str = "*") -> None:
    conn.execute(
        _q(
            schema,
            """INSERT INTO {s}.settings (plan, table_name, key, value)
                      VALUES (%s, %s, %s, %s) ON CONFLICT (plan, table_name, key)
                      DO UPDATE SET value = excluded.value, updated_at = now()""",
        ),
        (plan, table, key, Jsonb(value)),
    )


# --- one operator at a time -------------------------------------------------------------------


def lock_key(kind: str, name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a plan or a table."""
    raw = f"orchestrator:{kind}:{name}".encode()
    hi = zlib.crc32(raw)
    lo = zlib.crc32(raw[::-1])
    key = (hi << 32) | lo
    return key - (1 << 64) if key >= (1 << 63) else key


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


def to_json(value: Any) -> str:
    return json.dumps(value, default=str)

"""The control store: the only writer of the control schema's tables.

Every change is named (start, finish, fail, roll back, forget, checkpoint, save, log) and made
on the caller's connection inside the caller's transaction, so a status change commits with
the work it records. A status change is guarded: it is allowed only from the states that
`TRANSITIONS` (drawn in docs/architecture.md) permits, checked by the UPDATE itself, and an
illegal one raises `IllegalTransition` instead of overwriting what another session recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db import Conn
from orchestrator.errors import IllegalTransition, StageError
from orchestrator.plan import LoadedPlan
from orchestrator.state.migrations import ensure_schema, q, schema_exists


class Status(StrEnum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"
    rolled_back = "rolled_back"


STATUSES = tuple(s.value for s in Status)

# change -> (the statuses it may leave, the status it sets). The state diagram in
# docs/architecture.md draws exactly this table (tests/test_layout.py compares them).
TRANSITIONS: dict[str, tuple[frozenset[Status], Status]] = {
    "start": (
        frozenset({Status.pending, Status.failed, Status.rolled_back, Status.running}),
        Status.running,
    ),
    # Verification proves the current state, so it may start again once done (cutover
    # re-verifies just before its swap).
    "start_again": (
        frozenset({Status.pending, Status.failed, Status.rolled_back, Status.running, Status.done}),
        Status.running,
    ),
    "finish": (frozenset({Status.running}), Status.done),
    "fail": (frozenset({Status.running}), Status.failed),
    "roll_back": (frozenset({Status.done, Status.failed, Status.running}), Status.rolled_back),
    # An atomic stage that failed or was interrupted left nothing: record it as undone.
    "forget": (frozenset({Status.failed, Status.running}), Status.rolled_back),
}

# What `orchestrator set` may change while a copy runs (read before every batch).
ADJUSTABLE_SETTINGS = (
    "batch_size",
    "sleep_ms",
    "probe_max",
    "max_replication_lag_bytes",
    "max_wal_bytes_per_s",
    "paused",  # true holds the copy between batches until set back to false
    "adaptive",  # true: the copy yields to the application (stages/pace.py)
    "yield_goal",  # the share of its write rate the application keeps
    "replay_rate",  # apply --follow: keys per second; 0: yield to the application
)


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


# --- reads (any module may read) -------------------------------------------------------------


def stage_rows(conn: Conn, schema: str, plan: str) -> list[StageRow]:
    if not schema_exists(conn, schema):
        return []
    rows = conn.execute(
        q(schema, "SELECT * FROM {s}.stages WHERE plan = %s ORDER BY table_name, stage"), (plan,)
    ).fetchall()
    return [StageRow(**r) for r in rows]


def get_stage(conn: Conn, schema: str, plan: str, table: str, stage: str) -> StageRow:
    row = conn.execute(
        q(schema, "SELECT * FROM {s}.stages WHERE plan = %s AND table_name = %s AND stage = %s"),
        (plan, table, stage),
    ).fetchone()
    if row is None:
        raise StageError(
            f"{table}: no {stage} stage recorded for plan {plan}",
            hint="run `orchestrator apply PLAN` to register the plan first",
        )
    return StageRow(**row)


def events(
    conn: Conn, schema: str, plan: str, table: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    if not schema_exists(conn, schema):
        return []
    rows = conn.execute(
        q(
            schema,
            """SELECT * FROM (SELECT * FROM {s}.events WHERE plan = %s
                      AND (%s::text IS NULL OR %s = ANY(string_to_array(table_name, ',')))
                      ORDER BY id DESC LIMIT %s) e
                      ORDER BY id""",
        ),
        (plan, table, table, limit),
    ).fetchall()
    return list(rows)


def load_saved(conn: Conn, schema: str, plan: str, table: str, key: str) -> Any:
    row = conn.execute(
        q(schema, "SELECT value FROM {s}.saved WHERE plan = %s AND table_name = %s AND key = %s"),
        (plan, table, key),
    ).fetchone()
    return None if row is None else row["value"]


def saved_like(conn: Conn, schema: str, plan: str, table: str, prefix: str) -> dict[str, Any]:
    """Every saved value of a table whose key starts with `prefix`."""
    rows = conn.execute(
        q(
            schema,
            "SELECT key, value FROM {s}.saved WHERE plan = %s AND table_name = %s "
            "AND starts_with(key, %s)",
        ),
        (plan, table, prefix),
    ).fetchall()
    return {str(r["key"]): r["value"] for r in rows}


def setting(conn: Conn, schema: str, plan: str, table: str, key: str, default: Any) -> Any:
    """A value an operator may change while a stage runs (table-specific beats plan-wide)."""
    return settings(conn, schema, plan, table).get(key, default)


def settings(conn: Conn, schema: str, plan: str, table: str) -> dict[str, Any]:
    """Every value set for a table, in one query (table-specific beats plan-wide): the copy
    reads them before each batch, where a query per key cost a round trip each."""
    rows = conn.execute(
        q(
            schema,
            """SELECT DISTINCT ON (key) key, value FROM {s}.settings
                      WHERE plan = %s AND table_name IN (%s, '*')
                      ORDER BY key, (table_name = '*')""",
        ),
        (plan, table),
    ).fetchall()
    return {r["key"]: r["value"] for r in rows}


def parse_setting(key: str, text: str) -> Any:
    """An adjustable setting's value from the operator's text: `paused` is true or false,
    `probe_max` a number, the others whole numbers."""
    if key not in ADJUSTABLE_SETTINGS:
        raise StageError(
            f"{key}: not an adjustable setting", hint=f"use one of {', '.join(ADJUSTABLE_SETTINGS)}"
        )
    word = text.strip().lower()
    if key in ("paused", "adaptive"):
        if word in ("true", "on", "yes", "1", "false", "off", "no", "0"):
            return word in ("true", "on", "yes", "1")
        raise StageError(f"{key} = {text!r}: not true or false", hint="write true or false")
    try:
        number = float(word)
    except ValueError:
        raise StageError(f"{key} = {text!r}: not a number", hint=f"write a number for {key}"
                         ) from None
    if key == "yield_goal" and not 0 < number < 1:
        raise StageError(f"yield_goal = {text!r}: not between 0 and 1",
                         hint="write a share such as 0.85")
    if key != "probe_max" and number < 0:
        raise StageError(f"{key} = {text!r}: negative", hint=f"write 0 or more for {key}")
    return number if key in ("probe_max", "yield_goal") else int(number)


def change_setting(conn: Conn, loaded: LoadedPlan, key: str, value: Any, table: str = "*") -> None:
    """`orchestrator set`: create the control schema if needed and commit one setting."""
    if key not in ADJUSTABLE_SETTINGS:
        raise StageError(
            f"{key}: not an adjustable setting", hint=f"use one of {', '.join(ADJUSTABLE_SETTINGS)}"
        )
    ensure_schema(conn, loaded.plan.control_schema)
    with conn.transaction():
        Store(conn, loaded.plan.control_schema, loaded.plan.name).put_setting(key, value, table)


# --- writes: the named changes -----------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """The control schema of one plan, written on `conn` inside the caller's transaction."""

    conn: Conn
    schema: str
    plan: str
    # Stages whose `done` is final: nothing rolls them back (finalize dropped what it undoes).
    terminal: frozenset[str] = frozenset()

    def register(self, loaded: LoadedPlan, stages: dict[str, tuple[str, ...]]) -> None:
        """Record the plan text and make sure every (table, stage) row exists."""
        self.conn.execute(
            q(
                self.schema,
                """INSERT INTO {s}.plans (name, checksum, yaml, path) VALUES (%s, %s, %s, %s)
                 ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum,
                   yaml = excluded.yaml, path = excluded.path, updated_at = now()
                 WHERE {s}.plans.checksum IS DISTINCT FROM excluded.checksum""",
            ),
            (self.plan, loaded.checksum, loaded.text, loaded.path),
        )
        rows = [(self.plan, table, stage) for table, names in stages.items() for stage in names]
        with self.conn.cursor() as cur:
            cur.executemany(
                q(
                    self.schema,
                    "INSERT INTO {s}.stages (plan, table_name, stage) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                ),
                rows,
            )

    def status(self, table: str, stage: str) -> str:
        return get_stage(self.conn, self.schema, self.plan, table, stage).status

    def row(self, table: str, stage: str) -> StageRow:
        return get_stage(self.conn, self.schema, self.plan, table, stage)

    # The guarded status changes.

    def start(self, table: str, stage: str, *, again: bool = False, reset: bool = False) -> None:
        self._change("start_again" if again else "start", table, stage, reset=reset)

    def finish(self, table: str, stage: str, *, rows_done: int | None = None) -> None:
        self._change("finish", table, stage, rows_done=rows_done)

    def fail(self, table: str, stage: str, error: str) -> None:
        self._change("fail", table, stage, error=error)

    def roll_back(self, table: str, stage: str, *, reset: bool = False) -> None:
        if stage in self.terminal and self.status(table, stage) == Status.done:
            raise IllegalTransition(
                f"{table}: {stage} is done and final; it cannot be rolled back",
                hint="move the table back with a new plan if you must",
            )
        self._change("roll_back", table, stage, reset=reset)

    def forget(self, table: str, stage: str) -> None:
        self._change("forget", table, stage)

    def _change(
        self,
        change: str,
        table: str,
        stage: str,
        *,
        error: str | None = None,
        rows_done: int | None = None,
        reset: bool = False,
    ) -> None:
        allowed, status = TRANSITIONS[change]
        row = self.conn.execute(
            q(
                self.schema,
                """UPDATE {s}.stages SET status = %(status)s, updated_at = now(),
            started_at = CASE WHEN %(status)s = 'running' AND status <> 'running' THEN now()
                              ELSE started_at END,
            finished_at = CASE WHEN %(status)s IN ('done','failed','rolled_back') THEN now()
                               WHEN %(status)s = 'running' THEN NULL ELSE finished_at END,
            attempts = attempts + CASE WHEN %(status)s = 'running' AND status <> 'running'
                                       THEN 1 ELSE 0 END,
            last_error = %(error)s,
            rows_done = coalesce(%(rows_done)s, CASE WHEN %(reset)s THEN 0 ELSE rows_done END),
            checkpoint = CASE WHEN %(reset)s THEN NULL ELSE checkpoint END
            WHERE plan = %(plan)s AND table_name = %(table)s AND stage = %(stage)s
              AND status = ANY(%(allowed)s)
            RETURNING status""",
            ),
            {
                "status": status.value,
                "error": error,
                "rows_done": rows_done,
                "reset": reset,
                "plan": self.plan,
                "table": table,
                "stage": stage,
                "allowed": sorted(s.value for s in allowed),
            },
        ).fetchone()
        if row is None:
            now = self.status(table, stage)
            raise IllegalTransition(
                f"{table}: {stage} cannot {change.replace('_', ' ')} from {now} "
                f"(allowed from: {', '.join(sorted(allowed))})",
                hint="another session may have changed it: `orchestrator status PLAN`",
            )

    # Changes that keep the status.

    def checkpoint(
        self,
        table: str,
        stage: str,
        *,
        rows_done: int,
        checkpoint: dict[str, Any] | None,
        rows_per_s: float | None = None,
        rows_estimated: int | None = None,
    ) -> None:
        """Advance a running stage's checkpoint (in the same transaction as the batch)."""
        row = self.conn.execute(
            q(
                self.schema,
                """UPDATE {s}.stages SET rows_done = %s, checkpoint = %s,
                      rows_per_s = coalesce(%s, rows_per_s),
                      rows_estimated = coalesce(%s, rows_estimated), updated_at = now()
                      WHERE plan = %s AND table_name = %s AND stage = %s AND status = 'running'
                      RETURNING status""",
            ),
            (
                rows_done,
                Jsonb(checkpoint) if checkpoint is not None else None,
                rows_per_s,
                rows_estimated,
                self.plan,
                table,
                stage,
            ),
        ).fetchone()
        if row is None:
            raise IllegalTransition(
                f"{table}: {stage} is {self.status(table, stage)}, not running: no checkpoint",
                hint="another session may have changed it: `orchestrator status PLAN`",
            )

    def advance_range(
        self, table: str, stage: str, index: int, next_block: int, rows: int,
        rows_per_s: float | None,
    ) -> int:
        """One worker of a heap-order copy committed a batch: its range's next block and the
        rows it added (in the same transaction as the batch); returns the rows done in all.
        Each worker touches only its own range, so concurrent workers never lose each
        other's progress (the row lock orders their commits)."""
        row = self.conn.execute(
            q(
                self.schema,
                """UPDATE {s}.stages SET
                      checkpoint = jsonb_set(checkpoint, ARRAY['ranges', %s::text, 'next'],
                                             to_jsonb(%s::bigint)),
                      rows_done = rows_done + %s, rows_per_s = coalesce(%s, rows_per_s),
                      updated_at = now()
                      WHERE plan = %s AND table_name = %s AND stage = %s AND status = 'running'
                      RETURNING rows_done""",
            ),
            (index, next_block, rows, rows_per_s, self.plan, table, stage),
        ).fetchone()
        if row is None:
            raise IllegalTransition(
                f"{table}: {stage} is {self.status(table, stage)}, not running: no checkpoint",
                hint="another session may have changed it: `orchestrator status PLAN`",
            )
        return int(row["rows_done"])

    def note_error(self, table: str, stage: str, error: str) -> None:
        """A failed rollback leaves the stage as it was: only the error is new."""
        self.conn.execute(
            q(
                self.schema,
                "UPDATE {s}.stages SET last_error = %s, updated_at = now() "
                "WHERE plan = %s AND table_name = %s AND stage = %s",
            ),
            (error, self.plan, table, stage),
        )

    def save(self, table: str, key: str, value: Any) -> None:
        """Keep something a rollback will need (a created schema, granted privileges)."""
        self.conn.execute(
            q(
                self.schema,
                """INSERT INTO {s}.saved VALUES (%s, %s, %s, %s)
                      ON CONFLICT (plan, table_name, key) DO UPDATE SET value = excluded.value""",
            ),
            (self.plan, table, key, Jsonb(value)),
        )

    def unsave(self, table: str, key: str) -> None:
        self.conn.execute(
            q(
                self.schema,
                "DELETE FROM {s}.saved WHERE plan = %s AND table_name = %s AND key = %s",
            ),
            (self.plan, table, key),
        )

    def load(self, table: str, key: str) -> Any:
        return load_saved(self.conn, self.schema, self.plan, table, key)

    def saved_like(self, table: str, prefix: str) -> dict[str, Any]:
        return saved_like(self.conn, self.schema, self.plan, table, prefix)

    def put_setting(self, key: str, value: Any, table: str = "*") -> None:
        self.conn.execute(
            q(
                self.schema,
                """INSERT INTO {s}.settings (plan, table_name, key, value)
                      VALUES (%s, %s, %s, %s) ON CONFLICT (plan, table_name, key)
                      DO UPDATE SET value = excluded.value, updated_at = now()""",
            ),
            (self.plan, table, key, Jsonb(value)),
        )

    def settings(self, table: str) -> dict[str, Any]:
        return settings(self.conn, self.schema, self.plan, table)

    def log(
        self,
        action: str,
        outcome: str,
        *,
        table: str | None = None,
        stage: str | None = None,
        statement: str | None = None,
        duration_ms: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append to the event log (append-only: triggers refuse UPDATE, DELETE, TRUNCATE)."""
        self.conn.execute(
            q(
                self.schema,
                """INSERT INTO {s}.events (plan, table_name, stage, action, outcome, sql,
                      duration_ms, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
            ),
            (
                self.plan,
                table,
                stage,
                action,
                outcome,
                statement,
                duration_ms,
                Jsonb(detail) if detail is not None else None,
            ),
        )


__all__ = [
    "ADJUSTABLE_SETTINGS",
    "STATUSES",
    "TRANSITIONS",
    "StageRow",
    "Status",
    "Store",
    "change_setting",
    "ensure_schema",
    "events",
    "get_stage",
    "load_saved",
    "parse_setting",
    "schema_exists",
    "setting",
    "settings",
    "stage_rows",
]

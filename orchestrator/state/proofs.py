"""What verify proved, chunk by chunk: the control schema's `chunks` table.

A full verify pass records, per segment (the table, or a leaf partition) and chunk, its key
range, row count and checksum, and when the pass proved it (`passed_at`). A re-check of the
rows written since that finds them equal moves every chunk's `checked_at` to now. Cutover
re-checks only the rows written since while the full pass is recent enough
(stages/proof.py). Only this module writes the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.state.migrations import q, schema_exists


@dataclass(frozen=True)
class Chunk:
    part: str  # '' for a table that is not partitioned
    n: int
    lo: list[str] | None  # exclusive; None: from the start
    hi: list[str] | None  # inclusive; None: to the end
    rows: int
    checksum: str
    passed_at: datetime
    checked_at: datetime


@dataclass(frozen=True)
class Proofs:
    """One plan's chunk proofs."""

    conn: Conn
    schema: str
    plan: str

    def replace(self, table: str, part: str, chunks: list[tuple[Any, Any, int, str]]) -> None:
        """A full pass's chunks (lo, hi, rows, checksum) for one segment, replacing the last
        pass's. Call inside the transaction that marks verify done."""
        self.conn.execute(q(self.schema, "DELETE FROM {s}.chunks WHERE plan = %s "
                                         "AND table_name = %s AND part = %s"),
                          (self.plan, table, part))
        with self.conn.cursor() as cur:
            cur.executemany(
                q(self.schema, "INSERT INTO {s}.chunks (plan, table_name, part, n, lo, hi, rows, "
                               "checksum, passed_at, checked_at) "
                               "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now(), now())"),
                [(self.plan, table, part, n, lo, hi, rows, checksum)
                 for n, (lo, hi, rows, checksum) in enumerate(chunks)],
            )

    def checked_all(self, table: str) -> None:
        """A re-check found every row written since the full pass equal: the whole table is
        proven as of now."""
        self.conn.execute(
            q(self.schema, "UPDATE {s}.chunks SET checked_at = now() "
                           "WHERE plan = %s AND table_name = %s"), (self.plan, table))

    def forget(self, table: str) -> None:
        self.conn.execute(q(self.schema, "DELETE FROM {s}.chunks WHERE plan = %s "
                                         "AND table_name = %s"), (self.plan, table))

    def of(self, table: str) -> list[Chunk]:
        rows = self.conn.execute(
            q(self.schema, "SELECT part, n, lo, hi, rows, checksum, passed_at, checked_at "
                           "FROM {s}.chunks WHERE plan = %s AND table_name = %s "
                           "ORDER BY part, n"), (self.plan, table)).fetchall()
        return [Chunk(**dict(r)) for r in rows]


def summary(conn: Conn, schema: str, plan: str) -> dict[str, dict[str, Any]]:
    """Per table: when its last full pass proved it, the oldest check of any chunk since, and
    how many chunks (for status)."""
    if not schema_exists(conn, schema):
        return {}
    present = conn.execute("SELECT to_regclass(format('%%I.chunks', %s::text)) IS NOT NULL AS ok",
                           (schema,)).fetchone()
    if not (present and present["ok"]):
        return {}  # a control schema from before chunk proofs (upgraded by the next command)
    rows = conn.execute(
        q(schema, "SELECT table_name, min(passed_at) AS full_pass_at, "
                  "min(checked_at) AS checked_at, count(*) AS chunks FROM {s}.chunks "
                  "WHERE plan = %s GROUP BY table_name ORDER BY table_name"), (plan,)).fetchall()
    return {r["table_name"]: {k: r[k] for k in ("full_pass_at", "checked_at", "chunks")}
            for r in rows}


def pending_keys(conn: Conn, touched: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Per table, the keys replay changed since their chunks were last proven (`touched`:
    table label -> the schema and name of its touched table)."""
    out: dict[str, int] = {}
    for label, (schema, name) in touched.items():
        r = conn.execute("SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL"
                         " AS ok", (schema, name)).fetchone()
        if not (r and r["ok"]):
            continue
        n = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(
            sql.Identifier(schema, name))).fetchone()
        out[label] = int(n["n"]) if n else 0
    return out

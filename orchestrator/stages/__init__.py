"""The stages of a table's move. One module per stage; each offers forward, rollback and the
SQL of both for dry-runs. The engine (orchestrator.run.engine) sequences them and records status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.model.catalog import Catalog
from orchestrator.model.graph import DependencyGraph
from orchestrator.model.move import TableMove
from orchestrator.plan import LoadedPlan, Plan
from orchestrator.run.runner import LockPolicy

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Step:
    """One statement of a stage, with what it locks (for dry-runs and reviews)."""

    sql: sql.Composed | sql.SQL
    locks: str = ""
    # The statement that takes the stage's locks: its whole wait, over every relation it
    # locks, is bounded by lock_timeout (as a statement_timeout), not one lock_timeout each.
    bounded: bool = False


@dataclass
class Ctx:
    conn: Conn  # autocommit; stages open their own transactions
    loaded: LoadedPlan
    catalog: Catalog
    graph: DependencyGraph
    moves: dict[str, TableMove]
    progress: Progress = field(default=lambda _e: None)
    lock_timeout_ms: int | None = None
    stop_requested: Callable[[], bool] = field(default=lambda: False)

    @property
    def plan(self) -> Plan:
        return self.loaded.plan

    @property
    def control(self) -> str:
        return self.plan.control_schema

    def policy(self, m: TableMove) -> LockPolicy:
        o = m.options
        return LockPolicy(
            lock_timeout_ms=self.lock_timeout_ms or o.lock_timeout_ms,
            statement_timeout_ms=o.statement_timeout_ms,
            retries=o.lock_retries,
        )


def regclass(*parts: str) -> str:
    """A regclass text for pg_locks lookups (quoted, so any name works)."""
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)

"""One table looked at closely (the cockpit's detail pane): its stages' SQL both ways from the
dry-run, the locks its next stage takes and who holds them now, and its event history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.db import connect
from orchestrator.errors import OrchestratorError
from orchestrator.plan import LoadedPlan
from orchestrator.run import dryrun
from orchestrator.run.runner import blockers
from orchestrator.stages.base import regclass
from orchestrator.state import store


@dataclass(frozen=True)
class Detail:
    table: str
    next_stage: str
    locks: tuple[str, ...]  # what the next stage's statements lock
    holders: tuple[dict[str, Any], ...]  # sessions holding locks on the table now
    sql: str  # every stage's statements, forward and rollback (the dry-run's script)
    history: tuple[dict[str, Any], ...]  # the table's latest events, oldest first
    note: str = ""  # why the SQL is missing, when it is


def read(dsn: str, loaded: LoadedPlan, table: str, next_stage: str) -> Detail:
    """Read the detail of one table (read-only; a few statements)."""
    plan = loaded.plan
    with connect(dsn, autocommit=True, application="orchestrator-cockpit") as conn:
        conn.execute("SET search_path = ''")  # definitions print schema-qualified
        history = store.events(conn, plan.control_schema, plan.name, table, limit=15)
        holders = blockers(conn, [regclass(plan.source_schema, table)])
        try:
            report = dryrun.build(conn, loaded, [table])
        except OrchestratorError as exc:
            return Detail(table, next_stage, (), tuple(holders), "", tuple(history),
                          note=f"no dry-run: {exc.message}")
    found = [t for t in report.tables if t.table == table]
    if not found:
        return Detail(table, next_stage, (), tuple(holders), "", tuple(history),
                      note="no dry-run: the source table is gone (finalized)")
    locks = tuple(
        st.locks for s in found[0].stages if s.stage == next_stage for st in s.forward
        if st.locks)
    one = dryrun.DryRun(plan=report.plan, copy_rate=report.copy_rate,
                        rate_source=report.rate_source, tables=found)
    return Detail(table, next_stage, locks, tuple(holders), dryrun.to_sql(one), tuple(history))

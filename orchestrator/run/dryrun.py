"""Dry-run: for every unit and stage, the exact SQL forward and back, its locks, the sizes, an
expected duration from a measured copy rate, the risks, and the strategy with its reason.

Read-only: it never creates the control schema. The one measurement (a sample copy into a
temporary table) runs in a transaction that is rolled back.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from orchestrator.db import Conn, snapshot_txn
from orchestrator.errors import StageError
from orchestrator.model.catalog import Catalog, Relation
from orchestrator.model.context import Ctx, build_context
from orchestrator.model.move import TableMove
from orchestrator.plan import LoadedPlan, Strategy
from orchestrator.run.runner import blockers
from orchestrator.sql.compose import render
from orchestrator.stages import registry
from orchestrator.stages.base import Stage, Step, regclass
from orchestrator.stages.copy import COPY
from orchestrator.state import store

SAMPLE_ROWS = 20_000
LARGE_BYTES = 1 << 30


@dataclass(frozen=True)
class Statement:
    sql: str
    locks: str
    waits_behind: tuple[int, ...] = ()


Rendered = tuple[tuple[Statement, ...], tuple[Statement, ...]]


@dataclass(frozen=True)
class StagePlan:
    """One stage of one table. Its statements are composed and rendered when first read: a
    plan of 2,000 tables has ~120k of them, and the text report of a large plan shows none
    (`--format sql`, `--format json` or `--table` do)."""

    stage: str
    status: str
    note: str
    statements: Callable[[], Rendered] = field(repr=False, compare=False)

    @functools.cached_property
    def _rendered(self) -> Rendered:
        return self.statements()

    @property
    def forward(self) -> tuple[Statement, ...]:
        return self._rendered[0]

    @property
    def rollback(self) -> tuple[Statement, ...]:
        return self._rendered[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": self.status,
            "forward": [dataclasses.asdict(st) for st in self.forward],
            "rollback": [dataclasses.asdict(st) for st in self.rollback],
            "note": self.note,
        }


@dataclass(frozen=True)
class TablePlan:
    table: str
    target: str
    unit: int
    wave: int
    cycle: bool
    strategy: str
    reason: str
    rows: int
    bytes: int
    expected_s: float | None
    risks: tuple[str, ...]
    stages: tuple[StagePlan, ...]


@dataclass
class DryRun:
    plan: str
    copy_rate: float | None
    rate_source: str
    tables: list[TablePlan] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        tables = []
        for t in self.tables:
            row = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
            row["stages"] = [s.as_dict() for s in t.stages]
            tables.append(row)
        return {
            "plan": self.plan,
            "copy_rate": self.copy_rate,
            "rate_source": self.rate_source,
            "tables": tables,
            "sessions": self.sessions,
        }


def _statements(
    conn: Conn, steps: list[Step], holders: dict[str, list[int]]
) -> tuple[Statement, ...]:
    out = []
    for s in steps:
        waits: tuple[int, ...] = ()
        if s.bounded or "waits" in s.locks:
            waits = tuple(sorted({p for pids in holders.values() for p in pids}))
        out.append(Statement(render(conn, s.sql), s.locks, waits))
    return tuple(out)


def _long_transactions(conn: Conn) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT pid, usename AS role, application_name, state, "
        "(now() - xact_start)::text AS xact_age, left(query, 200) AS query "
        "FROM pg_stat_activity WHERE xact_start < now() - interval '1 minute' "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend' ORDER BY xact_start"
    ).fetchall()
    return [dict(r) for r in rows]


def _measure_rate(
    conn: Conn, loaded: LoadedPlan, moves: dict[str, TableMove], cat: Catalog
) -> tuple[float | None, str]:
    """Rows per second of a copy: from earlier copies of this plan, else a rolled-back sample."""
    plan = loaded.plan
    rows = store.stage_rows(conn, plan.control_schema, plan.name)
    rates = [r.rows_per_s for r in rows if r.stage == COPY.name and r.rows_per_s]
    if rates:
        return max(rates), "measured by earlier copies of this plan"
    candidates = [
        (cat.table(m.source_schema, m.source_name), m)
        for m in moves.values()
        if m.strategy == "copy"
    ]
    candidates = [(r, m) for r, m in candidates if r is not None and r.kind in ("r", "p")]
    if not candidates:
        return None, "no table uses the copy strategy"
    rel, m = max(candidates, key=lambda c: cat.size_of(c[0])[0] if c[0] else 0)
    assert rel is not None
    cols = sql.SQL(", ").join(sql.Identifier(c.source) for c in m.copied)
    # A real (WAL-logged) table with the key, like the target, in a transaction that is
    # rolled back: the catalog is left as it was.
    sample = sql.Identifier(m.source_schema, f"_orch_rate_{m.tag}")
    with snapshot_txn(conn, rollback=True):
        conn.execute(
            sql.SQL("CREATE TABLE {} AS SELECT {} FROM {} LIMIT 0").format(sample, cols, m.source)
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                sample, sql.SQL(", ").join(sql.Identifier(k) for k in m.key_source)
            )
        )
        t0 = time.monotonic()
        cur = conn.execute(
            sql.SQL("INSERT INTO {} SELECT {} FROM {} ORDER BY {} LIMIT {}").format(
                sample,
                cols,
                m.source,
                sql.SQL(", ").join(sql.Identifier(k) for k in m.key_source),
                sql.Literal(SAMPLE_ROWS),
            )
        )
        n = cur.rowcount
        elapsed = time.monotonic() - t0

    if n <= 0:
        return None, f"{m.label} is empty"
    return n / max(elapsed, 1e-6), f"a {n:,}-row sample copy of {m.label} (rolled back)"


def _status(conn: Conn, loaded: LoadedPlan) -> dict[tuple[str, str], str]:
    rows = store.stage_rows(conn, loaded.plan.control_schema, loaded.plan.name)
    return {(r.table_name, r.stage): r.status for r in rows}


def _risks(ctx: Ctx, m: TableMove, rel: Relation) -> list[str]:
    cat, plan = ctx.catalog, ctx.plan
    out: list[str] = []
    names = plan.table_names
    if rel.user_triggers:
        out.append(
            "user triggers "
            + ", ".join(t.name for t in rel.user_triggers)
            + (
                " move to the new table at cutover"
                if m.strategy == "copy"
                else " move with the table"
            )
        )
    deps = [
        d
        for d in cat.dependents_of(m.source_schema, m.source_name)
        if (d.schema, d.name) not in plan.locations()
    ]
    if deps:
        out.append(
            "dependent views "
            + ", ".join(f"{d.schema}.{d.name}" for d in deps)
            + (
                " are recreated over the compatibility view at cutover"
                if m.strategy == "copy"
                else " keep reading the moved table"
            )
        )
    for fk in cat.fks_to(m.source_schema, m.source_name):
        if fk.table not in names or fk.schema != plan.source_schema:
            out.append(
                f"inbound foreign key {fk.name} from {fk.schema}.{fk.table} (outside "
                "the plan) is re-pointed at cutover"
                if m.strategy == "copy"
                else f"inbound foreign key {fk.name} from {fk.schema}.{fk.table} follows the table"
            )
    for fk in cat.fks_from(m.source_schema, m.source_name):
        if not fk.columns_indexed:
            out.append(
                f"foreign key {fk.name} ({', '.join(fk.columns)}) has no index on its "
                "columns: validation and cascades scan the table"
            )
    if rel.total_bytes > LARGE_BYTES:
        out.append(f"large table: {rel.total_bytes / (1 << 30):.1f} GiB")
    read_only = [c.source for c in m.columns if c.down is not None]
    if read_only:
        out.append(
            "read-only through the compatibility view (computed by down): "
            + ", ".join(read_only)
            + "; INSERT and UPDATE naming them will fail"
        )
    out.append(
        f"after the swap TRUNCATE {m.source_schema}.{m.source_name} fails (it is a "
        f"view); truncate {m.target_schema}.{m.target_name} instead"
    )
    if m.strategy == Strategy.remote.value:
        out += _remote_risks(ctx, m)
    return out


def _remote_risks(ctx: Ctx, m: TableMove) -> list[str]:
    """What changes for the application when the table lives on another server."""
    from orchestrator.tools.scan import recorded_problems

    server = ctx.plan.remote_schemas()[m.target_schema]
    out = [
        f"moves to server {server}: after cutover {m.source_schema}.{m.source_name} is a view "
        "over a postgres_fdw foreign table; INSERT ... ON CONFLICT with a conflict target (or "
        f"DO UPDATE) fails through it, a transaction that writes it and a table on the source "
        "is not atomic (no two-phase commit), and every statement costs round trips to "
        f"server {server}; `orchestrator scan-code` finds such statements in the code",
        f"new keys: the source's compatibility relation and server {server} each hand out "
        "every other value of the key's sequence from cutover on",
    ]
    state, found = recorded_problems(ctx.conn, ctx.plan)
    names = {m.source_name, m.target_name}
    out += [f"recorded statement that cannot work then: {f}" for f in found
            if any(n in f for n in names)]
    if state != "available":
        out.append(f"pg_stat_statements is {state}: the application's statements were not "
                   "checked (run `orchestrator scan-code` over its code)")
    return out


def _reason(m: TableMove, spec_columns: int) -> str:
    if m.strategy == Strategy.remote.value:
        return (f"remote: schema {m.target_schema} lives on another server; the table moves "
                "by logical replication (publication, slot, subscription) and back after "
                "cutover")
    if m.strategy == Strategy.rename.value:
        return (
            "rename: ALTER TABLE ... SET SCHEMA plus a compatibility view; instant, no "
            "copy (the table changes no column)"
        )
    if spec_columns == 0:
        return (
            "copy, as the plan asks; it qualifies for the instant rename strategy (no "
            "column changes): set `options: {strategy: rename}` to use it"
        )
    return "copy: the plan maps columns, which only the copy strategy can do"


def build(conn: Conn, loaded: LoadedPlan, tables: Collection[str] = ()) -> DryRun:
    """Plan every stage of every unit (or of the units holding `tables`), changing nothing."""
    unknown = [t for t in tables if t not in loaded.plan.table_names]
    if unknown:
        raise StageError(
            f"{', '.join(unknown)}: not a table of plan {loaded.plan.name}",
            hint=f"`orchestrator graph {loaded.path}` lists the plan's tables",
        )
    ctx = build_context(conn, loaded)
    cat, plan = ctx.catalog, ctx.plan
    status = _status(conn, loaded)
    rate, source = _measure_rate(conn, loaded, ctx.moves, cat)
    out = DryRun(
        plan=plan.name, copy_rate=rate, rate_source=source, sessions=_long_transactions(conn)
    )
    # One query for every source table's current lock holders, whatever the table count.
    held: dict[int, list[int]] = {}
    sources = [regclass(m.source_schema, m.source_name) for m in ctx.moves.values()
               if cat.table(m.source_schema, m.source_name) is not None]
    for b in blockers(conn, sources):
        held.setdefault(int(b["relation_oid"]), []).append(int(b["pid"]))
    for unit in ctx.graph.units:
        if unit.kind != "tables":
            continue
        moves = [ctx.moves[n] for n in unit.members if n in ctx.moves]
        if tables and not set(unit.members) & set(tables):
            continue
        for m in moves:
            rel = cat.table(m.source_schema, m.source_name) or cat.table(
                plan.retired_schema, m.source_name
            )
            if rel is None or rel.kind not in ("r", "p"):
                continue
            rows, size = cat.size_of(rel)
            holders = {m.label: held.get(rel.oid, [])}
            st = _stage_plans(ctx, m, moves, status, holders)
            expected = rows / rate if rate and m.strategy == "copy" else None
            spec = plan.table(m.label)
            out.tables.append(
                TablePlan(
                    table=m.label,
                    target=f"{m.target_schema}.{m.target_name}",
                    unit=unit.id,
                    wave=unit.wave,
                    cycle=unit.is_cycle,
                    strategy=m.strategy,
                    reason=_reason(m, len(spec.columns)),
                    rows=rows,
                    bytes=size,
                    expected_s=expected,
                    risks=tuple(_risks(ctx, m, rel)),
                    stages=tuple(st),
                )
            )
    return out


def _stage_plans(
    ctx: Ctx,
    m: TableMove,
    unit: list[TableMove],
    status: dict[tuple[str, str], str],
    holders: dict[str, list[int]],
) -> list[StagePlan]:
    """Each stage of the table's strategy, its statements rendered when first read."""
    conn = ctx.conn
    plans = []
    for stage in registry.strategy_of(m).stages:
        moves = [x for x in unit if x.strategy == m.strategy] if stage.per_unit else [m]
        note = stage.note
        if stage.per_unit and len(unit) > 1:
            members = ", ".join(x.label for x in unit)
            note = f"the whole unit swaps in one transaction: {members}; {note}"

        def statements(stage: Stage = stage, moves: list[TableMove] = moves) -> Rendered:
            forward, back = stage.review(ctx, moves)
            return _statements(conn, forward, holders), _statements(conn, back, holders)

        plans.append(
            StagePlan(stage.name, status.get((m.label, stage.name), "pending"), note, statements)
        )
    return plans


def to_sql(d: DryRun) -> str:
    """A reviewable script: a header per stage, forward SQL, then the rollback as comments."""
    lines = [f"-- orchestrator dry-run of plan {d.plan}", "-- nothing below has been run", ""]
    for t in d.tables:
        lines.append(
            f"-- ===== {t.table} -> {t.target} (unit {t.unit}, wave {t.wave}, {t.strategy}) ====="
        )
        for s in t.stages:
            lines.append(f"-- ----- {t.table}: {s.stage} (now {s.status}) -----")
            if s.note:
                lines.append(f"-- {s.note}")
            for st in s.forward:
                if st.locks:
                    lines.append(f"-- locks: {st.locks}")
                lines.append(st.sql.rstrip(";") + ";")
            if s.rollback:
                lines.append(f"-- rollback of {s.stage}:")
                for st in s.rollback:
                    lines.append("--   " + st.sql.replace("\n", "\n--   ").rstrip(";") + ";")
            lines.append("")
    return "\n".join(lines)

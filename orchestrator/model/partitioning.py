"""What a partitioned table's move needs of its partitions: checks before it, and a guard
that the partitions have not changed since the move began.

A partitioned table moves whole: its partitions (sub-partitions and default partitions too)
go with it under their own names. Each check here names the object, the reason and what to
do instead (docs/runbook.md, "Partitioned tables").
"""

from __future__ import annotations

import re

from psycopg import sql

from orchestrator.errors import StageError
from orchestrator.model.catalog import Catalog, Relation
from orchestrator.model.graph import Problem
from orchestrator.model.move import TableMove
from orchestrator.plan import Options, Plan, Strategy, TableSpec
from orchestrator.sql.compose import Body
from orchestrator.state.store import Store

# Where the first stage saves the partitions the move began with.
PARTITIONS_KEY = "partitions"

# PostgreSQL 18 is the first that adds a foreign key NOT VALID to a partitioned table.
NOT_VALID_ON_PARTITIONED = 180000


def problems(
    cat: Catalog, plan: Plan, spec: TableSpec, opts: Options, src: Relation
) -> list[Problem]:
    """Why this plan table cannot move with its partitions (empty when it can)."""
    name = f"{src.schema}.{src.name}"
    if src.is_partition:
        parent = src.inherits[0] if src.inherits else "its parent"
        return [Problem(
            name, f"is a partition of {parent}",
            f"list {parent.split('.', 1)[-1]} in the plan instead: a partitioned table moves "
            "with all its partitions",
        )]
    if src.kind != "p":
        return []
    parts = cat.partitions_of(*src.qualified)
    out = _completeness(cat, src, parts)
    out += _names_free(cat, spec, parts)
    out += _key_mapping(spec, src, parts)
    out += _partition_extras(parts, opts)
    if opts.strategy == Strategy.copy:
        out += _copy_only(cat, plan, src, parts)
    return out


def _completeness(cat: Catalog, src: Relation, parts: list[Relation]) -> list[Problem]:
    """Every partition must be in the table's schema, where the move looks for them."""
    found: dict[str, int] = {}
    for p in parts:
        found[p.inherits[0]] = found.get(p.inherits[0], 0) + 1
    return [
        Problem(
            f"{node.schema}.{node.name}",
            f"has {node.child_count - found.get(f'{node.schema}.{node.name}', 0)} partition(s) "
            f"outside schema {src.schema}",
            f"move them into {src.schema} first (ALTER TABLE ... SET SCHEMA {src.schema}), or "
            "detach them",
        )
        for node in [src, *parts]
        if node.kind == "p" and node.child_count != found.get(f"{node.schema}.{node.name}", 0)
    ]


def _names_free(cat: Catalog, spec: TableSpec, parts: list[Relation]) -> list[Problem]:
    return [
        Problem(
            f"{spec.schema_}.{p.name}",
            f"the name of partition {p.schema}.{p.name} is already taken in {spec.schema_}",
            "drop or rename the existing relation: partitions keep their names",
        )
        for p in parts
        if cat.table(spec.schema_, p.name) is not None
    ]


def _key_mapping(spec: TableSpec, src: Relation, parts: list[Relation]) -> list[Problem]:
    """Partition bounds and keys are carried as the catalog prints them: their columns must
    keep their names and types."""
    keys = " ".join(k for k in [src.partition_key, *(p.partition_key for p in parts)] if k)
    return [
        Problem(
            f"{src.schema}.{src.name}.{col}",
            "is in the partition key, which the move carries unchanged",
            "move the table without mapping this column, and rename it afterwards",
        )
        for col in spec.columns
        if re.search(rf'(^|[^\w"]){re.escape(col)}($|[^\w"])|"{re.escape(col)}"', keys)
    ]


def _partition_extras(parts: list[Relation], opts: Options) -> list[Problem]:
    """What a single partition may hold beyond its parent's definition and the move does not
    carry: refused by name rather than dropped."""
    out: list[Problem] = []
    for p in parts:
        what = []
        if p.user_triggers:
            what.append("triggers of its own (" + ", ".join(t.name for t in p.user_triggers) + ")")
        if p.policies or p.rls_enabled:
            what.append("row-level security of its own")
        if any(c.acl or c.comment or c.stats_target is not None for c in p.columns):
            what.append("column grants, comments or statistics targets of its own")
        if opts.strategy == Strategy.copy and p.publications:
            what.append("publications (" + ", ".join(p.publications) + ")")
        if what:
            out.append(Problem(
                f"{p.schema}.{p.name}",
                "this partition has " + "; ".join(what) + ", which the move does not carry",
                "define them on the partitioned table instead, or drop them before the move "
                "and recreate them after",
            ))
    return out


def _copy_only(
    cat: Catalog, plan: Plan, src: Relation, parts: list[Relation]
) -> list[Problem]:
    """The copy strategy re-points keys and recreates views over new tables."""
    out: list[Problem] = []
    name = f"{src.schema}.{src.name}"
    old = cat.server_version < NOT_VALID_ON_PARTITIONED
    if old:
        for fk in cat.fks_from(*src.qualified):
            out.append(Problem(
                f"{name} ({fk.name})",
                "PostgreSQL before 18 cannot add a foreign key NOT VALID to a partitioned "
                "table, so the swap would validate it while holding its lock",
                "use `options: {strategy: rename}` (keys follow the table), or drop the key "
                "before the move and add it after",
            ))
        moved = {(plan.source_schema, t) for t in plan.table_names}
        for fk in cat.fks_to(*src.qualified):
            child = cat.table(fk.schema, fk.table)
            if child is not None and child.kind == "p" and (fk.schema, fk.table) not in moved:
                out.append(Problem(
                    f"{fk.schema}.{fk.table} ({fk.name})",
                    "PostgreSQL before 18 cannot re-add this partitioned table's key NOT "
                    f"VALID, as the swap of {name} needs",
                    "use `options: {strategy: rename}`, or drop the key before the move and "
                    "add it after",
                ))
    for p in parts:
        for fk in cat.fks_to(*p.qualified):
            out.append(Problem(
                f"{fk.schema}.{fk.table} ({fk.name})",
                f"references partition {p.schema}.{p.name} directly",
                "reference the partitioned table, or use `options: {strategy: rename}`",
            ))
        for d in cat.dependents_of(*p.qualified):
            if d.kind != "v":
                out.append(Problem(
                    f"{d.schema}.{d.name}",
                    f"reads partition {p.schema}.{p.name} and cannot be recreated over its "
                    "compatibility view",
                    "drop it before the move and recreate it after, or use strategy: rename",
                ))
    return out


def drift(was: list[str], now: list[str]) -> str | None:
    """What changed in a table's partitions since the move recorded them, or None."""
    added, gone = sorted(set(now) - set(was)), sorted(set(was) - set(now))
    if not added and not gone:
        return None
    parts = []
    if added:
        parts.append("attached or created since the move began: " + ", ".join(added))
    if gone:
        parts.append("detached or dropped since the move began: " + ", ".join(gone))
    return "its partitions changed (" + "; ".join(parts) + ")"


def guard_step_sql(table: str, expected: list[str]) -> sql.Composed:
    """A statement, run after the swap's LOCK, that fails if the partitions of `table` (its
    regclass text) are no longer `expected`: an ATTACH or DETACH between our catalog read and
    our lock would otherwise leave a partition behind. Once we hold the lock, none can happen.
    """
    body = sql.SQL(
        "BEGIN IF (SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname::text), "
        "'{{}}') FROM pg_catalog.pg_partition_tree({}::regclass) t "
        "JOIN pg_catalog.pg_class c ON c.oid = t.relid WHERE t.level > 0) "
        "IS DISTINCT FROM {}::text[] THEN RAISE EXCEPTION USING MESSAGE = {}, "
        "ERRCODE = 'object_not_in_prerequisite_state', "
        "HINT = 'attach or detach partitions only before or after a move'; END IF; END"
    ).format(
        sql.Literal(table),
        sql.Literal(sorted(expected)),
        sql.Literal(f"the partitions of {table} changed since the move read them"),
    )
    return sql.SQL("DO {}").format(Body(body))


def refuse_drift(store: Store, moves: list[TableMove]) -> None:
    """A partitioned table's stages run only over the partitions its move began with (saved
    with its first stage): an ATTACH or DETACH since then is refused, naming what changed."""
    for m in moves:
        saved = store.load(m.label, PARTITIONS_KEY)
        why = drift(list(saved), [p.name for p in m.partitions]) if saved is not None else None
        if why is not None:
            raise StageError(
                f"{m.label}: {why}; nothing was changed",
                hint="restore the partitions the move began with (DETACH what was attached, "
                "ATTACH or recreate what is gone), then rerun; attach and detach partitions "
                "only before a move or after its finalize",
            )

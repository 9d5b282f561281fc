"""Materialized views over a copy-moved table: rebuilt beside the old one over the new table
before the cutover lock (its query runs outside the lock), swapped in by name inside the
cutover transaction, swapped back by its rollback; the old one waits in the retired schema
until finalize drops it.

The rebuilt view keeps the definition (only the moved table's name changes in the catalog's
own text), its indexes under their names, the owner, grants, comment, storage parameters and
whether it was populated. Its content is as fresh as a REFRESH at the rebuild.
"""

from __future__ import annotations

import zlib

from psycopg import sql

from orchestrator.model.catalog import Catalog, Dependent, Relation
from orchestrator.model.move import TableMove
from orchestrator.sql.acl import grant_statements
from orchestrator.sql.compose import catalog_sql, rename_index, retarget_relation
from orchestrator.stages.base import Step

# Saved with the swap, per moved table: the [schema, name] of each materialized view swapped.
SAVED_KEY = "matviews"


def _short(prefix: str, *parts: str) -> str:
    return f"{prefix}{zlib.crc32('.'.join(parts).encode()):08x}"


def temp_name(schema: str, name: str) -> str:
    """The rebuilt view's name until the swap."""
    return _short("_orch_mv_", schema, name)


def readers(cat: Catalog, schema: str, name: str) -> list[Dependent]:
    """The materialized views that read a table."""
    return [d for d in cat.dependents_of(schema, name) if d.kind == "m"]


def rebuild_steps(cat: Catalog, m: TableMove) -> list[Step]:
    """Build each materialized view reading the source again, over the target, beside it."""
    steps: list[Step] = []
    for d in readers(cat, m.source_schema, m.source_name):
        rel = cat.table(d.schema, d.name)
        assert rel is not None  # validate refuses a view outside the plan's schemas
        tname = temp_name(d.schema, d.name)
        tmp = sql.Identifier(d.schema, tname)
        body = retarget_relation(
            d.definition, (m.source_schema, m.source_name), (m.target_schema, m.target_name)
        )
        opts = sql.SQL(" WITH ({})").format(catalog_sql(", ".join(d.options))) if d.options \
            else sql.SQL("")
        steps += [
            Step(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(tmp)),
            Step(
                sql.SQL("CREATE MATERIALIZED VIEW {}{} AS {} WITH {}DATA").format(
                    tmp, opts, sql.SQL(body.rstrip().rstrip(";")),
                    sql.SQL("" if rel.populated else "NO "),
                ),
                f"before the lock: runs the query of {d.schema}.{d.name} "
                f"(about {rel.row_estimate:,} rows)",
            ),
            *[
                Step(rename_index(i.definition, d.schema, tname,
                                  _short("_orch_mvi_", d.schema, i.name)))
                for i in rel.indexes
            ],
            *_dress(rel, tmp),
        ]
    return steps


def _dress(rel: Relation, tmp: sql.Identifier) -> list[Step]:
    """Owner, grants and comment as the old view has them."""
    steps = [Step(sql.SQL("ALTER MATERIALIZED VIEW {} OWNER TO {}").format(
        tmp, sql.Identifier(rel.owner)))]
    steps += [Step(g) for g in grant_statements(rel.acl, tmp, rel.owner)]
    if rel.comment is not None:
        steps.append(Step(sql.SQL("COMMENT ON MATERIALIZED VIEW {} IS {}").format(
            tmp, sql.Literal(rel.comment))))
    return steps


def swap_steps(cat: Catalog, m: TableMove) -> list[Step]:
    """Inside the cutover: the old view goes to the retired schema, the rebuilt one takes its
    name, and its indexes take theirs."""
    steps: list[Step] = []
    for d in readers(cat, m.source_schema, m.source_name):
        rel = cat.table(d.schema, d.name)
        assert rel is not None
        steps.append(Step(sql.SQL("ALTER MATERIALIZED VIEW {} SET SCHEMA {}").format(
            sql.Identifier(d.schema, d.name), sql.Identifier(m.retired_schema))))
        steps.append(Step(sql.SQL("ALTER MATERIALIZED VIEW {} RENAME TO {}").format(
            sql.Identifier(d.schema, temp_name(d.schema, d.name)), sql.Identifier(d.name))))
        steps += [
            Step(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(d.schema, _short("_orch_mvi_", d.schema, i.name)),
                sql.Identifier(i.name)))
            for i in rel.indexes
        ]
    return steps


def swapped(cat: Catalog, m: TableMove) -> list[list[str]]:
    """What swap_steps will swap, to save with the swap for its rollback and finalize."""
    return [[d.schema, d.name] for d in readers(cat, m.source_schema, m.source_name)]


def swap_back_steps(m: TableMove, saved: list[list[str]]) -> list[Step]:
    """Inside the cutover's rollback: the rebuilt view goes, the old one comes back."""
    steps: list[Step] = []
    for schema, name in saved:
        steps.append(Step(sql.SQL("DROP MATERIALIZED VIEW {}").format(
            sql.Identifier(schema, name))))
        steps.append(Step(sql.SQL("ALTER MATERIALIZED VIEW {} SET SCHEMA {}").format(
            sql.Identifier(m.retired_schema, name), sql.Identifier(schema))))
    return steps


def drop_retired_steps(m: TableMove, saved: list[list[str]]) -> list[Step]:
    """At finalize: the old views go before the retired table they read."""
    return [
        Step(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(
            sql.Identifier(m.retired_schema, name)))
        for _schema, name in saved
    ]


def drop_rebuilt_steps(cat: Catalog, m: TableMove) -> list[Step]:
    """At a full rollback: a rebuilt view left by a cutover that never swapped."""
    return [
        Step(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(
            sql.Identifier(d.schema, temp_name(d.schema, d.name))))
        for d in readers(cat, m.source_schema, m.source_name)
    ]

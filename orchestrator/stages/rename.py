"""rename: the instant strategy, ALTER TABLE ... SET SCHEMA plus a compatibility view.

For tables that move without any column change. Foreign keys, indexes, triggers, owned
sequences, grants and policies follow the table by OID; views that read it keep reading it in
its new schema. Reversible until finalize by the same statements backwards.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.acl import grant_statements
from orchestrator.catalog import Relation
from orchestrator.move import TableMove
from orchestrator.stages import Step


def forward_steps(m: TableMove, rel: Relation) -> list[Step]:
    moved = sql.Identifier(m.target_schema, m.source_name)
    steps = [
        lock_step([m.source]),
        Step(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(m.target_schema))),
        Step(
            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                m.source, sql.Identifier(m.target_schema)
            ),
            "ACCESS EXCLUSIVE on the table: waits at most lock_timeout, held milliseconds",
        ),
    ]
    if m.target_name != m.source_name:
        steps.append(
            Step(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(moved, sql.Identifier(m.target_name))
            )
        )
    if m.options.compat_view:
        view = sql.Identifier(m.source_schema, m.source_name)
        steps.append(
            Step(
                sql.SQL("CREATE VIEW {} WITH (security_invoker = true) AS SELECT * FROM {}").format(
                    view, m.target
                )
            )
        )
        steps.append(
            Step(sql.SQL("ALTER VIEW {} OWNER TO {}").format(view, sql.Identifier(rel.owner)))
        )
        steps += [Step(g) for g in grant_statements(rel.acl, view, rel.owner)]
        for c in rel.columns:
            steps += [Step(g) for g in grant_statements(c.acl, view, rel.owner, (c.name,))]
    return steps


def lock_step(relations: list[sql.Identifier]) -> Step:
    return Step(
        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.SQL(", ").join(relations)),
        "ACCESS EXCLUSIVE: the wait is bounded by lock_timeout, the hold is milliseconds",
        bounded=True,
    )


def rollback_steps(m: TableMove) -> list[Step]:
    steps = [
        lock_step(
            [m.target, sql.Identifier(m.source_schema, m.source_name)]
            if m.options.compat_view
            else [m.target]
        ),
        Step(
            sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier(m.source_schema, m.source_name))
        )
    ]
    if m.target_name != m.source_name:
        steps.append(
            Step(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    m.target, sql.Identifier(m.source_name)
                )
            )
        )
    steps.append(
        Step(
            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                sql.Identifier(m.target_schema, m.source_name), sql.Identifier(m.source_schema)
            ),
            "ACCESS EXCLUSIVE on the table: waits at most lock_timeout",
        )
    )
    return steps

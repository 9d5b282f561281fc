"""rename: the instant strategy, ALTER TABLE ... SET SCHEMA plus a compatibility view.

For tables that move without any column change. Foreign keys, indexes, triggers, owned
sequences, grants and policies follow the table by OID; views that read it keep reading it in
its new schema. Reversible until finalize by the same statements backwards.

Given the plan, the move also applies the plan's grants for the target schema (USAGE, and the
table privileges the table's ACL does not hold yet, see `plan_grants`). An exact rollback
revokes exactly those: the caller records `plan_grants(...)` with the forward stage and passes
it back to `rollback_steps`.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from orchestrator.model import partitioning
from orchestrator.model.catalog import Relation
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.plan import Plan
from orchestrator.sql.acl import grant_statements, parse_aclitem, revoke_defaults
from orchestrator.stages.base import Action, Phase, Stage, Step, regclass, remember
from orchestrator.stages.prepare import owner_usage
from orchestrator.state.store import Store

Granted = Sequence[tuple[str, tuple[str, ...]]]


def plan_grants(m: TableMove, rel: Relation, plan: Plan) -> list[tuple[str, tuple[str, ...]]]:
    """(role, privileges) the plan grants on the moved table that its ACL does not hold yet."""
    spec = plan.schemas.get(m.target_schema)
    if spec is None:
        return []
    held: dict[str, set[str]] = {}
    for item in rel.acl:
        acl = parse_aclitem(item)
        held.setdefault(acl.grantee, set()).update(acl.privileges)
    out: dict[str, list[str]] = {}
    for g in spec.grants:
        if g.role == rel.owner:
            continue  # the owner holds every privilege already
        for p in g.privileges:
            if p not in held.get(g.role, set()) and p not in out.get(g.role, []):
                out.setdefault(g.role, []).append(p)
    return [(role, tuple(privs)) for role, privs in out.items()]


def _plan_grant_steps(m: TableMove, rel: Relation, plan: Plan) -> list[Step]:
    spec = plan.schemas.get(m.target_schema)
    if spec is None:
        return []
    steps = [
        Step(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(m.target_schema), sql.Identifier(role)
            )
        )
        for role in spec.usage
    ]
    for role, privs in plan_grants(m, rel, plan):
        steps.append(
            Step(
                sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                    sql.SQL(", ").join(sql.SQL(p) for p in privs), m.target, sql.Identifier(role)
                )
            )
        )
    return steps


def _guard(m: TableMove, schema: str, name: str) -> list[Step]:
    """For a partitioned table, under the lock: its partitions are the ones the move knows."""
    if not m.partitioned:
        return []
    return [Step(partitioning.guard_step_sql(regclass(schema, name),
                                             [p.name for p in m.partitions]))]


def _set_schema(m: TableMove, schema: str, to: str) -> list[Step]:
    """A partitioned table's partitions follow it (SET SCHEMA moves one relation)."""
    return [
        Step(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
            sql.Identifier(schema, p.name), sql.Identifier(to)))
        for p in m.partitions
    ]


def _view(
    view: sql.Identifier, table: sql.Identifier, rel: Relation, defaults: tuple[str, ...]
) -> list[Step]:
    """A compatibility view under the old name, owned and granted as the table is."""
    steps = [
        Step(
            sql.SQL("CREATE VIEW {} WITH (security_invoker = true) AS SELECT * FROM {}").format(
                view, table
            )
        ),
        Step(sql.SQL("ALTER VIEW {} OWNER TO {}").format(view, sql.Identifier(rel.owner))),
    ]
    steps += [Step(r) for r in revoke_defaults(view, defaults, rel.owner)]
    steps += [Step(g) for g in grant_statements(rel.acl, view, rel.owner)]
    for c in rel.columns:
        steps += [Step(g) for g in grant_statements(c.acl, view, rel.owner, (c.name,))]
    return steps


def forward_steps(
    m: TableMove, rel: Relation, plan: Plan | None = None, defaults: tuple[str, ...] = (),
    parts: Sequence[Relation] = (),
) -> list[Step]:
    moved = sql.Identifier(m.target_schema, m.source_name)
    steps = [
        lock_step([m.source]),
        *_guard(m, m.source_schema, m.source_name),
        Step(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(m.target_schema))),
        Step(
            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                m.source, sql.Identifier(m.target_schema)
            ),
            "ACCESS EXCLUSIVE on the table: waits at most lock_timeout, held milliseconds",
        ),
        *_set_schema(m, m.source_schema, m.target_schema),
    ]
    if m.target_name != m.source_name:
        steps.append(
            Step(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(moved, sql.Identifier(m.target_name))
            )
        )
    if rel.owner:
        steps.append(owner_usage(m.target_schema, rel.owner))
    if plan is not None:
        steps += _plan_grant_steps(m, rel, plan)
    if m.options.compat_view:
        steps += _view(m.source, m.target, rel, defaults)
        for p in parts:
            steps += _view(sql.Identifier(m.source_schema, p.name),
                           sql.Identifier(m.target_schema, p.name), p, defaults)
    return steps


def lock_step(relations: list[sql.Identifier]) -> Step:
    return Step(
        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.SQL(", ").join(relations)),
        "ACCESS EXCLUSIVE: the wait is bounded by lock_timeout, the hold is milliseconds",
        bounded=True,
    )


def rollback_steps(m: TableMove, granted: Granted = ()) -> list[Step]:
    """The move backwards; `granted` (from `plan_grants` at forward time) is revoked first."""
    views = [sql.Identifier(m.source_schema, name) for name in m.names]
    steps = [
        lock_step([m.target, *views] if m.options.compat_view else [m.target]),
        *_guard(m, m.target_schema, m.target_name),
        *[Step(sql.SQL("DROP VIEW IF EXISTS {}").format(view)) for view in views],
    ]
    for role, privs in granted:
        steps.append(
            Step(
                sql.SQL("REVOKE {} ON TABLE {} FROM {}").format(
                    sql.SQL(", ").join(sql.SQL(p) for p in privs), m.target, sql.Identifier(role)
                )
            )
        )
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
    return steps + _set_schema(m, m.target_schema, m.source_schema)


class Rename(Stage):
    """The instant strategy's one stage: the table changes schema under one short lock."""

    name = "rename"
    short = "rename"
    phase = Phase.swap

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        rel = ctx.catalog.table(m.source_schema, m.source_name)
        assert rel is not None
        granted = plan_grants(m, rel, ctx.plan)
        noted = remember(ctx, m)

        def record(store: Store) -> None:
            noted(store)
            # What the plan granted beyond the table's own ACL, for an exact rollback.
            store.save(m.label, "rename_grants", [[role, list(privs)] for role, privs in granted])

        steps = forward_steps(m, rel, ctx.plan, ctx.catalog.defaults_for(m.source_schema),
                              ctx.catalog.partitions_of(*rel.qualified))
        return Action(self.name, steps, [regclass(m.source_schema, m.source_name)], record)

    def backward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        saved = ctx.store.load(m.label, "rename_grants") or []
        granted = [(str(role), tuple(privs)) for role, privs in saved]
        return Action(
            "rollback_rename",
            rollback_steps(m, granted),
            [regclass(m.target_schema, m.target_name)],
        )

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        m = moves[0]
        rel = ctx.catalog.table(m.source_schema, m.source_name)
        assert rel is not None
        forward = forward_steps(m, rel, ctx.plan, ctx.catalog.defaults_for(m.source_schema),
                                ctx.catalog.partitions_of(*rel.qualified))
        return forward, rollback_steps(m, plan_grants(m, rel, ctx.plan))


RENAME = Rename()

"""Live checks of a plan against the database: every problem at once, nothing changed."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.db import Conn
from orchestrator.model import partitioning, servers
from orchestrator.model.catalog import Catalog, Relation, read_catalog
from orchestrator.model.graph import DependencyGraph, Problem, build_graph
from orchestrator.model.move import key_columns
from orchestrator.plan import LoadedPlan, Options, Plan, Strategy, TableSpec
from orchestrator.state import store


@dataclass
class Report:
    plan: Plan
    catalog: Catalog
    graph: DependencyGraph
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "plan": self.plan.name,
            "valid": self.ok,
            "problems": [p.__dict__ for p in self.problems],
            "warnings": [p.__dict__ for p in self.warnings],
            "units": [list(u.members) for u in self.graph.units],
        }


def plan_schemas(plan: Plan) -> list[str]:
    """The schemas a plan reads or writes."""
    return [
        plan.source_schema,
        *sorted({t.schema_ for t in plan.tables}),
        *sorted({v.schema_ for v in plan.views}),
        plan.retired_schema,
    ]


def inspect(conn: Conn, loaded: LoadedPlan) -> Report:
    """Read the catalog, build the graph and run every live check (read-only)."""
    plan = loaded.plan
    cat = read_catalog(conn, plan_schemas(plan))
    graph = build_graph(plan, cat)
    report = Report(plan=plan, catalog=cat, graph=graph, problems=list(graph.problems))
    started = _started_tables(conn, plan)
    if plan.source_schema not in cat.existing_schemas:
        report.problems.append(
            Problem(
                plan.source_schema,
                "the source schema does not exist",
                "set source_schema in the plan to the schema the tables live in",
            )
        )
    for spec in plan.tables:
        _check_table(report, spec, started)
    _check_views(report)
    # Schemas to live on other servers: both servers, the references across them.
    problems, warnings = servers.check(conn, plan, cat)
    report.problems += problems
    report.warnings += warnings
    return report


def _started_tables(conn: Conn, plan: Plan) -> set[str]:
    """Tables this plan has already begun to move (their targets are ours)."""
    rows = store.stage_rows(conn, plan.control_schema, plan.name)
    return {r.table_name for r in rows if r.status in ("running", "done", "failed")}


def _check_table(report: Report, spec: TableSpec, started: set[str]) -> None:
    """Run every live check of one plan table, adding problems and warnings in a fixed order."""
    plan = report.plan
    name = f"{plan.source_schema}.{spec.name}"
    if spec.schema_ == plan.source_schema:
        report.problems.append(
            Problem(
                name,
                "the target schema is the source schema",
                "give the table another `schema` in the plan",
            )
        )
    if spec.name in started:
        return  # already being moved by this plan: the control schema is the truth now
    src = _movable_source(report, spec, name)
    if src is None:
        return
    opts = plan.options_for(spec)
    report.problems += partitioning.problems(report.catalog, plan, spec, opts, src)
    if src.is_partition:
        return  # it moves with its table, or not at all: nothing else to say of it alone
    _check_shape(report, spec, src, name)
    _check_columns(report, spec, src, name)
    _check_strategy(report, spec, opts, src, name)
    _check_depends_on(report, spec, name)
    _check_dependents(report, spec, opts, name)
    _warn_table(report, spec, opts, src, name)


def _movable_source(report: Report, spec: TableSpec, name: str) -> Relation | None:
    """The source table, or None (with a problem) when it is missing or not a table."""
    plan = report.plan
    src = report.catalog.table(plan.source_schema, spec.name)
    if src is None:
        report.problems.append(
            Problem(
                name,
                "no such table",
                f"check the name (tables are case-sensitive), or remove it from {plan.name}'s plan",
            )
        )
        return None
    if src.kind != "r" and src.kind != "p":
        report.problems.append(
            Problem(
                name,
                f"is not a table (relkind {src.kind})",
                "only ordinary tables can be moved; remove it from the plan",
            )
        )
        return None
    return src


def _check_shape(report: Report, spec: TableSpec, src: Relation, name: str) -> None:
    """The target name must be free; the table keyed and not a legacy inheritance child."""
    problems = report.problems
    target = report.catalog.table(spec.schema_, spec.target_name)
    if target is not None and target.oid != src.oid:
        problems.append(
            Problem(
                f"{spec.schema_}.{spec.target_name}",
                "the target name is already taken",
                "choose another rename_to or schema, or drop the existing relation",
            )
        )
    if (src.inherits or src.has_children) and src.kind != "p" and not src.is_partition:
        problems.append(
            Problem(
                name,
                "table inheritance is not supported",
                "remove the table (and its parents or children) from the plan",
            )
        )
    if key_columns(src, spec) is None:
        problems.append(
            Problem(
                name,
                "has no primary key"
                + (" and its declared key is not unique and NOT NULL" if spec.key else ""),
                "add a primary key, or declare `key: [col, ...]` naming a unique NOT NULL key",
            )
        )


def _check_columns(report: Report, spec: TableSpec, src: Relation, name: str) -> None:
    """Mapped columns must exist, and a computed (read-only) column must be confirmed."""
    colnames = {c.name for c in src.columns}
    for col, mapping in spec.columns.items():
        if col not in colnames:
            report.problems.append(
                Problem(
                    f"{name}.{col}",
                    "no such column",
                    f"columns of {spec.name}: {', '.join(sorted(colnames))}",
                )
            )
        if mapping.up is not None and not spec.confirm_read_only_columns:
            report.problems.append(
                Problem(
                    f"{name}.{col}",
                    "a column computed by `down` is read-only through the compatibility view, so "
                    "application INSERTs and UPDATEs naming it will fail after cutover",
                    "set `confirm_read_only_columns: true` on the table once the application "
                    "no longer writes it",
                )
            )


def _check_strategy(
    report: Report, spec: TableSpec, opts: Options, src: Relation, name: str
) -> None:
    """The table's strategy must be able to move it as the plan asks."""
    problems = report.problems
    if opts.strategy == Strategy.rename and spec.columns:
        problems.append(
            Problem(
                name,
                "the rename strategy cannot change columns",
                "use strategy: copy for a table with column mappings",
            )
        )
    if opts.strategy == Strategy.rename:
        for pub in src.schema_publications:
            problems.append(Problem(
                f"{name} (publication {pub})",
                f"is published through its schema (FOR TABLES IN SCHEMA {src.schema}): moved "
                "out of the schema, it would silently leave the publication",
                f"add it to the publication by name first (ALTER PUBLICATION {pub} ADD TABLE "
                f"{src.schema}.{src.name}), or add the target schema to it",
            ))
    if opts.strategy == Strategy.copy and not opts.compat_view:
        problems.append(Problem(
            name, "the copy strategy needs its compatibility view (compat_view: false is only "
            "supported by the rename strategy for now)",
            "remove `compat_view: false`, or use `options: {strategy: rename}`"))
    if opts.strategy == Strategy.copy:
        _check_copy_carries(report, spec, src, name)
        for c in src.constraints:
            if c.kind == "x":
                problems.append(
                    Problem(
                        f"{name} ({c.name})",
                        "exclusion constraints are not supported by the copy strategy yet",
                        "use `options: {strategy: rename}` for this table",
                    )
                )


def _check_copy_carries(report: Report, spec: TableSpec, src: Relation, name: str) -> None:
    """What the copy strategy cannot carry to a new table is refused by name, never dropped."""
    for pub in src.publications:
        report.problems.append(Problem(
            f"{name} (publication {pub})",
            "is published: the copy strategy would leave the publication on the retired table",
            f"drop it from the publication (ALTER PUBLICATION {pub} DROP TABLE ...), move it, "
            "and add the new table after cutover; or use `options: {strategy: rename}`",
        ))
    if spec.columns and src.statistics:
        report.problems.append(Problem(
            name,
            "has extended statistics (CREATE STATISTICS), which the copy strategy carries only "
            "when no column is mapped",
            "drop the statistics object before the move and create it on the new table after "
            "cutover, or move the table without column mappings",
        ))


def _check_depends_on(report: Report, spec: TableSpec, name: str) -> None:
    """A table's depends_on may only name tables of the plan."""
    for dep in spec.depends_on:
        if dep not in report.plan.table_names:
            report.problems.append(
                Problem(
                    f"{name} depends_on {dep}",
                    "is not a table of this plan",
                    "list only tables of the plan in depends_on",
                )
            )


def _check_dependents(report: Report, spec: TableSpec, opts: Options, name: str) -> None:
    """Rules cannot be recreated over a copy's compatibility view; a materialized view is
    rebuilt over the new table, when its shape allows (stages/matviews.py)."""
    plan, cat = report.plan, report.catalog
    if opts.strategy != Strategy.copy:
        return
    for d in cat.dependents_of(plan.source_schema, spec.name):
        if d.kind == "rule":
            report.problems.append(Problem(
                f"{d.schema}.{d.name}",
                f"this rule reads {name} and cannot be recreated over the compatibility view",
                "drop it before the move and recreate it after, or use strategy: rename",
            ))
        elif d.kind == "m":
            why = _matview_refusal(report, spec, d.schema, d.name)
            if why:
                report.problems.append(Problem(
                    f"{d.schema}.{d.name}",
                    f"this materialized view reads {name} and cannot be rebuilt over the new "
                    f"table: {why}",
                    "drop it before the move and recreate it after, or use strategy: rename",
                ))


def _matview_refusal(report: Report, spec: TableSpec, schema: str, view: str) -> str | None:
    """Why a materialized view over a copy-moved table cannot be rebuilt, or None."""
    cat, plan = report.catalog, report.plan
    if cat.table(schema, view) is None:
        return f"it lives in schema {schema}, which the plan does not read"
    if spec.columns:
        return "the plan maps the table's columns (the view would read the new values)"
    if cat.dependents_of(schema, view):
        return "views read it"
    read = {(d.on_schema, d.on_table) for d in cat.dependents
            if (d.schema, d.name) == (schema, view)}
    moved = {(plan.source_schema, t) for t in plan.table_names}
    if len(read & moved) > 1:
        return "it reads more than one table of the plan"
    return None


def _warn_table(
    report: Report, spec: TableSpec, opts: Options, src: Relation, name: str
) -> None:
    """Warn of what the move changes without refusing it: grants, triggers, outside keys."""
    plan, warnings = report.plan, report.warnings
    column_grants = sorted({c.name for c in src.columns if c.acl})
    if column_grants and opts.compat_view:
        warnings.append(Problem(
            name, f"has column-level grants ({', '.join(column_grants)}): a role holding only "
            "those cannot read through the security_invoker compatibility view, which selects "
            "every column of the new table",
            "grant those roles table-level SELECT, or point them at the new table, before the "
            "swap"))
    if src.user_triggers and opts.strategy == Strategy.copy:
        warnings.append(
            Problem(
                name,
                f"has user triggers ({', '.join(t.name for t in src.user_triggers)})",
                "they follow the data to the new table at cutover",
            )
        )
    for fk in report.catalog.fks_to(plan.source_schema, spec.name):
        if fk.schema != plan.source_schema or fk.table not in plan.table_names:
            warnings.append(
                Problem(
                    f"{fk.schema}.{fk.table} ({fk.name})",
                    f"a foreign key from outside the plan references {name}",
                    "it is re-pointed to the new table at cutover",
                )
            )


def _check_views(report: Report) -> None:
    names = {t.name for t in report.plan.tables} | {v.name for v in report.plan.views}
    for v in report.plan.views:
        for dep in v.depends_on:
            if dep not in names:
                report.problems.append(
                    Problem(
                        f"view {v.name} depends_on {dep}",
                        "is not a table or view of this plan",
                        "list only tables and views of the plan in depends_on",
                    )
                )

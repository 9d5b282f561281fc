"""verify-access: each role the plan names, its effective privileges against what the plan says.

For every role named in the plan's `schemas` (USAGE or table grants), and any role asked for:

- USAGE on each target schema (`has_schema_privilege`), declared or not;
- each privilege on each moved table (`has_table_privilege`, which counts PUBLIC, role
  membership, ownership and superuser), plus privileges held on some columns only;
- what the role can really do *through* the compatibility views and the plan's views: a
  `security_invoker` view needs the privilege on the view (and USAGE on the view's schema)
  and the privilege on the table under it, but not USAGE on the table's schema (schema
  USAGE is checked when a name is looked up, and the view looked it up when it was created);
  a view without `security_invoker` runs with its owner's rights, so the view's own grant is
  all it takes.

A privilege the plan does not declare is *extra* (a leak if it reaches data of another
schema), even without USAGE on the table's schema, since views reach it without; a declared
one the role lacks is *missing*. Row-level security is not evaluated: a
policy can only narrow what is listed. Read-only; a fixed number of queries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.db import Conn
from orchestrator.model.catalog import Relation, read_catalog
from orchestrator.model.validate import plan_schemas
from orchestrator.plan import LoadedPlan, Plan

PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")
VIEW_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True)
class RoleInfo:
    name: str
    exists: bool
    superuser: bool
    declared: bool  # named by the plan (not only by --role)


@dataclass(frozen=True)
class SchemaAccess:
    role: str
    schema: str
    declared: bool
    usage: bool

    @property
    def status(self) -> str:
        if self.declared == self.usage:
            return "ok"
        return "missing" if self.declared else "extra"


@dataclass(frozen=True)
class RelationAccess:
    role: str
    schema: str
    name: str
    kind: str  # "table", "compat view" or "plan view"
    table: str  # the plan table (or plan view) it belongs to
    declared: tuple[str, ...]
    effective: tuple[str, ...]  # what the role can do (through the view, for views)
    columns_only: tuple[str, ...]  # held on some columns only (tables)
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class AccessReport:
    plan: str
    roles: tuple[RoleInfo, ...]
    schemas: tuple[SchemaAccess, ...]
    relations: tuple[RelationAccess, ...]
    pending: tuple[str, ...]  # plan tables whose target does not exist yet
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and all(s.status == "ok" for s in self.schemas)
            and not any(r.missing or r.extra for r in self.relations)
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for s, sd in zip(self.schemas, d["schemas"], strict=True):
            sd["status"] = s.status
        d["ok"] = self.ok
        return d


def declared_roles(plan: Plan) -> list[str]:
    roles: list[str] = []
    for spec in plan.schemas.values():
        roles += spec.usage
        roles += [g.role for g in spec.grants]
    return list(dict.fromkeys(roles))


def _declared(plan: Plan, schema: str, role: str) -> set[str]:
    spec = plan.schemas.get(schema)
    if spec is None:
        return set()
    return {p for g in spec.grants if g.role == role for p in g.privileges}


def _usage_declared(plan: Plan, schema: str, role: str) -> bool:
    spec = plan.schemas.get(schema)
    return spec is not None and role in spec.usage


def _invoker(rel: Relation) -> bool:
    return any(
        o.lower().replace(" ", "")
        in ("security_invoker=true", "security_invoker=on", "security_invoker=1")
        for o in rel.options
    )


def verify_access(
    conn: Conn, loaded: LoadedPlan, extra_roles: list[str] | None = None
) -> AccessReport:
    """Compare every declared (and asked-for) role's effective privileges with the plan."""
    plan = loaded.plan
    declared = declared_roles(plan)
    names = list(dict.fromkeys([*declared, *(extra_roles or [])]))
    rows = conn.execute(
        "SELECT rolname, rolsuper FROM pg_roles WHERE rolname = ANY(%s)", (names,)
    ).fetchall()
    found = {r["rolname"]: bool(r["rolsuper"]) for r in rows}
    roles = tuple(RoleInfo(n, n in found, found.get(n, False), n in declared) for n in names)
    problems = [
        f"role {r.name} does not exist (named in the plan's schemas)"
        if r.declared
        else f"role {r.name} does not exist"
        for r in roles
        if not r.exists
    ]
    live = [r.name for r in roles if r.exists]

    cat = read_catalog(conn, plan_schemas(plan))
    targets = list(dict.fromkeys([*plan.schemas, *(t.schema_ for t in plan.tables)]))
    schemas = [s for s in targets if s in cat.existing_schemas]

    # The relations to check: moved tables, their compatibility views, the plan's views.
    checks: list[tuple[str, Relation, str, Relation | None]] = []  # kind, rel, plan name, under
    pending: list[str] = []
    target_rel: dict[str, Relation] = {}
    for t in plan.tables:
        rel = cat.table(t.schema_, t.target_name)
        if rel is None or rel.kind not in ("r", "p"):
            pending.append(t.name)
            continue
        target_rel[t.name] = rel
        checks.append(("table", rel, t.name, None))
        view = cat.table(plan.source_schema, t.name)
        if view is not None and view.kind == "v":
            checks.append(("compat view", view, t.name, rel))
    for v in plan.views:
        rel = cat.table(v.schema_, v.name)
        if rel is not None and rel.kind == "v":
            checks.append(("plan view", rel, v.name, None))

    oids = sorted({c[1].oid for c in checks})
    has: dict[tuple[str, int, str], tuple[bool, bool]] = {}
    usage: dict[tuple[str, str], bool] = {}
    if live and oids:
        for r in conn.execute(
            "SELECT r.role, c.oid::bigint AS oid, p.priv, "
            "has_table_privilege(r.role, c.oid, p.priv) AS has, "
            "CASE WHEN p.priv = ANY(%(colprivs)s) "
            "THEN has_any_column_privilege(r.role, c.oid, p.priv) ELSE false END AS any_col "
            "FROM unnest(%(roles)s::text[]) r(role), unnest(%(oids)s::oid[]) c(oid), "
            "unnest(%(privs)s::text[]) p(priv)",
            {
                "roles": live,
                "oids": oids,
                "privs": list(PRIVILEGES),
                "colprivs": list(COLUMN_PRIVILEGES),
            },
        ).fetchall():
            has[(r["role"], r["oid"], r["priv"])] = (bool(r["has"]), bool(r["any_col"]))
    every_schema = sorted(
        {*schemas, plan.source_schema, *(v.schema_ for v in plan.views)} & cat.existing_schemas
    )
    if live and every_schema:
        for r in conn.execute(
            "SELECT r.role, n.nspname AS schema, has_schema_privilege(r.role, n.oid, 'USAGE') "
            "AS usage FROM unnest(%s::text[]) r(role) "
            "JOIN pg_namespace n ON n.nspname = ANY(%s)",
            (live, every_schema),
        ).fetchall():
            usage[(r["role"], r["schema"])] = bool(r["usage"])

    schema_access = tuple(
        SchemaAccess(role, s, _usage_declared(plan, s, role), usage.get((role, s), False))
        for role in live
        for s in schemas
    )

    def held(role: str, rel: Relation, priv: str) -> bool:
        return has.get((role, rel.oid, priv), (False, False))[0]

    relations: list[RelationAccess] = []
    for role in live:
        for kind, rel, name, under in checks:
            if kind == "table":
                want = _declared(plan, rel.schema, role)
                eff = {p for p in PRIVILEGES if held(role, rel, p)}
                cols = {
                    p
                    for p in COLUMN_PRIVILEGES
                    if p not in eff and has.get((role, rel.oid, p), (False, False))[1]
                }
                note = ""
                if eff - want and not usage.get((role, rel.schema), False):
                    note = (
                        f"no USAGE on schema {rel.schema}: not by this name, "
                        "but security_invoker views over it reach it"
                    )
                if rel.rls_enabled:
                    note = "; ".join(filter(None, [note, "row-level security narrows rows"]))
                relations.append(
                    RelationAccess(
                        role,
                        rel.schema,
                        rel.name,
                        kind,
                        name,
                        declared=_order(want),
                        effective=_order(eff),
                        columns_only=_order(cols),
                        missing=_order(want - eff),
                        extra=_order((eff | cols) - want),
                        note=note,
                    )
                )
                continue
            # Through a view: what reaches the data under it.
            if kind == "compat view":
                assert under is not None
                unders = [under]
            else:
                spec = next(v for v in plan.views if v.name == name)
                unders = [target_rel[d] for d in spec.depends_on if d in target_rel]
            invoker = _invoker(rel)
            via = set()
            for p in VIEW_PRIVILEGES if kind == "compat view" else ("SELECT",):
                ok = held(role, rel, p) and usage.get((role, rel.schema), False)
                if invoker:
                    ok = ok and all(held(role, u, p) for u in unders)
                if ok:
                    via.add(p)
            want = set(VIEW_PRIVILEGES)
            for u in unders:
                want &= _declared(plan, u.schema, role)
            if not unders:
                want = set()
            notes = []
            if not invoker:
                notes.append("not security_invoker: the view reads with its owner's rights")
            gap = want - via
            if gap:
                notes.append(
                    f"declared {', '.join(_order(gap))} on the table is not reachable through "
                    "this view (grant it on the view if the application still uses it)"
                )
            relations.append(
                RelationAccess(
                    role,
                    rel.schema,
                    rel.name,
                    kind,
                    name,
                    declared=_order(want),
                    effective=_order(via),
                    columns_only=(),
                    missing=(),
                    extra=_order(via - want),
                    note="; ".join(notes),
                )
            )
    return AccessReport(
        plan=plan.name,
        roles=roles,
        schemas=schema_access,
        relations=tuple(relations),
        pending=tuple(pending),
        problems=tuple(problems),
    )


def _order(privs: set[str]) -> tuple[str, ...]:
    return tuple(p for p in PRIVILEGES if p in privs)

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
from typing import Any, NamedTuple

from orchestrator.db import Conn
from orchestrator.model.catalog import Catalog, Relation, read_catalog
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


class _Check(NamedTuple):
    """A relation to check: a moved table, its compatibility view or a plan view."""

    kind: str  # "table", "compat view" or "plan view"
    rel: Relation
    name: str  # the plan table (or plan view) it belongs to
    under: Relation | None  # the moved table under a compatibility view


@dataclass(frozen=True)
class _Held:
    """What the server says each live role holds: privileges by table OID, USAGE by schema."""

    privileges: dict[tuple[str, int, str], tuple[bool, bool]]  # (has, on some columns)
    usage: dict[tuple[str, str], bool]

    def table(self, role: str, rel: Relation, priv: str) -> bool:
        """Whether role holds priv on the whole relation."""
        return self.privileges.get((role, rel.oid, priv), (False, False))[0]

    def columns(self, role: str, rel: Relation, priv: str) -> bool:
        """Whether role holds priv on some column of the relation."""
        return self.privileges.get((role, rel.oid, priv), (False, False))[1]

    def schema(self, role: str, schema: str) -> bool:
        """Whether role holds USAGE on the schema."""
        return self.usage.get((role, schema), False)


def verify_access(
    conn: Conn, loaded: LoadedPlan, extra_roles: list[str] | None = None
) -> AccessReport:
    """Compare every declared (and asked-for) role's effective privileges with the plan."""
    plan = loaded.plan
    roles = _roles(conn, plan, extra_roles)
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
    checks, pending, target_rel = _relations_to_check(plan, cat)

    oids = sorted({c.rel.oid for c in checks})
    every_schema = sorted(
        {*schemas, plan.source_schema, *(v.schema_ for v in plan.views)} & cat.existing_schemas
    )
    held = _Held(_table_privileges(conn, live, oids), _schema_usage(conn, live, every_schema))
    schema_access = tuple(
        SchemaAccess(role, s, _usage_declared(plan, s, role), held.schema(role, s))
        for role in live
        for s in schemas
    )
    relations = [
        _table_access(plan, held, role, check)
        if check.kind == "table"
        else _view_access(plan, held, role, check, target_rel)
        for role in live
        for check in checks
    ]
    return AccessReport(
        plan=plan.name,
        roles=roles,
        schemas=schema_access,
        relations=tuple(relations),
        pending=tuple(pending),
        problems=tuple(problems),
    )


def _roles(conn: Conn, plan: Plan, extra_roles: list[str] | None) -> tuple[RoleInfo, ...]:
    """The plan's roles then the asked-for ones, each looked up once (one query)."""
    declared = declared_roles(plan)
    names = list(dict.fromkeys([*declared, *(extra_roles or [])]))
    rows = conn.execute(
        "SELECT rolname, rolsuper FROM pg_roles WHERE rolname = ANY(%s)", (names,)
    ).fetchall()
    found = {r["rolname"]: bool(r["rolsuper"]) for r in rows}
    return tuple(RoleInfo(n, n in found, found.get(n, False), n in declared) for n in names)


def _relations_to_check(
    plan: Plan, cat: Catalog
) -> tuple[list[_Check], list[str], dict[str, Relation]]:
    """The moved tables, their compatibility views and the plan's views that exist.

    Also returns the plan tables whose target does not exist yet, and each moved table's
    target relation by plan table name.
    """
    checks: list[_Check] = []
    pending: list[str] = []
    target_rel: dict[str, Relation] = {}
    for t in plan.tables:
        rel = cat.table(t.schema_, t.target_name)
        if rel is None or rel.kind not in ("r", "p"):
            pending.append(t.name)
            continue
        target_rel[t.name] = rel
        checks.append(_Check("table", rel, t.name, None))
        view = cat.table(plan.source_schema, t.name)
        if view is not None and view.kind == "v":
            checks.append(_Check("compat view", view, t.name, rel))
    for v in plan.views:
        rel = cat.table(v.schema_, v.name)
        if rel is not None and rel.kind == "v":
            checks.append(_Check("plan view", rel, v.name, None))
    return checks, pending, target_rel


def _table_privileges(
    conn: Conn, live: list[str], oids: list[int]
) -> dict[tuple[str, int, str], tuple[bool, bool]]:
    """Each role's table privileges on each relation, whole and on some columns (one query)."""
    has: dict[tuple[str, int, str], tuple[bool, bool]] = {}
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
    return has


def _schema_usage(
    conn: Conn, live: list[str], schemas: list[str]
) -> dict[tuple[str, str], bool]:
    """Whether each role holds USAGE on each schema (one query)."""
    usage: dict[tuple[str, str], bool] = {}
    if live and schemas:
        for r in conn.execute(
            "SELECT r.role, n.nspname AS schema, has_schema_privilege(r.role, n.oid, 'USAGE') "
            "AS usage FROM unnest(%s::text[]) r(role) "
            "JOIN pg_namespace n ON n.nspname = ANY(%s)",
            (live, schemas),
        ).fetchall():
            usage[(r["role"], r["schema"])] = bool(r["usage"])
    return usage


def _table_access(plan: Plan, held: _Held, role: str, check: _Check) -> RelationAccess:
    """A role's privileges on a moved table against those the plan declares for it."""
    rel = check.rel
    want = _declared(plan, rel.schema, role)
    eff = {p for p in PRIVILEGES if held.table(role, rel, p)}
    cols = {p for p in COLUMN_PRIVILEGES if p not in eff and held.columns(role, rel, p)}
    note = ""
    if eff - want and not held.schema(role, rel.schema):
        note = (
            f"no USAGE on schema {rel.schema}: not by this name, "
            "but security_invoker views over it reach it"
        )
    if rel.rls_enabled:
        note = "; ".join(filter(None, [note, "row-level security narrows rows"]))
    return RelationAccess(
        role,
        rel.schema,
        rel.name,
        check.kind,
        check.name,
        declared=_order(want),
        effective=_order(eff),
        columns_only=_order(cols),
        missing=_order(want - eff),
        extra=_order((eff | cols) - want),
        note=note,
    )


def _view_access(
    plan: Plan, held: _Held, role: str, check: _Check, target_rel: dict[str, Relation]
) -> RelationAccess:
    """What a role reaches through a view, against what the plan declares on the tables under it."""
    kind, rel, name = check.kind, check.rel, check.name
    if kind == "compat view":
        assert check.under is not None
        unders = [check.under]
    else:
        spec = next(v for v in plan.views if v.name == name)
        unders = [target_rel[d] for d in spec.depends_on if d in target_rel]
    invoker = _invoker(rel)
    via = set()
    for p in VIEW_PRIVILEGES if kind == "compat view" else ("SELECT",):
        ok = held.table(role, rel, p) and held.schema(role, rel.schema)
        if invoker:
            ok = ok and all(held.table(role, u, p) for u in unders)
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
    return RelationAccess(
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


def _order(privs: set[str]) -> tuple[str, ...]:
    return tuple(p for p in PRIVILEGES if p in privs)

"""`init`: a starting plan, written from the audit, that `validate` accepts as it is.

Tables are grouped into target schemas by foreign-key communities (the audit's domains) or by
name prefix, then `--to NAME=table,...` overrides place tables by hand. Tables the plan could
not move are left out with a YAML comment saying why; a table without a primary key but with
a unique NOT NULL key is kept with `key:` declared.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import yaml

from orchestrator.db import Conn
from orchestrator.errors import OrchestratorError
from orchestrator.model.catalog import Catalog, Relation, read_catalog
from orchestrator.plan import MAX_IDENT_BYTES, Plan, parse_plan
from orchestrator.tools.audit import Audit, quote, run_audit

GROUP_BY = ("community", "prefix")
OTHER = "other"


@dataclass(frozen=True)
class Scaffold:
    """The plan text and what went into it."""

    text: str
    schemas: dict[str, tuple[str, ...]]
    left_out: dict[str, str]  # table -> why
    keys: dict[str, tuple[str, ...]]
    rename: tuple[str, ...]  # tables given strategy rename (the copy strategy cannot move them)
    audit: Audit = field(repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "schemas": {k: list(v) for k, v in self.schemas.items()},
            "left_out": self.left_out,
            "keys": {k: list(v) for k, v in self.keys.items()},
            "rename_strategy": list(self.rename),
        }


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """`NAME=t1,t2` items into {NAME: [t1, t2]}; a table may be named once."""
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for item in items:
        name, sep, tables = item.partition("=")
        names = [t.strip() for t in tables.split(",") if t.strip()]
        if not sep or not name or not names:
            raise OrchestratorError(
                f"--to {item!r}: expected NAME=table,table",
                hint="for example --to client_mgmt=clients,users",
            )
        for t in names:
            if t in seen and seen[t] != name:
                raise OrchestratorError(
                    f"--to: {t} is sent to both {seen[t]} and {name}",
                    hint="name each table in one --to only",
                )
            seen[t] = name
        out.setdefault(name, []).extend(t for t in names if t not in out.get(name, []))
    return out


def _scalar(value: str) -> str:
    """A YAML scalar that reads back as exactly `value` (plain when safe, quoted otherwise)."""
    text = yaml.safe_dump([value], allow_unicode=True, width=1 << 30, default_flow_style=True)
    return text.strip()[1:-1]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _c(text: str) -> str:
    """Text for a YAML comment: one line."""
    return " ".join(text.splitlines())


def _prefix_word(name: str) -> str:
    return name.split("_", 1)[0] if "_" in name else name


def _prefix_groups(tables: list[str], audit: Audit) -> dict[str, str]:
    """table -> group: shared first word of the name (`client_users` with `clients`).

    A table alone with its prefix joins the group it shares the most foreign keys with (ties:
    the larger group, then the name), in rounds, so a table linked only to such tables follows
    them; one linked to none goes to `other`."""
    words = {_prefix_word(t) for t in tables}
    word_of = {}
    for t in tables:
        w = _prefix_word(t)
        if w.endswith("s") and w[:-1] in words:
            w = w[:-1]
        word_of[t] = w or OTHER
    sizes = Counter(word_of.values())
    group = {t: w for t, w in word_of.items() if sizes[w] > 1}
    pairs = [
        (fk.table, fk.ref_table)
        for fk in audit.foreign_keys
        if fk.schema == audit.schema and fk.ref_schema == audit.schema
    ]
    pairs += [(m.table, m.ref_table) for m in audit.missing]
    big = Counter(group.values())
    while True:
        links: dict[str, Counter[str]] = {t: Counter() for t in tables if t not in group}
        for a, b in pairs:
            if a in links and b in group:
                links[a][group[b]] += 1
            if b in links and a in group:
                links[b][group[a]] += 1
        found = {t: min(c, key=lambda g: (-c[g], -big[g], g)) for t, c in links.items() if c}
        if not found:
            break
        group.update(found)
    for t in tables:
        group.setdefault(t, OTHER)
    return group


def _community_groups(audit: Audit) -> dict[str, str]:
    return {t: d.name for d in audit.domains for t in d.tables}


def _copy_blockers(cat: Catalog, schema: str, rel: Relation) -> str | None:
    """Why the copy strategy cannot move this table (validate would refuse it), if it cannot."""
    if any(c.kind == "x" for c in rel.constraints):
        return "an exclusion constraint"
    for d in cat.dependents_of(schema, rel.name):
        if d.kind in ("m", "rule"):
            what = "materialized view" if d.kind == "m" else "rule"
            return f"the {what} {d.schema}.{d.name} reads it"
    return None


def _schema_ok(name: str, taken: set[str]) -> str:
    """A unique schema name of at most 63 bytes, not a reserved one nor an SQL keyword."""
    if quote(name) != name and name.lower() == name and quote(name + "_domain") == name + "_domain":
        name += "_domain"  # `order` would need quotes in every query: `order_domain` does not
    while len(name.encode()) > MAX_IDENT_BYTES:
        name = name[:-1]
    base, n = name, 2
    while name in taken:
        suffix = f"_{n}"
        name = base[: MAX_IDENT_BYTES - len(suffix)] + suffix
        while len(name.encode()) > MAX_IDENT_BYTES:
            base = base[:-1]
            name = base + suffix
        n += 1
    return name


def build_plan(
    conn: Conn,
    schema: str = "public",
    *,
    group_by: str = "community",
    overrides: dict[str, list[str]] | None = None,
    name: str | None = None,
    domains: int | None = None,
    strategy: str = "copy",
    control_schema: str = "_orchestrator",
) -> Scaffold:
    """Build a plan for every table of `schema` (read-only); check it parses as a plan."""
    _check_choices(group_by, strategy)
    overrides = overrides or {}
    audit = run_audit(conn, schema, count_orphans=False, domains=domains)
    cat = read_catalog(conn, [schema])
    plan_name = name or f"move_{schema}"
    reserved = _reserved_schemas(schema, control_schema)
    _check_overrides(overrides, audit, schema, reserved)

    tables = list(audit.tables)
    target_of = _targets(tables, audit, group_by, overrides, reserved)
    left_out, keys = _sort_out(cat, audit, schema, tables, target_of)
    taken_targets = _existing(conn, sorted({target_of[t] for t in tables if t not in left_out}))
    for t in tables:
        if t not in left_out and (target_of[t], t) in taken_targets:
            left_out[t] = f"{target_of[t]}.{t} already exists; choose another schema with --to"
    moved = [t for t in tables if t not in left_out]
    rename, reasons, unit_of = _strategies(cat, audit, schema, moved, strategy)

    text = _render(
        audit=audit,
        schema=schema,
        group_by=group_by,
        plan_name=plan_name,
        strategy=strategy,
        control_schema=control_schema,
        target_of=target_of,
        moved=moved,
        keys=keys,
        rename=rename,
        reasons=reasons,
        unit_of=unit_of,
        left_out=left_out,
    )
    parse_plan(text, "<init>")  # a plan we could not read back would be our bug: fail here
    schemas: dict[str, list[str]] = {}
    for t in moved:
        schemas.setdefault(target_of[t], []).append(t)
    return Scaffold(
        text=text,
        schemas={k: tuple(v) for k, v in schemas.items()},
        left_out=left_out,
        keys=keys,
        rename=tuple(sorted(rename)),
        audit=audit,
    )


def _check_choices(group_by: str, strategy: str) -> None:
    """Refuse an unknown --group-by or --strategy before reading anything."""
    if group_by not in GROUP_BY:
        raise OrchestratorError(
            f"--group-by {group_by}: unknown", hint=f"use one of {', '.join(GROUP_BY)}"
        )
    if strategy not in ("copy", "rename"):
        raise OrchestratorError(f"--strategy {strategy}: unknown", hint="use copy or rename")


def _reserved_schemas(schema: str, control_schema: str) -> set[str]:
    """Schemas no table may be moved into: the source, ours and the system's."""
    retired = Plan.model_construct(
        version=1, name="x", tables=[], control_schema=control_schema
    ).retired_schema
    return {schema, control_schema, retired, "pg_catalog", "information_schema"}


def _check_overrides(
    overrides: dict[str, list[str]], audit: Audit, schema: str, reserved: set[str]
) -> None:
    """Refuse --to naming a table not in the schema, or a schema tables cannot go to."""
    unknown = [t for ts in overrides.values() for t in ts if t not in audit.tables]
    if unknown:
        raise OrchestratorError(
            f"--to names tables that are not in {schema}: {', '.join(sorted(unknown))}",
            hint=f"tables of {schema}: {', '.join(audit.tables)}",
        )
    for target in overrides:
        if target in reserved - {schema} or target.startswith("pg_"):
            raise OrchestratorError(
                f"--to {target}: cannot move tables into that schema",
                hint="choose another schema name",
            )


def _targets(
    tables: list[str],
    audit: Audit,
    group_by: str,
    overrides: dict[str, list[str]],
    reserved: set[str],
) -> dict[str, str]:
    """Table -> target schema: its group's (made a valid, unique name), unless --to says."""
    groups = _prefix_groups(tables, audit) if group_by == "prefix" else _community_groups(audit)
    # Generated names must not clash with the source, the control schema or an override.
    rename_group: dict[str, str] = {}
    taken = set(reserved) | set(overrides)
    for g in dict.fromkeys(groups[t] for t in tables):
        rename_group[g] = _schema_ok(g, taken)
        taken.add(rename_group[g])
    target_of = {t: rename_group[groups[t]] for t in tables}
    for target, ts in overrides.items():
        for t in ts:
            target_of[t] = target
    return target_of


def _sort_out(
    cat: Catalog, audit: Audit, schema: str, tables: list[str], target_of: dict[str, str]
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """The tables the plan cannot move (table -> why), and the keys to declare for the keyless."""
    left_out: dict[str, str] = {}
    keys: dict[str, tuple[str, ...]] = {}
    keyless = {k.table: k.candidate_key for k in audit.keyless}
    for t in tables:
        rel = cat.table(schema, t)
        assert rel is not None
        if target_of[t] == schema:
            left_out[t] = f"kept in {schema} by --to"
        elif rel.kind != "p" and (rel.inherits or rel.has_children):
            left_out[t] = "table inheritance is not supported; move it by hand"
        elif t in keyless:
            key = keyless[t]
            if key is None:
                left_out[t] = (
                    "no primary key and no unique NOT NULL key to declare; add a primary key, "
                    "then add the table here"
                )
            else:
                keys[t] = key
    return left_out, keys


def _strategies(
    cat: Catalog, audit: Audit, schema: str, moved: list[str], strategy: str
) -> tuple[set[str], dict[str, str], dict[str, tuple[str, ...]]]:
    """The tables the copy strategy cannot move, why, and each table's foreign-key cycle.

    Tables of one foreign-key cycle share a strategy, so a cycle with one such table is
    given the rename strategy whole.
    """
    rename: set[str] = set()
    reasons: dict[str, str] = {}
    if strategy == "copy":
        for t in moved:
            rel = cat.table(schema, t)
            assert rel is not None
            why = _copy_blockers(cat, schema, rel)
            if why:
                reasons[t] = why
                rename.add(t)
    fk_graph: nx.DiGraph = nx.DiGraph()
    fk_graph.add_nodes_from(moved)
    for fk in audit.foreign_keys:
        if fk.schema == fk.ref_schema == schema and fk.table in moved and fk.ref_table in moved:
            fk_graph.add_edge(fk.table, fk.ref_table)
    unit_of: dict[str, tuple[str, ...]] = {}
    for comp in nx.strongly_connected_components(fk_graph):
        members = tuple(sorted(comp))
        for t in members:
            unit_of[t] = members
        if rename & comp:
            for t in members:
                if t not in reasons:
                    reasons[t] = "in a foreign-key cycle with " + ", ".join(sorted(rename & comp))
            rename |= comp
    return rename, reasons, unit_of


def _existing(conn: Conn, schemas: list[str]) -> set[tuple[str, str]]:
    rows = conn.execute(
        "SELECT n.nspname AS schema, c.relname AS name FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY(%s)",
        (schemas,),
    ).fetchall()
    return {(r["schema"], r["name"]) for r in rows}


def _render(
    *,
    audit: Audit,
    schema: str,
    group_by: str,
    plan_name: str,
    strategy: str,
    control_schema: str,
    target_of: dict[str, str],
    moved: list[str],
    keys: dict[str, tuple[str, ...]],
    rename: set[str],
    reasons: dict[str, str],
    unit_of: dict[str, tuple[str, ...]],
    left_out: dict[str, str],
) -> str:
    q = _scalar
    domains = {d.name: d for d in audit.domains}
    order = list(dict.fromkeys(target_of[t] for t in moved))
    lines = [
        f"# Written by `orchestrator init` from schema {schema} (grouped by {group_by}).",
        "# A starting point: rename the target schemas, add grants, then run",
        "# `orchestrator validate` and `orchestrator dry-run` on this file.",
        "version: 1",
        f"name: {q(plan_name)}",
        f"source_schema: {q(schema)}",
    ]
    if control_schema != "_orchestrator":
        lines.append(f"control_schema: {q(control_schema)}")
    lines += [
        "",
        "defaults:",
        f"  strategy: {strategy}",
        "  batch_size: 10000",
        "  lock_timeout_ms: 500",
        "",
        "schemas:",
    ]
    for s in order:
        lines += [
            f"  {q(s)}:",
            "    usage: []   # roles granted USAGE on the schema",
            "    grants: []  # e.g. - {role: app_ro, privileges: [SELECT]}",
        ]
    if not order:
        lines[-1] = "schemas: {}"
    lines += ["", "tables:" if moved else "tables: []"]
    for s in order:
        members = [t for t in moved if target_of[t] == s]
        d = domains.get(s)
        note = f"# --- {s}"
        if d is not None and d.hub is not None:
            note += (
                f": around {d.hub}; {_n(d.internal_fks, 'foreign key')} inside, "
                f"{d.crossing_fks} to other domains"
            )
        lines.append(_c(f"  {note} ---"))
        for t in sorted(members):
            lines += [f"  - name: {q(t)}", f"    schema: {q(s)}"]
            if t in keys:
                lines.append(
                    f"    key: [{', '.join(q(c) for c in keys[t])}]"
                    "  # no primary key: this unique NOT NULL key identifies rows"
                )
            if t in rename and strategy == "copy":
                lines.append(_c(f"    options: {{strategy: rename}}  # copy cannot: {reasons[t]}"))
            unit = [u for u in unit_of.get(t, ()) if u != t]
            if unit:
                lines.append(
                    _c(f"    # moves together with {', '.join(unit)} (a foreign-key cycle)")
                )
    if left_out:
        lines += ["", "# Left out of this plan:"]
        for t in sorted(left_out):
            lines.append(_c(f"#   {t}: {left_out[t]}"))
    return "\n".join(lines) + "\n"

"""The audit of a schema before a move: foreign keys, missing constraints, keys, cycles, domains.

Everything is data (frozen dataclasses); the CLI renders it. The catalog part is one
`read_catalog` (a fixed number of queries); orphan values of every candidate reference are
counted by a single further statement, whatever the number of candidates.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import networkx as nx
from networkx.algorithms.community import greedy_modularity_communities
from pglast.keywords import UNRESERVED_KEYWORDS
from psycopg import sql

from orchestrator.db import Conn
from orchestrator.errors import OrchestratorError
from orchestrator.model.catalog import Catalog, ForeignKey, Relation, read_catalog
from orchestrator.sql.compose import render

ACTIONS = {
    "a": "NO ACTION",
    "r": "RESTRICT",
    "c": "CASCADE",
    "n": "SET NULL",
    "d": "SET DEFAULT",
}

# Enumerating cycles is exponential in the worst case: stop after this many.
MAX_CYCLES = 500

_INTEGERS = {"smallint", "integer", "bigint"}
_TEXTS = {"text", "character varying", "varchar", "citext"}
_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


def quote(name: str) -> str:
    """An identifier as `quote_ident` writes it: bare when it can be, quoted otherwise."""
    if _PLAIN.fullmatch(name) and (name in UNRESERVED_KEYWORDS or not _is_keyword(name)):
        return name
    return '"' + name.replace('"', '""') + '"'


def _is_keyword(name: str) -> bool:
    from pglast.keywords import COL_NAME_KEYWORDS, RESERVED_KEYWORDS, TYPE_FUNC_NAME_KEYWORDS

    return name in RESERVED_KEYWORDS or name in COL_NAME_KEYWORDS or name in TYPE_FUNC_NAME_KEYWORDS


def qualified(schema: str, name: str) -> str:
    return f"{quote(schema)}.{quote(name)}"


@dataclass(frozen=True)
class FkInfo:
    """One foreign key, with what makes it slow or surprising."""

    name: str
    schema: str
    table: str
    columns: tuple[str, ...]
    ref_schema: str
    ref_table: str
    ref_columns: tuple[str, ...]
    on_update: str
    on_delete: str
    validated: bool
    deferrable: bool
    nullable: bool | None  # some referencing column allows NULL (None: table outside the audit)
    columns_indexed: bool
    suggestion: str | None  # the index to build when the referencing columns are unindexed


@dataclass(frozen=True)
class MissingReference:
    """A `*_id` column that looks like a reference to a table's key but has no constraint."""

    schema: str
    table: str
    column: str
    type: str
    ref_table: str
    ref_column: str
    ref_type: str
    type_match: str  # "exact" or "compatible" (e.g. integer and bigint)
    orphan_rows: int | None  # rows whose value has no parent (None: not counted)
    orphan_values: int | None  # distinct such values
    examples: tuple[str, ...]  # up to five orphan values, smallest first
    suggestion: str


@dataclass(frozen=True)
class KeylessTable:
    """A table without a primary key: the copy strategy needs a unique NOT NULL key."""

    schema: str
    table: str
    row_estimate: int
    candidate_key: tuple[str, ...] | None  # a unique, NOT NULL key the plan may declare


@dataclass(frozen=True)
class Cycle:
    """Tables that reference each other: they move as one unit."""

    tables: tuple[str, ...]
    foreign_keys: tuple[str, ...]
    breakable_by: tuple[str, ...]  # foreign keys of the cycle that are nullable or deferrable


@dataclass(frozen=True)
class Domain:
    """A community of the foreign-key graph: tables that mostly reference each other."""

    name: str
    hub: str | None  # the table with the most foreign keys inside the domain
    tables: tuple[str, ...]
    internal_fks: int  # foreign keys (and unconstrained references) inside the domain
    crossing_fks: int  # those between this domain and another (cross-schema after a split)


@dataclass(frozen=True)
class Audit:
    schema: str
    tables: tuple[str, ...]
    foreign_keys: tuple[FkInfo, ...]
    missing: tuple[MissingReference, ...]
    keyless: tuple[KeylessTable, ...]
    cycles: tuple[Cycle, ...]
    cycles_truncated: bool
    domains: tuple[Domain, ...]
    orphans_counted: bool

    @property
    def unindexed(self) -> tuple[FkInfo, ...]:
        return tuple(f for f in self.foreign_keys if not f.columns_indexed)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = {
            "tables": len(self.tables),
            "foreign_keys": len(self.foreign_keys),
            "unindexed_foreign_keys": len(self.unindexed),
            "missing_constraints": len(self.missing),
            "missing_with_orphans": sum(1 for m in self.missing if m.orphan_rows),
            "tables_without_primary_key": len(self.keyless),
            "cycles": len(self.cycles),
            "domains": len(self.domains),
        }
        return d


def _tables(cat: Catalog, schema: str) -> dict[str, Relation]:
    return {
        name: rel
        for (s, name), rel in sorted(cat.relations.items())
        if s == schema and rel.kind in ("r", "p") and not rel.is_partition
    }


def _label(schema: str, fk_schema: str, table: str) -> str:
    """Tables of the audited schema by name, others schema-qualified."""
    return table if fk_schema == schema else f"{fk_schema}.{table}"


def _fk_info(fk: ForeignKey, tables: dict[str, Relation], schema: str) -> FkInfo:
    rel = tables.get(fk.table) if fk.schema == schema else None
    nullable = None
    if rel is not None:
        nullable = any(not rel.column(c).not_null for c in fk.columns)
    suggestion = None
    if not fk.columns_indexed:
        suggestion = "CREATE INDEX CONCURRENTLY ON {} ({});".format(
            qualified(fk.schema, fk.table), ", ".join(quote(c) for c in fk.columns)
        )
    return FkInfo(
        name=fk.name,
        schema=fk.schema,
        table=fk.table,
        columns=fk.columns,
        ref_schema=fk.ref_schema,
        ref_table=fk.ref_table,
        ref_columns=fk.ref_columns,
        on_update=ACTIONS.get(fk.on_update, fk.on_update),
        on_delete=ACTIONS.get(fk.on_delete, fk.on_delete),
        validated=fk.validated,
        deferrable=fk.deferrable,
        nullable=nullable,
        columns_indexed=fk.columns_indexed,
        suggestion=suggestion,
    )


def candidate_key(rel: Relation) -> tuple[str, ...] | None:
    """A key a plan may declare for a table without a primary key (as validate accepts it)."""
    not_null = {c.name for c in rel.columns if c.not_null}
    for i in sorted(rel.indexes, key=lambda i: (len(i.columns), i.name)):
        if (
            i.unique
            and i.valid
            and not i.expressions
            and not i.partial
            and i.columns
            and set(i.columns) <= not_null
        ):
            return i.columns
    return None


def _base_type(t: str) -> str:
    return t.split("(", 1)[0].strip()


def type_match(a: str, b: str) -> str | None:
    """ "exact", "compatible" (comparable without a cast that could fail) or None."""
    if a == b:
        return "exact"
    x, y = _base_type(a), _base_type(b)
    if x == y or {x, y} <= _INTEGERS or {x, y} <= _TEXTS:
        return "compatible"
    return None


def _plural_forms(word: str) -> list[str]:
    forms = [word, word + "s", word + "es"]
    if word.endswith("y") and len(word) > 1:
        forms.append(word[:-1] + "ies")
    return forms


def _reference_candidates(column: str) -> list[str]:
    """Table names a `*_id` column may point to: `project_id` → project, projects, ...

    The whole prefix first, then its last word (`owner_user_id` → users)."""
    base = column[:-3]
    names = _plural_forms(base)
    if "_" in base:
        names += _plural_forms(base.rsplit("_", 1)[1])
    return list(dict.fromkeys(n for n in names if n))


def _single_key(rel: Relation) -> str | None:
    pk = rel.primary_key
    if pk is not None and len(pk.columns) == 1:
        return pk.columns[0]
    return None


def _find_missing(
    tables: dict[str, Relation], fks: tuple[ForeignKey, ...], schema: str
) -> list[tuple[Relation, str, Relation, str, str]]:
    """(table, column, parent, parent key, match) for each unconstrained `*_id` reference."""
    constrained: dict[str, set[str]] = {}
    for fk in fks:
        if fk.schema == schema:
            constrained.setdefault(fk.table, set()).update(fk.columns)
    found = []
    for name, rel in tables.items():
        for col in rel.columns:
            if not col.name.endswith("_id") or len(col.name) <= 3:
                continue
            if col.name in constrained.get(name, set()) or col.generated:
                continue
            for cand in _reference_candidates(col.name):
                parent = tables.get(cand)
                if parent is None:
                    continue
                key = _single_key(parent)
                if key is None or key not in ("id", col.name):
                    continue
                if parent.name == name and key == col.name:
                    continue  # the table's own key
                match = type_match(col.type, parent.column(key).type)
                if match is None:
                    continue
                found.append((rel, col.name, parent, key, match))
                break
    return found


def _count_orphans(
    conn: Conn, schema: str, found: list[tuple[Relation, str, Relation, str, str]]
) -> list[tuple[int, int, tuple[str, ...]]]:
    """Orphan rows, distinct orphan values and up to five examples per candidate: one query."""
    if not found:
        return []
    parts = []
    for i, (rel, col, parent, key, _match) in enumerate(found):
        child_col = sql.Identifier("c", col)
        orphans = sql.SQL(
            "FROM {child} c WHERE {col} IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM {parent} p WHERE {key} = {col})"
        ).format(
            child=sql.Identifier(schema, rel.name),
            col=child_col,
            parent=sql.Identifier(schema, parent.name),
            key=sql.Identifier("p", key),
        )
        parts.append(
            sql.SQL(
                "SELECT {i}::int AS i, (SELECT count(*) {orphans}) AS orphan_rows, "
                "(SELECT count(DISTINCT {col}) {orphans}) AS orphan_values, "
                "(SELECT coalesce(array_agg(v::text ORDER BY v), '{{}}') FROM "
                "(SELECT DISTINCT {col} AS v {orphans} ORDER BY 1 LIMIT 5) e) AS examples"
            ).format(i=sql.Literal(i), orphans=orphans, col=child_col)
        )
    query = sql.SQL(" UNION ALL ").join(parts)
    rows = {r["i"]: r for r in conn.execute(query).fetchall()}
    return [
        (int(rows[i]["orphan_rows"]), int(rows[i]["orphan_values"]), tuple(rows[i]["examples"]))
        for i in range(len(found))
    ]


def _fk_graph(schema: str, fks: tuple[FkInfo, ...]) -> nx.DiGraph:
    """child → parent, one edge per pair with the foreign keys that make it."""
    g: nx.DiGraph = nx.DiGraph()
    for fk in sorted(fks, key=lambda f: (f.schema, f.table, f.name)):
        a = _label(schema, fk.schema, fk.table)
        b = _label(schema, fk.ref_schema, fk.ref_table)
        if g.has_edge(a, b):
            g[a][b]["fks"].append(fk)
        else:
            g.add_edge(a, b, fks=[fk])
    return g


def _cycles(g: nx.DiGraph) -> tuple[list[Cycle], bool]:
    out: list[Cycle] = []
    truncated = False
    for i, cyc in enumerate(nx.simple_cycles(g)):
        if i >= MAX_CYCLES:
            truncated = True
            break
        start = cyc.index(min(cyc))
        nodes = cyc[start:] + cyc[:start]
        fks: list[FkInfo] = []
        for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True):
            fks += g[a][b]["fks"]
        out.append(
            Cycle(
                tables=tuple(nodes),
                foreign_keys=tuple(f.name for f in fks),
                breakable_by=tuple(f.name for f in fks if f.nullable or f.deferrable),
            )
        )
    out.sort(key=lambda c: (len(c.tables), c.tables))
    return out, truncated


def domain_name(hub: str) -> str:
    """The schema name suggested for a domain around a hub table (at most 63 bytes)."""
    name = "domain_" + hub
    while len(name.encode()) > 63:
        name = name[:-1]
    return name


def _domains(
    tables: dict[str, Relation],
    fks: tuple[FkInfo, ...],
    missing: list[tuple[str, str]],
    schema: str,
    count: int | None,
) -> list[Domain]:
    """Communities of the graph of foreign keys and of references that lack their constraint
    (`missing`: (table, parent) pairs): both are relationships the data has."""
    g: nx.Graph = nx.Graph()
    g.add_nodes_from(sorted(tables))
    pairs = [
        (fk.table, fk.ref_table)
        for fk in sorted(fks, key=lambda f: (f.table, f.name))
        if fk.schema == schema and fk.ref_schema == schema
    ]
    for a, b in [*pairs, *sorted(missing)]:
        if a == b or a not in tables or b not in tables:
            continue
        if g.has_edge(a, b):
            g[a][b]["weight"] += 1
        else:
            g.add_edge(a, b, weight=1)
    referenced: dict[str, int] = {}
    for _, b in [*pairs, *missing]:
        referenced[b] = referenced.get(b, 0) + 1
    connected = g.subgraph(n for n in g if g.degree(n) > 0)
    groups: list[set[str]] = []
    if connected.number_of_edges():
        n = None
        if count is not None:
            # best_n cannot exceed the node count, nor go below the connected components.
            n = max(
                min(count, connected.number_of_nodes()), nx.number_connected_components(connected)
            )
        groups = [
            set(c) for c in greedy_modularity_communities(connected, weight="weight", best_n=n)
        ]
    isolated = sorted(n for n in g if g.degree(n) == 0)
    domain_of = {t: i for i, grp in enumerate(groups) for t in grp}
    out: list[Domain] = []
    for i, grp in enumerate(groups):
        inner = g.subgraph(grp)
        # The hub: most relationships inside; ties go to the most referenced, then the name.
        hub = min(
            sorted(grp),
            key=lambda t: (-inner.degree(t, weight="weight"), -referenced.get(t, 0), t),
        )
        internal = sum(d["weight"] for _, _, d in inner.edges(data=True))
        crossing = sum(
            d["weight"]
            for a, b, d in g.edges(data=True)
            if (domain_of.get(a) == i) != (domain_of.get(b) == i)
        )
        out.append(Domain(domain_name(hub), hub, tuple(sorted(grp)), internal, crossing))
    out.sort(key=lambda d: (-len(d.tables), d.tables))
    if isolated:
        out.append(Domain("standalone", None, tuple(isolated), 0, 0))
    return out


def _fk_suggestion(schema: str, table: str, column: str, parent: str, key: str) -> str:
    """SQL for the operator to review and run, composed like any statement we run."""
    t = sql.Identifier(schema, table)
    return render(None, sql.SQL(
        "ALTER TABLE {t} ADD FOREIGN KEY ({c}) REFERENCES {p} ({k}) NOT VALID; "
        "-- then, once no orphans are left: ALTER TABLE {t} VALIDATE CONSTRAINT ..."
    ).format(t=t, c=sql.Identifier(column), p=sql.Identifier(schema, parent),
             k=sql.Identifier(key)))


def run_audit(
    conn: Conn, schema: str = "public", *, count_orphans: bool = True, domains: int | None = None
) -> Audit:
    """Audit one schema (read-only). `domains` asks the community split for that many."""
    cat = read_catalog(conn, [schema])
    if schema not in cat.existing_schemas:
        raise OrchestratorError(
            f"schema {schema} does not exist",
            hint="give --schema the schema the application's tables live in",
        )
    tables = _tables(cat, schema)
    fks = tuple(
        _fk_info(fk, tables, schema)
        for fk in sorted(cat.foreign_keys, key=lambda f: (f.schema, f.table, f.name))
    )
    found = _find_missing(tables, cat.foreign_keys, schema)
    counts: list[tuple[int | None, int | None, tuple[str, ...]]] = (
        list(_count_orphans(conn, schema, found))
        if count_orphans
        else [(None, None, ())] * len(found)
    )
    missing = tuple(
        MissingReference(
            schema=schema,
            table=rel.name,
            column=col,
            type=rel.column(col).type,
            ref_table=parent.name,
            ref_column=key,
            ref_type=parent.column(key).type,
            type_match=match,
            orphan_rows=rows,
            orphan_values=values,
            examples=examples,
            suggestion=_fk_suggestion(schema, rel.name, col, parent.name, key),
        )
        for (rel, col, parent, key, match), (rows, values, examples) in zip(
            found, counts, strict=True
        )
    )
    keyless = tuple(
        KeylessTable(schema, name, rel.row_estimate, candidate_key(rel))
        for name, rel in tables.items()
        if rel.primary_key is None
    )
    cycles, truncated = _cycles(_fk_graph(schema, fks))
    return Audit(
        schema=schema,
        tables=tuple(tables),
        foreign_keys=fks,
        missing=missing,
        keyless=keyless,
        cycles=tuple(cycles),
        cycles_truncated=truncated,
        domains=tuple(
            _domains(tables, fks, [(m.table, m.ref_table) for m in missing], schema, domains)
        ),
        orphans_counted=count_orphans,
    )

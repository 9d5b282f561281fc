"""Catalog introspection: a fixed number of set-based pg_catalog queries, whatever the table count.

Every query takes the list of schemas of interest as one array parameter; the result is a
`Catalog` of small frozen records keyed by (schema, name), never by OID across calls.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from orchestrator.db import Conn

# Counts every query this module sends, so tests and the planning-scale benchmark can prove
# the number does not grow with the table count.
QUERY_COUNT = 0


@dataclass(frozen=True)
class Column:
    name: str
    attnum: int
    type: str
    type_schema: str
    type_kind: str  # pg_type.typtype: b base, e enum, d domain, c composite, r range
    not_null: bool
    default: str | None
    identity: str  # '' | 'a' (ALWAYS) | 'd' (BY DEFAULT)
    generated: str  # '' | 's' stored | 'v' virtual
    collation: str | None
    comment: str | None
    acl: tuple[str, ...]
    stats_target: int | None = None  # SET STATISTICS, when not the default
    storage: str | None = None  # SET STORAGE p|e|m|x, when not the type's
    compression: str | None = None  # SET COMPRESSION p (pglz) | l (lz4), when set


@dataclass(frozen=True)
class Constraint:
    name: str
    kind: str  # p u c f x n t
    definition: str
    columns: tuple[str, ...]
    validated: bool
    deferrable: bool
    deferred: bool
    index: str | None
    ref_schema: str | None = None
    ref_table: str | None = None
    ref_columns: tuple[str, ...] = ()
    on_update: str = "a"
    on_delete: str = "a"
    comment: str | None = None
    # Cloned from a partitioned parent's constraint, or inherited (not declared here).
    inherited: bool = False


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key seen from either end, with both tables named."""

    name: str
    schema: str
    table: str
    columns: tuple[str, ...]
    ref_schema: str
    ref_table: str
    ref_columns: tuple[str, ...]
    definition: str
    validated: bool
    columns_indexed: bool
    on_update: str = "a"
    on_delete: str = "a"
    match: str = "s"
    deferrable: bool = False
    deferred: bool = False
    comment: str | None = None


@dataclass(frozen=True)
class Index:
    name: str
    definition: str
    unique: bool
    primary: bool
    valid: bool
    constraint: str | None
    columns: tuple[str, ...]  # key columns only (not INCLUDE); expressions are left out
    expressions: bool = False  # some key is an expression, so `columns` is not the whole key
    partial: bool = False  # WHERE clause: unique over some rows only
    clustered: bool = False  # CLUSTER ON this index
    replident: bool = False  # REPLICA IDENTITY USING INDEX this index
    inherited: bool = False  # a partition's copy of its parent's index
    comment: str | None = None


@dataclass(frozen=True)
class Trigger:
    name: str
    definition: str
    enabled: str  # O origin, D disabled, R replica, A always
    function: str
    cloned: bool = False  # a partition's copy of its parent's trigger


@dataclass(frozen=True)
class Policy:
    name: str
    command: str
    permissive: bool
    roles: tuple[str, ...]
    using: str | None
    check: str | None


@dataclass(frozen=True)
class Sequence:
    schema: str
    name: str
    data_type: str
    start: int
    increment: int
    min_value: int
    max_value: int
    cache: int
    cycle: bool
    owner_table: str | None
    owner_column: str | None
    owner_schema: str | None
    identity: bool
    acl: tuple[str, ...]
    owner: str


@dataclass(frozen=True)
class Dependent:
    """A view, materialized view or rule that reads a table by OID."""

    schema: str
    name: str
    kind: str  # v view, m matview, rule
    on_schema: str
    on_table: str
    definition: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # r table, p partitioned, v view, m matview, f foreign, S sequence
    owner: str
    persistence: str
    options: tuple[str, ...]
    acl: tuple[str, ...]
    comment: str | None
    rls_enabled: bool
    rls_forced: bool
    is_partition: bool
    inherits: tuple[str, ...]
    row_estimate: int
    total_bytes: int
    replica_identity: str
    view_definition: str | None
    populated: bool = True  # a materialized view WITH DATA
    # CREATE STATISTICS definitions as pg_get_statisticsobjdef prints them.
    statistics: tuple[str, ...] = ()
    # Publications that list this table, or its schema.
    publications: tuple[str, ...] = ()
    # Those that publish the table only through its schema (FOR TABLES IN SCHEMA).
    schema_publications: tuple[str, ...] = ()
    # PARTITION BY (pg_get_partkeydef) of a partitioned table; FOR VALUES of a partition.
    partition_key: str | None = None
    partition_bound: str | None = None
    child_count: int = 0
    columns: tuple[Column, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    indexes: tuple[Index, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    policies: tuple[Policy, ...] = ()

    @property
    def has_children(self) -> bool:
        """Partitions or inheritance children."""
        return self.child_count > 0

    @property
    def qualified(self) -> tuple[str, str]:
        return (self.schema, self.name)

    @property
    def primary_key(self) -> Constraint | None:
        return next((c for c in self.constraints if c.kind == "p"), None)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @property
    def user_triggers(self) -> tuple[Trigger, ...]:
        """Triggers the application created (not ours, not constraint triggers)."""
        return tuple(
            t for t in self.triggers if not t.name.startswith("_orch_") and not t.cloned
        )


@dataclass(frozen=True)
class Catalog:
    """Everything a move needs to know about a set of schemas."""

    schemas: tuple[str, ...]
    existing_schemas: frozenset[str]
    relations: dict[tuple[str, str], Relation]
    foreign_keys: tuple[ForeignKey, ...]
    sequences: dict[tuple[str, str], Sequence]
    dependents: tuple[Dependent, ...]
    server_version: int
    queries: int = field(default=0, compare=False)
    # Roles our own default privileges grant on every new table or view, by schema ('' for
    # all schemas): a new target or compatibility view must not carry them.
    default_grantees: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def table(self, schema: str, name: str) -> Relation | None:
        rel = self.relations.get((schema, name))
        return rel

    # Lookups by table are indexed once per catalog: planning walks every table, and a scan
    # of every foreign key per table made 2,000 tables quadratic.
    @cached_property
    def _fk_index(self) -> tuple[dict[tuple[str, str], list[ForeignKey]],
                                 dict[tuple[str, str], list[ForeignKey]]]:
        by_child: dict[tuple[str, str], list[ForeignKey]] = defaultdict(list)
        by_parent: dict[tuple[str, str], list[ForeignKey]] = defaultdict(list)
        for f in self.foreign_keys:
            by_child[(f.schema, f.table)].append(f)
            by_parent[(f.ref_schema, f.ref_table)].append(f)
        return by_child, by_parent

    def fks_from(self, schema: str, name: str) -> list[ForeignKey]:
        return list(self._fk_index[0].get((schema, name), ()))

    def fks_to(self, schema: str, name: str) -> list[ForeignKey]:
        return list(self._fk_index[1].get((schema, name), ()))

    def defaults_for(self, schema: str) -> tuple[str, ...]:
        """Grantees ('' is PUBLIC) our default privileges add to a new relation in schema."""
        return tuple(
            dict.fromkeys(self.default_grantees.get("", ()) + self.default_grantees.get(schema, ()))
        )

    @cached_property
    def _dependents_index(self) -> dict[tuple[str, str], list[Dependent]]:
        out: dict[tuple[str, str], list[Dependent]] = defaultdict(list)
        for d in self.dependents:
            out[(d.on_schema, d.on_table)].append(d)
        return out

    @cached_property
    def _sequence_index(self) -> dict[tuple[str | None, str | None], list[Sequence]]:
        out: dict[tuple[str | None, str | None], list[Sequence]] = defaultdict(list)
        for seq in self.sequences.values():
            out[(seq.owner_schema, seq.owner_table)].append(seq)
        return out

    def dependents_of(self, schema: str, name: str) -> list[Dependent]:
        return list(self._dependents_index.get((schema, name), ()))

    @cached_property
    def _children_index(self) -> dict[tuple[str, str], list[Relation]]:
        out: dict[tuple[str, str], list[Relation]] = defaultdict(list)
        for rel in self.relations.values():
            if rel.is_partition and rel.inherits:
                schema, _, name = rel.inherits[0].partition(".")
                out[(schema, name)].append(rel)
        return out

    def size_of(self, rel: Relation) -> tuple[int, int]:
        """Estimated rows and bytes of a table, a partitioned one's summed over its leaves."""
        if rel.kind != "p":
            return rel.row_estimate, rel.total_bytes
        leaves = [p for p in self.partitions_of(*rel.qualified) if p.kind == "r"]
        return sum(p.row_estimate for p in leaves), sum(p.total_bytes for p in leaves)

    def partitions_of(self, schema: str, name: str) -> list[Relation]:
        """Every partition below a partitioned table (sub-partitions too), each after its
        parent, by name within a level; only those in the schemas read."""
        out: list[Relation] = []
        level = [(schema, name)]
        while level:
            children = sorted(
                (c for key in level for c in self._children_index.get(key, ())),
                key=lambda r: (r.schema, r.name),
            )
            out += children
            level = [c.qualified for c in children]
        return out

    def owned_sequences(self, schema: str, name: str) -> list[Sequence]:
        return list(self._sequence_index.get((schema, name), ()))


# Whether a schema holds nothing (no relation, function or type): ours are dropped then.
EMPTY_SCHEMA = (
    "SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON "
    "n.oid = c.relnamespace WHERE n.nspname = %(s)s) AND NOT EXISTS (SELECT 1 FROM "
    "pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(s)s) "
    "AND NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON "
    "n.oid = t.typnamespace WHERE n.nspname = %(s)s) AS empty"
)


_RELATIONS = """
SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
       pg_get_userbyid(c.relowner) AS owner, c.relpersistence::text AS persistence,
       coalesce(c.reloptions, '{}')::text[] || coalesce(ARRAY(
         SELECT 'toast.' || o FROM pg_class tc, unnest(tc.reloptions) o
         WHERE tc.oid = c.reltoastrelid), '{}') AS options,
       coalesce(c.relacl, acldefault('r', c.relowner))::text[] AS acl,
       ds.description AS comment,
       c.relrowsecurity AS rls_enabled, c.relforcerowsecurity AS rls_forced,
       c.relispartition AS is_partition,
       coalesce((SELECT array_agg(pn.nspname || '.' || p.relname ORDER BY i.inhseqno)
                 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                 JOIN pg_namespace pn ON pn.oid = p.relnamespace
                 WHERE i.inhrelid = c.oid), '{}') AS inherits,
       (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid)::int AS child_count,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key,
       CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END
         AS partition_bound,
       greatest(c.reltuples, 0)::bigint AS row_estimate,
       CASE WHEN c.relkind IN ('r','p','m','S') THEN pg_total_relation_size(c.oid) ELSE 0 END
         AS total_bytes,
       c.relreplident::text AS replica_identity, c.relispopulated AS populated,
       CASE WHEN c.relkind IN ('v','m') THEN pg_get_viewdef(c.oid) END AS view_definition,
       ARRAY(SELECT pg_get_statisticsobjdef(st.oid) FROM pg_statistic_ext st
             WHERE st.stxrelid = c.oid ORDER BY st.stxname) AS statistics,
       ARRAY(SELECT p.pubname FROM pg_publication p
             WHERE EXISTS (SELECT 1 FROM pg_publication_rel pr
                           WHERE pr.prpubid = p.oid AND pr.prrelid = c.oid)
                OR EXISTS (SELECT 1 FROM pg_publication_namespace pn
                           WHERE pn.pnpubid = p.oid AND pn.pnnspid = c.relnamespace)
             ORDER BY p.pubname) AS publications,
       ARRAY(SELECT p.pubname FROM pg_publication p
             JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid
             WHERE pn.pnnspid = c.relnamespace AND NOT EXISTS (
                 SELECT 1 FROM pg_publication_rel pr
                 WHERE pr.prpubid = p.oid AND pr.prrelid = c.oid)
             ORDER BY p.pubname) AS schema_publications
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_description ds ON ds.objoid = c.oid
  AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = 0
WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('r','p','v','m','f')
"""

_COLUMNS = """
SELECT a.attrelid::bigint AS oid, a.attname AS name, a.attnum AS attnum,
       format_type(a.atttypid, a.atttypmod) AS type, tn.nspname AS type_schema,
       t.typtype::text AS type_kind, a.attnotnull AS not_null,
       pg_get_expr(d.adbin, d.adrelid) AS default,
       a.attidentity::text AS identity, a.attgenerated::text AS generated,
       CASE WHEN a.attcollation <> t.typcollation THEN co.collname END AS collation,
       ds.description AS comment,
       coalesce(a.attacl::text[], '{}') AS acl,
       nullif(a.attstattarget::int, -1) AS stats_target,
       CASE WHEN a.attstorage <> t.typstorage THEN a.attstorage::text END AS storage,
       nullif(a.attcompression::text, '') AS compression
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_description ds ON ds.objoid = a.attrelid
  AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = a.attnum
WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('r','p','v','m','f')
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

# Both ends: constraints of tables in the schemas, and foreign keys from anywhere into them.
# Comments come by join, not obj_description() per row (half this query's time at 12k rows);
# PostgreSQL 18's NOT NULL constraints ('n') are listed without a definition (nothing reads it:
# columns carry not_null), which saves deparsing thousands of them.
_CONSTRAINTS = """
SELECT co.conrelid::bigint AS oid, co.conname AS name, co.contype::text AS kind,
       CASE WHEN co.contype <> 'n' THEN pg_get_constraintdef(co.oid) END AS definition,
       coalesce((SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(co.conkey)
                 WITH ORDINALITY k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.attnum),
                '{}') AS columns,
       co.convalidated AS validated, co.condeferrable AS deferrable,
       co.condeferred AS deferred,
       CASE WHEN co.contype IN ('p','u','x') THEN ic.relname END AS index,
       n.nspname AS schema, c.relname AS table_name,
       rn.nspname AS ref_schema, r.relname AS ref_table,
       coalesce((SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(co.confkey)
                 WITH ORDINALITY k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = k.attnum),
                '{}') AS ref_columns,
       co.confupdtype::text AS on_update, co.confdeltype::text AS on_delete,
       co.confmatchtype::text AS match,
       co.conparentid <> 0 AS cloned, co.conparentid <> 0 OR NOT co.conislocal AS inherited,
       ds.description AS comment,
       CASE WHEN co.contype = 'f' THEN EXISTS (
           SELECT 1 FROM pg_index i WHERE i.indrelid = co.conrelid
             AND (i.indkey::int2[])[0:cardinality(co.conkey) - 1] @> co.conkey
             AND (i.indkey::int2[])[0:cardinality(co.conkey) - 1] <@ co.conkey)
       ELSE false END AS columns_indexed
FROM pg_constraint co
JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_class r ON r.oid = co.confrelid
LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
LEFT JOIN pg_class ic ON ic.oid = co.conindid
LEFT JOIN pg_description ds ON ds.objoid = co.oid
  AND ds.classoid = 'pg_constraint'::regclass AND ds.objsubid = 0
WHERE co.conrelid <> 0
  AND (n.nspname = ANY(%(schemas)s) OR rn.nspname = ANY(%(schemas)s))
ORDER BY co.conrelid, co.conname
"""

_INDEXES = """
SELECT i.indrelid::bigint AS oid, ic.relname AS name, pg_get_indexdef(i.indexrelid) AS definition,
       i.indisunique AS unique, i.indisprimary AS primary, i.indisvalid AS valid,
       (SELECT co.conname FROM pg_constraint co WHERE co.conindid = i.indexrelid
          AND co.conrelid = i.indrelid AND co.contype IN ('p','u','x')) AS constraint,
       coalesce((SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(i.indkey::int2[])
                 WITH ORDINALITY k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE k.ord <= i.indnkeyatts),
                '{}') AS columns,
       i.indexprs IS NOT NULL AS expressions, i.indpred IS NOT NULL AS partial,
       i.indisclustered AS clustered, i.indisreplident AS replident,
       EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid) AS inherited,
       ds.description AS comment
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class ic ON ic.oid = i.indexrelid
LEFT JOIN pg_description ds ON ds.objoid = i.indexrelid
  AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = 0
WHERE n.nspname = ANY(%(schemas)s)
ORDER BY i.indrelid, ic.relname
"""

_TRIGGERS = """
SELECT t.tgrelid::bigint AS oid, t.tgname AS name, pg_get_triggerdef(t.oid) AS definition,
       t.tgenabled::text AS enabled, p.proname AS function, t.tgparentid <> 0 AS cloned
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
WHERE n.nspname = ANY(%(schemas)s) AND NOT t.tgisinternal
ORDER BY t.tgrelid, t.tgname
"""

_POLICIES = """
SELECT p.polrelid::bigint AS oid, p.polname AS name, p.polcmd::text AS command,
       p.polpermissive AS permissive,
       coalesce((SELECT array_agg(CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r) END
                                  ORDER BY 1)
                 FROM unnest(p.polroles) r), '{}') AS roles,
       pg_get_expr(p.polqual, p.polrelid) AS using,
       pg_get_expr(p.polwithcheck, p.polrelid) AS check
FROM pg_policy p
JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%(schemas)s)
ORDER BY p.polrelid, p.polname
"""

_SEQUENCES = """
SELECT n.nspname AS schema, c.relname AS name, format_type(s.seqtypid, NULL) AS data_type,
       s.seqstart AS start, s.seqincrement AS increment, s.seqmin AS min_value,
       s.seqmax AS max_value, s.seqcache AS cache, s.seqcycle AS cycle,
       tn.nspname AS owner_schema, t.relname AS owner_table, a.attname AS owner_column,
       coalesce(d.deptype = 'i', false) AS identity,
       coalesce(c.relacl, acldefault('s', c.relowner))::text[] AS acl,
       pg_get_userbyid(c.relowner) AS owner
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
     AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
LEFT JOIN pg_class t ON t.oid = d.refobjid
LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE n.nspname = ANY(%(schemas)s) OR tn.nspname = ANY(%(schemas)s)
"""

# Views and rules bind to tables by OID: find every rewrite rule (a view's _RETURN rule or a
# user rule) in any schema that reads a table of the schemas.
_DEPENDENTS = """
SELECT DISTINCT vn.nspname AS schema,
       CASE WHEN rw.rulename = '_RETURN' THEN v.relname ELSE rw.rulename END AS name,
       CASE WHEN rw.rulename = '_RETURN' THEN v.relkind::text ELSE 'rule' END AS kind,
       tn.nspname AS on_schema, t.relname AS on_table,
       CASE WHEN rw.rulename = '_RETURN' THEN pg_get_viewdef(v.oid)
            ELSE pg_get_ruledef(rw.oid) END AS definition,
       coalesce(v.reloptions, '{}')::text[] AS options
FROM pg_depend d
JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
JOIN pg_class v ON v.oid = rw.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_class t ON d.refclassid = 'pg_class'::regclass AND t.oid = d.refobjid
JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE tn.nspname = ANY(%(schemas)s) AND t.oid <> v.oid AND t.relkind IN ('r','p','v','m')
"""


_DEFAULT_ACL = """
SELECT coalesce(n.nspname, '') AS schema,
       array_agg(DISTINCT CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee) END)
         AS grantees
FROM pg_default_acl d
LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
CROSS JOIN LATERAL aclexplode(d.defaclacl) a
WHERE d.defaclrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)
  AND d.defaclobjtype = 'r'
GROUP BY 1
"""


_Row = dict[str, Any]
# Per-table parts of the catalog, by table OID: "columns", "constraints", "indexes", ...
_Parts = dict[int, dict[str, list[Any]]]


def _fetch(conn: Conn, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one catalog query, counted in QUERY_COUNT; return its rows."""
    global QUERY_COUNT
    QUERY_COUNT += 1
    # These are fixed module constants; parameters carry every value.
    cur = conn.execute(query, params)
    return list(cur.fetchall())


def _column(r: _Row) -> Column:
    """A column record from a _COLUMNS row."""
    return Column(
        name=r["name"],
        attnum=r["attnum"],
        type=r["type"],
        type_schema=r["type_schema"],
        type_kind=r["type_kind"],
        not_null=r["not_null"],
        default=r["default"],
        identity=r["identity"],
        generated=r["generated"],
        collation=r["collation"],
        comment=r["comment"],
        acl=tuple(r["acl"]),
        stats_target=r["stats_target"],
        storage=r["storage"],
        compression=r["compression"],
    )


def _constraint(r: _Row) -> Constraint:
    """A constraint record (as its table sees it) from a _CONSTRAINTS row."""
    return Constraint(
        name=r["name"],
        kind=r["kind"],
        definition=r["definition"],
        columns=tuple(r["columns"]),
        validated=r["validated"],
        deferrable=r["deferrable"],
        deferred=r["deferred"],
        index=r["index"],
        ref_schema=r["ref_schema"],
        ref_table=r["ref_table"],
        ref_columns=tuple(r["ref_columns"]),
        on_update=r["on_update"],
        on_delete=r["on_delete"],
        comment=r["comment"],
        inherited=r["inherited"],
    )


def _foreign_key(r: _Row) -> ForeignKey:
    """A foreign key with both ends named, from a _CONSTRAINTS row of kind 'f'."""
    return ForeignKey(
        name=r["name"],
        schema=r["schema"],
        table=r["table_name"],
        columns=tuple(r["columns"]),
        ref_schema=r["ref_schema"],
        ref_table=r["ref_table"],
        ref_columns=tuple(r["ref_columns"]),
        definition=r["definition"],
        validated=r["validated"],
        columns_indexed=r["columns_indexed"],
        on_update=r["on_update"],
        on_delete=r["on_delete"],
        match=r["match"],
        deferrable=r["deferrable"],
        deferred=r["deferred"],
        comment=r["comment"],
    )


def _index(r: _Row) -> Index:
    """An index record from an _INDEXES row."""
    return Index(
        name=r["name"],
        definition=r["definition"],
        unique=r["unique"],
        primary=r["primary"],
        valid=r["valid"],
        constraint=r["constraint"],
        columns=tuple(r["columns"]),
        expressions=r["expressions"],
        partial=r["partial"],
        clustered=r["clustered"],
        replident=r["replident"],
        inherited=r["inherited"],
        comment=r["comment"],
    )


def _trigger(r: _Row) -> Trigger:
    """A trigger record from a _TRIGGERS row."""
    return Trigger(
        name=r["name"],
        definition=r["definition"],
        enabled=r["enabled"],
        function=r["function"],
        cloned=r["cloned"],
    )


def _policy(r: _Row) -> Policy:
    """A row-level security policy record from a _POLICIES row."""
    return Policy(
        name=r["name"],
        command=r["command"],
        permissive=r["permissive"],
        roles=tuple(r["roles"]),
        using=r["using"],
        check=r["check"],
    )


def _relation(r: _Row, parts: dict[str, list[Any]]) -> Relation:
    """A relation record from a _RELATIONS row, with its columns, constraints and so on."""
    return Relation(
        oid=r["oid"],
        schema=r["schema"],
        name=r["name"],
        kind=r["kind"],
        owner=r["owner"],
        persistence=r["persistence"],
        options=tuple(r["options"]),
        acl=tuple(r["acl"]),
        comment=r["comment"],
        rls_enabled=r["rls_enabled"],
        rls_forced=r["rls_forced"],
        is_partition=r["is_partition"],
        inherits=tuple(r["inherits"]),
        row_estimate=r["row_estimate"],
        total_bytes=r["total_bytes"],
        replica_identity=r["replica_identity"],
        view_definition=r["view_definition"],
        populated=r["populated"],
        statistics=tuple(r["statistics"]),
        publications=tuple(r["publications"]),
        schema_publications=tuple(r["schema_publications"]),
        partition_key=r["partition_key"],
        partition_bound=r["partition_bound"],
        child_count=r["child_count"],
        columns=tuple(parts.get("columns", ())),
        constraints=tuple(parts.get("constraints", ())),
        indexes=tuple(parts.get("indexes", ())),
        triggers=tuple(parts.get("triggers", ())),
        policies=tuple(parts.get("policies", ())),
    )


def _sequence(r: _Row) -> Sequence:
    """A sequence record from a _SEQUENCES row."""
    return Sequence(
        schema=r["schema"],
        name=r["name"],
        data_type=r["data_type"],
        start=r["start"],
        increment=r["increment"],
        min_value=r["min_value"],
        max_value=r["max_value"],
        cache=r["cache"],
        cycle=r["cycle"],
        owner_schema=r["owner_schema"],
        owner_table=r["owner_table"],
        owner_column=r["owner_column"],
        identity=r["identity"],
        acl=tuple(r["acl"]),
        owner=r["owner"],
    )


def _dependent(r: _Row) -> Dependent:
    """A view, materialized view or rule record from a _DEPENDENTS row."""
    return Dependent(
        schema=r["schema"],
        name=r["name"],
        kind=r["kind"],
        on_schema=r["on_schema"],
        on_table=r["on_table"],
        definition=r["definition"],
        options=tuple(r["options"]),
    )


def _constraint_parts(
    by_oid: _Parts, cons: list[_Row], schemas: tuple[str, ...]
) -> list[ForeignKey]:
    """File constraints of tables in `schemas` under their table; return every foreign key.

    _CONSTRAINTS reads both ends, so a foreign key from another schema into these is a
    ForeignKey but no table's constraint here.
    """
    fks: list[ForeignKey] = []
    for r in cons:
        if r["cloned"]:
            # A partition's copy of its parent's constraint (or a key's copy per referenced
            # partition): derived by PostgreSQL from the parent's, named and validated as it
            # pleases (15 leaves a validated key's copies NOT VALID), and never ours to move.
            continue
        c = _constraint(r)
        if r["schema"] in schemas:
            by_oid[r["oid"]]["constraints"].append(c)
        if r["kind"] == "f":
            fks.append(_foreign_key(r))
    return fks


def _relations(rels: list[_Row], by_oid: _Parts) -> dict[tuple[str, str], Relation]:
    """Each relation by (schema, name), carrying the parts filed under its OID."""
    relations: dict[tuple[str, str], Relation] = {}
    for r in rels:
        relations[(r["schema"], r["name"])] = _relation(r, by_oid.get(r["oid"], {}))
    return relations


def read_catalog(conn: Conn, schemas: list[str] | tuple[str, ...]) -> Catalog:
    """Read everything about the given schemas in a fixed number of queries (ten)."""
    before = QUERY_COUNT
    schemas = tuple(dict.fromkeys(schemas))
    params = {"schemas": list(schemas)}
    existing = {r["nspname"] for r in _fetch(conn, "SELECT nspname FROM pg_namespace", {})}
    rels = _fetch(conn, _RELATIONS, params)
    cols = _fetch(conn, _COLUMNS, params)
    cons = _fetch(conn, _CONSTRAINTS, params)
    idxs = _fetch(conn, _INDEXES, params)
    trgs = _fetch(conn, _TRIGGERS, params)
    pols = _fetch(conn, _POLICIES, params)
    seqs = _fetch(conn, _SEQUENCES, params)
    deps = _fetch(conn, _DEPENDENTS, params)
    defaults = _fetch(conn, _DEFAULT_ACL, {})

    by_oid: _Parts = defaultdict(lambda: defaultdict(list))
    for r in cols:
        by_oid[r["oid"]]["columns"].append(_column(r))
    fks = _constraint_parts(by_oid, cons, schemas)
    for r in idxs:
        by_oid[r["oid"]]["indexes"].append(_index(r))
    for r in trgs:
        by_oid[r["oid"]]["triggers"].append(_trigger(r))
    for r in pols:
        by_oid[r["oid"]]["policies"].append(_policy(r))
    return Catalog(
        schemas=schemas,
        existing_schemas=frozenset(existing),
        relations=_relations(rels, by_oid),
        foreign_keys=tuple(fks),
        sequences={(r["schema"], r["name"]): _sequence(r) for r in seqs},
        dependents=tuple(_dependent(r) for r in deps),
        default_grantees={r["schema"]: tuple(r["grantees"]) for r in defaults},
        server_version=int(conn.info.server_version),
        queries=QUERY_COUNT - before,
    )


def snapshot(conn: Conn, schemas: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A comparable picture of the schemas, by name and never by OID (invariant 4).

    _Row estimates and sizes are left out: they describe data, not the schema.
    """
    cat = read_catalog(conn, schemas)
    out: dict[str, Any] = {"relations": {}, "sequences": {}, "dependents": []}
    for key, rel in sorted(cat.relations.items()):
        out["relations"][".".join(key)] = {
            "kind": rel.kind,
            "owner": rel.owner,
            "persistence": rel.persistence,
            "options": rel.options,
            "acl": sorted(rel.acl),
            "comment": rel.comment,
            "rls": (rel.rls_enabled, rel.rls_forced),
            "view": rel.view_definition,
            "replica_identity": rel.replica_identity,
            "statistics": rel.statistics,
            "publications": rel.publications,
            "partitioning": (rel.partition_key, rel.partition_bound, rel.inherits),
            "columns": [
                (
                    c.name,
                    c.attnum,
                    c.type,
                    c.not_null,
                    c.default,
                    c.identity,
                    c.generated,
                    c.collation,
                    c.comment,
                    sorted(c.acl),
                    c.stats_target,
                    c.storage,
                    c.compression,
                )
                for c in rel.columns
            ],
            "constraints": sorted(
                (c.name, c.kind, c.definition, c.validated, c.deferrable, c.deferred, c.comment)
                for c in rel.constraints
            ),
            "indexes": sorted(
                (i.name, i.definition, i.valid, i.clustered, i.replident, i.comment)
                for i in rel.indexes
            ),
            "triggers": sorted((t.name, t.definition, t.enabled) for t in rel.triggers),
            "policies": sorted(
                (p.name, p.command, p.permissive, p.roles, p.using, p.check) for p in rel.policies
            ),
        }
    for key, seq in sorted(cat.sequences.items()):
        out["sequences"][".".join(key)] = {
            "definition": (
                seq.data_type,
                seq.start,
                seq.increment,
                seq.min_value,
                seq.max_value,
                seq.cache,
                seq.cycle,
            ),
            "owned_by": (seq.owner_schema, seq.owner_table, seq.owner_column),
            "acl": sorted(seq.acl),
            "owner": seq.owner,
        }
    out["dependents"] = sorted({(d.schema, d.name, d.kind, d.definition) for d in cat.dependents})
    out["schemas"] = sorted(s for s in cat.existing_schemas if s in schemas)
    return out

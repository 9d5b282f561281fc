"""One table's move, resolved against the catalog: names, key, column mapping, our objects."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from psycopg import sql

from orchestrator.errors import StageError
from orchestrator.model.catalog import Relation
from orchestrator.plan import Options, Plan, TableSpec
from orchestrator.sql.compose import catalog_sql, expression


@dataclass(frozen=True)
class ColumnMove:
    source: str
    target: str
    type: str  # the target column's type, as format_type prints it
    up: str | None  # plan expression over source columns, or None for a plain copy
    down: str | None  # plan expression over target columns
    generated: bool
    identity: str

    def up_sql(self, alias: str) -> sql.Composable:
        """The target value, computed from a source row called `alias`."""
        if self.up is None:
            return sql.Identifier(alias, self.source)
        return sql.SQL("({})::{}").format(
            expression(self.up, f"up of {self.source}"), catalog_sql(self.type)
        )

    def down_sql(self, alias: str, source_type: str) -> sql.Composable:
        """The source value, computed from a target row called `alias`."""
        if self.down is None:
            return sql.Identifier(alias, self.target)
        return sql.SQL("({})::{}").format(
            expression(self.down, f"down of {self.source}"), catalog_sql(source_type)
        )


@dataclass(frozen=True)
class Partition:
    """One partition of a partitioned table that moves with it, under the same name."""

    name: str
    parent: str  # its parent's name in the source schema (the table or a sub-partitioned one)
    bound: str  # FOR VALUES ... or DEFAULT, as pg_get_expr prints it
    key: str | None  # PARTITION BY of a sub-partitioned partition, else None (a leaf)

    @property
    def leaf(self) -> bool:
        return self.key is None


@dataclass(frozen=True)
class TableMove:
    plan: str
    control: str
    source_schema: str
    source_name: str
    target_schema: str
    target_name: str
    key_source: tuple[str, ...]
    key_target: tuple[str, ...]
    key_types: tuple[str, ...]
    columns: tuple[ColumnMove, ...]
    source_types: tuple[str, ...]
    options: Options
    strategy: str
    tag: str
    # A partitioned table's partitions, each after its parent; empty for a plain table.
    partitions: tuple[Partition, ...] = ()
    partition_key: str | None = None
    # Set on a per-partition view of the move (`segment`): source, target and retired then
    # name that partition, for the copy's and verify's per-partition SQL.
    part: str | None = None

    @property
    def source(self) -> sql.Identifier:
        return sql.Identifier(self.source_schema, self.part or self.source_name)

    @property
    def target(self) -> sql.Identifier:
        return sql.Identifier(self.target_schema, self.part or self.target_name)

    @property
    def partitioned(self) -> bool:
        return self.partition_key is not None

    def segments(self) -> tuple[TableMove, ...]:
        """What holds rows: the table itself, or each leaf partition of a partitioned one."""
        if not self.partitioned:
            return (self,)
        return tuple(replace(self, part=p.name) for p in self.partitions if p.leaf)

    def partition(self, name: str) -> Partition:
        return next(p for p in self.partitions if p.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        """The names the move takes over in the source schema: the table's and its
        partitions' (each keeps a compatibility view after the swap)."""
        return (self.source_name, *(p.name for p in self.partitions))

    @property
    def retired_schema(self) -> str:
        return retired_schema(self.control)

    @property
    def retired(self) -> sql.Identifier:
        return sql.Identifier(self.retired_schema, self.part or self.source_name)

    def obj(self, kind: str) -> sql.Identifier:
        """One of our objects in the control schema: log_, rlog_, cap_, rcap_, trunc_, rtrunc_."""
        return sql.Identifier(self.control, f"{kind}_{self.tag}")

    def obj_name(self, kind: str) -> str:
        return f"{kind}_{self.tag}"

    @property
    def rename_map(self) -> dict[str, str]:
        return {c.source: c.target for c in self.columns if c.source != c.target}

    @property
    def copied(self) -> tuple[ColumnMove, ...]:
        """Columns written by copy and replay (generated columns compute themselves)."""
        return tuple(c for c in self.columns if not c.generated)

    @property
    def overriding(self) -> sql.Composable:
        always = any(c.identity == "a" for c in self.copied)
        return sql.SQL(" OVERRIDING SYSTEM VALUE") if always else sql.SQL("")

    @property
    def label(self) -> str:
        return self.source_name


def key_columns(rel: Relation, spec: TableSpec) -> tuple[str, ...] | None:
    """The primary key, or the plan's declared key when it is unique and NOT NULL."""
    pk = rel.primary_key
    if pk is not None:
        return pk.columns
    if spec.key:
        cols = tuple(spec.key)
        unique = any(
            i.unique
            and i.valid
            and not i.expressions
            and not i.partial
            and set(i.columns) == set(cols)
            for i in rel.indexes
        )
        not_null = all(c.not_null for c in rel.columns if c.name in cols)
        if unique and not_null and len(cols) == len({c.name for c in rel.columns} & set(cols)):
            return cols
    return None


def retired_schema(control: str) -> str:
    """Where cutover keeps source tables until finalize (see Plan.retired_schema)."""
    return control[:55] + "_retired"


def object_tag(plan: str, schema: str, table: str) -> str:
    """A short, stable, identifier-safe tag for our per-table objects."""
    readable = re.sub(r"[^a-z0-9_]", "", table.lower())[:30]
    crc = zlib.crc32(f"{plan}\x00{schema}\x00{table}".encode())
    return f"{readable}_{crc:08x}"


def _partitions(rel: Relation, parts: Sequence[Relation]) -> tuple[Partition, ...]:
    return tuple(
        Partition(
            name=p.name,
            parent=rel.name if p.inherits[0] == f"{rel.schema}.{rel.name}"
            else p.inherits[0].split(".", 1)[1],
            bound=p.partition_bound or "DEFAULT",
            key=p.partition_key,
        )
        for p in parts
    )


def build_move(
    plan: Plan, spec: TableSpec, rel: Relation, parts: Sequence[Relation] = ()
) -> TableMove:
    """Resolve a plan entry against the source table, wherever it is now (in the source
    schema, retired after a cutover, or moved by the rename strategy); `parts` are its
    partitions (Catalog.partitions_of), if it is partitioned."""
    keys = key_columns(rel, spec)
    if keys is None:
        raise StageError(
            f"{rel.schema}.{rel.name}: no primary key or declared unique key",
            hint="run `orchestrator validate PLAN` for the fix",
        )
    columns = []
    for c in rel.columns:
        mapping = spec.columns.get(c.name)
        target = mapping.rename if mapping and mapping.rename else c.name
        ctype = mapping.type if mapping and mapping.type else c.type
        columns.append(
            ColumnMove(
                source=c.name,
                target=target,
                type=ctype,
                up=mapping.up if mapping else None,
                down=mapping.down if mapping else None,
                generated=bool(c.generated),
                identity=c.identity,
            )
        )
    by_source = {c.source: c for c in columns}
    for k in keys:
        if by_source[k].up is not None:
            raise StageError(
                f"{rel.name}.{k}: a key column cannot be computed with up/down",
                hint="map key columns with `rename` only",
            )
    opts = plan.options_for(spec)
    return TableMove(
        plan=plan.name,
        control=plan.control_schema,
        source_schema=plan.source_schema,
        source_name=spec.name,
        target_schema=spec.schema_,
        target_name=spec.target_name,
        key_source=keys,
        key_target=tuple(by_source[k].target for k in keys),
        key_types=tuple(rel.column(k).type for k in keys),
        columns=tuple(columns),
        source_types=tuple(c.type for c in rel.columns),
        options=opts,
        strategy=opts.strategy.value,
        tag=object_tag(plan.name, plan.source_schema, spec.name),
        partitions=_partitions(rel, parts),
        partition_key=rel.partition_key,
    )

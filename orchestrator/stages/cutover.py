"""cutover: one short transaction per unit that swaps the application over to the new tables.

Inside the lock: drain the last log entries, retire each source table out of the way (kept, in
the retired schema), put a security_invoker compatibility view under the old name, hand over
sequences, move user triggers, re-point foreign keys (NOT VALID; validated after the lock is
released), recreate dependent views, and install reverse capture so the retired table keeps
receiving every write until finalize. Rollback is the same swap backwards.

Everything here is computed from the live catalog, so the rollback needs no saved copy of what
the forward step changed: whatever points at the new tables is pointed back.
"""

from __future__ import annotations

from dataclasses import replace

from psycopg import sql

from orchestrator.errors import StageError
from orchestrator.model import partitioning
from orchestrator.model.catalog import Catalog, ForeignKey, Relation
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.plan import Plan
from orchestrator.sql import capture
from orchestrator.sql.acl import grant_statements, revoke_defaults
from orchestrator.sql.compose import idents, rewrite_definition
from orchestrator.stages import matviews, proof, verify
from orchestrator.stages.base import Action, Phase, Stage, Step, regclass
from orchestrator.stages.prepare import resync_access_steps
from orchestrator.state.store import Store

_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
_MATCH = {"f": " MATCH FULL", "p": " MATCH PARTIAL", "s": ""}


def fk_sql(
    child: sql.Identifier,
    fk: ForeignKey,
    columns: tuple[str, ...],
    parent: sql.Identifier,
    ref_columns: tuple[str, ...],
) -> sql.Composed:
    """ADD CONSTRAINT ... FOREIGN KEY ... NOT VALID, keeping the original's every option."""
    defer = ""
    if fk.deferrable:
        defer = " DEFERRABLE INITIALLY DEFERRED" if fk.deferred else " DEFERRABLE"
    tail = (
        f"{_MATCH[fk.match]} ON UPDATE {_ACTIONS[fk.on_update]} "
        f"ON DELETE {_ACTIONS[fk.on_delete]}{defer} NOT VALID"
    )
    return sql.SQL(
        "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({})" + tail
    ).format(child, sql.Identifier(fk.name), idents(columns), parent, idents(ref_columns))


def fk_steps(
    child: sql.Identifier,
    fk: ForeignKey,
    columns: tuple[str, ...],
    parent: sql.Identifier,
    ref_columns: tuple[str, ...],
) -> list[Step]:
    """The key re-added NOT VALID (fk_sql), with its comment."""
    steps = [Step(fk_sql(child, fk, columns, parent, ref_columns))]
    if fk.comment is not None:
        steps.append(Step(sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
            sql.Identifier(fk.name), child, sql.Literal(fk.comment))))
    return steps


def _drop_fk(schema: str, table: str, name: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
        sql.Identifier(schema, table), sql.Identifier(name)
    )


class _Unit:
    """Lookups across the tables of one unit, in either direction."""

    def __init__(self, moves: list[TableMove], cat: Catalog) -> None:
        self.moves = moves
        self.cat = cat
        self.by_source = {(m.source_schema, m.source_name): m for m in moves}
        self.by_target = {(m.target_schema, m.target_name): m for m in moves}
        self.by_retired = {(m.retired_schema, m.source_name): m for m in moves}


def _view_sql(m: TableMove, rel: Relation, defaults: tuple[str, ...] = ()) -> list[Step]:
    types = dict(zip((c.source for c in m.columns), m.source_types, strict=True))
    cols = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(c.down_sql("t", types[c.source]), sql.Identifier(c.source))
        if c.down is not None
        else (
            sql.SQL("{} AS {}").format(sql.Identifier("t", c.target), sql.Identifier(c.source))
            if c.target != c.source
            else sql.Identifier("t", c.source)
        )
        for c in m.columns
    )
    view = m.source  # the table's name, or a partition's on a per-partition view of the move
    steps = [
        Step(
            sql.SQL("CREATE VIEW {} WITH (security_invoker = true) AS SELECT {} FROM {} t").format(
                view, cols, m.target
            ),
            "new view",
        )
    ]
    steps.append(Step(sql.SQL("ALTER VIEW {} OWNER TO {}").format(view, sql.Identifier(rel.owner))))
    if rel.comment is not None:
        steps.append(
            Step(sql.SQL("COMMENT ON VIEW {} IS {}").format(view, sql.Literal(rel.comment)))
        )
    steps += [Step(r) for r in revoke_defaults(view, defaults, rel.owner)]
    steps += [Step(g) for g in grant_statements(rel.acl, view, rel.owner)]
    for c in rel.columns:
        steps += [Step(g) for g in grant_statements(c.acl, view, rel.owner, (c.name,))]
    return steps


def _dependent_views(cat: Catalog, schema: str, name: str) -> list[Step]:
    steps = []
    for d in cat.dependents_of(schema, name):
        if d.kind == "m":
            continue  # rebuilt beside and swapped by name (stages/matviews.py)
        if d.kind != "v":
            raise StageError(
                f"{d.schema}.{d.name} ({d.kind}) reads {schema}.{name} and cannot be recreated",
                hint="drop it before cutover and recreate it afterwards",
            )
        opts: sql.Composable = sql.SQL("")
        if d.options:
            opts = sql.SQL(" WITH ({})").format(
                sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(
                        sql.Identifier(o.split("=", 1)[0]), sql.Literal(o.split("=", 1)[1])
                    )
                    for o in d.options
                )
            )
        # The definition was printed with an empty search_path, so its names are qualified
        # and now resolve to the compatibility view (or, on rollback, to the table again).
        steps.append(
            Step(
                sql.SQL("CREATE OR REPLACE VIEW {}{} AS {}").format(
                    sql.Identifier(d.schema, d.name),
                    opts,
                    sql.SQL(d.definition.rstrip().rstrip(";")),
                ),
                f"ACCESS EXCLUSIVE on {d.schema}.{d.name}",
            )
        )
    return steps


def _sequence_handover(
    cat: Catalog, src: tuple[str, str], dst: tuple[str, str], cols: dict[str, str]
) -> list[Step]:
    """Give the sequences to the table that becomes live, never reissuing a value."""
    steps = []
    for seq in cat.owned_sequences(*src):
        col = cols.get(seq.owner_column or "", seq.owner_column or "")
        if seq.identity:
            steps.append(
                Step(
                    sql.SQL(
                        "SELECT setval(pg_get_serial_sequence({}, {}), s.last_value, s.is_called) "
                        "FROM {} s"
                    ).format(
                        sql.Literal(regclass(*dst)),
                        sql.Literal(col),
                        sql.Identifier(seq.schema, seq.name),
                    )
                )
            )
        else:
            # An owned sequence lives in its table's schema: detach it, move it, re-attach.
            # Defaults call it by OID, so neither table's nextval() notices.
            seq_id = sql.Identifier(seq.schema, seq.name)
            steps.append(Step(sql.SQL("ALTER SEQUENCE {} OWNED BY NONE").format(seq_id)))
            if seq.schema != dst[0]:
                steps.append(
                    Step(
                        sql.SQL("ALTER SEQUENCE {} SET SCHEMA {}").format(
                            seq_id, sql.Identifier(dst[0])
                        )
                    )
                )
            steps.append(
                Step(
                    sql.SQL("ALTER SEQUENCE {} OWNED BY {}").format(
                        sql.Identifier(dst[0], seq.name), sql.Identifier(*dst, col)
                    )
                )
            )
    return steps


def lock_targets(
    moves: list[TableMove], cat: Catalog, reverse: bool = False
) -> list[tuple[str, str]]:
    """Every relation the swap alters: views that read the live tables, the live tables,
    tables whose foreign keys point at them, and their parents. Locked together, up front, in
    one bounded statement, views first: the application locks a view before the tables under
    it, and taking them in the other order would deadlock with every such statement."""
    views: list[tuple[str, str]] = []
    tables: list[tuple[str, str]] = []
    unit = {
        (x.target_schema, x.target_name) if reverse else (x.source_schema, x.source_name)
        for x in moves
    }
    for m in moves:
        # Materialized views cannot be named in LOCK: the ALTERs that swap them take their
        # ACCESS EXCLUSIVE under the same lock_timeout (nothing reads a table through them).
        views += [(d.schema, d.name) for name in m.names
                  for d in cat.dependents_of(m.source_schema, name) if d.kind != "m"]
        if reverse:
            # The compatibility views (the table's and its partitions').
            views += [(m.source_schema, name) for name in m.names]
        key = (m.target_schema, m.target_name) if reverse else (m.source_schema, m.source_name)
        tables.append(key)
        # The table that takes over: foreign keys are re-pointed at it and capture triggers
        # put on it, which conflict with an autovacuum of it (likely on a table just filled).
        # Locked up front, a vacuum in the way is seen and cancelled before the try, instead
        # of holding the swap, with every lock it already took, past lock_timeout.
        tables.append((m.retired_schema, m.source_name) if reverse
                      else (m.target_schema, m.target_name))
    for m in moves:
        key = (m.target_schema, m.target_name) if reverse else (m.source_schema, m.source_name)
        for fk in cat.fks_to(*key):
            if (fk.schema, fk.table) not in unit:
                tables.append((fk.schema, fk.table))
        # Dropping and adding a table's own foreign keys touches its parents' triggers too.
        for fk in cat.fks_from(*key):
            if (fk.ref_schema, fk.ref_table) not in unit:
                tables.append((fk.ref_schema, fk.ref_table))
    return list(dict.fromkeys(views + tables))


def lock_relations(moves: list[TableMove], cat: Catalog, reverse: bool = False) -> list[str]:
    """regclass texts of what the swap locks, for naming blockers."""
    return [regclass(*k) for k in lock_targets(moves, cat, reverse)]


def _lock_step(moves: list[TableMove], cat: Catalog, reverse: bool) -> list[Step]:
    """The swap's one LOCK (a partitioned table's partitions are locked with it), then, for
    a partitioned table, the check that its partitions are the ones this swap knows."""
    rels = sql.SQL(", ").join(sql.Identifier(*k) for k in lock_targets(moves, cat, reverse))
    return [Step(
        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(rels),
        "ACCESS EXCLUSIVE on every relation the swap alters; the whole wait is bounded by "
        "lock_timeout, then the try is abandoned and retried",
        bounded=True,
    )] + [
        Step(partitioning.guard_step_sql(
            regclass(m.target_schema, m.target_name) if reverse
            else regclass(m.source_schema, m.source_name),
            [p.name for p in m.partitions]), "none: reads the catalog under our lock")
        for m in moves if m.partitioned
    ]


def _partitions_to(m: TableMove, schema: str, to: str) -> list[Step]:
    """Each partition of the table follows it from `schema` to `to` (SET SCHEMA moves one
    relation, not its partitions)."""
    return [
        Step(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
            sql.Identifier(schema, p.name), sql.Identifier(to)))
        for p in m.partitions
    ]


def _partition_views(m: TableMove, cat: Catalog) -> list[Step]:
    """A compatibility view under each partition's name, over its counterpart."""
    steps: list[Step] = []
    for p in m.partitions:
        rel = cat.table(m.source_schema, p.name)
        assert rel is not None
        steps += _view_sql(replace(m, part=p.name), rel, cat.defaults_for(m.source_schema))
    return steps


def _inbound_fks(m: TableMove, cat: Catalog, u: _Unit) -> tuple[list[Step], list[Step]]:
    """Foreign keys into the source from outside the unit: dropped in the swap, added to the
    target after it (the statements now, and those for later in the transaction)."""
    now: list[Step] = []
    after: list[Step] = []
    for fk in cat.fks_to(m.source_schema, m.source_name):
        if (fk.schema, fk.table) in u.by_source:
            continue
        now.append(
            Step(
                _drop_fk(fk.schema, fk.table, fk.name),
                f"ACCESS EXCLUSIVE on {fk.schema}.{fk.table}",
            )
        )
        after += fk_steps(
            sql.Identifier(fk.schema, fk.table),
            fk,
            fk.columns,
            m.target,
            tuple(m.rename_map.get(c, c) for c in fk.ref_columns),
        )
    return now, after


def _own_fks(m: TableMove, cat: Catalog, u: _Unit) -> tuple[list[Step], list[Step]]:
    """The source's own foreign keys go with it to the target; the retired copy keeps none,
    so reverse replay never waits on a parent row."""
    now: list[Step] = []
    after: list[Step] = []
    for fk in cat.fks_from(m.source_schema, m.source_name):
        now.append(Step(_drop_fk(fk.schema, fk.table, fk.name)))
        parent = u.by_source.get((fk.ref_schema, fk.ref_table))
        if parent is not None:
            ref, refcols = (
                parent.target,
                tuple(parent.rename_map.get(c, c) for c in fk.ref_columns),
            )
        else:
            ref, refcols = sql.Identifier(fk.ref_schema, fk.ref_table), fk.ref_columns
        after += fk_steps(
            m.target, fk, tuple(m.rename_map.get(c, c) for c in fk.columns), ref, refcols
        )
    return now, after


def forward_steps(moves: list[TableMove], cat: Catalog, plan: Plan | None = None) -> list[Step]:
    u = _Unit(moves, cat)
    steps: list[Step] = _lock_step(moves, cat, reverse=False)
    for m in moves:
        steps += [
            Step(s, "drains the last log entries")
            for s in capture.replay_all_sql(capture.forward(m))
        ]
    steps.append(
        Step(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(moves[0].retired_schema)
            )
        )
    )
    later: list[Step] = []
    for m in moves:
        rel = cat.table(m.source_schema, m.source_name)
        assert rel is not None
        steps += [Step(s) for s in capture.drop_triggers_sql(capture.forward(m))]
        now, after = _inbound_fks(m, cat, u)
        steps += now
        later += after
        now, after = _own_fks(m, cat, u)
        steps += now
        later += after
        steps += _sequence_handover(
            cat, (m.source_schema, m.source_name), (m.target_schema, m.target_name), m.rename_map
        )
        for t in rel.user_triggers:
            steps.append(
                Step(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(t.name), m.source))
            )
            later.append(
                Step(rewrite_definition(t.definition, m.target_schema, m.target_name, m.rename_map))
            )
        steps.append(
            Step(
                sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    m.source, sql.Identifier(m.retired_schema)
                ),
                "the source leaves the application's way",
            )
        )
        steps += _partitions_to(m, m.source_schema, m.retired_schema)
    for m in moves:
        rel = cat.table(m.source_schema, m.source_name)
        assert rel is not None
        steps += _view_sql(m, rel, cat.defaults_for(m.source_schema))
        steps += _partition_views(m, cat)
    for m in moves:
        for name in m.names:
            steps += _dependent_views(cat, m.source_schema, name)
        steps += matviews.swap_steps(cat, m)
    steps += later
    for m in moves:
        rel = cat.table(m.source_schema, m.source_name)
        if plan is not None and rel is not None:
            steps += resync_access_steps(m, rel, cat.table(m.target_schema, m.target_name), plan)
    for m in moves:
        steps += [
            Step(s, "reverse capture on the new table")
            for s in capture.install_sql(capture.reverse(m))
        ]
    return steps


NOT_VALID_KEY = "not_valid_fks"


def not_valid_fks(moves: list[TableMove], cat: Catalog) -> dict[str, list[str]]:
    """Per moved table, the foreign keys into or out of it that are NOT VALID before the swap:
    the user's own (a rollback validates every key we added before anything else runs), which
    the swap re-adds NOT VALID and nobody validates, in either direction."""
    out: dict[str, list[str]] = {}
    for m in moves:
        key = (m.source_schema, m.source_name)
        out[m.label] = sorted({fk.name for fk in cat.fks_to(*key) + cat.fks_from(*key)
                               if not fk.validated})
    return out


def validate_steps(
    moves: list[TableMove], cat: Catalog, reverse: bool = False,
    keep: dict[str, list[str]] | None = None,
) -> list[Step]:
    """VALIDATE the NOT VALID keys the swap added (SHARE UPDATE EXCLUSIVE: writes go on); the
    keys in `keep` were NOT VALID before the move and stay so."""
    steps: list[Step] = []
    seen: set[tuple[str, str, str]] = set()
    for m in moves:
        key = (m.source_schema, m.source_name) if reverse else (m.target_schema, m.target_name)
        kept = set((keep or {}).get(m.label, ()))
        for fk in cat.fks_to(*key) + cat.fks_from(*key):
            if fk.name in kept:
                continue
            if not fk.validated and (fk.schema, fk.table, fk.name) not in seen:
                seen.add((fk.schema, fk.table, fk.name))
                steps.append(
                    Step(
                        sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                            sql.Identifier(fk.schema, fk.table), sql.Identifier(fk.name)
                        ),
                        "SHARE UPDATE EXCLUSIVE (reads and writes continue)",
                    )
                )
    return steps


def _fks_back(
    m: TableMove, cat: Catalog, u: _Unit, back: dict[str, str]
) -> tuple[list[Step], list[Step]]:
    """Foreign keys into and out of the target go back to the source table (the statements
    now, and those for later in the transaction)."""
    now: list[Step] = []
    after: list[Step] = []
    for fk in cat.fks_to(m.target_schema, m.target_name):
        if (fk.schema, fk.table) in u.by_target:
            continue
        now.append(Step(_drop_fk(fk.schema, fk.table, fk.name)))
        after += fk_steps(
            sql.Identifier(fk.schema, fk.table),
            fk,
            fk.columns,
            m.source,
            tuple(back.get(c, c) for c in fk.ref_columns),
        )
    for fk in cat.fks_from(m.target_schema, m.target_name):
        now.append(Step(_drop_fk(fk.schema, fk.table, fk.name)))
        parent = u.by_target.get((fk.ref_schema, fk.ref_table))
        if parent is not None:
            pback = {v: k for k, v in parent.rename_map.items()}
            ref, refcols = parent.source, tuple(pback.get(c, c) for c in fk.ref_columns)
        else:
            ref, refcols = sql.Identifier(fk.ref_schema, fk.ref_table), fk.ref_columns
        after += fk_steps(m.source, fk, tuple(back.get(c, c) for c in fk.columns), ref, refcols)
    return now, after


def _aside(m: TableMove) -> list[tuple[str, str]]:
    """Each compatibility view's name, and the name it steps aside to during a rollback."""
    return [(name, f"_orch_old_{m.tag}" + (f"_{i}" if i else ""))
            for i, name in enumerate(m.names)]


def rollback_steps(moves: list[TableMove], cat: Catalog) -> list[Step]:
    """The swap backwards: the retired tables come back under their names, with every row."""
    u = _Unit(moves, cat)
    steps: list[Step] = _lock_step(moves, cat, reverse=True)
    for m in moves:
        steps += [
            Step(s, "drains the last reverse-log entries")
            for s in capture.replay_all_sql(capture.reverse(m))
        ]
    later: list[Step] = []
    for m in moves:
        tgt = cat.table(m.target_schema, m.target_name)
        assert tgt is not None
        back = {v: k for k, v in m.rename_map.items()}
        steps += [Step(s) for s in capture.uninstall_sql(capture.reverse(m))]
        now, after = _fks_back(m, cat, u, back)
        steps += now
        later += after
        for t in tgt.user_triggers:
            steps.append(
                Step(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(t.name), m.target))
            )
            later.append(
                Step(rewrite_definition(t.definition, m.source_schema, m.source_name, back))
            )
        # The compatibility views step aside so the tables can take their names back;
        # dependent views are rebound before the views are dropped.
        steps += [
            Step(sql.SQL("ALTER VIEW {} RENAME TO {}").format(
                sql.Identifier(m.source_schema, name), sql.Identifier(aside)))
            for name, aside in _aside(m)
        ]
        steps.append(
            Step(
                sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    m.retired, sql.Identifier(m.source_schema)
                )
            )
        )
        steps += _partitions_to(m, m.retired_schema, m.source_schema)
        steps += _sequence_handover(
            cat, (m.target_schema, m.target_name), (m.source_schema, m.source_name), back
        )
    for m in moves:
        # Views reading the compatibility views, printed as reading public.<name>: rebound
        # to the tables that take the names back.
        for name in m.names:
            steps += _dependent_views(cat, m.source_schema, name)
    for m in moves:
        steps += [
            Step(sql.SQL("DROP VIEW {}").format(sql.Identifier(m.source_schema, aside)))
            for _, aside in _aside(m)
        ]
    steps += later
    for m in moves:
        steps += [
            Step(s, "forward capture resumes")
            for s in capture.create_triggers_sql(capture.forward(m))
        ]
    return steps


class Cutover(Stage):
    """The swap of a whole unit in one short transaction; backwards, the same swap reversed."""

    name = "cutover"
    short = "swap"
    phase = Phase.swap
    per_unit = True
    follow_up = True
    note = (
        "rollback is the same swap backwards under the same lock discipline: drain the "
        "reverse log, move the retired table back, re-point foreign keys and triggers, drop "
        "the compatibility view; its exact SQL is computed from the catalog once the swap has "
        "happened"
    )

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        kept = not_valid_fks(moves, ctx.catalog)
        views = {m.label: matviews.swapped(ctx.catalog, m) for m in moves}

        def record(store: Store) -> None:
            # With the swap: which keys stay NOT VALID after it, and after its rollback; which
            # materialized views its rollback swaps back.
            for label, names in kept.items():
                store.save(label, NOT_VALID_KEY, names)
            for label, swapped in views.items():
                store.save(label, matviews.SAVED_KEY, swapped)

        return Action(
            self.name,
            forward_steps(moves, ctx.catalog, ctx.plan),
            lock_relations(moves, ctx.catalog),
            record,
        )

    def backward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        back = [
            step for m in moves
            for step in matviews.swap_back_steps(m, ctx.store.load(m.label, matviews.SAVED_KEY)
                                                 or [])
        ]
        return Action(
            "rollback_cutover",
            rollback_steps(moves, ctx.catalog) + back,
            lock_relations(moves, ctx.catalog, reverse=True),
        )

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        rebuild = [s for m in moves for s in matviews.rebuild_steps(ctx.catalog, m)]
        return rebuild + forward_steps(moves, ctx.catalog, ctx.plan), []

    def prelude(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> Action | None:
        rebuild = [] if reverse else [
            s for m in moves for s in matviews.rebuild_steps(ctx.catalog, m)
        ]
        return Action("rebuild_matviews", rebuild) if rebuild else None

    def before(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        if reverse:
            self.between_tries(ctx, moves, reverse=True)
            return
        # Bring the proof up to date just before the swap (only the chunks changed since the
        # last full pass, while it is recent), and leave only a short tail for the lock.
        for m in moves:
            proof.before_swap(ctx, m)
            verify.drain(ctx, m, until=1000)

    def between_tries(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        for m in moves:
            if reverse:
                capture.drain(ctx.conn, capture.reverse(m))
            else:
                verify.drain(ctx, m, until=1000)

    def after(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> list[Step]:
        keep = {m.label: list(ctx.store.load(m.label, NOT_VALID_KEY) or []) for m in moves}
        return validate_steps(moves, ctx.catalog, reverse, keep)


CUTOVER = Cutover()

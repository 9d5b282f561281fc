"""The remote strategy's swap and its end: cutover to the other server with the way back kept
open by reverse replication, its rollback, and finalize (docs/cross-server.md).

While the reverse direction runs, the table has one name on both servers, the plan's retired
schema (`transit`): the target table, and the source's retired table that the reverse
subscription keeps equal. The target's final name is a view over it until finalize, which
moves the table there; the source reaches it through a postgres_fdw foreign table in the
target schema's name, and the old name is a view over that.

Ordering across the two servers (no two-phase commit): the forward swap commits the target's
part first, inside the source's locked transaction, and undoes it if the source's part then
fails; a crash between the two is found and undone by the next try (`_resume`). Nothing is
lost meanwhile: the forward slot keeps every change the target has not confirmed.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.errors import StageError
from orchestrator.model.catalog import ForeignKey, Relation
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.remote import ddl, link
from orchestrator.remote import replication as rep
from orchestrator.stages.base import Action, GiveWay, Phase, Stage, Step, regclass, remember
from orchestrator.stages.remote_sync import (
    drop_forward,
    drop_transit_if_empty,
    exists,
    source_rel,
)
from orchestrator.state.store import Store

DRAIN_S = 0.05  # inside the lock: the least wait for the other server to apply everything
CATCH_UP_S = 300.0  # outside it: how long the other server may take to catch up
REVERSE_FROM = "remote_reverse_from"  # the target's LSN the way back starts from
SWAP_MS = "remote_swap_ms"  # the last swap's time under the lock: drain, target, source
FKS = "remote_fks"


def _refuse_writes(ctx: Ctx, m: TableMove, view: sql.Identifier) -> list[ddl.Statement]:
    """With `application: target`, the old name reads but refuses writes, naming the new
    home (an INSTEAD OF trigger; it goes with the view)."""
    fn = sql.Identifier(ctx.control, "refuse_moved_write")
    server = link.server_of(ctx.plan, m)
    message = (f"{m.source_schema}.{m.source_name} moved to {m.target_schema}."
               f"{m.target_name} on server {server}: write to it there")
    return [
        sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $f$ "
                "BEGIN RAISE EXCEPTION '%', TG_ARGV[0] "
                "USING ERRCODE = 'read_only_sql_transaction'; END $f$").format(fn),
        sql.SQL("CREATE TRIGGER _orch_refuse_write INSTEAD OF INSERT OR UPDATE OR DELETE ON {} "
                "FOR EACH ROW EXECUTE FUNCTION {}({})").format(view, fn, sql.Literal(message)),
    ]


def _seq_values(conn: Conn, names: list[sql.Identifier]) -> list[tuple[int, bool]]:
    out = []
    for n in names:
        r = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(n)).fetchone()
        assert r is not None
        out.append((int(r["last_value"]), bool(r["is_called"])))
    return out


def _setval(conn: Conn, seq: sql.Identifier, value: tuple[int, bool]) -> None:
    conn.execute("SELECT setval(%s::regclass, %s, %s)",
                 (seq.as_string(conn), value[0], value[1]))


def _last(value: tuple[int, bool], step: int) -> int:
    """The last value a sequence handed out (or the one before its first)."""
    return value[0] if value[1] else value[0] - step


def _interleave(conn: Conn, seq: sql.Identifier, inc: int, last: int, first: int) -> None:
    """Two generators of one key space after cutover, the source's compatibility relation's
    and the target's own: each steps by twice the increment, from `last` + `first` * inc."""
    conn.execute(sql.SQL("ALTER SEQUENCE {} INCREMENT BY {}").format(seq, sql.Literal(2 * inc)))
    _setval(conn, seq, (last + first * inc, False))


class RemoteCutover(Stage):
    """Switch the application to the other server under the source table's lock, once the
    target applied everything; the way back replicates from the target from then on."""

    name = "cutover"
    short = "cut"
    phase = Phase.swap
    follow_up = True
    note = ("locks the source table (bounded, retried), waits until the target applied up to "
            "the source's current LSN, carries sequences, starts the reverse replication and "
            "leaves the old name as a view over a postgres_fdw foreign table")

    # --- forward -------------------------------------------------------------------------

    def before(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        m = moves[0]
        n = link.names(ctx.plan, m)
        with link.target(ctx, m) as tgt:
            if reverse:
                _start_way_back(ctx, m, n, tgt)  # if the cutover was cut short before it
                _prepare_way_back(ctx, m, tgt)
            else:
                _resume(ctx, m, tgt)
                _way_back_ready(ctx, m, n, tgt)
        link.warm(ctx, m)  # the swap's session on the target, opened before the lock
        self.between_tries(ctx, moves, reverse=reverse)

    def between_tries(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        """Outside the lock, let the other server catch up, so that the drain under the lock
        has only the last moments' changes to wait for."""
        m = moves[0]
        n = link.names(ctx.plan, m)
        if not reverse:
            _catch_up(ctx, m, ctx.conn, n.forward, "the target")
            with link.target(ctx, m) as tgt:
                if rep.slot_exists(tgt, n.reverse):
                    rep.advance(tgt, n.reverse)
            return
        with link.target(ctx, m) as tgt:
            # Once an earlier try committed the target's part (the table back under the
            # source's name), the reverse stream has nothing more to bring.
            if rep.slot_exists(tgt, n.reverse) and exists(
                    tgt, n.transit_schema, m.source_name, "r"):
                _catch_up(ctx, m, tgt, n.reverse, "the source")

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        rel = source_rel(ctx, m)
        table = sql.Identifier(m.source_schema, m.source_name)
        lock = Step(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table),
                    "ACCESS EXCLUSIVE on the source table until commit", bounded=True)
        return Action(self.name, [lock], [regclass(m.source_schema, m.source_name)],
                      record=_remember(ctx, m),
                      inside=functools.partial(_swap, ctx, m, rel, itertools.count(1)))

    def after(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> list[Step]:
        """Once committed: the forward direction (or, back, the reverse one) is dropped; the
        other direction is running."""
        m = moves[0]
        n = link.names(ctx.plan, m)
        with link.target(ctx, m) as tgt:
            if reverse:
                rep.ensure_subscription(tgt, n.forward, link.source_for_target(ctx, m),
                                        enabled=True, copy_data=False)
                rep.drop_slot(tgt, n.reverse)
            else:
                _start_way_back(ctx, m, n, tgt)
                drop_forward(ctx, m, tgt)
        return []

    # --- backward ------------------------------------------------------------------------

    def backward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        view = sql.Identifier(m.source_schema, m.source_name)
        lock = Step(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(view),
                    "ACCESS EXCLUSIVE on the compatibility view until commit", bounded=True)
        return Action(f"rollback_{self.name}", [lock], [regclass(m.source_schema, m.source_name)],
                      inside=functools.partial(_swap_back, ctx, m, source_rel(ctx, m),
                                               itertools.count(1)))

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        return self.forward(ctx, moves).steps, self.backward(ctx, moves).steps


def _start_way_back(ctx: Ctx, m: TableMove, n: link.Names, tgt: Conn) -> None:
    """After the swap committed: the reverse slot moved to the point the swap saved (the
    target's WAL position right after its part committed: what the forward stream wrote is
    before it, what the application writes through the new names after), then the reverse
    subscription enabled. Idempotent: a slot already past the point is left alone."""
    since = ctx.store.load(m.label, REVERSE_FROM)
    sub = rep.subscription(ctx.conn, n.reverse)
    if since is None or sub is None or sub["enabled"]:
        return
    tgt.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn) FROM pg_replication_slots "
                "WHERE slot_name = %s AND confirmed_flush_lsn < %s::pg_lsn",
                (n.reverse, since, n.reverse, since))
    rep.set_enabled(ctx.conn, n.reverse, True)


def _way_back_ready(ctx: Ctx, m: TableMove, n: link.Names, tgt: Conn) -> None:
    """Before the swap and outside its lock, everything the reverse direction needs that can
    wait: on the target the slot (making one waits for that server's running transactions)
    and the publication of the table (membership is by oid, so the rename under the lock
    keeps it); on the source postgres_fdw, its server and user mapping, and the subscription,
    made disabled and without a copy (it connects now, not under the lock; the swap enables
    it). The slot is moved past everything the target has written (again under the lock,
    once the forward stream is drained): the forward stream's rows never go back."""
    info = link.target_conninfo(ctx.plan, m)
    rep.ensure_slot(tgt, n.reverse)
    rep.ensure_publication(tgt, n.reverse, sql.Identifier(m.source_schema, m.source_name))
    rep.advance(tgt, n.reverse)
    _fdw_server(ctx, m, n, info)
    rep.ensure_subscription(ctx.conn, n.reverse, info, enabled=False, copy_data=False)


def _catch_up(ctx: Ctx, m: TableMove, conn: Conn, slot: str, who: str) -> None:
    """Outside the lock: wait until the other side keeps up, i.e. applies what was written up
    to a moment within a fraction of the swap's drain budget. Catching up once is not enough
    under a steady write load: the lag the drain would then wait for is the apply worker's
    delay at the moment the lock is taken."""
    deadline = time.monotonic() + CATCH_UP_S
    budget = _drain_s(ctx, m)
    while True:
        lsn = rep.current_lsn(conn)
        t0 = time.monotonic()
        if not rep.wait_applied(conn, slot, lsn, max(deadline - t0, 0.0)):
            raise StageError(f"{m.label}: {who} did not apply the changes up to {lsn} within "
                             f"{CATCH_UP_S:.0f} s; nothing was switched",
                             hint=f"check the subscription {slot} (pg_stat_subscription on "
                             "the subscriber, its server log), then rerun")
        if time.monotonic() - t0 <= budget / 2 or time.monotonic() > deadline:
            return


def _drain_s(ctx: Ctx, m: TableMove, attempt: int = 1) -> float:
    """How long the swap waits, holding its lock, for the other server's last changes: one
    try's lock budget (`SwapControls.try_ms`, or lock_timeout without the forecast), at least
    DRAIN_S, and a budget more with each try that gave way (a loaded subscriber), never more
    than lock_timeout. A try that runs out gives way: the application waited at most that."""
    policy = ctx.policy(m)
    one = max(DRAIN_S, policy.try_ms / 1000)
    return min(one * attempt, max(one, policy.lock_timeout_ms / 1000))


def _remember(ctx: Ctx, m: TableMove) -> Callable[[Store], None]:
    keep = remember(ctx, m)  # the target schema's name on the source, if we created it

    def save(store: Store) -> None:
        keep(store)
        rel = source_rel(ctx, m)
        store.save(m.label, FKS, [_fk_text(fk) for fk in ctx.catalog.fks_from(*rel.qualified)])

    return save


def _fk_text(fk: ForeignKey) -> dict[str, object]:
    return {"name": fk.name, "columns": list(fk.columns), "ref_table": fk.ref_table,
            "ref_schema": fk.ref_schema, "ref_columns": list(fk.ref_columns),
            "definition": fk.definition}


def _resume(ctx: Ctx, m: TableMove, tgt: Conn) -> None:
    """A swap killed after the target's part committed and before the source's: put the
    target back as it was before the swap (the forward slot kept every change since)."""
    n = link.names(ctx.plan, m)
    if not exists(tgt, n.transit_schema, m.source_name, "r"):
        return
    with tgt.transaction():
        _target_back(tgt, m, n, keep_publication=True)
    rep.set_enabled(tgt, n.forward, True)


def _target_back(tgt: Conn, m: TableMove, n: link.Names, *,
                 keep_publication: bool = False) -> None:
    """The target as before the swap: the table back under the source's name (an undone
    swap keeps the reverse publication for its next try)."""
    if not keep_publication:
        tgt.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(n.reverse)))
    tgt.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(
        sql.Identifier(m.target_schema, m.target_name)))
    tgt.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
        n.transit(m), sql.Identifier(m.source_schema)))


def _swap(ctx: Ctx, m: TableMove, rel: Relation, tries: Iterator[int]) -> None:
    """Inside the source's locked transaction: drain, the target's part (committed), then the
    source's part (committed with the status by the runner)."""
    conn = ctx.conn
    n = link.names(ctx.plan, m)
    t0 = time.monotonic()
    lsn = rep.current_lsn(conn)
    budget = _drain_s(ctx, m, next(tries))
    if not rep.wait_applied(conn, n.forward, lsn, budget):
        raise GiveWay(f"the target had not applied up to {lsn} after {budget:.2f} s")
    counters = ddl.counters(ctx.catalog, rel)
    values = _seq_values(conn, [sql.Identifier(c.sequence.schema, c.sequence.name)
                                for c in counters])
    tgt = link.warm(ctx, m)
    t1 = time.monotonic()
    with tgt.transaction():
        rep.set_enabled(tgt, n.forward, False)
        for s in [sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(x))
                  for x in (n.transit_schema, m.target_schema)]:
            tgt.execute(s)
        tgt.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
            sql.Identifier(m.source_schema, m.source_name),
            sql.Identifier(n.transit_schema)))
        for c, v in zip(counters, values, strict=True):
            inc = c.sequence.increment
            _interleave(tgt, sql.Identifier(n.transit_schema, c.sequence.name), inc,
                        _last(v, inc), 2)
        tgt.execute(sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
            sql.Identifier(m.target_schema, m.target_name), n.transit(m)))
    # Nothing the target wrote before now goes back (on PostgreSQL 15 there is no origin
    # filter, and the forward stream's rows are in the target's WAL): the reverse slot is
    # moved exactly here once we committed (`after`), and only then the reverse subscription
    # starts. The point is saved with the swap, for an `after` that runs on a rerun.
    since = rep.current_lsn(tgt)
    ctx.store.save(m.label, REVERSE_FROM, since)
    t2 = time.monotonic()
    try:
        _source_part(ctx, m, rel, n, values)
        # Where the time under the lock went (status and the benchmark read it).
        ctx.store.save(m.label, SWAP_MS, {
            "drain": round((t1 - t0) * 1000, 1), "target": round((t2 - t1) * 1000, 1),
            "source": round((time.monotonic() - t2) * 1000, 1)})
    except BaseException:
        with tgt.transaction():
            _target_back(tgt, m, n, keep_publication=True)
        rep.set_enabled(tgt, n.forward, True)
        # No slot waits on the target while nobody tries again (the next try makes it anew).
        rep.drop_slot(tgt, n.reverse)
        raise


def _fdw_server(ctx: Ctx, m: TableMove, n: link.Names, target_info: str) -> None:
    """postgres_fdw on the source and our server and user mapping for the target, each made if
    missing, in a transaction of its own before the swap (not under its lock)."""
    options, user = link.fdw_options(target_info)
    opts = [sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in options.items()]
    uopts = [sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in user.items()]
    with ctx.conn.transaction():
        for s in [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(m.target_schema)),
            # Beside the foreign tables it serves (our sessions run with an empty search_path).
            sql.SQL("CREATE EXTENSION IF NOT EXISTS postgres_fdw WITH SCHEMA {}").format(
                sql.Identifier(m.target_schema)),
            sql.SQL("CREATE SERVER IF NOT EXISTS {} FOREIGN DATA WRAPPER postgres_fdw "
                    "OPTIONS ({})").format(sql.Identifier(n.server), sql.SQL(", ").join(opts)),
            sql.SQL("CREATE USER MAPPING IF NOT EXISTS FOR PUBLIC SERVER {}{}").format(
                sql.Identifier(n.server), sql.SQL(" OPTIONS ({})").format(
                    sql.SQL(", ").join(uopts)) if uopts else sql.SQL("")),
        ]:
            ctx.conn.execute(s)


def _source_part(ctx: Ctx, m: TableMove, rel: Relation, n: link.Names,
                 values: list[tuple[int, bool]]) -> None:
    conn = ctx.conn
    foreign = (m.target_schema, m.target_name)
    statements: list[ddl.Statement] = [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(n.transit_schema)),
        sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
            sql.Identifier(m.source_schema, m.source_name), sql.Identifier(n.transit_schema)),
        # Its table is the retired one now, which the reverse stream writes: not forward.
        sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(n.forward)),
        *ddl.foreign_table(ctx.catalog, rel, foreign, n.server,
                           (n.transit_schema, m.source_name)),
        *ddl.compat_view(rel, sql.Identifier(m.source_schema, m.source_name),
                         sql.Identifier(*foreign)),
    ]
    for s in statements:
        conn.execute(s)
    for c, v in zip(ddl.counters(ctx.catalog, rel), values, strict=True):
        inc = c.sequence.increment
        _setval(conn, ddl.local_sequence(*foreign, c), (_last(v, inc) + inc, False))
    if ctx.plan.schemas[m.target_schema].application == "target":
        for s in _refuse_writes(ctx, m, sql.Identifier(m.source_schema, m.source_name)):
            conn.execute(s)
    # Made before the lock (`_way_back_ready`), enabled once its slot is moved (`after`).


def _prepare_way_back(ctx: Ctx, m: TableMove, tgt: Conn) -> None:
    """Before a cutover's rollback: the forward direction anew, a publication without its
    table yet and a slot, so that every source change from the swap back on is kept (the
    table joins the publication in the swap's transaction)."""
    n = link.names(ctx.plan, m)
    if not rep.publication_exists(ctx.conn, n.forward):  # else made by an earlier try
        rep.drop_subscription(tgt, n.forward)  # leftovers of a cutover killed before its end
        rep.drop_slot(ctx.conn, n.forward)
        rep.ensure_publication(ctx.conn, n.forward, None)
    rep.ensure_slot(ctx.conn, n.forward)


def _swap_back(ctx: Ctx, m: TableMove, rel: Relation, tries: Iterator[int]) -> None:
    """Inside the source's transaction, the compatibility view locked: hold the target's
    writers, drain the reverse stream, then both servers back to their state before cutover
    (the target's part commits first)."""
    conn = ctx.conn
    n = link.names(ctx.plan, m)
    foreign = sql.Identifier(m.target_schema, m.target_name)
    counters = ddl.counters(ctx.catalog, rel)
    tgt = link.warm(ctx, m)
    if exists(tgt, n.transit_schema, m.source_name, "r"):
        with tgt.transaction():
            tgt.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(n.transit(m)))
            lsn = rep.current_lsn(tgt)
            if not rep.wait_applied(tgt, n.reverse, lsn, _drain_s(ctx, m)):
                raise GiveWay(f"the source had not applied up to {lsn} after "
                              f"{_drain_s(ctx, m):.1f} s")
            values = _seq_values(tgt, [sql.Identifier(n.transit_schema, c.sequence.name)
                                       for c in counters])
            for c in counters:  # one generator again
                tgt.execute(sql.SQL("ALTER SEQUENCE {} INCREMENT BY {}").format(
                    sql.Identifier(n.transit_schema, c.sequence.name),
                    sql.Literal(c.sequence.increment)))
            _target_back(tgt, m, n)
    else:  # an earlier try committed the target's part: it was drained then
        values = _seq_values(tgt, [sql.Identifier(m.source_schema, c.sequence.name)
                                   for c in counters])
    local = _seq_values(conn, [ddl.local_sequence(m.target_schema, m.target_name, c)
                               for c in counters])
    if rep.detach_subscription(conn, n.reverse):
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(n.reverse)))
    for s in [
        sql.SQL("DROP VIEW {}").format(sql.Identifier(m.source_schema, m.source_name)),
        sql.SQL("DROP FOREIGN TABLE {}").format(foreign),
        sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(n.transit(m),
                                                       sql.Identifier(m.source_schema)),
        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
            sql.Identifier(n.forward), sql.Identifier(m.source_schema, m.source_name)),
    ]:
        conn.execute(s)
    for c, a, b in zip(counters, values, local, strict=True):
        # The retired table's sequence continues past every id either side handed out.
        step = 2 * c.sequence.increment
        last = max(_last(a, step), _last(b, step), key=lambda x: x * c.sequence.increment)
        _setval(conn, sql.Identifier(m.source_schema, c.sequence.name), (last, True))


class RemoteFinalize(Stage):
    """The end: the reverse direction dropped on both servers, the target table under its
    final name (the source's foreign table follows it), the retired table dropped."""

    name = "finalize"
    short = "final"
    phase = Phase.final
    note = ("CANNOT BE UNDONE: drops the reverse subscription, publication and slot, moves the "
            "target table to its final name and drops the retired table on the source")

    def before(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        m = moves[0]
        n = link.names(ctx.plan, m)
        rep.drop_subscription(ctx.conn, n.reverse)
        with link.target(ctx, m) as tgt:
            rep.drop_slot(tgt, n.reverse)
            rep.drop_publication(tgt, n.reverse)
            drop_forward(ctx, m, tgt)  # leftovers of a cutover killed before its end

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        n = link.names(ctx.plan, m)
        retired = n.transit(m)
        steps = [Step(sql.SQL("ALTER FOREIGN TABLE {} OPTIONS (SET schema_name {}, SET "
                              "table_name {})").format(
            sql.Identifier(m.target_schema, m.target_name), sql.Literal(m.target_schema),
            sql.Literal(m.target_name)), "ACCESS EXCLUSIVE on the foreign table", bounded=True)]
        # Keys that reference the retired table (from tables that stay, or from other moved
        # tables' retired copies) go with it; the target has its own (after).
        steps += [Step(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            sql.Identifier(fk.schema, fk.table), sql.Identifier(fk.name)))
            for fk in ctx.catalog.fks_to(n.transit_schema, m.source_name)
            if (fk.schema, fk.table) != (n.transit_schema, m.source_name)]
        if exists(ctx.conn, n.transit_schema, m.source_name, "r"):
            steps.append(Step(sql.SQL("DROP TABLE {}").format(retired),
                              "ACCESS EXCLUSIVE on the retired table (nothing reads it)"))
        return Action(self.name, steps, [regclass(m.target_schema, m.target_name)],
                      inside=lambda: _final_name(ctx, m))

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        return [], []


def _final_name(ctx: Ctx, m: TableMove) -> None:
    """On the target: the view under the final name gives way to the table itself, with the
    keys to moved tables already final (committed before the source's part)."""
    n = link.names(ctx.plan, m)
    final = sql.Identifier(m.target_schema, m.target_name)
    with link.target(ctx, m, wrap=False) as tgt:
        if not exists(tgt, n.transit_schema, m.source_name, "r"):
            return  # done by an earlier try
        with tgt.transaction():
            tgt.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(final))
            tgt.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                n.transit(m), sql.Identifier(m.target_schema)))
            if m.target_name != m.source_name:
                tgt.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    sql.Identifier(m.target_schema, m.source_name),
                    sql.Identifier(m.target_name)))
            for stmt in _target_keys(ctx, m, tgt):
                tgt.execute(stmt)
        drop_transit_if_empty(ctx, tgt)


def _target_keys(ctx: Ctx, m: TableMove, tgt: Conn) -> list[ddl.Statement]:
    """Foreign keys between this table and moved tables of its schema already in their final
    place on the target, as NOT VALID (no scan under the lock; new rows are checked)."""
    out: list[ddl.Statement] = []
    mine = {t.name: t for t in ctx.plan.tables if t.schema_ == m.target_schema}
    for spec in mine.values():
        for fk in ctx.store.load(spec.name, FKS) or []:
            ref = str(fk["ref_table"])
            if (spec.name != m.source_name and ref != m.source_name) or ref not in mine:
                continue
            other = ref if spec.name == m.source_name else spec.name
            if other != m.source_name and not exists(
                    tgt, m.target_schema, mine[other].target_name, "r"):
                continue  # it adds the key when it arrives
            out.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES "
                               "{} ({}) NOT VALID").format(
                sql.Identifier(m.target_schema, mine[spec.name].target_name),
                sql.Identifier(str(fk["name"])),
                sql.SQL(", ").join(sql.Identifier(str(c)) for c in fk["columns"]),
                sql.Identifier(m.target_schema, mine[ref].target_name),
                sql.SQL(", ").join(sql.Identifier(str(c)) for c in fk["ref_columns"])))
    return out


REMOTE_CUTOVER = RemoteCutover()
REMOTE_FINALIZE = RemoteFinalize()


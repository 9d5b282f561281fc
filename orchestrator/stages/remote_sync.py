"""The remote strategy before its swap: prepare, sync and verify a table on another server
through PostgreSQL's own logical replication (docs/cross-server.md).

Each stage's work on the target server (and each replication slot, which is not
transactional) is made idempotent by name: the stage finds what a killed run left and does
the rest, then records its status on the source. The target table carries the source's
qualified name until cutover, because a subscription matches tables by that name.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg import sql

from orchestrator.db import Conn, snapshot_txn
from orchestrator.errors import StageError
from orchestrator.model.catalog import EMPTY_SCHEMA, Relation
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.remote import ddl, link
from orchestrator.remote import replication as rep
from orchestrator.run.events import Rows
from orchestrator.sql.compose import catalog_sql
from orchestrator.stages.base import Action, LoopStage, Stage, Step
from orchestrator.stages.throttle import WalMeter, wait_for_server
from orchestrator.stages.verify import chunk_end_sql, chunk_params, key_bounds, row_hash

SUBOID = "remote_suboid"  # the forward subscription's oid: names its sync slots
POLL_S = 0.1
BINARY_COPY = 160000  # the initial sync copies in binary from PostgreSQL 16 on
VERIFY_CHUNK = 50_000
RECHECKS = 5
SYNC_FAILURES = 3  # the subscription's workers failing this often stops the sync stage
CATCH_UP_S = 120.0  # verify waits this long for the target to apply a chunk's LSN


def source_rel(ctx: Ctx, m: TableMove) -> Relation:
    """The moved table's shape on the source, wherever it is (retired after cutover)."""
    rel = ctx.catalog.table(m.source_schema, m.source_name)
    if rel is None or rel.kind not in ("r", "p"):
        rel = ctx.catalog.table(ctx.plan.retired_schema, m.source_name)
    if rel is None:
        raise StageError(f"{m.label}: the source table is not in place",
                         hint=f"`orchestrator status {ctx.loaded.path}` shows where it stands")
    return rel


def exists(conn: Conn, schema: str, name: str, kinds: str = "rpvf") -> bool:
    r = conn.execute("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname = %s AND c.relname = %s AND c.relkind = ANY(%s)",
                     (schema, name, list(kinds))).fetchone()
    return r is not None




def drop_transit_if_empty(ctx: Ctx, tgt: Conn) -> None:
    """The transit schema on the target is ours (the plan's retired schema's name): dropped
    once no table of the plan is in it."""
    schema = ctx.plan.retired_schema
    r = tgt.execute(EMPTY_SCHEMA, {"s": schema}).fetchone()
    if r is not None and r["empty"]:
        tgt.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(schema)))


def run_all(conn: Conn, statements: list[ddl.Statement]) -> None:
    """Statements in one transaction on an autocommit session."""
    with conn.transaction():
        for s in statements:
            conn.execute(s)


def make_forward(ctx: Ctx, m: TableMove, rel: Relation, tgt: Conn) -> int:
    """The forward direction, each piece made if missing: target table, publication, slot,
    a disabled subscription that will copy the table first. Its oid."""
    n = link.names(ctx.plan, m)
    if not exists(tgt, rel.schema, rel.name):
        run_all(tgt, ddl.missing_types(ctx.conn, tgt, rel) + ddl.target_table(ctx.catalog, rel))
    rep.ensure_publication(ctx.conn, n.forward, sql.Identifier(rel.schema, rel.name))
    rep.ensure_slot(ctx.conn, n.forward)
    # Binary when both servers copy in binary (PostgreSQL 16+): the initial sync's COPY then
    # skips the text conversions.
    binary = min(ctx.conn.info.server_version, tgt.info.server_version) >= BINARY_COPY
    return rep.ensure_subscription(tgt, n.forward, link.source_for_target(ctx, m),
                                   enabled=False, copy_data=True, binary=binary)


def drop_forward(ctx: Ctx, m: TableMove, tgt: Conn) -> None:
    """Subscription, its slots (and the initial sync's) and the publication, in the order
    that always works."""
    n = link.names(ctx.plan, m)
    sub = rep.subscription(tgt, n.forward)
    suboid = int(str(sub["oid"])) if sub else ctx.store.load(m.label, SUBOID)
    rep.drop_subscription(tgt, n.forward)
    rep.drop_slot(ctx.conn, n.forward)
    rep.drop_sync_slots(ctx.conn, suboid)
    rep.drop_publication(ctx.conn, n.forward)


def drop_reverse(ctx: Ctx, m: TableMove, tgt: Conn) -> None:
    """The way back's subscription (on the source), slot and publication (on the target)."""
    n = link.names(ctx.plan, m)
    rep.drop_subscription(ctx.conn, n.reverse)
    rep.drop_slot(tgt, n.reverse)
    rep.drop_publication(tgt, n.reverse)


def _save(label: str, key: str, value: Any) -> Any:
    def save(store: Any) -> None:
        store.save(label, key, value)

    return save


class RemotePrepare(Stage):
    """An empty target table on the other server, a publication and a slot on the source, and
    a disabled subscription on the target: nothing flows yet."""

    name = "prepare"
    short = "prep"
    note = ("on the target server: CREATE TABLE under the source's name; on the source: "
            "CREATE PUBLICATION and a logical replication slot; on the target: CREATE "
            "SUBSCRIPTION (disabled). Secondary indexes come after the initial sync.")

    def before(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        m = moves[0]
        with link.target(ctx, m) as tgt:
            if reverse:
                drop_forward(ctx, m, tgt)
                drop_reverse(ctx, m, tgt)  # made by a cutover that did not switch
                rel = source_rel(ctx, m)
                tgt.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.Identifier(rel.schema, rel.name)))
                drop_transit_if_empty(ctx, tgt)
            else:
                make_forward(ctx, m, source_rel(ctx, m), tgt)

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        # Only what `before` made is left to record: the subscription's oid (which names the
        # initial sync's slots, should the subscription be dropped without its server).
        m = moves[0]
        suboid = _forward_oid(ctx, m)
        return Action(self.name, [],
                      record=_save(m.label, SUBOID, suboid) if suboid is not None else None)

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        rel = source_rel(ctx, moves[0])
        return [Step(s) for s in ddl.target_table(ctx.catalog, rel)], []


def _forward_oid(ctx: Ctx, m: TableMove) -> int | None:
    with link.target(ctx, m) as tgt:
        sub = rep.subscription(tgt, link.names(ctx.plan, m).forward)
    return int(str(sub["oid"])) if sub else None


class RemoteSync(LoopStage):
    """The subscription's initial copy, then streaming; the secondary indexes once the copy
    is done. Rolled back: the target emptied and the forward direction made anew."""

    name = "sync"
    short = "sync"
    also = ("dual_write", "copy")
    note = ("ALTER SUBSCRIPTION ... ENABLE on the target; the initial copy by the "
            "subscription's table sync, then streaming; secondary indexes built after it")

    def run(self, ctx: Ctx, m: TableMove) -> None:
        rel = source_rel(ctx, m)
        n = link.names(ctx.plan, m)
        t0 = time.monotonic()
        shown = 0.0
        with link.target(ctx, m) as tgt:
            failed = rep.errors(tgt, n.forward)
            sub = rep.subscription(tgt, n.forward)
            if sub is not None and not sub["enabled"]:
                # The plan's throttles and the operator's pause hold a sync before it starts;
                # once started PostgreSQL's COPY runs at its own pace (pausing it would start
                # it over).
                wait_for_server(ctx, m, WalMeter())
            rep.set_enabled(tgt, n.forward, True)
            while (state := rep.sync_state(tgt, n.forward, rel.schema, rel.name)) != "r":
                if rep.errors(tgt, n.forward) - failed >= SYNC_FAILURES:
                    raise StageError(
                        f"{m.label}: the initial sync failed {SYNC_FAILURES} times on server "
                        f"{link.server_of(ctx.plan, m)} (its server log says why)",
                        hint="fix the cause and rerun apply (the subscription retries), or "
                        f"start over with `orchestrator rollback {ctx.loaded.path} --table "
                        f"{m.label} --to prepare`")
                if state is None:
                    raise StageError(f"{m.label}: the subscription {n.forward} on the target "
                                     "does not list the table",
                                     hint=f"roll the table back (`orchestrator rollback "
                                     f"{ctx.loaded.path} --table {m.label}`) and apply again")
                done = rep.copy_progress(tgt, rel.schema, rel.name)
                if done is not None:
                    rate = done[0] / max(time.monotonic() - t0, 1e-3)
                    ctx.progress(Rows(m.label, self.name, done[0], rel.row_estimate, rate))
                    if time.monotonic() - shown >= 1.0:  # for status and watch elsewhere
                        shown = time.monotonic()
                        with ctx.conn.transaction():
                            ctx.store.checkpoint(m.label, self.name, rows_done=done[0],
                                                 checkpoint={"bytes": done[1]},
                                                 rows_per_s=rate,
                                                 rows_estimated=rel.row_estimate)
                time.sleep(POLL_S)
            for index in ddl.secondary_indexes(rel):
                if not exists(tgt, rel.schema, index.name, "i"):
                    run_all(tgt, ddl.index_steps(rel, index))
        with ctx.conn.transaction():
            ctx.store.finish(m.label, self.name)
            ctx.store.log("sync", "ok", table=m.label, stage=self.name,
                          duration_ms=(time.monotonic() - t0) * 1000)

    def before(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        if not reverse:
            return
        m = moves[0]
        rel = source_rel(ctx, m)
        with link.target(ctx, m) as tgt:
            # A new slot and subscription copy the table again from an empty target.
            drop_forward(ctx, m, tgt)
            drop_reverse(ctx, m, tgt)  # made by a cutover that did not switch
            for index in ddl.secondary_indexes(rel):
                con = next((k for k in rel.constraints if k.name == index.constraint), None)
                stmt = sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                    sql.Identifier(rel.schema, rel.name), sql.Identifier(con.name)) \
                    if con is not None else sql.SQL("DROP INDEX IF EXISTS {}").format(
                        sql.Identifier(rel.schema, index.name))
                tgt.execute(stmt)
            tgt.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(rel.schema, rel.name)))
            make_forward(ctx, m, rel, tgt)


def _row(rel: Relation) -> sql.Composed:
    # Enums hash by their oid, which differs between servers: those (and arrays, which may
    # hold them, and other non-base types) are hashed in their text form.
    return sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier("s", c.name))
        if c.type_kind != "b" or c.type.endswith("]") else sql.Identifier("s", c.name)
        for c in rel.columns)


def _side(m: TableMove, rel: Relation, lo: bool, hi: bool) -> sql.Composed:
    """One server's count and order-free sum of row hashes over a key range."""
    return sql.SQL("SELECT count(*) AS n, coalesce(sum({}), 0) AS h FROM {} s WHERE {}").format(
        row_hash(_row(rel), True), sql.Identifier(rel.schema, rel.name),
        key_bounds(m, "s", m.key_source, lo, hi))


def _rows(m: TableMove, rel: Relation, where: sql.Composable) -> sql.Composed:
    """Each row's key (as text) and hash."""
    key = sql.SQL(", ").join(sql.SQL("s.{}::text").format(sql.Identifier(k))
                             for k in m.key_source)
    return sql.SQL("SELECT ARRAY[{}] AS k, {} AS h FROM {} s WHERE {}").format(
        key, row_hash(_row(rel), True), sql.Identifier(rel.schema, rel.name), where)


def _among(m: TableMove, keys: list[list[str]]) -> sql.Composed:
    """`(k1, k2) IN ((v, v), ...)`: the given keys, typed as the source's."""
    return sql.SQL("({}) IN ({})").format(
        sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(k)) for k in m.key_source),
        sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Literal(v), catalog_sql(t))
            for v, t in zip(k, m.key_types, strict=True))) for k in keys))


def _hashes(conn: Conn, m: TableMove, rel: Relation, lo: list[str] | None,
            hi: list[str] | None, keys: list[list[str]] | None) -> dict[tuple[str, ...], int]:
    """Row hashes of a key range (lo, hi], or of the given keys."""
    if keys is None:
        q = _rows(m, rel, key_bounds(m, "s", m.key_source, lo is not None, hi is not None))
        rows = conn.execute(q, chunk_params(lo, hi)).fetchall()
    else:
        rows = conn.execute(_rows(m, rel, _among(m, keys))).fetchall()
    return {tuple(r["k"]): int(r["h"]) for r in rows}


class RemoteVerify(LoopStage):
    """Chunked checksums on both servers: each chunk's source side with the source's LSN in
    one snapshot, its target side once the target has applied up to that LSN. The target may
    have applied more by then (the application keeps writing), so a chunk that differs is
    compared row by row, and the rows that differ are checked again, each round after the
    target caught up with a new source snapshot; rows that differ round after round are a
    mismatch, named by key."""

    name = "verify"
    short = "verif"
    note = "count and hash per key range on each server, compared once the target caught up"

    def run(self, ctx: Ctx, m: TableMove) -> None:
        rel = source_rel(ctx, m)
        t0 = time.monotonic()
        lo: list[str] | None = None
        rows = 0
        with link.target(ctx, m) as tgt:
            for conn in (ctx.conn, tgt):  # text forms alike on both servers
                conn.execute("SET TimeZone = 'UTC'")
            while True:
                hi, src, lsn = self._source_chunk(ctx, m, rel, lo)
                self._caught_up(ctx, m, lsn)
                if _target_side(tgt, m, rel, lo, hi) != src:
                    self._row_by_row(ctx, m, rel, tgt, lo, hi)
                rows += int(src[0])
                rate = rows / max(time.monotonic() - t0, 1e-3)
                ctx.progress(Rows(m.label, self.name, rows, rel.row_estimate, rate))
                with ctx.conn.transaction():
                    ctx.store.checkpoint(m.label, self.name, rows_done=rows, checkpoint=None,
                                         rows_per_s=rate, rows_estimated=rel.row_estimate)
                if hi is None:
                    break
                lo = hi
        with ctx.conn.transaction():
            ctx.store.finish(m.label, self.name, rows_done=rows)
            ctx.store.log("verify", "ok", table=m.label, stage=self.name,
                          duration_ms=(time.monotonic() - t0) * 1000, detail={"rows": rows})

    def _caught_up(self, ctx: Ctx, m: TableMove, lsn: str) -> None:
        if not rep.wait_applied(ctx.conn, link.names(ctx.plan, m).forward, lsn, CATCH_UP_S):
            raise StageError(
                f"{m.label}: the target did not apply the source's changes up to {lsn} "
                f"within {CATCH_UP_S:.0f} s", hint="check the subscription on the target "
                "(pg_stat_subscription, its server log), then rerun apply")

    def _row_by_row(self, ctx: Ctx, m: TableMove, rel: Relation, tgt: Conn,
                    lo: list[str] | None, hi: list[str] | None) -> None:
        keys: list[list[str]] | None = None
        for attempt in range(RECHECKS + 1):
            with snapshot_txn(ctx.conn, read_only=True):
                src = _hashes(ctx.conn, m, rel, lo, hi, keys)
                lsn = rep.current_lsn(ctx.conn)
            self._caught_up(ctx, m, lsn)
            got = _hashes(tgt, m, rel, lo, hi, keys)
            differ = sorted(k for k in src.keys() | got.keys() if src.get(k) != got.get(k))
            if not differ:
                return
            if attempt == RECHECKS:
                shown = ", ".join("(" + ", ".join(k) + ")" for k in differ[:5])
                raise StageError(
                    f"{m.label}: {len(differ)} row(s) differ between the servers after "
                    f"{RECHECKS} re-checks, keys {shown}{' ...' if len(differ) > 5 else ''}",
                    hint="roll the sync back and apply again (`orchestrator rollback "
                    f"{ctx.loaded.path} --table {m.label} --to prepare`)")
            keys = [list(k) for k in differ]
            time.sleep(0.05 * (attempt + 1))

    def _source_chunk(self, ctx: Ctx, m: TableMove, rel: Relation, lo: list[str] | None,
                      ) -> tuple[list[str] | None, tuple[int, str], str]:
        """The next chunk's end, its source side and the LSN it reflects, in one snapshot."""
        conn = ctx.conn
        with snapshot_txn(conn, read_only=True):
            params = chunk_params(lo, None)
            params["chunk"] = VERIFY_CHUNK
            r = conn.execute(chunk_end_sql(m, lo is not None), params).fetchone()
            hi = r["hi"] if r else None
            s = conn.execute(_side(m, rel, lo is not None, hi is not None),
                             chunk_params(lo, hi)).fetchone()
            lsn = rep.current_lsn(conn)
        assert s is not None
        return hi, (int(s["n"]), str(s["h"])), lsn


def _target_side(tgt: Conn, m: TableMove, rel: Relation, lo: list[str] | None,
                 hi: list[str] | None) -> tuple[int, str]:
    r = tgt.execute(_side(m, rel, lo is not None, hi is not None),
                    chunk_params(lo, hi)).fetchone()
    assert r is not None
    return int(r["n"]), str(r["h"])


REMOTE_PREPARE = RemotePrepare()
REMOTE_SYNC = RemoteSync()
REMOTE_VERIFY = RemoteVerify()

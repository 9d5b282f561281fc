"""copy: batches from source to target, each committed with its checkpoint; then the log
backlog drained and the secondary indexes built, in one transaction that marks it done.

Batches are ranges of heap blocks split between workers (stages/heap_copy.py) by default;
this module holds the keyset order (partitioned tables, clusters past 2^32 transaction ids,
`copy_order: key`), the start, and the finish both orders share.

No row locks and no ON CONFLICT: only the orchestrator writes the target, and no replay runs
until the copy ends, so every batch is a plain INSERT ... SELECT ... RETURNING its keys. A row
changed after a batch read it has its key in the capture log, and the drain at the end
re-reads it.

The copy ends under any write rate, whatever the key order of new rows. It stops at the largest
key present when it started (the upper bound), and within that range it skips every row
written since it started: such a row was written while the capture trigger was live, so its
key is in the log and the drain brings it. "Written since" is the row version's xmin, newer
than the transaction that started the copy (exact while the cluster has used fewer than 2^32
transaction ids: then a frozen tuple's kept xmin cannot wrap into the window). Past that, the
copy falls back to the heap: rows in blocks added since the start are skipped. Without the
skip, a serial key inserted below an outlier high key would keep a throttled copy chasing it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from psycopg import sql

from orchestrator.db import Conn, snapshot_txn
from orchestrator.model.catalog import Constraint, Index, Relation
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.run.events import Rows
from orchestrator.sql import capture
from orchestrator.sql.compose import catalog_sql, idents, rewrite_definition
from orchestrator.stages import heap_copy
from orchestrator.stages.base import Action, LoopStage, Step
from orchestrator.stages.pace import Pace, Policy
from orchestrator.stages.prepare import constraint_text, key_after_copy, key_index, key_steps
from orchestrator.stages.throttle import WalMeter, wait_for_server


def _typed_key(m: TableMove, param: str) -> sql.Composed:
    return sql.SQL("({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Placeholder(f"{param}{i}"), catalog_sql(t))
            for i, t in enumerate(m.key_types)
        )
    )


NO_BLOCK = 4294967295  # the block test is off: no tuple lies at or beyond this block


def fresh_bound_sql() -> sql.SQL:
    """This transaction's id and the source's heap extent and file, taken when the copy starts
    (after dual-write committed: any later writer of the source fires the capture trigger)."""
    return sql.SQL(
        "SELECT pg_current_xact_id()::text::bigint AS xid, "
        "pg_relation_size(%(rel)s::oid::regclass) "
        "/ current_setting('block_size')::bigint AS blocks, "
        "pg_relation_filenode(%(rel)s::oid::regclass)::bigint AS node"
    )


def fresh_params(fresh: dict[str, Any] | None) -> dict[str, Any]:
    """Batch parameters from the recorded bound; a checkpoint without one skips nothing."""
    f = fresh or {}
    xid = f.get("xid")
    return {
        # age() counts back from the batch's own transaction: a row whose xmin is no older
        # than the copy's starting transaction was written after the start. '0' (invalid)
        # turns the test off; batch_sql checks for it explicitly.
        "fresh_xid": str(xid % 2**32) if xid is not None else "0",
        "fresh_tid": f"({f.get('block', NO_BLOCK)},0)",
        "fresh_oid": f.get("oid", 0),
        "fresh_node": f.get("node", 0),
    }


def batch_sql(m: TableMove, first: bool) -> sql.Composed:
    """One batch: the next `limit` source rows after the checkpoint, up to the upper bound,
    leaving out rows written since the copy started (the drain brings those)."""
    keys = idents(m.key_source, "s")
    cond = [
        sql.SQL("({}) <= {}").format(keys, _typed_key(m, "hi")),
        # Rows written since the copy started (their xmin is no older than its start). Off
        # when the param is '0': age() of an invalid xid is INT_MAX, so test for it first.
        sql.SQL(
            "NOT (%(fresh_xid)s::xid <> '0'::xid AND age(s.xmin) >= 0 "
            "AND age(s.xmin) <= age(%(fresh_xid)s::xid))"
        ),
        # The block test holds only while the source keeps the file it had at the start (a
        # rewrite, such as VACUUM FULL, moves old rows anywhere).
        sql.SQL(
            "NOT (s.ctid >= %(fresh_tid)s::tid "
            "AND pg_relation_filenode(%(fresh_oid)s::oid::regclass) = %(fresh_node)s::oid)"
        ),
    ]
    if not first:
        cond.insert(0, sql.SQL("({}) > {}").format(keys, _typed_key(m, "lo")))
    order = sql.SQL(", ").join(sql.Identifier("s", k) for k in m.key_source)
    last = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in m.key_target)
    desc = sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(k)) for k in m.key_target)
    vals = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(c.up_sql("s"), sql.Identifier(c.target)) for c in m.copied
    )
    cols = idents(c.target for c in m.copied)
    # Only the keys come back from the INSERT (RETURNING): the batch's rows themselves are
    # never held in a CTE, which spilled to temporary files on PostgreSQL 15 with the
    # default 4 MB work_mem at 10,000 rows.
    return sql.SQL("""WITH ins AS (
  INSERT INTO {tgt} ({cols}){overriding}
  SELECT {vals} FROM {src} s WHERE {cond} ORDER BY {order} LIMIT %(limit)s
  RETURNING {tkeys})
SELECT (SELECT count(*) FROM ins) AS n,
       (SELECT ARRAY[{last}] FROM ins ORDER BY {desc} LIMIT 1) AS last""").format(
        vals=vals,
        src=m.source,
        cond=sql.SQL(" AND ").join(cond),
        order=order,
        tgt=m.target,
        cols=cols,
        overriding=m.overriding,
        tkeys=idents(m.key_target),
        last=last,
        desc=desc,
    )


def upper_bound_sql(m: TableMove) -> sql.Composed:
    last = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in m.key_source)
    desc = sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(k)) for k in m.key_source)
    return sql.SQL("SELECT ARRAY[{}] AS hi FROM {} ORDER BY {} LIMIT 1").format(
        last, m.source, desc
    )


def fresh_bound(conn: Conn, rel: Relation) -> dict[str, Any]:
    """What tells a row written from now on: the xmin test while the cluster's transaction ids
    have not wrapped (exact), else the heap extent of the source's current file."""
    r = conn.execute(fresh_bound_sql(), {"rel": rel.oid}).fetchone()
    assert r is not None
    if int(r["xid"]) < 2**32:
        return {"xid": int(r["xid"])}
    return {"block": int(r["blocks"]), "oid": rel.oid, "node": int(r["node"])}


def _secondary(m: TableMove, rel: Relation) -> list[tuple[Index, Constraint | None]]:
    """The source's indexes the copy builds on the target (all but the key's), each with the
    unique or exclusion constraint it backs, if any."""
    skip = {key_index(rel, m)}
    cons = {c.index: c for c in rel.constraints if c.kind in ("u", "x") and c.index}
    return [(i, cons.get(i.name)) for i in rel.indexes
            if not i.primary and not i.inherited and i.name not in skip]


def index_steps(m: TableMove, rel: Relation, parts: Sequence[Relation] = ()) -> list[Step]:
    """The source's secondary indexes and unique constraints, for the target; for a
    partitioned table, those of the parent (each recursing to the partitions) and those a
    partition has of its own."""
    steps = _index_steps(m, rel)
    for p in parts:
        steps += _index_steps(replace(m, part=p.name), p)
    return steps


def _index_steps(m: TableMove, rel: Relation) -> list[Step]:
    steps: list[Step] = []
    for i, con in _secondary(m, rel):
        if con is not None and con.kind == "u" and rel.kind == "p":
            # A partitioned table takes no ADD CONSTRAINT ... USING INDEX: the constraint
            # builds its own index (same name, recursing to the partitions).
            steps.append(Step(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                m.target, sql.Identifier(con.name), constraint_text(con, m.rename_map)),
                "SHARE on the target only"))
            continue
        steps.append(Step(
            rewrite_definition(i.definition, m.target_schema, m.part or m.target_name,
                               m.rename_map),
            "SHARE on the target only",
        ))
        if con is not None and con.kind == "u":
            defer = sql.SQL("")
            if con.deferrable:
                defer = sql.SQL(" DEFERRABLE INITIALLY DEFERRED" if con.deferred else " DEFERRABLE")
            steps.append(Step(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}{}").format(
                    m.target, sql.Identifier(con.name), sql.Identifier(i.name), defer)))
    return steps + _index_roles(m, rel) + _comments(m, rel)


def _comments(m: TableMove, rel: Relation) -> list[Step]:
    """Comments on the indexes and unique or exclusion constraints built here."""
    steps = []
    for i, con in _secondary(m, rel):
        if i.comment is not None:
            steps.append(Step(sql.SQL("COMMENT ON INDEX {} IS {}").format(
                sql.Identifier(m.target_schema, i.name), sql.Literal(i.comment))))
        if con is not None and con.comment is not None:
            steps.append(Step(sql.SQL("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
                sql.Identifier(con.name), m.target, sql.Literal(con.comment))))
    return steps


_IDENTITY = {"f": "FULL", "n": "NOTHING"}


def _index_roles(m: TableMove, rel: Relation) -> list[Step]:
    """REPLICA IDENTITY and CLUSTER ON as the source has them, once every index exists."""
    steps: list[Step] = []
    if rel.replica_identity in _IDENTITY:
        steps.append(Step(sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(
            m.target, sql.SQL(_IDENTITY[rel.replica_identity]))))
    for i in rel.indexes:
        if i.replident:
            steps.append(Step(sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
                m.target, sql.Identifier(i.name))))
        if i.clustered:
            steps.append(Step(sql.SQL("ALTER TABLE {} CLUSTER ON {}").format(
                m.target, sql.Identifier(i.name))))
    return steps


def drop_index_steps(m: TableMove, rel: Relation, parts: Sequence[Relation] = ()) -> list[Step]:
    """What index_steps built, dropped again (a constraint takes its index with it)."""
    return [
        Step(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
            owner.target, sql.Identifier(con.name)))
        if con is not None else
        Step(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(m.target_schema, i.name)))
        for owner, r in [(m, rel), *((replace(m, part=p.name), p) for p in parts)]
        for i, con in _secondary(owner, r)
    ]


def forward_steps(m: TableMove, rel: Relation, parts: Sequence[Relation] = ()) -> list[Step]:
    d = capture.forward(m)
    # Heap order (heap_copy.py), or one keyset loop per segment: the table, or each leaf
    # partition into its counterpart.
    loops = [Step(heap_copy.batch_sql(m), "ROW EXCLUSIVE on the target; plain reads of the "
                  "source by heap block range, one range per worker")] if (
        m.options.copy_order == "heap" and not m.partitioned) else [
        step
        for seg in m.segments()
        for step in (
            Step(upper_bound_sql(seg), "none (reads the source's key index)"),
            Step(batch_sql(seg, first=False),
                 "ROW EXCLUSIVE on the target; plain reads of the source"),
        )
    ]
    return [
        *loops,
        *(key_steps(m, rel) if key_after_copy(m, rel) else []),
        *[
            Step(s, "ROW EXCLUSIVE on the target; reads the source and the log")
            for s in capture.replay_all_sql(d)
        ],
        *index_steps(m, rel, parts),
    ]


def rollback_steps(m: TableMove, rel: Relation, parts: Sequence[Relation] = ()) -> list[Step]:
    d = capture.forward(m)
    pk = rel.primary_key
    return [
        *drop_index_steps(m, rel, parts),
        # The key too, when the copy built it: the target is again as prepare left it.
        *([Step(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
            m.target, sql.Identifier(pk.name)), "ACCESS EXCLUSIVE on the target only")]
          if pk is not None and key_after_copy(m, rel) else []),
        Step(sql.SQL("TRUNCATE {}").format(m.target), "ACCESS EXCLUSIVE on the target only"),
        Step(sql.SQL("TRUNCATE {}").format(d.log), "ACCESS EXCLUSIVE on our log only"),
    ]


def _bounds(ctx: Ctx, seg: TableMove, rel: Relation) -> dict[str, Any]:
    """One segment's bounds, fixed when its copy starts: the upper key and what tells a row
    written since."""
    r = ctx.conn.execute(upper_bound_sql(seg)).fetchone()
    return {"hi": r["hi"] if r else None, "last": None, "fresh": fresh_bound(ctx.conn, rel)}


def _start(ctx: Ctx, m: TableMove, rel: Relation, parts: Sequence[Relation]) -> dict[str, Any]:
    """The copy's starting checkpoint: the table's bounds, or for a partitioned table an
    empty map of partitions (each gets its bounds when its turn comes)."""
    with ctx.conn.transaction():
        if m.partitioned:
            est = sum(max(p.row_estimate, 0) for p in parts if p.kind == "r")
            cp: dict[str, Any] = {"parts": {}}
        else:
            est = max(rel.row_estimate, 0)
            fresh = fresh_bound(ctx.conn, rel)
            cp = (heap_copy.start(ctx, m, rel, fresh) if heap_copy.applies(ctx, m, fresh)
                  else _bounds(ctx, m, rel))
        ctx.store.checkpoint(m.label, "copy", rows_done=0, checkpoint=cp, rows_estimated=est)
        ctx.store.log(
            "copy", "started", table=m.label, stage="copy",
            detail={"upper_bound": cp.get("hi"), "estimate": est, "order": cp.get("mode", "key"),
                    "workers": len(cp.get("ranges", [])) or 1,
                    "partitions": [s.part for s in m.segments() if s.part]},
        )
    return cp


def _batch_params(cp: dict[str, Any], limit: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, **fresh_params(cp.get("fresh"))}
    for i, v in enumerate(cp["hi"]):
        params[f"hi{i}"] = v
    for i, v in enumerate(cp["last"] or []):
        params[f"lo{i}"] = v
    return params


Wrap = Callable[[dict[str, Any]], dict[str, Any]]


def _batches(
    ctx: Ctx, m: TableMove, cp: dict[str, Any], rows_done: int, estimate: int,
    wrap: Wrap = lambda cp: cp,
) -> tuple[int, dict[str, Any]]:
    """Copy one segment's batches until its upper bound; the rows copied in all and the
    segment's last checkpoint. `wrap` makes the segment's checkpoint the stage's. Settings
    (batch size, throttle) are read again before every batch, in one query."""
    conn = ctx.conn
    started = time.monotonic()
    done_here = 0
    wal = WalMeter()
    pace = Pace(conn, Policy(adaptive=False))
    while cp["hi"] is not None:
        cfg, t = wait_for_server(ctx, m, wal)
        pace.retune(t.policy, conn)
        limit = int(cfg.get("batch_size", m.options.batch_size))
        began = time.monotonic()
        with conn.transaction():
            r = conn.execute(batch_sql(m, cp["last"] is None), _batch_params(cp, limit)).fetchone()
            n = int(r["n"]) if r else 0
            if n == 0:
                break
            cp = {**cp, "last": r["last"] if r else None, "rows": cp.get("rows", 0) + n}
            rows_done += n
            done_here += n
            rate = done_here / max(time.monotonic() - started, 1e-6)
            ctx.store.checkpoint(m.label, "copy", rows_done=rows_done, checkpoint=wrap(cp),
                                 rows_per_s=rate)
        ctx.progress(Rows(m.label, "copy", rows_done, max(estimate, rows_done), rate, m.part))
        if n < limit:
            break
        pace.rest(n, time.monotonic() - began)
        if t.sleep_ms:
            time.sleep(t.sleep_ms / 1000)
    return rows_done, cp


def _partitions(
    ctx: Ctx, m: TableMove, cp: dict[str, Any], rows_done: int, estimate: int
) -> int:
    """Copy each leaf partition into its counterpart, one after the other, each with its own
    bounds and checkpoint under cp["parts"]; a finished partition is marked done."""
    parts: dict[str, Any] = dict(cp.get("parts", {}))
    for seg in m.segments():
        name = seg.part or ""
        if parts.get(name, {}).get("done"):
            continue
        if name not in parts:
            rel = ctx.catalog.table(m.source_schema, name)
            assert rel is not None
            with ctx.conn.transaction():
                parts[name] = _bounds(ctx, seg, rel)
                ctx.store.checkpoint(m.label, "copy", rows_done=rows_done,
                                     checkpoint={"parts": parts})

        def wrap(sub: dict[str, Any], name: str = name) -> dict[str, Any]:
            return {"parts": {**parts, name: sub}}

        rows_done, sub = _batches(ctx, seg, parts[name], rows_done, estimate, wrap)
        parts[name] = {**sub, "done": True}
        with ctx.conn.transaction():
            ctx.store.checkpoint(m.label, "copy", rows_done=rows_done,
                                 checkpoint={"parts": parts})
    return rows_done


def has_primary_key(conn: Conn, m: TableMove) -> bool:
    r = conn.execute("SELECT EXISTS (SELECT FROM pg_constraint WHERE contype = 'p' AND "
                     "conrelid = to_regclass(%s)) AS ok", (m.target.as_string(conn),)).fetchone()
    return bool(r and r["ok"])


def _yielding(ctx: Ctx, m: TableMove) -> bool:
    """Whether the copy yields to the application (throttle.adaptive, or `set` over it)."""
    return bool(ctx.store.settings(m.label).get("adaptive",
                                                ctx.plan.defaults.throttle.adaptive))


def finish(
    ctx: Ctx, m: TableMove, rel: Relation, rows_done: int, parts: Sequence[Relation] = ()
) -> None:
    """Drain the backlog, build the indexes and mark the copy done, in one transaction.

    REPEATABLE READ gives one snapshot: after the drain, every target row equals the source
    row at that snapshot, so unique indexes build without spurious violations. Plain CREATE
    INDEX is right here: only the orchestrator writes the target (docs/design.md, invariant 9).
    """
    conn = ctx.conn
    d = capture.forward(m)
    # The key first when it came after the copy: replay looks rows up by it. The target then
    # holds rows of the copy's start only, a subset of one consistent state: no duplicates.
    # Committed on its own, and skipped on a rerun that finds it built.
    # A copy that yields to the application builds its indexes on one core, not two.
    one_core = _yielding(ctx, m)
    if key_steps(m, rel) and not has_primary_key(conn, m):
        t0 = time.monotonic()
        with conn.transaction():
            if one_core:
                conn.execute("SET LOCAL max_parallel_maintenance_workers = 0")
            for step in key_steps(m, rel):
                conn.execute(step.sql)
            ctx.store.log("build_key", "ok", table=m.label, stage="copy",
                          duration_ms=(time.monotonic() - t0) * 1000)
    # Most of the backlog goes first in small committed batches, outside the index build.
    while capture.replay_batch(conn, d, 10_000) >= 10_000:
        pass
    t0 = time.monotonic()
    steps = index_steps(m, rel, parts)
    with snapshot_txn(conn):
        if one_core:
            conn.execute("SET LOCAL max_parallel_maintenance_workers = 0")
        drained = capture.replay_all(conn, d)
        for step in steps:
            conn.execute(step.sql)
        ctx.store.finish(m.label, "copy", rows_done=rows_done)
        ctx.store.log(
            "copy", "ok", table=m.label, stage="copy", duration_ms=(time.monotonic() - t0) * 1000,
            detail={"rows": rows_done, "drained": drained, "indexes": len(steps)},
        )


class Copy(LoopStage):
    """Batches from source to target, each with its checkpoint; then drain and index."""

    name = "copy"
    short = "copy"
    also = ("sync",)
    note = (
        "batches repeat from the checkpoint until the upper bound; the index builds run "
        "with the final drain in one transaction"
    )

    def _rel(self, ctx: Ctx, m: TableMove) -> Relation:
        rel = ctx.catalog.table(m.source_schema, m.source_name)
        assert rel is not None
        return rel

    def _parts(self, ctx: Ctx, m: TableMove) -> list[Relation]:
        return ctx.catalog.partitions_of(m.source_schema, m.source_name)

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        return Action(self.name, forward_steps(m, self._rel(ctx, m), self._parts(ctx, m)))

    def backward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        return Action("rollback_copy", rollback_steps(m, self._rel(ctx, m), self._parts(ctx, m)))

    def run(self, ctx: Ctx, m: TableMove) -> None:
        """Copy batches from the recorded checkpoint; crash-safe at every batch boundary."""
        rel = self._rel(ctx, m)
        st = ctx.store.row(m.label, self.name)
        cp: dict[str, Any] = dict(st.checkpoint or {})
        rows_done = st.rows_done
        parts = self._parts(ctx, m)
        if "hi" not in cp and "parts" not in cp and "mode" not in cp:
            cp, rows_done = _start(ctx, m, rel, parts), 0
        estimate = ctx.store.row(m.label, self.name).rows_estimated or 0
        conn = ctx.conn
        # Each batch commits without waiting for its WAL flush (set for the session once, not
        # per transaction: a round trip per batch saved). A crash may lose the last batches,
        # each with its checkpoint, since WAL keeps their order: the rerun copies them again.
        conn.execute("SET synchronous_commit = off")
        try:
            if m.partitioned:
                copied = _partitions(ctx, m, cp, rows_done, estimate)
            elif cp.get("mode") == "heap":
                copied = heap_copy.run(ctx, m, rel, cp, rows_done, estimate)
            else:
                copied, _ = _batches(ctx, m, cp, rows_done, estimate)
        finally:
            if not (conn.broken or conn.closed):
                conn.execute("RESET synchronous_commit")
        finish(ctx, m, rel, copied, parts)


COPY = Copy()

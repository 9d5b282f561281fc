"""The copy in heap order: batches are ranges of the source's heap blocks (TID range scans),
read in file order like the single-statement limit, split between workers that copy side by
side, each on its own session and each committing its own range's checkpoint.

Why it is correct, given what copy.py already relies on: the capture trigger is live before
the copy starts, and the copy leaves out every row version written since it started (its xmin
is no older than the copy's starting transaction), so whatever changes after the start reaches
the target through the log, which the drain at the end replays by re-reading each key. A row
version older than the start sits in a block below the start's extent and is read once, by
the one worker whose range holds it; a version written since (an update, wherever it lands)
is skipped. Ranges are disjoint, so no row is copied twice, and no replay runs before the copy
ends, so batches stay plain INSERTs.

What it relies on that keyset batches do not: a row version keeps its ctid. A rewrite of the
source (VACUUM FULL, CLUSTER, pg_repack) moves every row, so each batch checks, in its own
transaction after its read took the source's lock, that the source's file is still the one
the copy started on, and fails the stage otherwise (roll back to dual_write and copy again).
Transaction ids past 2^32 make the xmin test unusable; there, and for partitioned tables, the
copy keeps keyset batches (copy.py).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Any

from psycopg import sql

from orchestrator.db import Conn, sibling
from orchestrator.errors import StageError
from orchestrator.model.catalog import Relation
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.run.events import Rows
from orchestrator.sql.compose import idents
from orchestrator.stages.pace import Pace, Policy
from orchestrator.stages.throttle import WalMeter, wait_for_server
from orchestrator.state.store import Store

_EXTENT = """SELECT pg_relation_size(%(rel)s::oid::regclass)
                    / current_setting('block_size')::bigint AS blocks,
                    pg_relation_filenode(%(rel)s::oid::regclass)::bigint AS node,
                    current_setting('max_parallel_workers')::int AS workers"""
_NODE = "SELECT pg_relation_filenode(%(rel)s::oid::regclass)::bigint AS node"


def applies(ctx: Ctx, m: TableMove, fresh: dict[str, Any]) -> bool:
    """Heap order is used when asked for (the default), the table is not partitioned and the
    xmin test is exact."""
    return m.options.copy_order == "heap" and not m.partitioned and "xid" in fresh


def batch_sql(m: TableMove) -> sql.Composed:
    """The rows of a block range, leaving out versions written since the copy started."""
    vals = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(c.up_sql("s"), sql.Identifier(c.target)) for c in m.copied)
    return sql.SQL(
        "INSERT INTO {tgt} ({cols}){overriding} SELECT {vals} FROM {src} s "
        "WHERE s.ctid >= %(lo)s::tid AND s.ctid < %(hi)s::tid "
        # Written since the copy started: see copy.batch_sql.
        "AND NOT (age(s.xmin) >= 0 AND age(s.xmin) <= age(%(fresh_xid)s::xid))"
    ).format(tgt=m.target, cols=idents(c.target for c in m.copied), overriding=m.overriding,
             vals=vals, src=m.source)


def start(ctx: Ctx, m: TableMove, rel: Relation, fresh: dict[str, Any]) -> dict[str, Any]:
    """The copy's starting checkpoint: the source's extent now, split into one contiguous
    block range per worker."""
    r = ctx.conn.execute(_EXTENT, {"rel": rel.oid}).fetchone()
    assert r is not None
    blocks, node = int(r["blocks"]), int(r["node"])
    workers = m.options.copy_workers or max(1, min(int(r["workers"]), os.cpu_count() or 1))
    workers = max(1, min(workers, blocks or 1))
    edges = [blocks * i // workers for i in range(workers + 1)]
    est = max(rel.row_estimate, 0)
    return {
        "mode": "heap", "fresh": fresh, "node": node, "blocks": blocks,
        "rows_per_block": max(1.0, est / blocks) if blocks else 1.0,
        "ranges": [{"next": edges[i], "hi": edges[i + 1]} for i in range(workers)],
    }


def run(ctx: Ctx, m: TableMove, rel: Relation, cp: dict[str, Any], rows_done: int,
        estimate: int) -> int:
    """Copy every range still open, one worker session each; the rows done in all."""
    todo = [i for i, r in enumerate(cp["ranges"]) if r["next"] < r["hi"]]
    if not todo:
        return rows_done
    # One pace for all workers, its probe on our session (idle while the workers copy).
    shared = _Shared(rows_at_start=rows_done, started=time.monotonic(),
                     pace=Pace(ctx.conn, Policy(adaptive=False)), probe=ctx.conn)
    threads = [threading.Thread(target=_worker, args=(ctx, m, rel, cp, i, estimate, shared),
                                name=f"copy-{m.label}-{i}", daemon=True) for i in todo]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        shared.stop.set()  # Ctrl-C: each worker ends after its batch, its checkpoint kept
        for t in threads:
            t.join()
        raise
    if shared.errors:
        raise shared.errors[0]
    return ctx.store.row(m.label, "copy").rows_done


class _Shared:
    """What the workers of one copy share: a stop flag, the first error, the rate's base."""

    def __init__(self, rows_at_start: int, started: float, pace: Pace, probe: Conn) -> None:
        self.pace, self.probe = pace, probe
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.rows_at_start = rows_at_start
        self.total = rows_at_start  # the rows done in all, as the last batch returned it
        self.started = started


def _worker(ctx: Ctx, m: TableMove, rel: Relation, cp: dict[str, Any], index: int,
            estimate: int, shared: _Shared) -> None:
    conn: Conn | None = None
    try:
        conn = sibling(ctx.conn)  # named like the main session: a DBA ends them together
        conn.execute("SET synchronous_commit = off")  # as the keyset copy (copy.py)
        wctx = replace(ctx, conn=conn, store=Store(conn, ctx.store.schema, ctx.store.plan,
                                                   ctx.store.terminal))
        rng = cp["ranges"][index]
        nxt, hi, wal = int(rng["next"]), int(rng["hi"]), WalMeter()
        xid = str(int(cp["fresh"]["xid"]) % 2**32)
        while nxt < hi and not shared.stop.is_set() and not shared.errors:
            cfg, throttle = wait_for_server(wctx, m, wal)
            rows = int(cfg.get("batch_size", m.options.batch_size))
            end = min(hi, nxt + max(1, int(rows / float(cp["rows_per_block"]))))
            began, before = time.monotonic(), shared.total
            done = _batch(wctx, m, rel, cp, index, nxt, end, xid, shared)
            shared.pace.retune(throttle.policy, shared.probe)
            shared.pace.rest(max(done - before, 0), time.monotonic() - began)
            rate = (done - shared.rows_at_start) / max(time.monotonic() - shared.started, 1e-6)
            ctx.progress(Rows(m.label, "copy", done, max(estimate, done), rate))
            nxt = end
            if throttle.sleep_ms and nxt < hi:
                time.sleep(throttle.sleep_ms / 1000)
    except BaseException as exc:  # handed to the main thread, which raises the first
        shared.errors.append(exc)
        shared.stop.set()
    finally:
        if conn is not None:
            conn.close()


def _batch(wctx: Ctx, m: TableMove, rel: Relation, cp: dict[str, Any], index: int, lo: int,
           hi: int, xid: str, shared: _Shared) -> int:
    """One block range in one transaction with its checkpoint; the rows done in all."""
    conn = wctx.conn
    with conn.transaction():
        cur = conn.execute(batch_sql(m), {"lo": f"({lo},0)", "hi": f"({hi},0)",
                                          "fresh_xid": xid})
        n = max(cur.rowcount, 0)
        # Our read holds the source's lock until commit: a rewrite cannot come after this.
        node = conn.execute(_NODE, {"rel": rel.oid}).fetchone()
        if node is None or int(node["node"]) != int(cp["node"]):
            raise StageError(
                f"{m.label}: the source was rewritten during the copy (VACUUM FULL, CLUSTER "
                "or a repack moved its rows), so copying by heap position is no longer "
                "exact; nothing of this batch was kept",
                hint=f"copy again: `orchestrator rollback PLAN --table {m.label} --to "
                "dual_write`, then `orchestrator apply PLAN --table " + m.label + "`")
        rate = (shared.total + n - shared.rows_at_start) / max(
            time.monotonic() - shared.started, 1e-6)
        shared.total = wctx.store.advance_range(m.label, "copy", index, hi, n, rate)
        return shared.total

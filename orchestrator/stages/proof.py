"""Incremental verification: keep verify's proof current by re-checking only what changed.

A full verify pass records every chunk it proved (state/proofs.py). From then on, replay notes
each key it applies to the target in the move's `touched` table (sql/capture.py), in the same
transaction as the change. Re-checking a table is then: replay the log, find the chunks that
hold a touched key, check those (with the same re-checks and repairs as a full pass), and
forget the touched keys seen at the start once every such chunk is equal again. Its cost
follows the write rate, not the table's size. The cutover does that before the swap while the
last full pass is younger than the plan's `verify_max_age_h`, and a full pass otherwise; so
does `apply --follow` every few seconds while a table waits for its cutover.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from orchestrator.db import Conn, snapshot_txn
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove, object_tag
from orchestrator.plan import Plan
from orchestrator.sql import capture
from orchestrator.sql.compose import catalog_sql
from orchestrator.stages import verify
from orchestrator.state.proofs import Chunk, Proofs, pending_keys, summary


def dirty_sql(m: TableMove, touched: sql.Identifier, control: str) -> sql.Composed:
    """The chunks (part, n) that hold a key replay touched since they were proven."""
    keys = sql.SQL(", ").join(sql.Identifier("t", k) for k in m.key_source)

    def bound(side: str) -> sql.Composed:
        return sql.SQL(", ").join(
            sql.SQL("(c.{}[{}])::{}").format(sql.Identifier(side), sql.Literal(i + 1),
                                             catalog_sql(t))
            for i, t in enumerate(m.key_types))

    return sql.SQL(
        "SELECT DISTINCT c.part, c.n FROM {touched} t JOIN {chunks} c "
        "ON c.plan = %(plan)s AND c.table_name = %(table)s "
        "AND (c.lo IS NULL OR ROW({keys}) > ROW({lo})) "
        "AND (c.hi IS NULL OR ROW({keys}) <= ROW({hi}))"
    ).format(touched=touched, chunks=sql.Identifier(control, "chunks"), keys=keys,
             lo=bound("lo"), hi=bound("hi"))


def full_pass_needed(ctx: Ctx, m: TableMove) -> str | None:
    """Why the table's proof cannot just be brought up to date (then verify runs in full),
    or None."""
    if ctx.full_verify:
        return "the operator asked for it (--full-verify)"
    if ctx.store.status(m.label, "verify") != "done":
        return "the last verify did not finish"
    chunks = Proofs(ctx.conn, ctx.control, ctx.plan.name).of(m.label)
    if not chunks:
        return "no chunk proofs are recorded"
    if {c.part for c in chunks} != {seg.part or "" for seg in m.segments()}:
        return "its partitions are not the ones proven"
    age = datetime.now(UTC) - min(c.passed_at for c in chunks)
    limit = timedelta(hours=m.options.verify_max_age_h)
    if age > limit:
        return f"its last full proof is {age.total_seconds() / 3600:.1f} h old (over " \
            f"verify_max_age_h = {m.options.verify_max_age_h:g})"
    return None


def recheck(ctx: Ctx, m: TableMove) -> int:
    """Bring a verified table's proof up to date; the chunks checked. Stops, marking verify
    failed, on a range that still differs after re-checks and repairs."""
    d = capture.forward(m)
    assert d.touched is not None
    conn, proofs = ctx.conn, Proofs(ctx.conn, ctx.control, ctx.plan.name)
    t0 = time.monotonic()
    verify.drain(ctx, m)
    seen = [r["ctid"] for r in conn.execute(
        sql.SQL("SELECT ctid::text AS ctid FROM {}").format(d.touched)).fetchall()]
    params = {"plan": ctx.plan.name, "table": m.label}
    dirty = {(r["part"], r["n"]) for r in conn.execute(
        dirty_sql(m, d.touched, ctx.control), params).fetchall()}
    chunks = proofs.of(m.label)
    for seg in m.segments():
        todo = [c for c in chunks if (c.part, c.n) in dirty and c.part == (seg.part or "")]
        _check(ctx, m, seg, todo, proofs)
    with conn.transaction():
        # Touched keys written since `seen` was read stay for the next re-check.
        conn.execute(sql.SQL("DELETE FROM {} WHERE ctid = ANY(%s::tid[])").format(d.touched),
                     (seen,))
        ctx.store.log("verify", "recheck", table=m.label, stage="verify",
                      duration_ms=(time.monotonic() - t0) * 1000,
                      detail={"chunks": len(dirty), "of": len(chunks), "keys": len(seen)})
    return len(dirty)


def _check(ctx: Ctx, m: TableMove, seg: TableMove, todo: list[Chunk], proofs: Proofs) -> None:
    """Check each changed chunk of one segment, recording it equal or stopping on it."""
    fast = verify.fast_hash_works(ctx, seg) if todo else True
    for c in todo:
        t0 = time.monotonic()
        with snapshot_txn(ctx.conn, read_only=True):
            res = verify.checksum(ctx, seg, c.lo, c.hi, fast)
        res, bad = verify.settle(ctx, seg, c.lo, c.hi, res, fast)
        if bad is not None:
            verify.fail(ctx, m, seg, bad, (time.monotonic() - t0) * 1000)
        with ctx.conn.transaction():
            proofs.checked(m.label, c.part, c.n, int(res["rows"]), str(res["source"]))


def before_swap(ctx: Ctx, m: TableMove) -> None:
    """What the cutover runs just before its swap: a re-check of the changed chunks, or a
    full pass when the proof cannot be brought up to date (saying why)."""
    why = full_pass_needed(ctx, m)
    if why is None:
        recheck(ctx, m)
        return
    with ctx.conn.transaction():
        ctx.store.log("verify", "full_pass", table=m.label, stage="verify",
                      detail={"reason": why})
    verify.VERIFY.run(ctx, m)


def status(conn: Conn, plan: Plan) -> dict[str, dict[str, Any]]:
    """Per verified table: its last full pass, the oldest check of a chunk since, its
    chunks, and the keys replay changed since (for status and watch)."""
    found = summary(conn, plan.control_schema, plan.name)
    touched = {t.name: (plan.control_schema,
                        "touched_" + object_tag(plan.name, plan.source_schema, t.name))
               for t in plan.tables if t.name in found}
    for label, n in pending_keys(conn, touched).items():
        found[label]["changed_keys"] = n
    return found


def recheck_waiting(ctx: Ctx, done: Callable[[str, str], bool]) -> int:
    """Re-check the changed chunks of every verified table not yet cut over (whose last full
    pass is recent enough); the chunks checked. `apply --follow` runs it every few seconds."""
    checked = 0
    for m in ctx.moves.values():
        if m.strategy == "copy" and done(m.label, "verify") and not done(m.label, "cutover") \
                and full_pass_needed(ctx, m) is None:
            checked += recheck(ctx, m)
    return checked

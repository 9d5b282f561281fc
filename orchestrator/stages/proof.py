"""Incremental verification: keep verify's proof current by re-checking only what changed.

A full verify pass proves every chunk equal and records it (state/proofs.py). From then on,
replay notes each key it applies to the target in the move's `touched` table
(sql/capture.py), in the same transaction as the change. Only replay writes the target and
every captured change of the source goes through the log to replay, so any row that can
differ now has its key either in the log (pending: it will be replayed and noted) or in
`touched`. Re-checking a table is therefore: replay the log, compare source and target row
by row for the noted keys (row hashes, in one snapshot, pending keys left out), repair any
that still differ after re-checks, and forget the notes read before the comparison. Its cost
follows the number of keys written since, not the table's size. The cutover does that before
the swap while the last full pass is younger than the plan's `verify_max_age_h` (a full pass
otherwise); so does `apply --follow` every few seconds while a table waits for its cutover.
A write behind the triggers is not noted: only a full pass finds it (`--full-verify`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from orchestrator.db import Conn, snapshot_txn
from orchestrator.errors import StageError
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove, object_tag
from orchestrator.plan import Plan
from orchestrator.sql import capture
from orchestrator.sql.compose import idents
from orchestrator.stages import verify
from orchestrator.state.proofs import Proofs, pending_keys, summary

LIMIT = 100  # differing keys named at most


def _eq(left: str, left_cols: tuple[str, ...], right: str, right_cols: tuple[str, ...]
        ) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, a), sql.Identifier(right, b))
        for a, b in zip(left_cols, right_cols, strict=True))


def differing_sql(m: TableMove, fast: bool) -> sql.Composed:
    """The noted keys whose source and target rows differ (a missing row counts), keys still
    pending in the log left out. Source and target are the whole tables (a partitioned
    table's parents): a key update may have moved a row between partitions."""
    d = capture.forward(m)
    assert d.touched is not None
    src = sql.Identifier(m.source_schema, m.source_name)
    tgt = sql.Identifier(m.target_schema, m.target_name)
    src_row = sql.SQL(", ").join(c.up_sql("s") for c in m.copied)
    tgt_row = sql.SQL(", ").join(sql.Identifier("t", c.target) for c in m.copied)
    ks = m.key_source
    return sql.SQL(
        "SELECT {keys} FROM (SELECT DISTINCT {kcols} FROM {touched}) k "
        "WHERE NOT EXISTS (SELECT 1 FROM {log} l WHERE {lk}) "
        "AND (SELECT {sh} FROM {src} s WHERE {sk}) IS DISTINCT FROM "
        "(SELECT {th} FROM {tgt} t WHERE {tk})"
    ).format(
        keys=sql.SQL(", ").join(sql.Identifier("k", c) for c in ks), kcols=idents(ks),
        touched=d.touched, log=d.log, lk=_eq("l", ks, "k", ks),
        sh=verify.row_hash(src_row, fast), src=src, sk=_eq("s", ks, "k", ks),
        th=verify.row_hash(tgt_row, fast), tgt=tgt, tk=_eq("t", m.key_target, "k", ks),
    )


def repair_keys_sql(m: TableMove, fast: bool) -> list[sql.Composed]:
    """The target's rows for the differing keys replaced by the source's (run in one
    REPEATABLE READ transaction: both statements see the same differing keys)."""
    src = sql.Identifier(m.source_schema, m.source_name)
    tgt = sql.Identifier(m.target_schema, m.target_name)
    diff = differing_sql(m, fast)
    vals = sql.SQL(", ").join(c.up_sql("s") for c in m.copied)
    return [
        sql.SQL("DELETE FROM {} t USING ({}) k WHERE {}").format(
            tgt, diff, _eq("t", m.key_target, "k", m.key_source)),
        sql.SQL("INSERT INTO {} ({}){} SELECT {} FROM {} s JOIN ({}) k ON {}").format(
            tgt, idents(c.target for c in m.copied), m.overriding, vals, src, diff,
            _eq("s", m.key_source, "k", m.key_source)),
    ]


def full_pass_needed(ctx: Ctx, m: TableMove) -> str | None:
    """Why the table's proof cannot just be brought up to date (then verify runs in full),
    or None."""
    if ctx.controls.full_verify:
        return "the operator asked for it (--full-verify)"
    if ctx.store.status(m.label, "verify") != "done":
        return "the last verify did not finish"
    chunks = Proofs(ctx.conn, ctx.control, ctx.plan.name).of(m.label)
    if not chunks:
        return "no chunk proofs are recorded"
    if {c.part for c in chunks} != {seg.part or "" for seg in m.segments()}:
        return "its partitions are not the ones proven"
    age = datetime.now(UTC) - min(c.passed_at for c in chunks)
    if age > timedelta(hours=m.options.verify_max_age_h):
        return f"its last full proof is {age.total_seconds() / 3600:.1f} h old (over " \
            f"verify_max_age_h = {m.options.verify_max_age_h:g})"
    return None


def _differing(ctx: Ctx, m: TableMove, fast: bool) -> list[list[Any]]:
    with snapshot_txn(ctx.conn, read_only=True):
        rows = ctx.conn.execute(differing_sql(m, fast) + sql.SQL(" LIMIT {}").format(
            sql.Literal(LIMIT))).fetchall()
    return [list(r.values()) for r in rows]


def recheck(ctx: Ctx, m: TableMove) -> int:
    """Bring a verified table's proof up to date; the keys checked. Stops, marking verify
    failed, on keys that still differ after re-checks and a repair."""
    d = capture.forward(m)
    assert d.touched is not None
    conn, t0 = ctx.conn, time.monotonic()
    verify.drain(ctx, m)
    seen = [r["ctid"] for r in conn.execute(
        sql.SQL("SELECT ctid::text AS ctid FROM {}").format(d.touched)).fetchall()]
    fast = verify.fast_hash_works(ctx, m)
    bad = _differing(ctx, m, fast)
    tries = 0
    while bad and tries < verify.RECHECKS:  # the target may trail by late commits
        tries += 1
        verify.drain(ctx, m)
        time.sleep(0.05 * tries)
        bad = _differing(ctx, m, fast)
    repaired = _repair(ctx, m, fast) if bad and ctx.controls.repair else 0
    if repaired:
        bad = _differing(ctx, m, fast)
    if bad:
        _fail(ctx, m, bad, (time.monotonic() - t0) * 1000)
    with conn.transaction():
        # Keys noted after `seen` was read stay for the next re-check.
        conn.execute(sql.SQL("DELETE FROM {} WHERE ctid = ANY(%s::tid[])").format(d.touched),
                     (seen,))
        Proofs(conn, ctx.control, ctx.plan.name).checked_all(m.label)
        ctx.store.log("verify", "recheck", table=m.label, stage="verify",
                      duration_ms=(time.monotonic() - t0) * 1000,
                      detail={"keys": len(seen), "repaired": repaired})
    return len(seen)


def _repair(ctx: Ctx, m: TableMove, fast: bool) -> int:
    """Replace the differing rows from the source, in one short transaction, logged."""
    with snapshot_txn(ctx.conn):
        delete, insert = repair_keys_sql(m, fast)
        deleted = ctx.conn.execute(delete).rowcount
        inserted = ctx.conn.execute(insert).rowcount
        ctx.store.log("verify", "repair", table=m.label, stage="verify",
                      detail={"keys": "changed since the full pass", "deleted": deleted,
                              "inserted": inserted})
    return max(deleted, inserted)


def _fail(ctx: Ctx, m: TableMove, bad: list[list[Any]], duration: float) -> None:
    keys = "; ".join("(" + ", ".join(str(v) for v in k) + ")" for k in bad[:10])
    message = f"{m.label}: source and target differ for keys ({', '.join(m.key_source)}) " \
        f"{keys}" + (" and more" if len(bad) > 10 else "")
    with ctx.conn.transaction():
        # Verify was done; it is not any more (a status goes through running to failed).
        ctx.store.start(m.label, "verify", again=True)
        ctx.store.fail(m.label, "verify", message)
        ctx.store.log("verify", "mismatch", table=m.label, stage="verify",
                      duration_ms=duration, detail={"keys": [[str(v) for v in k] for k in bad]})
    path = ctx.loaded.path
    raise StageError(message, hint=f"inspect those rows; `orchestrator apply {path} --table "
                     f"{m.label}` verifies the whole table again (repairing what it can)")


def before_swap(ctx: Ctx, m: TableMove) -> None:
    """What the cutover runs just before its swap: a re-check of the keys changed since the
    full pass, or a full pass when the proof cannot be brought up to date (saying why)."""
    why = full_pass_needed(ctx, m)
    if why is None:
        recheck(ctx, m)
        return
    with ctx.conn.transaction():
        ctx.store.log("verify", "full_pass", table=m.label, stage="verify",
                      detail={"reason": why})
    verify.VERIFY.run(ctx, m)


def recheck_waiting(ctx: Ctx, done: Callable[[str, str], bool]) -> int:
    """Re-check every verified table not yet cut over (whose last full pass is recent
    enough); the keys checked. `apply --follow` runs it every few seconds."""
    checked = 0
    for m in ctx.moves.values():
        if m.strategy == "copy" and done(m.label, "verify") and not done(m.label, "cutover") \
                and full_pass_needed(ctx, m) is None:
            checked += recheck(ctx, m)
    return checked


def status(conn: Conn, plan: Plan) -> dict[str, dict[str, Any]]:
    """Per verified table: its last full pass, the last re-check, its chunks, and the keys
    replay changed since (for status and watch)."""
    found = summary(conn, plan.control_schema, plan.name)
    touched = {t.name: (plan.control_schema,
                        "touched_" + object_tag(plan.name, plan.source_schema, t.name))
               for t in plan.tables if t.name in found}
    for label, n in pending_keys(conn, touched).items():
        found[label]["changed_keys"] = n
    return found

"""verify: counts and checksums per key range, source against target, while writes continue.

Each chunk is read in one REPEATABLE READ snapshot that covers source, target and capture log
together; with two cores the target side is read by a second session that imports that
snapshot (`Pair`), beside the first reading the source side. A key whose change is still in
the log is legitimately different and is left out on both sides; every other row must be
equal. A differing chunk is re-checked after a replay before it is declared different, and
the first differing key range is named.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from psycopg import errors, sql

from orchestrator.db import sibling, snapshot_txn
from orchestrator.errors import StageError
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.run.events import Rows
from orchestrator.sql import capture
from orchestrator.sql.compose import catalog_sql, idents
from orchestrator.stages.base import LoopStage, Step
from orchestrator.state.proofs import Proofs

CHUNK = 50_000
RECHECKS = 3
MAX_REPAIRS = 8  # per chunk: beyond that the chunk is reported, not patched again and again


def _key_param(m: TableMove, name: str) -> sql.Composed:
    return sql.SQL("({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Placeholder(f"{name}{i}"), catalog_sql(t))
            for i, t in enumerate(m.key_types)
        )
    )


def key_bounds(m: TableMove, alias: str, keys: tuple[str, ...], lo: bool, hi: bool) -> sql.Composed:
    parts: list[sql.Composable] = [sql.SQL("true")]
    if lo:
        parts.append(sql.SQL("({}) > {}").format(idents(keys, alias), _key_param(m, "lo")))
    if hi:
        parts.append(sql.SQL("({}) <= {}").format(idents(keys, alias), _key_param(m, "hi")))
    return sql.SQL(" AND ").join(parts)


def chunk_end_sql(m: TableMove, lo: bool, hi: bool = False) -> sql.Composed:
    """The key %(chunk)s rows after `lo` (and not past `hi`): the end of the next chunk."""
    last = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in m.key_source)
    order = idents(m.key_source)
    return sql.SQL(
        "SELECT ARRAY[{}] AS hi FROM {} s WHERE {} ORDER BY {} OFFSET %(chunk)s - 1 LIMIT 1"
    ).format(last, m.source, key_bounds(m, "s", m.key_source, lo, hi), order)


def row_hash(row: sql.Composable, fast: bool) -> sql.Composed:
    """A 64-bit hash of a row: hash_record_extended (PostgreSQL 14+) hashes the typed values,
    about three times faster than hashing the row's text; the text form serves types that
    have no extended hash function."""
    if fast:
        return sql.SQL("hash_record_extended(row({}), 0)").format(row)
    return sql.SQL("hashtextextended(row({})::text, 0)").format(row)


def side_sql(m: TableMove, target: bool, lo: bool, hi: bool, fast: bool = True) -> sql.Composed:
    """One side's count and order-free sum of row hashes over a key range, pending keys (in
    the capture log) left out."""
    d = capture.forward(m)
    alias, keys = ("t", m.key_target) if target else ("s", m.key_source)
    row = (sql.SQL(", ").join(sql.Identifier("t", c.target) for c in m.copied) if target
           else sql.SQL(", ").join(c.up_sql("s") for c in m.copied))
    pending = sql.SQL(" AND ").join(
        sql.SQL("l.{} = {}.{}").format(sql.Identifier(a), sql.Identifier(alias),
                                       sql.Identifier(b))
        for a, b in zip(m.key_source, keys, strict=True))
    return sql.SQL("SELECT count(*) AS n, coalesce(sum({hash}), 0) AS h FROM {rel} {alias} "
                   "WHERE {bounds} AND NOT EXISTS (SELECT 1 FROM {log} l WHERE {pending})"
                   ).format(hash=row_hash(row, fast), rel=m.target if target else m.source,
                            alias=sql.Identifier(alias), bounds=key_bounds(m, alias, keys, lo, hi),
                            log=d.log, pending=pending)


def checksum_sql(m: TableMove, lo: bool, hi: bool, fast: bool = True) -> sql.Composed:
    """Count and an order-free sum of row hashes on both sides, pending keys left out."""
    return sql.SQL("SELECT a.n AS rows, a.n || ':' || a.h AS source, b.n || ':' || b.h AS "
                   "target FROM ({}) a, ({}) b").format(
        side_sql(m, False, lo, hi, fast), side_sql(m, True, lo, hi, fast))


class Pair:
    """A second session that reads the target side of each chunk while the first reads the
    source side, in the same snapshot (exported by the first, imported by the second): each
    chunk costs the slower side instead of both, on two cores."""

    def __init__(self, ctx: Ctx) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.conn = sibling(ctx.conn)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-target")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.conn.close()

    def target(self, m: TableMove, snapshot: str, lo: list[str] | None,
               hi: list[str] | None, fast: bool) -> dict[str, Any]:
        with snapshot_txn(self.conn, read_only=True):
            # The first statement of the transaction: it then sees what the exporter sees.
            self.conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                sql.Literal(snapshot)))
            r = self.conn.execute(side_sql(m, True, lo is not None, hi is not None, fast),
                                  chunk_params(lo, hi)).fetchone()
        assert r is not None
        return dict(r)


def _split_checksum(ctx: Ctx, pair: Pair, m: TableMove, lo: list[str] | None,
                    hi: list[str] | None, fast: bool) -> dict[str, Any]:
    """Both sides of one chunk on two sessions (call inside the first's snapshot)."""
    snap = ctx.conn.execute("SELECT pg_export_snapshot() AS s").fetchone()
    assert snap is not None
    future = pair.pool.submit(pair.target, m, str(snap["s"]), lo, hi, fast)
    src = ctx.conn.execute(side_sql(m, False, lo is not None, hi is not None, fast),
                           chunk_params(lo, hi)).fetchone()
    tgt = future.result()
    assert src is not None
    return {"rows": src["n"], "source": f"{src['n']}:{src['h']}",
            "target": f"{tgt['n']}:{tgt['h']}"}


def fast_hash_works(ctx: Ctx, m: TableMove) -> bool:
    """Whether every copied column's type can be hashed without its text form."""
    row = sql.SQL(", ").join(c.up_sql("s") for c in m.copied)
    try:
        with ctx.conn.transaction():
            ctx.conn.execute(
                sql.SQL("SELECT {} FROM {} s LIMIT 1").format(row_hash(row, True), m.source)
            )
    except (errors.UndefinedFunction, errors.FeatureNotSupported):
        return False
    return True


def forward_steps(m: TableMove) -> list[Step]:
    return [
        Step(capture.replay_batch_sql(capture.forward(m)), "ROW EXCLUSIVE on the target"),
        *[
            step
            for seg in m.segments()
            for step in (
                Step(chunk_end_sql(seg, lo=True), "none"),
                Step(checksum_sql(seg, lo=True, hi=True), "none (REPEATABLE READ snapshot)"),
            )
        ],
    ]


@dataclass
class Mismatch:
    lo: list[str] | None
    hi: list[str] | None
    source: str
    target: str


def chunk_params(lo: list[str] | None, hi: list[str] | None) -> dict[str, Any]:
    p: dict[str, Any] = {"chunk": CHUNK}
    for i, v in enumerate(lo or []):
        p[f"lo{i}"] = v
    for i, v in enumerate(hi or []):
        p[f"hi{i}"] = v
    return p


def _check_chunk(
    ctx: Ctx,
    m: TableMove,
    lo: list[str] | None,
    fast: bool,
    pair: Pair | None = None,
) -> tuple[list[str] | None, dict[str, Any]]:
    conn = ctx.conn
    with snapshot_txn(conn, read_only=True):
        r = conn.execute(chunk_end_sql(m, lo is not None), chunk_params(lo, None)).fetchone()
        hi = r["hi"] if r else None
        if pair is not None:
            return hi, _split_checksum(ctx, pair, m, lo, hi, fast)
        return hi, checksum(ctx, m, lo, hi, fast)


def checksum(
    ctx: Ctx, m: TableMove, lo: list[str] | None, hi: list[str] | None, fast: bool
) -> dict[str, Any]:
    """Both sides' checksums of one chunk (call inside a snapshot transaction)."""
    res = ctx.conn.execute(
        checksum_sql(m, lo is not None, hi is not None, fast), chunk_params(lo, hi)
    ).fetchone()
    assert res is not None
    return dict(res)


NARROW_TO = 64


def _narrow(ctx: Ctx, m: TableMove, bad: Mismatch, rows: int, fast: bool) -> Mismatch:
    """Bisect a differing chunk down to a range of at most NARROW_TO source rows."""
    conn = ctx.conn
    while rows > NARROW_TO:
        half = rows // 2
        with snapshot_txn(conn, read_only=True):
            params = chunk_params(bad.lo, bad.hi)
            params["chunk"] = half
            r = conn.execute(
                chunk_end_sql(m, bad.lo is not None, bad.hi is not None), params
            ).fetchone()
            if r is None:
                break
            mid = r["hi"]
            first = checksum(ctx, m, bad.lo, mid, fast)
            if first["source"] != first["target"]:
                bad, rows = Mismatch(bad.lo, mid, first["source"], first["target"]), half
            else:
                second = checksum(ctx, m, mid, bad.hi, fast)
                if second["source"] == second["target"]:
                    break  # changed under us while narrowing: keep the wider range
                bad, rows = Mismatch(mid, bad.hi, second["source"], second["target"]), rows - half
    return bad


def drain(ctx: Ctx, m: TableMove, until: int = 0) -> int:
    """Replay the forward log until at most `until` entries are left (or it stops shrinking)."""
    d = capture.forward(m)
    total = 0
    while True:
        n = capture.replay_batch(ctx.conn, d, 10_000)
        total += n
        if n < 10_000 or capture.backlog(ctx.conn, d) <= until:
            return total


Proven = list[tuple[Any, Any, int, str]]  # per chunk: lo, hi, rows, checksum


def settle(
    ctx: Ctx, m: TableMove, lo: list[str] | None, hi: list[str] | None,
    res: dict[str, Any], fast: bool,
) -> tuple[dict[str, Any], Mismatch | None]:
    """A chunk's checksums made final: while they differ, replay and look again (the target
    may trail by entries committed after our log read); if they still differ, narrow the
    range down, repair it (unless --no-repair) and look at the whole chunk again. The last
    checksums, and the narrowed range that still differs, if any."""
    tries = 0
    while res["source"] != res["target"] and tries < RECHECKS:
        tries += 1
        drain(ctx, m)
        time.sleep(0.05 * tries)
        with snapshot_txn(ctx.conn, read_only=True):
            res = checksum(ctx, m, lo, hi, fast)
    repairs = 0
    while res["source"] != res["target"]:
        bad = _narrow(ctx, m, Mismatch(lo, hi, res["source"], res["target"]),
                      int(res["rows"]), fast)
        if not (ctx.controls.repair and repairs < MAX_REPAIRS and _repaired(ctx, m, bad, fast)):
            return res, bad
        repairs += 1
        with snapshot_txn(ctx.conn, read_only=True):
            res = checksum(ctx, m, lo, hi, fast)
    return res, None


def _scan(
    ctx: Ctx, m: TableMove, estimate: int, checked: int = 0, proven: Proven | None = None,
    pair: Pair | None = None,
) -> tuple[int, Mismatch | None]:
    """Check every chunk of one segment (the table, or one leaf partition) in key order, each
    committed with its checkpoint; stop at the first chunk that still differs after its
    re-checks (and repairs), narrowed to a small key range. `checked` counts rows of earlier
    segments; each equal chunk is appended to `proven`."""
    t0 = time.monotonic()
    lo: list[str] | None = None
    first = checked
    fast = fast_hash_works(ctx, m)
    while True:
        hi, res = _check_chunk(ctx, m, lo, fast, pair)
        res, bad = settle(ctx, m, lo, hi, res, fast)
        if bad is not None:
            return checked, bad
        if proven is not None:
            proven.append((lo, hi, int(res["rows"]), str(res["source"])))
        checked += int(res["rows"])
        rate = (checked - first) / max(time.monotonic() - t0, 1e-6)
        with ctx.conn.transaction():
            ctx.store.checkpoint(
                m.label, "verify", rows_done=checked,
                checkpoint={"last": hi, "part": m.part} if m.part else {"last": hi},
                rows_per_s=rate, rows_estimated=estimate,  # so status shows verify's ETA
            )
        ctx.progress(Rows(m.label, "verify", checked, max(estimate, checked), rate, m.part))
        if hi is None:
            return checked, None
        lo = hi


def pending_sql(m: TableMove, lo: bool, hi: bool) -> sql.Composed:
    """Log entries for keys in a range: changes still to replay there."""
    return sql.SQL("SELECT count(*) AS n FROM {} l WHERE {}").format(
        capture.forward(m).log, key_bounds(m, "l", m.key_source, lo, hi))


def repair_sql(m: TableMove, lo: bool, hi: bool) -> list[sql.Composed]:
    """The target's rows in a key range replaced by the source's (one segment: the table, or
    one leaf partition and its counterpart)."""
    vals = sql.SQL(", ").join(c.up_sql("s") for c in m.copied)
    return [
        sql.SQL("DELETE FROM {} t WHERE {}").format(
            m.target, key_bounds(m, "t", m.key_target, lo, hi)),
        sql.SQL("INSERT INTO {} ({}){} SELECT {} FROM {} s WHERE {}").format(
            m.target, idents(c.target for c in m.copied), m.overriding, vals, m.source,
            key_bounds(m, "s", m.key_source, lo, hi)),
    ]


def _repaired(ctx: Ctx, m: TableMove, bad: Mismatch, fast: bool) -> bool:
    """Repair a range that still differs after its re-checks, when no change to its keys is
    waiting in the log (one short transaction, logged with the range and the row counts);
    whether the range is equal now. A change made meanwhile fires the capture trigger, so
    replay brings it as it brings any other."""
    conn, lo, hi = ctx.conn, bad.lo is not None, bad.hi is not None
    params = chunk_params(bad.lo, bad.hi)
    with snapshot_txn(conn):
        r = conn.execute(pending_sql(m, lo, hi), params).fetchone()
        if r is None or int(r["n"]) > 0:
            return False
        delete, insert = repair_sql(m, lo, hi)
        deleted = conn.execute(delete, params).rowcount
        inserted = conn.execute(insert, params).rowcount
        after = checksum(ctx, m, bad.lo, bad.hi, fast)
        ctx.store.log(
            "verify", "repair", table=m.label, stage="verify",
            detail={"lo": bad.lo, "hi": bad.hi, "partition": m.part, "deleted": deleted,
                    "inserted": inserted, "source": bad.source, "target": bad.target},
        )
    return bool(after["source"] == after["target"])


def _describe(m: TableMove, mismatch: Mismatch) -> str:
    def key(k: list[str] | None, none: str) -> str:
        return none if k is None else "(" + ", ".join(k) + ")"

    where = f" of partition {m.part}" if m.part else ""
    return (
        f"source and target differ in keys ({', '.join(m.key_source)}){where} after "
        f"{key(mismatch.lo, '(start)')} up to {key(mismatch.hi, '(end)')}"
    )


def _scan_all(
    ctx: Ctx, m: TableMove, estimate: int, proven: dict[str, Proven], pair: Pair | None = None
) -> tuple[int, TableMove, Mismatch | None]:
    """Every segment in turn (each leaf partition against its counterpart); the rows checked,
    and the segment and range of the first difference, if any. `proven` gets each segment's
    chunks."""
    checked = 0
    for seg in m.segments():
        proven[seg.part or ""] = []
        checked, mismatch = _scan(ctx, seg, estimate, checked, proven[seg.part or ""], pair)
        if mismatch is not None:
            return checked, seg, mismatch
    return checked, m, None


class Verify(LoopStage):
    """Read-only proof that the target equals the source, chunk by chunk."""

    name = "verify"
    short = "verify"
    note = "read-only: nothing to undo; chunks repeat over the key range"

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        return forward_steps(moves[0]), []

    def run(self, ctx: Ctx, m: TableMove) -> None:
        """Verify the whole table; mark verify done, or failed naming the first bad key range."""
        touched = capture.forward(m).touched
        with ctx.conn.transaction():
            ctx.store.start(m.label, self.name, again=True, reset=True)
            # Until this pass ends, nothing is proven (the target may have been recopied).
            Proofs(ctx.conn, ctx.control, ctx.plan.name).forget(m.label)
            if touched is not None:
                # A full pass proves every chunk: what replay touched before it is moot.
                ctx.conn.execute(sql.SQL("DELETE FROM {}").format(touched))
        drain(ctx, m)
        t0 = time.monotonic()
        proven: dict[str, Proven] = {}
        # Two sessions, source and target side by side, where there are cores for both.
        pair = Pair(ctx) if (m.options.copy_workers or os.cpu_count() or 1) > 1 else None
        try:
            checked, seg, mismatch = _scan_all(
                ctx, m, ctx.store.row(m.label, "copy").rows_done, proven, pair)
        finally:
            if pair is not None:
                pair.close()
        duration = (time.monotonic() - t0) * 1000
        if mismatch is not None:
            fail(ctx, m, seg, mismatch, duration)
        with ctx.conn.transaction():
            ctx.store.finish(m.label, self.name, rows_done=checked)
            proofs = Proofs(ctx.conn, ctx.control, ctx.plan.name)
            proofs.forget(m.label)
            for part, chunks in proven.items():
                proofs.replace(m.label, part, chunks)
            ctx.store.log(
                "verify", "ok", table=m.label, stage=self.name, duration_ms=duration,
                detail={"rows": checked},
            )


def fail(ctx: Ctx, m: TableMove, seg: TableMove, mismatch: Mismatch, duration: float) -> None:
    """Mark verify failed, naming the segment and range that still differ, and stop."""
    with ctx.conn.transaction():
        ctx.store.fail(m.label, "verify", _describe(seg, mismatch))
        ctx.store.log(
            "verify", "mismatch", table=m.label, stage="verify", duration_ms=duration,
            detail={"lo": mismatch.lo, "hi": mismatch.hi, "source": mismatch.source,
                    "target": mismatch.target, "partition": seg.part},
        )
    path = ctx.loaded.path
    raise StageError(
        f"{m.label}: {_describe(seg, mismatch)}",
        hint=f"inspect that range; `orchestrator rollback {path} --table {m.label} --to "
        f"dual_write` then `orchestrator apply {path} --table {m.label}` recopies the "
        "table",
    )


VERIFY = Verify()

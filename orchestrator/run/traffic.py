"""Finalize's gate on observed traffic: no finalize while the application still uses the old
names through the compatibility views, unless the operator forces it.

Finalize removes the way back (the retired table, the reverse capture). An application that
still reads or writes the old names has not finished its own move, so finalize asks
compat-usage's evidence (tools/scan.py) first:

- sessions holding a lock on a compatibility view right now;
- with pg_stat_statements, statements naming the old name whose count grew since the swap.
  Each swap records a baseline of those counts just after it commits (`compat_baseline`):
  what ran before it (the application's reads of the old table, and the orchestrator's own
  copy, verify and DDL) is not evidence. Counts say how much, not when, so each look records
  the statements that grew and when that set last changed (`compat_seen`); finalize refuses
  while that is within the plan's `finalize_quiet_period_s`. The first look at a growth
  cannot tell when it happened, so it counts as now: the quiet period starts there.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from orchestrator.errors import StageError
from orchestrator.model.context import Ctx
from orchestrator.tools.audit import qualified
from orchestrator.tools.scan import compat_views, live_users, statement_counts

BASELINE_KEY = "compat_baseline"
SEEN_KEY = "compat_seen"
LOOK_S = 0.05  # one look at pg_locks (sessions using a view now)


def _key(query: str) -> str:
    return hashlib.sha1(query.encode(), usedforsecurity=False).hexdigest()[:16]


def record_baseline(ctx: Ctx, tables: list[str]) -> None:
    """Just after a swap: the counts so far of statements naming the tables' old names."""
    counts = statement_counts(ctx.conn, ctx.plan, set(tables))
    if counts is None:
        return
    with ctx.conn.transaction():
        for t in tables:
            ctx.store.save(t, BASELINE_KEY, {_key(q): c for c, q in counts.get(t, [])})
            ctx.store.unsave(t, SEEN_KEY)


def recent_use(ctx: Ctx, tables: list[str], quiet_s: float) -> list[str]:
    """What used the compatibility views of `tables` within the last `quiet_s` seconds, as
    sentences naming the view and the statements or sessions seen. Records what it saw."""
    views = {t: oid for t, oid in compat_views(ctx.conn, ctx.plan).items() if t in tables}
    live = live_users(ctx.conn, views, LOOK_S)
    counts = statement_counts(ctx.conn, ctx.plan, set(views))
    now = datetime.now(UTC)
    seen: list[str] = []
    for table in views:
        view = qualified(ctx.plan.source_schema, table)
        if live.get(table):
            seen.append(f"{view} is in use now by {', '.join(sorted(live[table]))}")
        if counts is None:
            continue  # no pg_stat_statements: the live look is all the evidence
        base = ctx.store.load(table, BASELINE_KEY) or {}
        grown = {_key(q): (c, q) for c, q in counts.get(table, []) if c > base.get(_key(q), 0)}
        before = ctx.store.load(table, SEEN_KEY) or {}
        now_seen = {k: c for k, (c, _) in grown.items()}
        changed = now if now_seen and before.get("grown") != now_seen else (
            datetime.fromisoformat(before["changed_at"]) if before.get("changed_at") else None)
        with ctx.conn.transaction():
            ctx.store.save(table, SEEN_KEY, {
                "grown": now_seen, "changed_at": changed.isoformat() if changed else None})
        if grown and changed is not None and (now - changed).total_seconds() < quiet_s:
            top = sorted(grown.values(), key=lambda x: -x[0])[:3]
            statements = "; ".join(" ".join(q.split())[:120] for _, q in top)
            since = ("first seen now" if changed == now
                     else f"last grew {changed:%Y-%m-%d %H:%M:%S} UTC")
            seen.append(f"{view}: statements since the swap ({since}): {statements}")
    return seen


def refuse_recent_use(ctx: Ctx, tables: list[str]) -> None:
    """Raise, changing nothing, if a compatibility view of `tables` was used within the
    plan's quiet period."""
    quiet = ctx.plan.finalize_quiet_period_s
    seen = recent_use(ctx, tables, quiet)
    if seen:
        raise StageError(
            f"finalize refused: the compatibility views were used within the last {quiet:g} s "
            "(the plan's finalize_quiet_period_s); nothing was finalized: " + " | ".join(seen),
            hint=f"move the application to the new names (`orchestrator compat-usage "
            f"{ctx.loaded.path}` shows what still uses the old ones) and rerun after a quiet "
            "period; or finalize anyway with --force (the views stay; only the way back goes)")

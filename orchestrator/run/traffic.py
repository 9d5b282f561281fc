"""Finalize's gate on observed traffic: no finalize while the application still uses the old
names through the compatibility views, unless the operator forces it.

Finalize removes the way back (the retired table, the reverse capture). An application that
still reads or writes the old names has not finished its own move, so finalize asks
compat-usage's evidence (tools/scan.py) first: sessions holding a lock on a compatibility view
right now, and pg_stat_statements' counts of statements naming the old names. Counts are
cumulative, so each look records them in the control store (`compat_seen`: the count and when
it last changed); a view whose count changed within the plan's `finalize_quiet_period_s` was
used within it. The first look at a count above zero cannot tell when it grew, so it counts as
now: the quiet period starts at the first finalize that sees it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from orchestrator.errors import StageError
from orchestrator.model.context import Ctx
from orchestrator.tools.scan import compat_usage

SEEN_KEY = "compat_seen"
LOOK_S = 0.05  # one look at pg_locks (sessions using a view now)


def recent_use(ctx: Ctx, tables: list[str], quiet_s: float) -> list[str]:
    """What used the compatibility views of `tables` within the last `quiet_s` seconds,
    as sentences naming the view and the statements or sessions seen. Records the counts."""
    usage = compat_usage(ctx.conn, ctx.loaded, LOOK_S)
    now = datetime.now(UTC)
    seen: list[str] = []
    for v in usage.views:
        if v.table not in tables or not v.exists:
            continue
        if v.live:
            seen.append(f"{v.view} is in use now by {', '.join(v.live)}")
        if v.calls is None:
            continue
        before = ctx.store.load(v.table, SEEN_KEY) or {}
        changed = now if v.calls > 0 and before.get("calls") != v.calls else (
            datetime.fromisoformat(before["changed_at"]) if before.get("changed_at") else None)
        with ctx.conn.transaction():
            ctx.store.save(v.table, SEEN_KEY, {
                "calls": v.calls, "changed_at": changed.isoformat() if changed else None})
        if changed is not None and (now - changed).total_seconds() < quiet_s:
            statements = "; ".join(" ".join(s.split())[:120] for s in v.statements[:3])
            since = ("first seen now" if changed == now
                     else f"last grew {changed:%Y-%m-%d %H:%M:%S} UTC")
            seen.append(f"{v.view}: {v.calls} statement calls ({since}): {statements}")
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

"""Replay of the capture logs between commands: forward while the target follows the source
(after the copy, until cutover), reverse while the retired table follows the target (after
cutover, until finalize). Whichever command runs replays (docs/design.md, invariant 10)."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.model.context import Ctx
from orchestrator.sql import capture
from orchestrator.stages import verify
from orchestrator.stages.copy import COPY
from orchestrator.stages.registry import COPY_STRATEGY


def replay_once(ctx: Ctx, done: Callable[[str, str], bool]) -> int:
    """Replay every active log once; the number of log entries replayed."""
    copied, swapped = COPY.name, COPY_STRATEGY.swap.name
    final = COPY_STRATEGY.final.name
    total = 0
    for m in ctx.moves.values():
        if m.strategy != COPY_STRATEGY.name:
            continue  # only the copy strategy captures changes
        if done(m.label, copied) and not done(m.label, swapped):
            total += verify.drain(ctx, m)
        elif done(m.label, swapped) and not done(m.label, final):
            total += capture.drain(ctx.conn, capture.reverse(m))
    return total

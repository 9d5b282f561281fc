"""Which stages each strategy has, in order: the one place a stage list is written.

The engine walks these lists; the dry-run renders them; `apply --until`, `rollback --to`, the
status columns and the tests read them. A new strategy is a new `Strategy` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.model.move import TableMove
from orchestrator.plan import Strategy as StrategyName
from orchestrator.stages.base import Phase, Stage
from orchestrator.stages.copy import COPY
from orchestrator.stages.cutover import CUTOVER
from orchestrator.stages.dual_write import DUAL_WRITE
from orchestrator.stages.finalize import FINALIZE_COPY, FINALIZE_RENAME
from orchestrator.stages.prepare import PREPARE
from orchestrator.stages.remote_swap import REMOTE_CUTOVER, REMOTE_FINALIZE
from orchestrator.stages.remote_sync import REMOTE_PREPARE, REMOTE_SYNC, REMOTE_VERIFY
from orchestrator.stages.rename import RENAME
from orchestrator.stages.verify import VERIFY


@dataclass(frozen=True)
class Strategy:
    """A way to move a table: its stages in the order they run."""

    name: str
    stages: tuple[Stage, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def in_phase(self, *phases: Phase) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.phase in phases)

    @property
    def swap(self) -> Stage:
        """The stage that switches the application over (the cutover command's)."""
        return self.in_phase(Phase.swap)[0]

    @property
    def final(self) -> Stage:
        return self.in_phase(Phase.final)[0]

    def before_swap(self, until: str) -> tuple[Stage, ...]:
        """The stages `apply --until` runs before the swap: up to `until`, or all of them."""
        stages = self.in_phase(Phase.apply)
        for i, s in enumerate(stages):
            if until == s.name or until in s.also:
                return stages[: i + 1]
        return stages

    @property
    def reversible(self) -> tuple[Stage, ...]:
        """The stages a rollback undoes, in forward order."""
        return self.in_phase(Phase.apply, Phase.swap)


COPY_STRATEGY = Strategy(StrategyName.copy.value, (PREPARE, DUAL_WRITE, COPY, VERIFY, CUTOVER,
                                                   FINALIZE_COPY))
RENAME_STRATEGY = Strategy(StrategyName.rename.value, (RENAME, FINALIZE_RENAME))
# A table whose target schema lives on another server (docs/cross-server.md).
REMOTE_STRATEGY = Strategy(StrategyName.remote.value, (REMOTE_PREPARE, REMOTE_SYNC, REMOTE_VERIFY,
                                                       REMOTE_CUTOVER, REMOTE_FINALIZE))
STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (COPY_STRATEGY, RENAME_STRATEGY, REMOTE_STRATEGY)}

# A plan view is created once the tables it reads have moved: one stage, under `view:<name>`.
VIEW_STAGE = "create"

# `rollback --to`: a stage to keep, the ones after it undone (the swap is undone, never kept).
ROLLBACK_TO: tuple[str, ...] = tuple(dict.fromkeys(
    s.name for strategy in STRATEGIES.values() for s in strategy.in_phase(Phase.apply)))
# `apply --until`: those, or the cutover too (apply never finalizes).
APPLY_UNTIL: tuple[str, ...] = (*ROLLBACK_TO, COPY_STRATEGY.swap.name)
# Stages whose `done` nothing may roll back.
TERMINAL: frozenset[str] = frozenset(
    s.name for strategy in STRATEGIES.values() for s in strategy.in_phase(Phase.final)
)


def strategy_of(m: TableMove) -> Strategy:
    return STRATEGIES[m.strategy]


def stage_names(strategy: str) -> tuple[str, ...]:
    return STRATEGIES[strategy].names


def view_key(name: str) -> str:
    """The control store's table name for a plan view."""
    return f"view:{name}"

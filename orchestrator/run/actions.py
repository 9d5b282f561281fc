"""The operator's actions on one table, as the cockpit offers them: each names what it will do
(the confirmation's text) and runs through the same session and engine verbs as the CLI, so
it takes the same advisory locks, gates and lock_timeout, and is recorded in the event log
under the operator's database role like the CLI's commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from orchestrator.db import connect
from orchestrator.errors import StageError
from orchestrator.model.context import Controls
from orchestrator.plan import LoadedPlan
from orchestrator.run.events import Progress
from orchestrator.run.gates import Gates
from orchestrator.run.session import session
from orchestrator.stages.registry import ROLLBACK_TO, STRATEGIES
from orchestrator.state.store import change_setting, parse_setting

if TYPE_CHECKING:  # the status model sits above run/ (observe/ imports run/)
    from orchestrator.observe.status import TableStatus


class Kind(StrEnum):
    next = "next"  # run the table's next stage
    cutover = "cutover"
    undo = "undo"  # roll back the last stage done
    rollback = "rollback"  # roll back the whole unit
    pause = "pause"
    resume = "resume"
    setting = "setting"  # batch_size or sleep_ms
    apply_all = "apply_all"  # every table of the plan up to verify
    cutover_all = "cutover_all"  # every table of the plan, unit by unit


@dataclass(frozen=True)
class Action:
    kind: Kind
    table: str
    stage: str = ""  # next: the stage to run; undo: the stage undone
    to: str | None = None  # undo: the stage kept
    key: str = ""  # setting
    value: str = ""

    def describe(self) -> str:
        """What it will do, in the words of the confirmation."""
        t = self.table
        return {
            Kind.next: f"run {self.stage} of {t}",
            Kind.cutover: f"cut {t} over: the application switches to the new table; the old "
                          "name becomes a compatibility view",
            Kind.undo: f"roll back {self.stage} of {t}" + (
                f" (keeping {self.to})" if self.to else " (its unit entirely)"),
            Kind.rollback: f"roll back every stage of {t} and its unit",
            Kind.pause: f"pause the copy of {t} between batches",
            Kind.resume: f"resume the copy of {t}",
            Kind.setting: f"set {self.key} = {self.value} for {t}",
            Kind.apply_all: "apply the whole plan up to verify (every table, wave by wave)",
            Kind.cutover_all: "cut the whole plan over, unit by unit: the application "
                              "switches to the new tables",
        }[self.kind]


def next_action(t: TableStatus) -> Action:
    """The table's next stage: apply up to it, its swap, or finalize."""
    if not t.stage:
        raise StageError(f"{t.name}: every stage is done (final)", hint="nothing to run")
    strategy = STRATEGIES[t.strategy]
    if t.stage == strategy.swap.name:
        return Action(Kind.cutover, t.name, t.stage)
    return Action(Kind.next, t.name, t.stage)


def undo_action(t: TableStatus) -> Action:
    """Roll back the last stage that ran (done, failed or running), keeping the one before."""
    strategy = STRATEGIES[t.strategy]
    ran = [s.name for s in strategy.reversible
           if t.stages[s.name].status in ("done", "failed", "running")]
    if not ran:
        raise StageError(f"{t.name}: no stage to roll back",
                         hint="only stages before finalize can be rolled back")
    last = ran[-1]
    names = [s.name for s in strategy.reversible]
    before = names[names.index(last) - 1] if names.index(last) > 0 else None
    return Action(Kind.undo, t.name, last, before if before in ROLLBACK_TO else None)


def rollback_action(t: TableStatus) -> Action:
    """Roll back every stage of the table's unit: refused when none has run."""
    if all(s.status in ("pending", "rolled_back") for s in t.stages.values()):
        raise StageError(f"{t.name}: nothing to roll back (no stage has run)",
                         hint="n runs its next stage")
    return Action(Kind.rollback, t.name)


def perform(dsn: str, loaded: LoadedPlan, action: Action, progress: Progress,
            controls: Controls | None = None, hold: Gates | None = None) -> None:
    """Run one action (raises the engine's errors, which name the next command)."""
    if action.kind in (Kind.pause, Kind.resume, Kind.setting):
        key = "paused" if action.kind != Kind.setting else action.key
        value = {"pause": "true", "resume": "false"}.get(action.kind, action.value)
        with connect(dsn, autocommit=True) as conn:
            change_setting(conn, loaded, key, parse_setting(key, value), action.table)
        return
    with session(dsn, loaded, progress, controls, hold) as eng:
        if action.kind == Kind.apply_all:
            eng.apply(None, "verify")
            return
        if action.kind == Kind.cutover_all:
            eng.cutover(None)
            return
        strategy = STRATEGIES[loaded.plan.options_for(loaded.plan.table(action.table)).strategy]
        if action.kind == Kind.cutover:
            eng.cutover([action.table])
        elif action.kind == Kind.next and action.stage == strategy.final.name:
            eng.finalize([action.table])
        elif action.kind == Kind.next:
            eng.apply([action.table], action.stage)
        elif action.kind == Kind.undo:
            eng.rollback(action.table, action.to)
        else:
            eng.rollback(action.table)

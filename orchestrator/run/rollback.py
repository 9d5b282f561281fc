"""Rollback policy: what may be undone, in which order, and what a rollback cleans up.

A unit goes back as a whole (a foreign-key cycle moved together), latest stage first, down to
the stage named by `--to`. An atomic stage that failed or was interrupted left nothing, so it
is only recorded as undone; a loop stage that ran at all may have left batches, so it is undone
whatever its status. A finalized table cannot go back, and neither can a table that a plan
view still reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.errors import StageError
from orchestrator.model.catalog import EMPTY_SCHEMA
from orchestrator.model.context import Controls, Ctx, policy_for
from orchestrator.model.graph import Unit
from orchestrator.model.move import TableMove
from orchestrator.plan import LoadedPlan, Plan
from orchestrator.run.runner import Runner
from orchestrator.stages import registry
from orchestrator.stages.base import Action, Kind, Phase, Stage, Step
from orchestrator.state.store import Status, Store


class Engine(Protocol):
    """What the rollback policy needs of the engine (run/engine.py), which calls it."""

    @property
    def conn(self) -> Conn: ...
    @property
    def loaded(self) -> LoadedPlan: ...
    @property
    def controls(self) -> Controls: ...
    @property
    def plan(self) -> Plan: ...
    @property
    def store(self) -> Store: ...
    @property
    def runner(self) -> Runner: ...
    def context(self) -> Ctx: ...
    def units(self, ctx: Ctx, tables: list[str] | None) -> list[Unit]: ...
    def status(self, table: str, stage: str) -> str: ...
    def done(self, table: str, stage: str) -> bool: ...
    def undo(self, ctx: Ctx, stage: Stage, moves: list[TableMove]) -> None: ...
    def finish_after(self, stage: Stage, moves: list[TableMove], *, reverse: bool) -> None: ...



def roll_back_plan(eng: Engine, to: str | None) -> list[str]:
    """Undo every unit of the plan, the last wave first (a unit's tables are referenced by
    later waves' foreign keys, so those go back before it). Every unit is checked before any
    is touched: a refusal changes nothing."""
    ctx = eng.context()
    units = list(reversed(eng.units(ctx, None)))
    for unit in units:
        _refuse_finalized(eng, unit.members)
    _refuse_stranding(eng, ctx, [m for u in units for m in ctx.unit_moves(u)])
    undone: list[str] = []
    for unit in units:
        undone += roll_back_unit(eng, unit.members[0], to)
    return undone


def roll_back_unit(eng: Engine, table: str, to: str | None) -> list[str]:
    """Undo the stages of `table`'s unit after `to` (all of them without `to`), latest first;
    the `table:stage` pairs undone."""
    ctx = eng.context()
    unit = next(iter(eng.units(ctx, [table])), None)
    if unit is None:
        raise StageError(f"{table}: not part of plan {eng.plan.name}", hint="check --table")
    _refuse_finalized(eng, unit.members)
    moves = ctx.unit_moves(unit)
    _refuse_stranding(eng, ctx, moves)
    undone: list[str] = []
    for strategy in {registry.strategy_of(m).name: registry.strategy_of(m) for m in moves}.values():
        mine = [m for m in moves if m.strategy == strategy.name]
        _refuse_unknown_stage(eng, table, strategy, to)
        undone += _roll_back(eng, strategy, mine, to)
    drop_empty_schemas(eng)
    return undone


def _refuse_finalized(eng: Engine, tables: tuple[str, ...]) -> None:
    """A finalized table has no source left to build a move from: checked by name."""
    for name in tables:
        final = registry.STRATEGIES[eng.plan.options_for(eng.plan.table(name)).strategy].final
        if eng.done(name, final.name):
            raise StageError(
                f"{name}: finalized, so it cannot be rolled back",
                hint="finalize dropped the retired table; move it back with a new plan if you "
                "must",
            )


def _refuse_unknown_stage(
    eng: Engine, table: str, strategy: registry.Strategy, to: str | None
) -> None:
    if to is None or to in strategy.names:
        return
    if len(strategy.reversible) == 1:
        raise StageError(
            f"{table}: the {strategy.name} strategy has a single stage, so there is nothing to "
            f"roll back to ({to})",
            hint=f"run `orchestrator rollback {eng.loaded.path} --table {table}` without --to",
        )
    raise StageError(
        f"--to {to}: not a stage of the {strategy.name} strategy",
        hint=f"use one of {', '.join(s.name for s in strategy.in_phase(Phase.apply))}",
    )


def _roll_back(
    eng: Engine, strategy: registry.Strategy, moves: list[TableMove], to: str | None
) -> list[str]:
    # A rollback of a swap killed after its swap back committed left the keys it re-added
    # NOT VALID (they are validated after the lock): finish them first.
    swap = strategy.swap
    swapped_back = [m for m in moves if eng.status(m.label, swap.name) == Status.rolled_back]
    if swapped_back:
        eng.finish_after(swap, swapped_back, reverse=True)
    order = list(strategy.reversible)
    stop = strategy.names.index(to) if to else -1
    undone: list[str] = []
    for stage in reversed(order[stop + 1 :]):
        statuses = {m.label: eng.status(m.label, stage.name) for m in moves}
        # A loop stage that ran at all may have left batches behind; an atomic stage left
        # nothing unless it is done.
        undo = {Status.done, Status.failed, Status.running} if stage.kind == Kind.loop else {
            Status.done
        }
        forget = [
            m for m in moves
            if statuses[m.label] in (Status.failed, Status.running)
            and statuses[m.label] not in undo
        ]
        _forget_attempts(eng, stage.name, forget)
        todo = [m for m in moves if statuses[m.label] in undo]
        if todo:
            eng.undo(eng.context(), stage, todo)
            undone += [f"{m.label}:{stage.name}" for m in todo]
    return undone


def _forget_attempts(eng: Engine, stage: str, moves: list[TableMove]) -> None:
    """A failed or interrupted atomic stage left nothing: record it as rolled back."""
    if not moves:
        return
    with eng.conn.transaction():
        for m in moves:
            eng.store.forget(m.label, stage)
            eng.store.log(
                f"rollback_{stage}", "ok", table=m.label, stage=stage,
                detail={"note": "the stage never committed; nothing to undo"},
            )


def _refuse_stranding(eng: Engine, ctx: Ctx, moves: list[TableMove]) -> None:
    """A plan view that reads a moved table would break if the table went back; a plan view
    dropped by hand is recorded as undone."""
    names = {m.label for m in moves}
    for v in eng.plan.views:
        exists = ctx.catalog.table(v.schema_, v.name) is not None
        if exists and names & set(v.depends_on):
            raise StageError(
                f"rolling back {', '.join(sorted(names))} would strand view "
                f"{v.schema_}.{v.name}, which reads the moved table",
                hint=f"drop the view first (DROP VIEW {v.schema_}.{v.name}), then roll back",
            )
        key = registry.view_key(v.name)
        if not exists and eng.done(key, registry.VIEW_STAGE):
            with eng.conn.transaction():
                eng.store.roll_back(key, registry.VIEW_STAGE)


def drop_empty_schemas(eng: Engine) -> None:
    """Drop the target schemas this plan created once nothing is left in them."""
    for key, schema in eng.store.saved_like("*", "created_schema:").items():
        row = eng.conn.execute(EMPTY_SCHEMA, {"s": str(schema)}).fetchone()
        if not (row and row["empty"]):
            continue
        stmt = sql.SQL("DROP SCHEMA IF EXISTS {} RESTRICT").format(sql.Identifier(str(schema)))
        action = Action("drop_schema", [Step(stmt)], record=_unsave(key))
        eng.runner.run(action, tables=[], stage="", policy=policy_for(
            eng.plan.defaults, eng.controls.lock_timeout_ms, eng.controls.swap))


def _unsave(key: str) -> Callable[[Store], None]:
    def unsave(store: Store) -> None:
        store.unsave("*", key)

    return unsave

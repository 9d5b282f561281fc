"""What a stage is: a name, its statements forward and back, the relations they lock, and how
it runs (one locked transaction, or a loop of committed batches).

Every stage of every strategy is one `Stage` object; `stages/registry.py` orders them per
strategy. The engine, the dry-run, `apply --until`, `rollback --to`, the status columns and the
tests read stage lists from the registry, never from names written elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

from psycopg import sql

from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.model.partitioning import PARTITIONS_KEY

if TYPE_CHECKING:
    from orchestrator.state.store import Store


@dataclass(frozen=True)
class Step:
    """One statement of a stage, with what it locks (for dry-runs and reviews)."""

    sql: sql.Composed | sql.SQL
    locks: str = ""
    # The statement that takes the stage's locks: its whole wait, over every relation it
    # locks, is bounded by lock_timeout (as a statement_timeout), not one lock_timeout each.
    bounded: bool = False


class Kind(StrEnum):
    ddl = "ddl"  # one transaction through the runner; its status commits with it
    loop = "loop"  # batches, each committed with its checkpoint; partial work may remain


class Phase(StrEnum):
    apply = "apply"  # `apply` runs it
    swap = "swap"  # switches the application over (`cutover`)
    final = "final"  # `finalize`: cannot be undone


@dataclass(frozen=True)
class Action:
    """One locked transaction: its statements, the relations they lock (regclass texts, to
    name blockers), and what it records in the control store with them."""

    name: str
    steps: list[Step]
    locks: list[str] = field(default_factory=list)
    record: Callable[[Store], None] | None = None
    # Work in the same transaction after the statements, before the status is recorded: a
    # cross-server swap waits there for the other server and changes it while it holds the
    # lock its statements took. It raises `GiveWay` to release the lock and try again later.
    inside: Callable[[], None] | None = None


class GiveWay(Exception):
    """Raised by an action's `inside` work: not ready yet (another server has not caught up);
    the runner rolls back, backs off and tries again, as after a lock timeout."""


class Stage:
    """One stage of a strategy. Subclasses set the class attributes and override what they do.

    `moves` is one table, or a whole unit for a stage with `per_unit` (the swap of a foreign
    key cycle is one transaction).
    """

    name: ClassVar[str]
    short: ClassVar[str]  # the status table's column header
    kind: ClassVar[Kind] = Kind.ddl
    phase: ClassVar[Phase] = Phase.apply
    per_unit: ClassVar[bool] = False
    # Whether `after` has statements to run once the lock is released.
    follow_up: ClassVar[bool] = False
    # For the dry-run: what the reviewer should know beyond the statements.
    note: ClassVar[str] = ""
    # Other strategies' stage names that `apply --until` treats as this stage (in a plan
    # mixing strategies, `--until copy` stops a table moving to another server after sync).
    also: ClassVar[tuple[str, ...]] = ()

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        return Action(self.name, [])

    def backward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        return Action(f"rollback_{self.name}", [])

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        """The statements both ways as the dry-run shows them, before anything ran."""
        return self.forward(ctx, moves).steps, self.backward(ctx, moves).steps

    def before(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        """Work outside the lock, just before the locked transaction (drains, re-checks)."""

    def prelude(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> Action | None:
        """A transaction of its own before the stage's: building beside, outside its lock."""
        return None

    def between_tries(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> None:
        """Work between two tries of the locked transaction, while backing off."""

    def after(self, ctx: Ctx, moves: list[TableMove], *, reverse: bool) -> list[Step]:
        """Statements to run once the transaction committed, each in a transaction of its own
        (e.g. validating foreign keys added NOT VALID, outside the lock)."""
        return []



class LoopStage(Stage, ABC):
    """A stage that works in batches, each committed with its checkpoint (copy, verify)."""

    kind = Kind.loop

    @abstractmethod
    def run(self, ctx: Ctx, m: TableMove) -> None:
        """Do the work from the recorded checkpoint; mark the stage done at the end."""


def regclass(*parts: str) -> str:
    """A regclass text for pg_locks lookups (quoted, so any name works)."""
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def remember(ctx: Ctx, m: TableMove) -> Callable[[Store], None]:
    """Note, with the move's first stage: that the plan created the target schema (so a full
    rollback can drop it again once it is empty), and a partitioned table's partitions (every
    later stage refuses to run if they changed)."""
    created = m.target_schema not in ctx.catalog.existing_schemas
    schema = m.target_schema

    def save(store: Store) -> None:
        if created:
            store.save("*", f"created_schema:{schema}", schema)
        if m.partitioned:
            store.save(m.label, PARTITIONS_KEY, sorted(p.name for p in m.partitions))

    return save

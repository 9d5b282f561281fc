"""The plan resolved against the live catalog: every table's move, the graph, and the session
the stages work in (connection, control store, progress reporter, lock policy)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.db import Conn
from orchestrator.errors import ValidationFailed
from orchestrator.model.catalog import Catalog
from orchestrator.model.graph import DependencyGraph, Unit
from orchestrator.model.move import TableMove, build_move
from orchestrator.model.validate import inspect
from orchestrator.plan import Hook, LoadedPlan, Options, Plan, Strategy
from orchestrator.run.events import Progress, ignore
from orchestrator.state.store import Store


@dataclass(frozen=True)
class SwapControls:
    """How a swap (cutover, rename, their rollbacks) approaches its lock: it tries only when
    the stall forecast is clear (run/forecast.py), waiting up to `forecast_wait_s`; it ends
    the sessions in its way only when the operator set `terminate_after_ms`, and then only
    within the rules."""

    forecast: bool = True
    forecast_wait_s: float = 30.0
    # With the forecast on, a swap's LOCK waits at most this long per try (and lock_timeout
    # if that is shorter): an application statement queued behind a try that meets a young
    # transaction waits this, not all of lock_timeout. Tries are retried with jitter.
    try_ms: int = 100
    terminate_after_ms: int | None = None
    terminate_max_age_s: float = 600.0
    terminate_writers: bool = False


@dataclass(frozen=True)
class LockPolicy:
    """How long a locked transaction may wait for its locks, and how often it tries again."""

    lock_timeout_ms: int
    statement_timeout_ms: int
    retries: int
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    swap: SwapControls = SwapControls()

    @property
    def try_ms(self) -> int:
        """How long one try of a swap's LOCK may wait: lock_timeout, or shorter tries while
        the stall forecast decides when to try (SwapControls.try_ms)."""
        if self.swap.forecast:
            return min(self.lock_timeout_ms, self.swap.try_ms)
        return self.lock_timeout_ms


def policy_for(
    options: Options, lock_timeout_ms: int | None = None, swap: SwapControls | None = None
) -> LockPolicy:
    """The plan's (or a table's) lock options, with the operator's --lock-timeout over them."""
    return LockPolicy(
        lock_timeout_ms=lock_timeout_ms or options.lock_timeout_ms,
        statement_timeout_ms=options.statement_timeout_ms,
        retries=options.lock_retries,
        swap=swap or SwapControls(),
    )


@dataclass(frozen=True)
class Controls:
    """What the operator chose for this run, over the plan's options: the command's
    --lock-timeout, how swaps approach their lock, and how verify treats a difference."""

    lock_timeout_ms: int | None = None
    swap: SwapControls = SwapControls()
    # Verify replaces a target range that still differs after its re-checks (--no-repair:
    # it only reports it).
    repair: bool = True
    # Cutover verifies in full before its swap, however recent the last full pass.
    full_verify: bool = False
    # The command's --hook commands, run beside the plan's (run/hooks.py).
    hooks: tuple[Hook, ...] = ()
    # finalize despite recent use of the compatibility views (run/traffic.py).
    force: bool = False


@dataclass(frozen=True)
class Ctx:
    """One read of the catalog and everything resolved from it. Rebuilt after each swap,
    since a swap changes what the catalog says."""

    conn: Conn  # autocommit; stages open their own transactions
    loaded: LoadedPlan
    catalog: Catalog
    graph: DependencyGraph
    moves: dict[str, TableMove]
    store: Store
    progress: Progress = ignore
    controls: Controls = Controls()

    @property
    def plan(self) -> Plan:
        return self.loaded.plan

    @property
    def control(self) -> str:
        return self.plan.control_schema

    def policy(self, m: TableMove | None = None) -> LockPolicy:
        return policy_for(m.options if m is not None else self.plan.defaults,
                          self.controls.lock_timeout_ms, self.controls.swap)

    def unit_moves(self, unit: Unit) -> list[TableMove]:
        return [self.moves[n] for n in unit.members if n in self.moves]


def build_context(
    conn: Conn,
    loaded: LoadedPlan,
    progress: Progress = ignore,
    store: Store | None = None,
    controls: Controls | None = None,
) -> Ctx:
    """Read the catalog, check the plan and resolve every table's move (read-only)."""
    plan = loaded.plan
    report = inspect(conn, loaded)
    if not report.ok:
        problems = [f"{p.subject}: {p.message} (fix: {p.hint})" for p in report.problems]
        raise ValidationFailed(
            f"plan {plan.name} is not valid:\n  " + "\n  ".join(problems),
            hint=f"run `orchestrator validate {loaded.path}` and fix what it lists",
            problems=problems,
        )
    moves: dict[str, TableMove] = {}
    cat = report.catalog
    for spec in plan.tables:
        strategy = plan.options_for(spec).strategy
        rel = cat.table(plan.source_schema, spec.name)
        if rel is None or rel.kind == "v":
            # Already swapped: the source sits in the retired schema (copy) or in its target
            # schema (rename).
            rel = (
                cat.table(plan.retired_schema, spec.name)
                if strategy in (Strategy.copy, Strategy.remote)
                else cat.table(spec.schema_, spec.target_name)
            )
        if rel is not None and rel.kind in ("r", "p"):
            moves[spec.name] = build_move(plan, spec, rel, cat.partitions_of(*rel.qualified))
    return Ctx(
        conn=conn,
        loaded=loaded,
        catalog=cat,
        graph=report.graph,
        moves=moves,
        store=store or Store(conn, plan.control_schema, plan.name),
        progress=progress,
        controls=controls or Controls(),
    )

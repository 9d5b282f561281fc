"""The engine: the verbs an operator runs (apply, cutover, finalize, rollback, follow) over the
stage registry, the step runner and the control store.

Every verb is idempotent: a stage already done is skipped, and a rerun after a crash resumes.
A DDL stage is one locked transaction that also records its status and event (run/runner.py);
a loop stage commits a checkpoint with every batch. Which stages a table has, and in what
order, comes from its strategy in stages/registry.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.errors import LockTimeoutExhausted, StageError
from orchestrator.model import partitioning
from orchestrator.model.context import Controls, Ctx, build_context
from orchestrator.model.graph import Unit
from orchestrator.model.move import TableMove
from orchestrator.model.partitioning import PARTITIONS_KEY
from orchestrator.plan import LoadedPlan, Plan
from orchestrator.run import follow, gates, rollback, traffic, views
from orchestrator.run import jobs as jobs_of
from orchestrator.run.events import Progress, StageChanged, StageFailed, StageStarted
from orchestrator.run.gates import Gates
from orchestrator.run.runner import Runner, StepFailed
from orchestrator.stages import registry
from orchestrator.stages.base import (
    Action,
    Kind,
    LoopStage,
    Phase,
    Stage,
    Step,
    regclass,
)
from orchestrator.state.store import Status, Store


@dataclass(frozen=True)
class Engine:
    """One operator session on one plan (see run/session.py, which opens it)."""

    conn: Conn
    loaded: LoadedPlan
    progress: Progress
    controls: Controls = field(default_factory=Controls)  # the operator's, over the plan's
    hold: Gates = field(default_factory=Gates)  # what holds a swap (run/gates.py)

    @property
    def plan(self) -> Plan:
        return self.loaded.plan

    @property
    def store(self) -> Store:
        return Store(self.conn, self.plan.control_schema, self.plan.name, registry.TERMINAL)

    @property
    def runner(self) -> Runner:
        return Runner(self.conn, self.store, self.progress)

    def register(self) -> None:
        """Record the plan and a pending row for every stage of every table and view."""
        stages = {
            t.name: registry.stage_names(self.plan.options_for(t).strategy)
            for t in self.plan.tables
        }
        stages.update({registry.view_key(v.name): (registry.VIEW_STAGE,) for v in self.plan.views})
        with self.conn.transaction():
            self.store.register(self.loaded, stages)

    def context(self) -> Ctx:
        return build_context(self.conn, self.loaded, self.progress, self.store, self.controls)

    def status(self, table: str, stage: str) -> str:
        return self.store.status(table, stage)

    def done(self, table: str, stage: str) -> bool:
        return self.status(table, stage) == Status.done

    def units(self, ctx: Ctx, tables: list[str] | None) -> list[Unit]:
        units = [u for u in ctx.graph.units if u.kind == "tables"]
        if tables:
            unknown = [t for t in tables if t not in {x.name for x in self.plan.tables}]
            if unknown:
                raise StageError(
                    f"{', '.join(unknown)}: not a table of plan {self.plan.name}",
                    hint=f"tables of the plan: {', '.join(t.name for t in self.plan.tables)}",
                )
            units = [u for u in units if set(u.members) & set(tables)]
        return units

    # --- one stage, forward or back ---------------------------------------------------------

    def start(self, tables: list[str], stage: str) -> None:
        """Mark a stage running, committed on its own just before its work."""
        for name in tables:
            self.progress(StageStarted(name, stage))
        with self.conn.transaction():
            for name in tables:
                self.store.start(name, stage)

    def transact(
        self, ctx: Ctx, stage: Stage, action: Action, moves: list[TableMove], *,
        back: bool = False,
    ) -> None:
        """One stage's action through the runner, its status committed with it. On failure the
        stage is marked failed (a failed rollback keeps its status and notes the error)."""
        names = [m.label for m in moves]
        reset = back and stage.kind == Kind.loop

        def status(store: Store, name: str) -> None:
            if back:
                store.roll_back(name, stage.name, reset=reset)
            else:
                store.finish(name, stage.name)

        try:
            self.runner.run(
                action, tables=names, stage=stage.name, policy=ctx.policy(moves[0]),
                status=status,
                between_tries=lambda: stage.between_tries(ctx, moves, reverse=back),
            )
        except StepFailed as exc:
            if self.conn.broken or self.conn.closed:
                # Our session is gone (terminated, server down): nothing can be recorded on
                # it, and a second error from trying would hide the server's reason.
                raise exc.error from None
            error = str(exc.error).strip()
            self._record_failure(names, stage.name, action.name, error, exc.statement, back)
            raise StageError(
                f"{', '.join(names)}: {action.name} failed and was rolled back, nothing "
                f"changed: {error}\n  statement: {exc.statement}",
                hint=f"fix the cause, then rerun; or undo earlier stages with `orchestrator "
                f"rollback {self.loaded.path} --table {names[0]}`",
            ) from exc.error
        except LockTimeoutExhausted as exc:
            self._record_failure(names, stage.name, action.name, exc.message, None, back)
            raise
        done = Status.rolled_back if back else Status.done
        self.progress(StageChanged(",".join(names), stage.name, done))

    def _record_failure(
        self, names: list[str], stage: str, action: str, error: str, statement: str | None,
        back: bool,
    ) -> None:
        with self.conn.transaction():
            for name in names:
                if back:
                    self.store.note_error(name, stage, error)
                else:
                    self.store.fail(name, stage, error)
            self.store.log(action, "error", table=",".join(names), stage=stage,
                           statement=statement, detail={"error": error})
        self.progress(StageFailed(",".join(names), stage, error))

    def advance(self, ctx: Ctx, stage: Stage, moves: list[TableMove]) -> None:
        """Run a stage forward for one table (or a unit, for a per-unit stage)."""
        partitioning.refuse_drift(ctx.store, moves)
        if isinstance(stage, LoopStage):
            for m in moves:
                self.start([m.label], stage.name)
                stage.run(ctx, m)
                self.progress(StageChanged(m.label, stage.name, Status.done))
            return
        stage.before(ctx, moves, reverse=False)
        self._prelude(ctx, stage, moves, reverse=False)
        self.start([m.label for m in moves], stage.name)
        self.transact(ctx, stage, stage.forward(ctx, moves), moves)
        self.finish_after(stage, moves, reverse=False)

    def undo(self, ctx: Ctx, stage: Stage, moves: list[TableMove]) -> None:
        """Run a stage backwards: the whole unit at once for a per-unit stage."""
        partitioning.refuse_drift(ctx.store, moves)
        for group in [moves] if stage.per_unit else [[m] for m in moves]:
            self.progress(StageStarted(",".join(m.label for m in group), stage.name, True))
            stage.before(ctx, group, reverse=True)
            self._prelude(ctx, stage, group, reverse=True)
            self.transact(ctx, stage, stage.backward(ctx, group), group, back=True)
            self.finish_after(stage, group, reverse=True)

    def _prelude(self, ctx: Ctx, stage: Stage, moves: list[TableMove], *, reverse: bool) -> None:
        action = stage.prelude(ctx, moves, reverse=reverse)
        if action is None:
            return
        try:
            self.runner.run(action, tables=[m.label for m in moves], stage=stage.name,
                            policy=ctx.policy(moves[0]))
        except StepFailed as exc:
            raise StageError(
                f"{', '.join(m.label for m in moves)}: {action.name} failed, nothing was "
                f"swapped: {str(exc.error).strip()}\n  statement: {exc.statement}",
                hint="fix the cause, then rerun the same command",
            ) from exc.error

    def finish_after(self, stage: Stage, moves: list[TableMove], *, reverse: bool) -> None:
        """The statements a stage leaves for after its lock (validating foreign keys), each in
        its own transaction, read from a fresh catalog."""
        if not stage.follow_up:
            return
        ctx = self.context()
        labels = ",".join(m.label for m in moves)
        for step in stage.after(ctx, moves, reverse=reverse):
            try:
                self.runner.run(Action("validate_fk", [step]), tables=[labels], stage=stage.name,
                                policy=ctx.policy(moves[0]))
            except StepFailed as exc:
                raise StageError(
                    f"{', '.join(m.label for m in moves)}: the swap is done, but validating a "
                    f"foreign key failed: {str(exc.error).strip()}\n  statement: "
                    f"{exc.statement}",
                    hint="fix the offending rows, then rerun the same cutover command: it "
                    "validates what is left",
                ) from exc.error

    # --- the verbs --------------------------------------------------------------------------

    def apply(self, tables: list[str] | None = None, until: str = "verify",
              jobs: int = 1) -> None:
        """Walk the units in graph order, each table up to `until` (never finalize); with
        `jobs`, the units of a wave side by side (run/jobs.py)."""
        if until not in registry.APPLY_UNTIL:
            raise StageError(f"--until {until}: not a stage",
                             hint=f"use one of {', '.join(registry.APPLY_UNTIL)}")
        ctx = self.context()
        swap = until == registry.COPY_STRATEGY.swap.name

        def stages(eng: Engine, unit: Unit) -> None:
            ectx = eng.context() if eng is not self else ctx
            for m in ectx.unit_moves(unit):
                for stage in registry.strategy_of(m).before_swap(until):
                    eng._advance_table(ectx, stage, m)

        def then(unit: Unit) -> None:
            nonlocal ctx
            if swap:
                # The stages built the target: the swap reads it from a fresh catalog.
                self._swap_unit(self.context(), unit)
                ctx = self.context()

        for wave in jobs_of.by_wave(self.units(ctx, tables)):
            jobs_of.run_wave(self, wave, stages, jobs, then, lambda c: replace(self, conn=c))
        if swap:
            self.create_views(self.context())
        # Whichever command runs replays what the capture logged (docs/design.md).
        self.replay_once()

    def _advance_table(self, ctx: Ctx, stage: Stage, m: TableMove) -> None:
        if self.done(m.label, stage.name):
            return
        rel = ctx.catalog.table(m.source_schema, m.source_name)
        if rel is None or rel.kind not in ("r", "p"):
            raise StageError(
                f"{m.label}: the source table is not in place for {stage.name}",
                hint=f"`orchestrator status {self.loaded.path}` shows where it stands",
            )
        self.advance(ctx, stage, [m])

    def cutover(self, tables: list[str] | None = None) -> None:
        """Swap each unit over, after checking every unit is ready: a refusal changes nothing."""
        ctx = self.context()
        for unit in self.units(ctx, tables):
            for m in ctx.unit_moves(unit):
                self._refuse_unready(m, "; nothing was cut over")
        for unit in self.units(ctx, tables):
            self._swap_unit(ctx, unit)
            ctx = self.context()
        self.create_views(ctx)
        self.replay_once()

    def _refuse_unready(self, m: TableMove, suffix: str = "") -> None:
        """A swap needs every stage before it done; the last may be interrupted (`running`):
        the swap verifies again in full first and stops on any difference."""
        strategy = registry.strategy_of(m)
        before = strategy.in_phase(Phase.apply)
        if not before or self.done(m.label, strategy.swap.name):
            return
        last = before[-1]
        ready = all(self.done(m.label, s.name) for s in before[:-1]) and self.status(
            m.label, last.name
        ) in (Status.done, Status.running)
        if not ready:
            raise StageError(
                f"{m.label}: {strategy.swap.name} needs a clean {last.name} first ({last.name} "
                f"is {self.status(m.label, last.name)}){suffix}",
                hint=f"run `orchestrator apply {self.loaded.path} --table {m.label}`",
            )

    def _swap_unit(self, ctx: Ctx, unit: Unit) -> None:
        """Each strategy's swap stage for the unit's tables: per table, or the whole unit in one
        transaction (a foreign-key cycle swaps together)."""
        moves = ctx.unit_moves(unit)
        groups: dict[str, list[TableMove]] = {}
        for m in moves:
            groups.setdefault(m.strategy, []).append(m)
        for name in sorted(groups, key=lambda n: registry.STRATEGIES[n].swap.per_unit):
            swap = registry.STRATEGIES[name].swap
            for group in [groups[name]] if swap.per_unit else [[m] for m in groups[name]]:
                self._swap(ctx, swap, group)

    def _swap(self, ctx: Ctx, swap: Stage, moves: list[TableMove]) -> None:
        if all(self.done(m.label, swap.name) for m in moves):
            # A crash after the swap may have left foreign keys NOT VALID: finish them.
            self.finish_after(swap, moves, reverse=False)
            return
        for m in moves:
            self._refuse_unready(m)
            if not swap.per_unit:
                rel = ctx.catalog.table(m.source_schema, m.source_name)
                if rel is None or rel.kind not in ("r", "p"):
                    raise StageError(f"{m.label}: not found in {m.source_schema}",
                                     hint=f"`orchestrator status {self.loaded.path}`")
        # The operator's window, postpone file or readiness conditions hold the swap here.
        verified = {m.label for m in moves
                    if m.strategy == "copy" and self.done(m.label, "verify")}
        gates.wait(ctx, self.hold, moves, verified)
        self.advance(ctx, swap, moves)
        # What named the old names until now is not evidence against finalize later.
        traffic.record_baseline(ctx, [m.label for m in moves])

    def create_views(self, ctx: Ctx) -> None:
        """Create plan views whose tables have all moved (idempotent; run/views.py)."""
        views.create(ctx, self.runner, self.done, self.progress)

    def finalize(self, tables: list[str] | None = None) -> None:
        """Make each table's move final, once it has been swapped. Cannot be undone."""
        ctx = self.context()
        if self.plan.finalize_quiet_period_s > 0 and not self.controls.force:
            # Not while the application still uses the old names (run/traffic.py).
            traffic.refuse_recent_use(ctx, [
                m.label for u in self.units(ctx, tables) for m in ctx.unit_moves(u)
                if not self.done(m.label, registry.strategy_of(m).final.name)])
        for unit in self.units(ctx, tables):
            for m in ctx.unit_moves(unit):
                strategy = registry.strategy_of(m)
                final, gate = strategy.final, strategy.swap.name
                if self.done(m.label, final.name):
                    continue
                if not self.done(m.label, gate):
                    raise StageError(
                        f"{m.label}: {final.name} needs {gate} done first "
                        f"({gate} is {self.status(m.label, gate)})",
                        hint=f"run `orchestrator cutover {self.loaded.path} --table {m.label}`",
                    )
                self.advance(ctx, final, [m])

    def drop_compat_views(self, tables: list[str] | None = None) -> list[str]:
        """Drop the compatibility views of finalized tables, once nothing reads them.

        Like finalize, this cannot be undone; `orchestrator compat-usage` tells whether the
        application still uses them.
        """
        ctx = self.context()
        src = self.plan.source_schema
        dropped: list[str] = []
        for spec in self.plan.tables:
            final = registry.STRATEGIES[self.plan.options_for(spec).strategy].final.name
            view = ctx.catalog.table(src, spec.name)
            if (tables and spec.name not in tables) or view is None or view.kind != "v" or (
                not self.done(spec.name, final)
            ):
                continue
            # A partitioned table's partitions have compatibility views too.
            names = [spec.name, *(ctx.store.load(spec.name, PARTITIONS_KEY) or [])]
            readers = [f"{d.schema}.{d.name}" for name in names
                       for d in ctx.catalog.dependents_of(src, name)
                       if (d.schema, d.name) not in {(src, n) for n in names}]
            if readers:
                raise StageError(
                    f"{src}.{spec.name}: views still read the compatibility view: "
                    f"{', '.join(readers)}",
                    hint="point them at the new table (or drop them), then rerun")
            steps = [Step(sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier(src, name)))
                     for name in names]
            self.runner.run(
                Action("drop_compat_view", steps, [regclass(src, n) for n in names]),
                tables=[spec.name], stage=final, policy=ctx.policy(),
            )
            dropped.append(f"{src}.{spec.name}")
        return dropped

    def rollback(self, table: str | None, to: str | None = None) -> list[str]:
        """Reverse a table's unit (or, without a table, every unit of the plan, the last wave
        first) stage by stage, down to (not including) `to`."""
        if table is None:
            return rollback.roll_back_plan(self, to)
        return rollback.roll_back_unit(self, table, to)

    def replay_once(self) -> int:
        """Replay every active capture log once (forward before cutover, reverse after)."""
        return follow.replay_once(self.context(), self.done)

    def follow(
        self, idle_s: float = 1.0, until: Callable[[], bool] | None = None,
        recheck_s: float = 10.0, rate: float | None = None,
    ) -> None:
        """Keep replaying captured changes until interrupted (Ctrl-C) or `until()` is true, at
        the plan's pace (run/follow.py); `rate` fixes it in keys per second."""
        follow.keep_replaying(self.context, self.done, until, idle_s=idle_s,
                              recheck_s=recheck_s, rate=rate)

"""The engine: walks the graph's units through their stages and records every step.

Each DDL stage runs as one transaction under lock_timeout (with retries) that also records
its status and event, so a crash leaves either all of a stage or none of it. The copy commits
a checkpoint with every batch. Every verb is idempotent: a stage already done is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.db import Conn, connect
from orchestrator.errors import LockTimeoutExhausted, StageError, ValidationFailed
from orchestrator.model.graph import Unit
from orchestrator.model.move import TableMove, build_move
from orchestrator.model.validate import inspect
from orchestrator.plan import LoadedPlan, Strategy, TableSpec
from orchestrator.run.runner import LockPolicy, LockWaitExceeded, run_locked
from orchestrator.sql import capture
from orchestrator.sql.compose import render
from orchestrator.stages import Ctx, Progress, Step, dual_write, finalize, prepare, rename
from orchestrator.stages import copy as copy_stage
from orchestrator.stages import cutover as cutover_stage
from orchestrator.stages import verify as verify_stage
from orchestrator.state import store as control

COPY_STAGES = control.STAGES
BEFORE_CUTOVER = ("prepare", "dual_write", "copy", "verify")
VIEW_STAGE = "create"


def stages_of(spec: TableSpec, strategy: Strategy) -> tuple[str, ...]:
    return control.RENAME_STAGES if strategy == Strategy.rename else control.STAGES


def _view_key(name: str) -> str:
    return f"view:{name}"


@dataclass
class Engine:
    """One operator session on one plan."""

    conn: Conn
    lock_conn: Conn
    loaded: LoadedPlan
    progress: Progress
    lock_timeout_ms: int | None = None

    @property
    def plan(self) -> Any:
        return self.loaded.plan

    @property
    def s(self) -> str:
        return str(self.loaded.plan.control_schema)

    # --- set-up -----------------------------------------------------------------------------

    def register(self) -> None:
        control.ensure_schema(self.conn, self.s)
        stages = {t.name: stages_of(t, self.plan.options_for(t).strategy) for t in self.plan.tables}
        stages.update({_view_key(v.name): (VIEW_STAGE,) for v in self.plan.views})
        with self.conn.transaction():
            control.register_plan(self.conn, self.loaded, stages)

    def context(self) -> Ctx:
        return build_context(self.conn, self.loaded, self.progress, self.lock_timeout_ms)

    def status(self, table: str, stage: str) -> str:
        return control.get_stage(self.conn, self.s, self.plan.name, table, stage).status

    def done(self, table: str, stage: str) -> bool:
        return self.status(table, stage) == "done"

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

    # --- one DDL stage ----------------------------------------------------------------------

    def _ddl(
        self,
        ctx: Ctx,
        m: TableMove,
        stage: str,
        action: str,
        steps: list[Step],
        status: str,
        relations: list[str],
        tables: list[str] | None = None,
        extra: Callable[[Conn], None] | None = None,
        between_tries: Callable[[], None] | None = None,
    ) -> None:
        """Run steps, then record status for each table, all in one locked transaction."""
        names = tables or [m.label]

        def work(conn: Conn) -> None:
            t0 = time.monotonic()
            texts = []
            timings: list[tuple[float, str]] = []  # where a long hold went, for the event
            lock_wait_ms = 0.0
            policy = ctx.policy(m)
            for step in steps:
                texts.append(render(conn, step.sql))
                try:
                    if step.bounded:
                        _set_local(conn, "statement_timeout", f"{policy.lock_timeout_ms}ms")
                    s0 = time.monotonic()
                    conn.execute(step.sql)
                    timings.append(((time.monotonic() - s0) * 1000, texts[-1]))
                    if step.bounded:
                        # The LOCK statement: its time is the wait before the grant; the hold
                        # is the event's duration minus this.
                        lock_wait_ms = timings[-1][0]
                    if step.bounded:
                        _set_local(conn, "statement_timeout", f"{policy.statement_timeout_ms}ms")
                except psycopg.errors.LockNotAvailable:
                    raise
                except psycopg.errors.QueryCanceled as exc:
                    if step.bounded:
                        raise LockWaitExceeded(str(exc)) from exc
                    raise _StepFailed(texts[-1], exc) from exc
                except psycopg.Error as exc:
                    raise _StepFailed(texts[-1], exc) from exc
            if extra is not None:
                extra(conn)
            for name in names:
                control.set_status(conn, self.s, self.plan.name, name, stage, status)
            slowest = sorted(timings, key=lambda t: -t[0])[:3]
            control.log_event(
                conn,
                self.s,
                self.plan.name,
                action,
                "ok",
                table=",".join(names),
                stage=stage,
                statement=";\n".join(texts) + ";",
                duration_ms=(time.monotonic() - t0) * 1000,
                detail={
                    "lock_wait_ms": round(lock_wait_ms, 1),
                    "slowest_ms": [[round(ms, 1), text[:160]] for ms, text in slowest],
                },
            )

        def on_retry(attempt: int, who: list[dict[str, Any]]) -> None:
            self.progress(
                {"table": ",".join(names), "stage": stage, "lock_wait": attempt, "blockers": who}
            )
            if between_tries is not None:
                # Writes go on while we back off: drain them outside the lock again, so the
                # try that succeeds has only a short tail to drain inside it.
                between_tries()

        try:
            run_locked(
                self.conn,
                plan=self.plan.name,
                control_schema=self.s,
                table=",".join(names),
                stage=stage,
                action=action,
                policy=ctx.policy(m),
                relations=relations,
                work=work,
                on_retry=on_retry,
            )
        except _StepFailed as exc:
            if self.conn.broken or self.conn.closed:
                # Our session is gone (terminated, server down): nothing can be recorded on it,
                # and a second error from trying would hide the server's reason.
                raise exc.error from None
            self._failed(names, stage, action, str(exc.error).strip(), exc.statement)
            raise StageError(
                f"{', '.join(names)}: {action} failed and was rolled back, nothing changed: "
                f"{str(exc.error).strip()}\n  statement: {exc.statement}",
                hint=f"fix the cause, then rerun; or undo earlier stages with `orchestrator "
                f"rollback {self.loaded.path} --table {names[0]}`",
            ) from exc.error
        except LockTimeoutExhausted as exc:
            self._failed(names, stage, action, exc.message, None)
            raise
        self.progress({"table": ",".join(names), "stage": stage, "status": status})

    def _failed(
        self, names: list[str], stage: str, action: str, error: str, statement: str | None
    ) -> None:
        with self.conn.transaction():
            for name in names:
                if action.startswith("rollback"):
                    # A failed rollback leaves the stage as it was: only the error is new.
                    control.set_error(self.conn, self.s, self.plan.name, name, stage, error)
                else:
                    control.set_status(
                        self.conn, self.s, self.plan.name, name, stage, "failed", error=error
                    )
            control.log_event(
                self.conn,
                self.s,
                self.plan.name,
                action,
                "error",
                table=",".join(names),
                stage=stage,
                statement=statement,
                detail={"error": error},
            )

    def _running(self, table: str, stage: str) -> None:
        with self.conn.transaction():
            control.set_status(self.conn, self.s, self.plan.name, table, stage, "running")

    # --- forward ----------------------------------------------------------------------------

    def apply(self, tables: list[str] | None = None, until: str = "verify") -> None:
        """Walk the units in graph order, each table up to `until` (never finalize)."""
        ctx = self.context()
        order = list(COPY_STAGES)
        last = order.index(until)
        for unit in self.units(ctx, tables):
            for name in unit.members:
                m = ctx.moves.get(name)
                if m is None or m.strategy == "rename":
                    continue
                self._before_cutover(ctx, m, order[: min(last, 3) + 1])
            if last >= order.index("cutover"):
                self._cutover_unit(ctx, unit)
                ctx = self.context()
        if last >= order.index("cutover"):
            self.create_views(self.context())
        # Whichever command runs replays what the capture logged (DESIGN.md).
        self.replay_once()

    def _before_cutover(self, ctx: Ctx, m: TableMove, stages: list[str]) -> None:
        rel = ctx.catalog.table(m.source_schema, m.source_name)
        for stage in stages:
            if self.done(m.label, stage):
                continue
            if rel is None or rel.kind != "r":
                raise StageError(
                    f"{m.label}: the source table is not in place for {stage}",
                    hint=f"`orchestrator status {self.loaded.path}` shows where it stands",
                )
            self._running(m.label, stage)
            if stage == "prepare":
                self._ddl(
                    ctx,
                    m,
                    stage,
                    "prepare",
                    prepare.forward_steps(
                        m, rel, self.plan, ctx.catalog.defaults_for(m.target_schema)
                    ),
                    "done",
                    [],
                    extra=self._remember_schema(ctx, m),
                )
            elif stage == "dual_write":
                self._ddl(
                    ctx,
                    m,
                    stage,
                    "dual_write",
                    dual_write.forward_steps(m),
                    "done",
                    [_rc(m.source_schema, m.source_name)],
                )
            elif stage == "copy":
                copy_stage.run(ctx, m, rel)
                if not self.done(m.label, "copy"):
                    return  # stopped on request; rerun resumes from the checkpoint
                self.progress({"table": m.label, "stage": stage, "status": "done"})
            elif stage == "verify":
                verify_stage.run(ctx, m)
                self.progress({"table": m.label, "stage": stage, "status": "done"})

    def _remember_schema(self, ctx: Ctx, m: TableMove) -> Callable[[Conn], None]:
        """Note (with the stage's work) that we created the target schema, so a full
        rollback can drop it again once it is empty."""
        existed = m.target_schema in ctx.catalog.existing_schemas

        def save(conn: Conn) -> None:
            if not existed:
                control.save(
                    conn,
                    self.s,
                    self.plan.name,
                    "*",
                    f"created_schema:{m.target_schema}",
                    m.target_schema,
                )

        return save

    def _drop_empty_schemas(self) -> None:
        """Drop target schemas this plan created once nothing is left in them."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT key, value FROM {}.saved WHERE plan = %s AND table_name = '*' "
                "AND key LIKE 'created_schema:%%'"
            ).format(sql.Identifier(self.s)),
            (self.plan.name,),
        ).fetchall()
        for r in rows:
            schema = str(r["value"])
            empty = self.conn.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON "
                "n.oid = c.relnamespace WHERE n.nspname = %s) AND NOT EXISTS (SELECT 1 FROM "
                "pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s) "
                "AND NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON "
                "n.oid = t.typnamespace WHERE n.nspname = %s) AS empty",
                (schema, schema, schema),
            ).fetchone()
            if not (empty and empty["empty"]):
                continue
            stmt = sql.SQL("DROP SCHEMA IF EXISTS {} RESTRICT").format(sql.Identifier(schema))
            with self.conn.transaction():
                self.conn.execute(stmt)
                self.conn.execute(
                    sql.SQL(
                        "DELETE FROM {}.saved WHERE plan = %s AND table_name = '*' AND key = %s"
                    ).format(sql.Identifier(self.s)),
                    (self.plan.name, r["key"]),
                )
                control.log_event(
                    self.conn,
                    self.s,
                    self.plan.name,
                    "drop_schema",
                    "ok",
                    statement=render(self.conn, stmt),
                )

    def cutover(self, tables: list[str] | None = None) -> None:
        ctx = self.context()
        # Check every unit before swapping any: a refusal must leave the plan as it was.
        for unit in self.units(ctx, tables):
            for name in unit.members:
                m = ctx.moves.get(name)
                if (
                    m is not None
                    and m.strategy == "copy"
                    and not self.done(name, "cutover")
                    and not self._may_cut_over(name)
                ):
                    raise StageError(
                        f"{name}: cutover needs a clean verify first (verify is "
                        f"{self.status(name, 'verify')}); nothing was cut over",
                        hint=f"run `orchestrator apply {self.loaded.path} --table {name}`",
                    )
        for unit in self.units(ctx, tables):
            self._cutover_unit(ctx, unit)
            ctx = self.context()
        self.create_views(ctx)
        self.replay_once()

    def _may_cut_over(self, table: str) -> bool:
        """Copied, and verified clean — or verifying when a crash interrupted it: cutover
        verifies again in full before the swap and stops on any difference."""
        return self.done(table, "copy") and self.status(table, "verify") in ("done", "running")

    def _cutover_unit(self, ctx: Ctx, unit: Unit) -> None:
        moves = [ctx.moves[n] for n in unit.members if n in ctx.moves]
        copy_moves = [m for m in moves if m.strategy == "copy"]
        for m in moves:
            if m.strategy == "rename":
                self._rename(ctx, m)
        if not copy_moves:
            return
        if all(self.done(m.label, "cutover") for m in copy_moves):
            # A crash after the swap may have left foreign keys NOT VALID: finish them.
            self._validate_fks(copy_moves)
            return
        for m in copy_moves:
            if not self._may_cut_over(m.label):
                raise StageError(
                    f"{m.label}: cutover needs a clean verify first (verify is "
                    f"{self.status(m.label, 'verify')})",
                    hint=f"run `orchestrator apply {self.loaded.path} --table {m.label}`",
                )
        # Verify again just before the swap, and leave only a short tail for inside the lock.
        for m in copy_moves:
            verify_stage.run(ctx, m)
            verify_stage.drain(ctx, m, until=1000)
        for m in copy_moves:
            self._running(m.label, "cutover")
        first = copy_moves[0]
        steps = cutover_stage.forward_steps(copy_moves, ctx.catalog)

        def drain_forward() -> None:
            for m in copy_moves:
                verify_stage.drain(ctx, m, until=1000)

        self._ddl(
            ctx,
            first,
            "cutover",
            "cutover",
            steps,
            "done",
            cutover_stage.lock_relations(copy_moves, ctx.catalog),
            tables=[m.label for m in copy_moves],
            between_tries=drain_forward,
        )
        self._validate_fks(copy_moves)

    def _validate_fks(self, moves: list[TableMove], reverse: bool = False) -> None:
        ctx = self.context()
        for step in cutover_stage.validate_steps(moves, ctx.catalog, reverse):

            def work(conn: Conn, st: Step = step) -> None:
                t0 = time.monotonic()
                conn.execute(st.sql)
                control.log_event(
                    conn,
                    self.s,
                    self.plan.name,
                    "validate_fk",
                    "ok",
                    table=",".join(m.label for m in moves),
                    stage="cutover",
                    statement=render(conn, st.sql),
                    duration_ms=(time.monotonic() - t0) * 1000,
                )

            try:
                run_locked(
                    self.conn,
                    plan=self.plan.name,
                    control_schema=self.s,
                    table=moves[0].label,
                    stage="cutover",
                    action="validate_fk",
                    policy=ctx.policy(moves[0]),
                    relations=[],
                    work=work,
                )
            except psycopg.Error as exc:
                raise StageError(
                    f"{', '.join(m.label for m in moves)}: the swap is done, but validating a "
                    f"foreign key failed: {str(exc).strip()}\n  statement: "
                    f"{render(self.conn, step.sql)}",
                    hint="fix the offending rows, then rerun the same cutover command: it "
                    "validates what is left",
                ) from exc

    def _rename(self, ctx: Ctx, m: TableMove) -> None:
        if self.done(m.label, "rename"):
            return
        rel = ctx.catalog.table(m.source_schema, m.source_name)
        if rel is None or rel.kind != "r":
            raise StageError(
                f"{m.label}: not found in {m.source_schema}",
                hint=f"`orchestrator status {self.loaded.path}`",
            )
        self._running(m.label, "rename")
        granted = rename.plan_grants(m, rel, self.plan)
        remember = self._remember_schema(ctx, m)

        def record(conn: Conn) -> None:
            remember(conn)
            # What the plan granted beyond the table's own ACL, for an exact rollback.
            control.save(
                conn,
                self.s,
                self.plan.name,
                m.label,
                "rename_grants",
                [[role, list(privs)] for role, privs in granted],
            )

        self._ddl(
            ctx,
            m,
            "rename",
            "rename",
            rename.forward_steps(m, rel, self.plan, ctx.catalog.defaults_for(m.source_schema)),
            "done",
            [_rc(m.source_schema, m.source_name)],
            extra=record,
        )

    def create_views(self, ctx: Ctx) -> None:
        """Create plan views whose tables have all moved (idempotent)."""
        moved = {
            t.name
            for t in self.plan.tables
            if self.done(
                t.name,
                "cutover"
                if ctx.moves.get(t.name) is None or ctx.moves[t.name].strategy == "copy"
                else "rename",
            )
        }
        for v in self.plan.views:
            key = _view_key(v.name)
            if self.done(key, VIEW_STAGE) or not set(v.depends_on) <= moved | {
                x.name for x in self.plan.views if self.done(_view_key(x.name), VIEW_STAGE)
            }:
                continue
            body = sql.SQL(v.sql.strip().rstrip(";"))
            opts = sql.SQL(" WITH (security_invoker = true)") if v.security_invoker else sql.SQL("")
            stmt = sql.SQL("CREATE VIEW {}{} AS {}").format(
                sql.Identifier(v.schema_, v.name), opts, body
            )

            def work(conn: Conn, stmt: sql.Composed = stmt, key: str = key) -> None:
                conn.execute(stmt)
                control.set_status(conn, self.s, self.plan.name, key, VIEW_STAGE, "done")
                control.log_event(
                    conn,
                    self.s,
                    self.plan.name,
                    "create_view",
                    "ok",
                    table=key,
                    stage=VIEW_STAGE,
                    statement=render(conn, stmt),
                )

            first = next(iter(ctx.moves.values()))
            run_locked(
                self.conn,
                plan=self.plan.name,
                control_schema=self.s,
                table=key,
                stage=VIEW_STAGE,
                action="create_view",
                policy=ctx.policy(first),
                relations=[],
                work=work,
            )
            self.progress({"table": key, "stage": VIEW_STAGE, "status": "done"})

    # --- finalize ---------------------------------------------------------------------------

    def finalize(self, tables: list[str] | None = None) -> None:
        ctx = self.context()
        for unit in self.units(ctx, tables):
            moves = [ctx.moves[n] for n in unit.members if n in ctx.moves]
            for m in moves:
                gate = "rename" if m.strategy == "rename" else "cutover"
                if self.done(m.label, "finalize"):
                    continue
                if not self.done(m.label, gate):
                    raise StageError(
                        f"{m.label}: finalize needs {gate} done first "
                        f"({gate} is {self.status(m.label, gate)})",
                        hint=f"run `orchestrator cutover {self.loaded.path} --table {m.label}`",
                    )
                self._running(m.label, "finalize")
                self._ddl(
                    ctx,
                    m,
                    "finalize",
                    "finalize",
                    finalize.forward_steps(m),
                    "done",
                    [_rc(m.retired_schema, m.source_name), _rc(m.target_schema, m.target_name)],
                )

    def drop_compat_views(self, tables: list[str] | None = None) -> list[str]:
        """Drop the compatibility views of finalized tables, once nothing reads them.

        Like finalize, this cannot be undone; `orchestrator compat-usage` tells whether the
        application still uses them.
        """
        ctx = self.context()
        src = self.plan.source_schema
        dropped: list[str] = []
        for spec in self.plan.tables:
            if tables and spec.name not in tables:
                continue
            view = ctx.catalog.table(src, spec.name)
            if view is None or view.kind != "v" or not self.done(spec.name, "finalize"):
                continue
            readers = [f"{d.schema}.{d.name}" for d in ctx.catalog.dependents_of(src, spec.name)]
            if readers:
                raise StageError(
                    f"{src}.{spec.name}: views still read the compatibility view: "
                    f"{', '.join(readers)}",
                    hint="point them at the new table (or drop them), then rerun")
            stmt = sql.SQL("DROP VIEW {}").format(sql.Identifier(src, spec.name))

            def work(conn: Conn, stmt: sql.Composed = stmt, name: str = spec.name) -> None:
                conn.execute(stmt)
                control.log_event(conn, self.s, self.plan.name, "drop_compat_view", "ok",
                                  table=name, stage="finalize", statement=render(conn, stmt))

            run_locked(self.conn, plan=self.plan.name, control_schema=self.s, table=spec.name,
                       stage="finalize", action="drop_compat_view",
                       policy=ctx.policy(next(iter(ctx.moves.values()))) if ctx.moves else
                       LockPolicy(self.plan.defaults.lock_timeout_ms, 0,
                                  self.plan.defaults.lock_retries),
                       relations=[_rc(src, spec.name)], work=work)
            dropped.append(f"{src}.{spec.name}")
        return dropped

    # --- rollback ---------------------------------------------------------------------------

    def rollback(self, table: str, to: str | None = None) -> list[str]:
        """Reverse a table's unit stage by stage, down to (not including) `to`."""
        ctx = self.context()
        unit = next(iter(self.units(ctx, [table])), None)
        if unit is None:
            raise StageError(f"{table}: not part of plan {self.plan.name}", hint="check --table")
        # A finalized table has no source left to build a move from: check by name.
        for name in unit.members:
            if self.done(name, "finalize"):
                raise StageError(
                    f"{name}: finalized, so it cannot be rolled back",
                    hint="finalize dropped the retired table; move it back with a "
                    "new plan if you must",
                )
        moves = [ctx.moves[n] for n in unit.members if n in ctx.moves]
        undone: list[str] = []
        self._refuse_stranding(ctx, moves, to)
        if any(m.strategy == "rename" for m in moves):
            if to is not None:
                raise StageError(
                    f"{table}: the rename strategy has a single stage, so there is nothing "
                    f"to roll back to ({to})",
                    hint=f"run `orchestrator rollback {self.loaded.path} --table {table}` "
                    "without --to",
                )
            for m in moves:
                if self.done(m.label, "rename") and to is None:
                    self._ddl(
                        ctx,
                        m,
                        "rename",
                        "rollback_rename",
                        rename.rollback_steps(
                            m,
                            [
                                (str(role), tuple(privs))
                                for role, privs in control.load_saved(
                                    self.conn, self.s, self.plan.name, m.label, "rename_grants"
                                )
                                or []
                            ],
                        ),
                        "rolled_back",
                        [_rc(m.target_schema, m.target_name)],
                    )
                    undone.append(f"{m.label}:rename")
            self._drop_empty_schemas()
            return undone
        # A rollback of cutover killed after its swap committed left the keys it re-added to
        # the old tables NOT VALID (they are validated after the lock): finish them first.
        swapped_back = [
            m for m in moves
            if m.strategy == "copy" and self.status(m.label, "cutover") == "rolled_back"
        ]
        if swapped_back:
            self._validate_fks(swapped_back, reverse=True)
        order = [*BEFORE_CUTOVER, "cutover"]
        stop = order.index(to) if to else -1
        for stage in reversed(order[stop + 1 :]):
            # prepare, dual_write and cutover are single transactions: unless done, nothing
            # of them exists. A copy or verify that ran at all may have left batches behind.
            statuses = {m.label: self.status(m.label, stage) for m in moves}
            undo = ("done", "failed", "running") if stage in ("copy", "verify") else ("done",)
            self._forget_attempts(
                stage,
                [
                    m
                    for m in moves
                    if statuses[m.label] in ("failed", "running") and statuses[m.label] not in undo
                ],
            )
            todo = [m for m in moves if statuses[m.label] in undo]
            if not todo:
                continue
            ctx = self.context()
            self._rollback_stage(ctx, todo, stage)
            undone += [f"{m.label}:{stage}" for m in todo]
        self._drop_empty_schemas()
        return undone

    def _forget_attempts(self, stage: str, moves: list[TableMove]) -> None:
        """A failed or interrupted atomic stage left nothing: record it as rolled back."""
        if not moves:
            return
        with self.conn.transaction():
            for m in moves:
                control.set_status(self.conn, self.s, self.plan.name, m.label, stage, "rolled_back")
                control.log_event(
                    self.conn,
                    self.s,
                    self.plan.name,
                    f"rollback_{stage}",
                    "ok",
                    table=m.label,
                    stage=stage,
                    detail={"note": "the stage never committed; nothing to undo"},
                )

    def _refuse_stranding(self, ctx: Ctx, moves: list[TableMove], to: str | None) -> None:
        """A plan view that reads a moved table would break if the table went back."""
        names = {m.label for m in moves}
        for v in self.plan.views:
            exists = ctx.catalog.table(v.schema_, v.name) is not None
            if exists and names & set(v.depends_on):
                raise StageError(
                    f"rolling back {', '.join(sorted(names))} would strand view "
                    f"{v.schema_}.{v.name}, which reads the moved table",
                    hint=f"drop the view first (DROP VIEW {v.schema_}.{v.name}), then roll back",
                )
            if not exists and self.done(_view_key(v.name), VIEW_STAGE):
                with self.conn.transaction():
                    control.set_status(
                        self.conn,
                        self.s,
                        self.plan.name,
                        _view_key(v.name),
                        VIEW_STAGE,
                        "rolled_back",
                    )

    def _rollback_stage(self, ctx: Ctx, moves: list[TableMove], stage: str) -> None:
        for m in moves:
            rel = ctx.catalog.table(m.source_schema, m.source_name)
            if stage == "cutover":
                continue
            if stage == "verify":
                with self.conn.transaction():
                    control.set_status(
                        self.conn,
                        self.s,
                        self.plan.name,
                        m.label,
                        stage,
                        "rolled_back",
                        reset_checkpoint=True,
                    )
                    control.log_event(
                        self.conn,
                        self.s,
                        self.plan.name,
                        "rollback_verify",
                        "ok",
                        table=m.label,
                        stage=stage,
                    )
            elif stage == "copy":
                assert rel is not None
                self._ddl(
                    ctx,
                    m,
                    stage,
                    "rollback_copy",
                    copy_stage.rollback_steps(m, rel),
                    "rolled_back",
                    [],
                    extra=self._reset(m.label, stage),
                )
            elif stage == "dual_write":
                self._ddl(
                    ctx,
                    m,
                    stage,
                    "rollback_dual_write",
                    dual_write.rollback_steps(m),
                    "rolled_back",
                    [_rc(m.source_schema, m.source_name)],
                )
            elif stage == "prepare":
                self._ddl(
                    ctx, m, stage, "rollback_prepare", prepare.rollback_steps(m), "rolled_back", []
                )
        if stage == "cutover":
            self._rollback_cutover(ctx, moves)

    def _reset(self, table: str, stage: str) -> Callable[[Conn], None]:
        def reset(conn: Conn) -> None:
            control.set_status(
                conn, self.s, self.plan.name, table, stage, "rolled_back", reset_checkpoint=True
            )

        return reset

    def _rollback_cutover(self, ctx: Ctx, moves: list[TableMove]) -> None:
        def drain_reverse() -> None:
            for m in moves:
                d = capture.reverse(m)
                while capture.replay_batch(self.conn, d, 10_000) >= 10_000:
                    pass

        drain_reverse()
        steps = cutover_stage.rollback_steps(moves, ctx.catalog)
        rels = cutover_stage.lock_relations(moves, ctx.catalog, reverse=True)
        self._ddl(
            ctx,
            moves[0],
            "cutover",
            "rollback_cutover",
            steps,
            "rolled_back",
            rels,
            tables=[m.label for m in moves],
            between_tries=drain_reverse,
        )
        self._validate_fks(moves, reverse=True)

    # --- follow -----------------------------------------------------------------------------

    def replay_once(self) -> int:
        """Replay every active log once (forward before cutover, reverse after)."""
        ctx = self.context()
        total = 0
        for m in ctx.moves.values():
            if m.strategy != "copy":
                continue
            if self.done(m.label, "copy") and not self.done(m.label, "cutover"):
                total += verify_stage.drain(ctx, m)
            elif self.done(m.label, "cutover") and not self.done(m.label, "finalize"):
                d = capture.reverse(m)
                while (n := capture.replay_batch(self.conn, d, 10_000)) > 0:
                    total += n
                    if n < 10_000:
                        break
        return total


def build_context(
    conn: Conn,
    loaded: LoadedPlan,
    progress: Progress | None = None,
    lock_timeout_ms: int | None = None,
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
                if strategy == Strategy.copy
                else cat.table(spec.schema_, spec.target_name)
            )
        if rel is not None and rel.kind in ("r", "p"):
            moves[spec.name] = build_move(plan, spec, rel)
    return Ctx(
        conn=conn,
        loaded=loaded,
        catalog=cat,
        graph=report.graph,
        moves=moves,
        progress=progress or (lambda _e: None),
        lock_timeout_ms=lock_timeout_ms,
    )


def _set_local(conn: Conn, name: str, value: str) -> None:
    conn.execute(
        sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(name), sql.Literal(value))
    )


class _StepFailed(Exception):
    def __init__(self, statement: str, error: psycopg.Error) -> None:
        super().__init__(statement)
        self.statement = statement
        self.error = error


def _rc(schema: str, name: str) -> str:
    from orchestrator.stages import regclass

    return regclass(schema, name)


@contextmanager
def session(
    dsn: str,
    loaded: LoadedPlan,
    progress: Progress | None = None,
    lock_timeout_ms: int | None = None,
    tables: list[str] | None = None,
) -> Iterator[Engine]:
    """Connect, take the plan's and tables' advisory locks, register the plan."""
    conn = connect(dsn, autocommit=True)
    lock_conn = connect(dsn, autocommit=True, application="orchestrator-lock")
    # Our names print schema-qualified: catalog definitions we replay must not depend on
    # whatever search_path the operator's session had.
    conn.execute("SET search_path = ''")
    try:
        # Table locks are taken by qualified source name: two plans moving the same table
        # collide, two plans moving same-named tables of different schemas do not.
        names = [
            f"{loaded.plan.source_schema}.{t}"
            for t in (tables or [t.name for t in loaded.plan.tables])
        ]
        with control.operator_lock(lock_conn, loaded.plan.name, names):
            eng = Engine(
                conn=conn,
                lock_conn=lock_conn,
                loaded=loaded,
                progress=progress or (lambda _e: None),
                lock_timeout_ms=lock_timeout_ms,
            )
            # Bad input changes nothing: check the plan against the catalog before the
            # control schema is created or the plan recorded.
            build_context(conn, loaded)
            eng.register()
            yield eng
    finally:
        conn.close()
        lock_conn.close()

"""The plan's views: each created once every table it reads has moved (or been created)."""

from __future__ import annotations

from collections.abc import Callable

from psycopg import sql

from orchestrator.errors import StageError
from orchestrator.model.context import Ctx
from orchestrator.run.events import Progress, StageChanged
from orchestrator.run.runner import Runner, StepFailed
from orchestrator.stages import registry
from orchestrator.stages.base import Action, Step
from orchestrator.state.store import Status, Store


def create(ctx: Ctx, runner: Runner, done: Callable[[str, str], bool],
           progress: Progress) -> None:
    """Create the plan views whose tables have all moved; a view that fails is named with
    PostgreSQL's reason and changes nothing."""
    plan = ctx.plan
    key = registry.view_key
    moved = {t.name for t in plan.tables
             if done(t.name, registry.STRATEGIES[plan.options_for(t).strategy].swap.name)}
    for v in plan.views:
        created = {x.name for x in plan.views if done(key(x.name), registry.VIEW_STAGE)}
        if done(key(v.name), registry.VIEW_STAGE) or not set(v.depends_on) <= (moved | created):
            continue
        opts = sql.SQL(" WITH (security_invoker = true)") if v.security_invoker else sql.SQL("")
        stmt = sql.SQL("CREATE VIEW {}{} AS {}").format(
            sql.Identifier(v.schema_, v.name), opts, sql.SQL(v.sql.strip().rstrip(";")))

        def status(store: Store, name: str) -> None:
            store.start(name, registry.VIEW_STAGE)
            store.finish(name, registry.VIEW_STAGE)

        try:
            runner.run(Action("create_view", [Step(stmt)]), tables=[key(v.name)],
                       stage=registry.VIEW_STAGE, policy=ctx.policy(), status=status)
        except StepFailed as exc:
            remote = sorted({plan.table(t).schema_ for t in v.depends_on
                             if plan.table(t).schema_ in plan.remote_schemas()})
            raise StageError(
                f"view {v.schema_}.{v.name}: creating it failed, nothing changed: "
                f"{str(exc.error).strip()}",
                hint="fix its sql in the plan and rerun the same command" + (
                    f"; it reads {', '.join(remote)} through postgres_fdw foreign tables, "
                    "which have no primary key, so a GROUP BY cannot rely on one "
                    "(docs/cross-server.md, \"Views\")" if remote else ""),
            ) from exc.error
        progress(StageChanged(key(v.name), registry.VIEW_STAGE, Status.done))

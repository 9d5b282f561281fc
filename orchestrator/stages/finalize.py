"""finalize: drop the reverse capture and the retired tables. Not reversible."""

from __future__ import annotations

from psycopg import sql

from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.sql import capture
from orchestrator.stages import matviews
from orchestrator.stages.base import Action, Phase, Stage, Step, regclass


def forward_steps(m: TableMove) -> list[Step]:
    if m.strategy == "rename":
        return []
    return [
        *[Step(s) for s in capture.uninstall_sql(capture.reverse(m))],
        *[Step(s) for s in capture.uninstall_sql(capture.forward(m), triggers=False)],
        Step(
            sql.SQL("DROP TABLE {}").format(m.retired),
            "ACCESS EXCLUSIVE on the retired table (nothing reads it)",
        ),
    ]


class Finalize(Stage):
    """The end of a move: what kept it reversible is dropped. Cannot be undone."""

    name = "finalize"
    short = "final"
    phase = Phase.final

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        return Action(
            self.name,
            self._steps(ctx, m),
            [regclass(m.retired_schema, m.source_name), regclass(m.target_schema, m.target_name)],
        )


    def _steps(self, ctx: Ctx, m: TableMove) -> list[Step]:
        return forward_steps(m)


class FinalizeCopy(Finalize):
    note = "CANNOT BE UNDONE: drops the retired table and its reverse capture"

    def _steps(self, ctx: Ctx, m: TableMove) -> list[Step]:
        # The old materialized views the swap put in the retired schema go first.
        saved = ctx.store.load(m.label, matviews.SAVED_KEY) or []
        return matviews.drop_retired_steps(m, saved) + forward_steps(m)

    def review(self, ctx: Ctx, moves: list[TableMove]) -> tuple[list[Step], list[Step]]:
        # Before the swap nothing is saved yet: the materialized views it will swap are the
        # ones reading the source now.
        m = moves[0]
        return matviews.drop_retired_steps(m, matviews.swapped(ctx.catalog, m)) + \
            forward_steps(m), []


class FinalizeRename(Finalize):
    note = (
        "nothing to drop: the compatibility view stays until the plan drops it; finalize "
        "only records that the move is final"
    )


FINALIZE_COPY = FinalizeCopy()
FINALIZE_RENAME = FinalizeRename()

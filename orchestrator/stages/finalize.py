"""finalize: drop the reverse capture and the retired tables. Not reversible."""

from __future__ import annotations

from psycopg import sql

from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.sql import capture
from orchestrator.stages.base import Action, Phase, Stage, Step, regclass


def forward_steps(m: TableMove) -> list[Step]:
    if m.strategy == "rename":
        return []
    return [
        *[Step(s) for s in capture.uninstall_sql(capture.reverse(m))],
        *[Step(s) for s in capture.uninstall_sql(capture.forward(m))[2:]],
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
            forward_steps(m),
            [regclass(m.retired_schema, m.source_name), regclass(m.target_schema, m.target_name)],
        )


class FinalizeCopy(Finalize):
    note = "CANNOT BE UNDONE: drops the retired table and its reverse capture"


class FinalizeRename(Finalize):
    note = (
        "nothing to drop: the compatibility view stays until the plan drops it; finalize "
        "only records that the move is final"
    )


FINALIZE_COPY = FinalizeCopy()
FINALIZE_RENAME = FinalizeRename()

"""finalize: drop the reverse capture and the retired tables. Not reversible."""

from __future__ import annotations

from psycopg import sql

from orchestrator.model.move import TableMove
from orchestrator.sql import capture
from orchestrator.stages import Step


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


ROLLBACK_NOTE = (
    "finalize cannot be undone: the retired source table and its reverse "
    "capture are dropped; roll back cutover before finalize if you may need it"
)

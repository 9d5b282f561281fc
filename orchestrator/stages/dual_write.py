"""dual-write: capture every change to the source (keys only) for replay into the target."""

from __future__ import annotations

from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.sql import capture
from orchestrator.stages.base import Action, Stage, Step, regclass


def forward_steps(m: TableMove) -> list[Step]:
    lock = "SHARE ROW EXCLUSIVE on the source for CREATE TRIGGER: waits at most lock_timeout"
    steps = capture.install_sql(capture.forward(m))
    return [Step(s, lock if i >= 3 else "our log only") for i, s in enumerate(steps)]


def rollback_steps(m: TableMove) -> list[Step]:
    return [
        Step(s, "SHARE ROW EXCLUSIVE on the source")
        for s in capture.uninstall_sql(capture.forward(m))
    ]


class DualWrite(Stage):
    """Capture: a trigger on the source logs every changed key from here on."""

    name = "dual_write"
    short = "dual"

    def forward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        return Action(self.name, forward_steps(m), [regclass(m.source_schema, m.source_name)])

    def backward(self, ctx: Ctx, moves: list[TableMove]) -> Action:
        m = moves[0]
        return Action(
            "rollback_dual_write", rollback_steps(m), [regclass(m.source_schema, m.source_name)]
        )


DUAL_WRITE = DualWrite()

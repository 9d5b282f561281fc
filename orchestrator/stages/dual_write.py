"""dual-write: capture every change to the source (keys only) for replay into the target."""

from __future__ import annotations

from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.sql import capture
from orchestrator.stages.base import Action, Stage, Step, regclass


def forward_steps(m: TableMove) -> list[Step]:
    lock = "SHARE ROW EXCLUSIVE on the source for CREATE TRIGGER: waits at most lock_timeout"
    d = capture.forward(m)
    triggers = capture.create_triggers_sql(d)
    objects = capture.install_sql(d)[: -len(triggers)]
    return [Step(s, "our log only") for s in objects] + [Step(s, lock) for s in triggers]


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

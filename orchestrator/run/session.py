"""An operator session: two connections, the advisory locks, the plan registered.

The work connection runs with `search_path = ''`: catalog definitions we replay then resolve
the same way whoever runs the tool. The lock connection only holds the session advisory locks
(state/locks.py), so they outlive every transaction of the work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from orchestrator.db import connect
from orchestrator.errors import OrchestratorError
from orchestrator.model.context import Controls, build_context
from orchestrator.plan import LoadedPlan
from orchestrator.run.engine import Engine
from orchestrator.run.events import Progress, ignore
from orchestrator.run.gates import Gates
from orchestrator.run.hooks import Hooks
from orchestrator.state.locks import operator_lock
from orchestrator.state.migrations import ensure_schema


@contextmanager
def session(
    dsn: str,
    loaded: LoadedPlan,
    progress: Progress = ignore,
    controls: Controls | None = None,
    hold: Gates | None = None,
) -> Iterator[Engine]:
    """Connect, take the plan's and its tables' advisory locks, register the plan."""
    conn = connect(dsn, autocommit=True)
    lock_conn = connect(dsn, autocommit=True, application="orchestrator-lock")
    # Our names print schema-qualified: catalog definitions we replay must not depend on
    # whatever search_path the operator's session had.
    conn.execute("SET search_path = ''")
    try:
        # Table locks are taken by qualified source name: two plans moving the same table
        # collide, two plans moving same-named tables of different schemas do not.
        names = [f"{loaded.plan.source_schema}.{t.name}" for t in loaded.plan.tables]
        with operator_lock(lock_conn, loaded.plan.name, names):
            controls = controls or Controls()
            # The plan's hooks and the command's run on every phase change; the
            # before-cutover ones are also a gate of every swap.
            hooks = Hooks.of(loaded.plan, controls.hooks, progress)
            gates = replace(hold or Gates(), check=hooks.gate)
            eng = Engine(conn, loaded, hooks, controls, gates)
            # Bad input changes nothing: check the plan against the catalog before the
            # control schema is created or the plan recorded.
            build_context(conn, loaded)
            ensure_schema(conn, loaded.plan.control_schema)
            eng.register()
            try:
                yield eng
            except OrchestratorError as exc:
                hooks.failed(exc.message)
                raise
    finally:
        conn.close()
        lock_conn.close()

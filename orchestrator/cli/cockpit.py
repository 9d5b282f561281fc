"""`orchestrator cockpit`: the interactive terminal (orchestrator/cockpit), optionally serving
the metrics beside it."""

# No `from __future__ import annotations`: typer reads the commands' annotations at runtime.
from typing import Annotated

import typer

from orchestrator.cli.common import PlanArg, app, dsn, guard
from orchestrator.plan import load_plan

MetricsOpt = Annotated[str | None, typer.Option(
    "--metrics", help="HOST:PORT: also serve the plan's Prometheus metrics there.")]


@app.command()
def cockpit(
    plan: PlanArg,
    read_only: Annotated[bool, typer.Option("--read-only", help="Watch only: the action "
                                            "keys are off.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between "
                                            "refreshes.")] = 1.0,
    metrics: MetricsOpt = None,
) -> None:
    """Step through the plan's phases interactively: the units by wave, a table's SQL, locks
    and history, and keys for the next stage, cutover, rollback, pause and throttle."""
    from orchestrator.cockpit.app import Cockpit, Settings
    from orchestrator.observe import status as status_model
    from orchestrator.observe.metrics import Listen, serve

    with guard():
        loaded = load_plan(plan)
        where = dsn()
        server = None
        if metrics:
            server = serve(status_model.reader(where, loaded), loaded.plan.name,
                           Listen.parse(metrics))
        try:
            Cockpit(Settings(where, loaded, read_only, interval)).run()
        finally:
            if server is not None:
                server.shutdown()

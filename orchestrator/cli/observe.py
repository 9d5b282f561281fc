"""Commands that read and change nothing: validate, graph, status, watch, history, and the plan's
reference and JSON Schema."""

# No `from __future__ import annotations`: typer reads the commands' annotations at runtime.
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer

from orchestrator.cli.common import (
    Fmt,
    FmtOpt,
    PlanArg,
    app,
    connect_db,
    dsn,
    emit_json,
    guard,
    out,
)
from orchestrator.model import graph
from orchestrator.model.validate import inspect
from orchestrator.observe import status as status_model
from orchestrator.plan import load_plan, plan_json_schema
from orchestrator.state import store
from orchestrator.tui import render as tui


class GraphFmt(StrEnum):
    text = "text"
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


@app.command("plan-reference")
def plan_reference() -> None:
    """Print docs/plan-reference.md, generated from the plan models."""
    from orchestrator.plan import reference_markdown

    sys.stdout.write(reference_markdown())


@app.command("plan-schema")
def plan_schema() -> None:
    """Print the plan's JSON Schema (for editors)."""
    sys.stdout.write(plan_json_schema() + "\n")


@app.command()
def validate(plan: PlanArg, fmt: FmtOpt = Fmt.text) -> None:
    """Check a plan and the live database; list every problem. Changes nothing."""
    with guard(fmt):
        loaded = load_plan(plan)
        with connect_db() as conn:
            report = inspect(conn, loaded)
    if fmt == Fmt.json:
        emit_json(report.as_dict())
    else:
        tui.print_validation(out, report)
    raise typer.Exit(0 if report.ok else 1)


@app.command("graph")
def graph_cmd(
    plan: PlanArg,
    fmt: Annotated[GraphFmt, typer.Option("--format")] = GraphFmt.text,
) -> None:
    """Print the move order: units (cycles move together) and waves."""
    with guard(fmt if fmt == GraphFmt.json else "text"):
        loaded = load_plan(plan)
        with connect_db() as conn:
            report = inspect(conn, loaded)
    dg = report.graph
    if fmt == GraphFmt.json:
        sys.stdout.write(graph.to_json(dg) + "\n")
    elif fmt == GraphFmt.mermaid:
        sys.stdout.write(graph.to_mermaid(dg) + "\n")
    elif fmt == GraphFmt.dot:
        sys.stdout.write(graph.to_dot(dg) + "\n")
    else:
        tui.print_graph(out, dg)
    raise typer.Exit(0 if not dg.problems else 1)


@app.command()
def status(plan: PlanArg, fmt: FmtOpt = Fmt.text) -> None:
    """Where each table stands, what holds it, and the next commands (the status model)."""
    with guard(fmt):
        loaded = load_plan(plan)
        with connect_db() as conn:
            ps = status_model.read(conn, loaded)
    if fmt == Fmt.json:
        emit_json(ps.as_dict())
    else:
        tui.print_status(out, ps)


@app.command()
def watch(
    plan: PlanArg,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")]
    = 1.0,
    count: Annotated[int, typer.Option("--count", help="Stop after this many refreshes "
                                       "(0: until Ctrl-C).")] = 0,
) -> None:
    """Follow the move live from the control schema (works beside an apply elsewhere)."""
    import time

    from rich.live import Live

    with guard():
        loaded = load_plan(plan)
        with connect_db() as conn:
            waves = status_model.waves(conn, loaded)  # the order does not change while we look

            def frame() -> Any:
                return tui.status_view(status_model.read(conn, loaded, waves), out.width)

            n = 0
            try:
                with Live(frame(), console=out, refresh_per_second=4) as live:
                    while count == 0 or n < count:
                        n += 1
                        time.sleep(interval)
                        live.update(frame())
            except KeyboardInterrupt:
                pass


@app.command()
def metrics(
    plan: PlanArg,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve /metrics on.")]
    = "127.0.0.1:9187",
    duration: Annotated[float, typer.Option("--duration", help="Stop after this many seconds "
                                            "(0: until Ctrl-C).")] = 0.0,
) -> None:
    """Serve the plan's status model as Prometheus metrics (read-only)."""
    import signal
    import time

    from orchestrator.observe.metrics import Listen, serve

    with guard():
        loaded = load_plan(plan)
        where = Listen.parse(listen)
        server = serve(status_model.reader(dsn(), loaded), loaded.plan.name, where)
        out.print(f"serving the metrics of plan {loaded.plan.name} on "
                  f"http://{where.host}:{where.port}/metrics (Ctrl-C stops)", highlight=False)
        # A service manager stops it with SIGTERM (a background job of a script ignores
        # SIGINT): both end it the same way.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            deadline = time.monotonic() + duration
            while duration <= 0 or time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()


@app.command()
def history(
    plan: PlanArg,
    table: Annotated[str | None, typer.Option("--table", help="Only this table.")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 200,
    fmt: FmtOpt = Fmt.text,
) -> None:
    """Show the append-only event log."""
    with guard(fmt):
        loaded = load_plan(plan)
        with connect_db() as conn:
            rows = store.events(conn, loaded.plan.control_schema, loaded.plan.name, table, limit)
    if fmt == Fmt.json:
        emit_json(rows)
    else:
        tui.print_history(out, rows)

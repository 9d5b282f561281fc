"""The command line: a thin typer layer over the core. Only this module and tui print."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from orchestrator import control, graph, log, tui
from orchestrator.db import Conn, connect, resolve_dsn, stop_embedded
from orchestrator.errors import OrchestratorError
from orchestrator.plan import LoadedPlan, load_plan, plan_json_schema
from orchestrator.validate import inspect

app = typer.Typer(
    name="orchestrator",
    help="Move PostgreSQL tables between schemas one at a time, online and reversibly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
server_app = typer.Typer(help="The embedded PostgreSQL server.", no_args_is_help=True)
app.add_typer(server_app, name="server")

out = Console()
err = Console(stderr=True)


class Fmt(StrEnum):
    text = "text"
    json = "json"


class GraphFmt(StrEnum):
    text = "text"
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


class _State:
    dsn: str | None = None
    embedded: str | None = None
    verbose: bool = False


state = _State()

DsnOpt = Annotated[
    str | None, typer.Option("--dsn", help="PostgreSQL connection string.", envvar=None)
]
FmtOpt = Annotated[Fmt, typer.Option("--format", help="text for people, json for scripts.")]
PlanArg = Annotated[Path, typer.Argument(help="The plan YAML file.")]


@app.callback()
def _root(
    dsn: DsnOpt = None,
    embedded: Annotated[
        str | None,
        typer.Option(
            "--embedded",
            help="Start/reuse the embedded server; --embedded=DIR picks its directory.",
        ),
    ] = None,
    log_format: Annotated[str, typer.Option("--log-format", help="console | json")] = "console",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Tracebacks, debug logs.")
    ] = False,
) -> None:
    state.dsn = dsn
    state.embedded = embedded
    state.verbose = verbose
    log.configure(log_format, verbose)


T = TypeVar("T")


def _fail(exc: OrchestratorError, fmt: str) -> None:
    if fmt == "json":
        out.print_json(json.dumps(exc.as_dict()))
    else:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, markup=True)
        if exc.hint:
            err.print(f"[yellow]next:[/] {exc.hint}", highlight=False)
    if state.verbose:
        err.print(traceback.format_exc())
    raise typer.Exit(exc.exit_code)


@contextmanager
def _guard(fmt: str = "text") -> Iterator[None]:
    """Turn expected failures into a message and an exit code, never a traceback."""
    try:
        yield
    except OrchestratorError as exc:
        _fail(exc, fmt)


def _connect(autocommit: bool = True) -> Conn:
    return connect(resolve_dsn(state.dsn, state.embedded), autocommit=autocommit)


def _emit_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


@app.command("plan-schema")
def plan_schema() -> None:
    """Print the plan's JSON Schema (for editors)."""
    sys.stdout.write(plan_json_schema() + "\n")


@app.command()
def validate(plan: PlanArg, fmt: FmtOpt = Fmt.text) -> None:
    """Check a plan and the live database; list every problem. Changes nothing."""
    with _guard(fmt):
        loaded = load_plan(plan)
        with _connect() as conn:
            report = inspect(conn, loaded)
    if fmt == Fmt.json:
        _emit_json(report.as_dict())
    else:
        tui.print_validation(out, report)
    raise typer.Exit(0 if report.ok else 1)


@app.command("graph")
def graph_cmd(
    plan: PlanArg,
    fmt: Annotated[GraphFmt, typer.Option("--format")] = GraphFmt.text,
) -> None:
    """Print the move order: units (cycles move together) and waves."""
    with _guard(fmt if fmt == GraphFmt.json else "text"):
        loaded = load_plan(plan)
        with _connect() as conn:
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


def _registered(conn: Conn, loaded: LoadedPlan) -> bool:
    return control.schema_exists(conn, loaded.plan.control_schema)


@app.command()
def status(plan: PlanArg, fmt: FmtOpt = Fmt.text) -> None:
    """Show each table's stages as recorded in the control schema."""
    with _guard(fmt):
        loaded = load_plan(plan)
        with _connect() as conn:
            rows = control.stage_rows(conn, loaded.plan.control_schema, loaded.plan.name)
            blockers = control.events(conn, loaded.plan.control_schema, loaded.plan.name, limit=50)
    if fmt == Fmt.json:
        _emit_json({"plan": loaded.plan.name, "stages": [r.__dict__ for r in rows]})
    else:
        tui.print_status(out, loaded.plan, rows, blockers)


@app.command()
def history(
    plan: PlanArg,
    table: Annotated[str | None, typer.Option("--table", help="Only this table.")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 200,
    fmt: FmtOpt = Fmt.text,
) -> None:
    """Show the append-only event log."""
    with _guard(fmt):
        loaded = load_plan(plan)
        with _connect() as conn:
            rows = control.events(conn, loaded.plan.control_schema, loaded.plan.name, table, limit)
    if fmt == Fmt.json:
        _emit_json(rows)
    else:
        tui.print_history(out, rows)


@server_app.command("start")
def server_start(
    directory: Annotated[Path | None, typer.Argument(help="Data directory parent.")] = None,
) -> None:
    """Start (or reuse) the embedded server and print its DSN."""
    from orchestrator.db import start_embedded

    with _guard():
        sys.stdout.write(start_embedded(directory) + "\n")


@server_app.command("stop")
def server_stop(
    directory: Annotated[Path | None, typer.Argument(help="Data directory parent.")] = None,
) -> None:
    """Stop the embedded server (by its postmaster pid)."""
    pid = stop_embedded(directory)
    out.print(f"stopped embedded server pid {pid}" if pid else "no embedded server running")


def _register_commands(register: Callable[[typer.Typer], None]) -> None:
    register(app)


def main() -> None:
    """Entry point for the console script and `python -m orchestrator`."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted: every committed step is recorded; rerun the same command to resume")
        sys.exit(130)

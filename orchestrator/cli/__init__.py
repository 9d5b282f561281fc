"""The command line: a thin typer layer over the core. Only this module and tui print."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console

from orchestrator import log
from orchestrator.db import Conn, connect, resolve_dsn, stop_embedded
from orchestrator.errors import OrchestratorError
from orchestrator.model import graph
from orchestrator.model.validate import inspect
from orchestrator.plan import LoadedPlan, load_plan, plan_json_schema
from orchestrator.state import store as control
from orchestrator.tui import render as tui

app = typer.Typer(
    name="orchestrator",
    help="Move PostgreSQL tables between schemas one at a time, online and reversibly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
server_app = typer.Typer(help="The embedded PostgreSQL server.", no_args_is_help=True)
app.add_typer(server_app, name="server")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


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
            help="Start (or reuse) the embedded server; `--embedded DIR` picks its directory.",
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
    except psycopg.errors.QueryCanceled as exc:
        # A statement ran past statement_timeout (the plan's, or the role's): the connection
        # is fine, and nothing of the interrupted step was committed.
        _fail(OrchestratorError(
            f"a statement was canceled: {str(exc).strip()}",
            hint="raise the plan's statement_timeout_ms (or the role's statement_timeout), or "
            "lower batch_size with `orchestrator set PLAN batch_size N`, then rerun the same "
            "command"), fmt)
    except psycopg.OperationalError as exc:
        # The server went away or ended our session mid-step: every committed step and
        # checkpoint is recorded, so the same command resumes.
        _fail(OrchestratorError(
            f"lost the database connection: {str(exc).strip()}",
            hint="check the server, then rerun the same command: it resumes from the last "
            "committed step"), fmt)


def _connect(autocommit: bool = True) -> Conn:
    return connect(resolve_dsn(state.dsn, state.embedded), autocommit=autocommit)


def _emit_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


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

    with _guard():
        loaded = load_plan(plan)
        with _connect() as conn:
            def frame() -> Any:
                rows = control.stage_rows(conn, loaded.plan.control_schema, loaded.plan.name)
                events = control.events(conn, loaded.plan.control_schema, loaded.plan.name,
                                        limit=20)
                return tui.status_view(loaded.plan, rows, events)

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


@app.command()
def demo(
    rows: Annotated[int, typer.Option("--rows", help="Turns to generate (other tables "
                                      "scale with it).")] = 200_000,
    keep: Annotated[bool, typer.Option("--keep", help="Leave the server running and print "
                                       "its DSN.")] = False,
    directory: Annotated[Path | None, typer.Option("--dir", help="Embedded server data "
                                                   "directory parent.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Application sessions.")] = 2,
) -> None:
    """Run the Cogito move on the embedded server under a simulated application."""
    from rich.table import Table

    from orchestrator.demo import demo as demo_mod

    def say(text: str) -> None:
        out.print(f"[bold cyan]»[/] {text}", highlight=False)

    reporter = tui.Reporter(out)
    started_here = state.dsn is None
    try:
        with _guard(), reporter:
            summary = demo_mod.run(say, reporter.event, rows=rows, directory=directory,
                                   dsn=state.dsn, threads=threads)
    finally:
        if started_here and not keep:
            pid = stop_embedded(directory)
            if pid:
                out.print(f"stopped the embedded server (pid {pid}); --keep leaves it running")
    table = Table(title="Cogito demo: summary")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("rows compared (moved tables vs their retired sources)",
                  f"{summary.compared:,}")
    table.add_row("mismatches", f"{summary.mismatches}")
    for stage, secs in summary.stage_seconds.items():
        table.add_row(f"time: {stage}", f"{secs:.2f} s")
    table.add_row("application writes during the move", f"{summary.app_writes:,}")
    table.add_row("application reads during the move", f"{summary.app_reads:,}")
    table.add_row("application statements retried (lock waits, moved rows)",
                  f"{summary.app_retried:,}")
    table.add_row("application errors", f"{summary.app_errors}")
    table.add_row("longest application wait", f"{summary.longest_wait_ms:.0f} ms")
    out.print(table)
    if keep:
        where = f" {directory}" if directory else ""
        out.print(f"the server keeps running; explore with:\n  psql '{summary.dsn}'\n"
                  f"  orchestrator --dsn '{summary.dsn}' status plans/cogito.yaml\n"
                  f"stop it with: orchestrator server stop{where}")
    raise typer.Exit(0 if summary.mismatches == 0 else 1)


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


TablesOpt = Annotated[
    list[str] | None,
    typer.Option("--table", "-t", help="Only this table (and its cycle unit); repeatable."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
LockOpt = Annotated[
    int | None,
    typer.Option("--lock-timeout", help="lock_timeout in ms for this run (overrides the plan)."),
]


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise OrchestratorError(
            f"{question} needs confirmation", hint="rerun with --yes in scripts"
        )
    if not typer.confirm(question):
        raise typer.Exit(1)


@contextmanager
def _engine(
    plan: Path, tables: list[str] | None, lock_timeout: int | None, fmt: str = "text"
) -> Iterator[Any]:
    from orchestrator.run.engine import session

    loaded = load_plan(plan)
    dsn = resolve_dsn(state.dsn, state.embedded)
    reporter = tui.Reporter(err if fmt == "json" else out, json_mode=fmt == "json")
    with reporter, session(dsn, loaded, reporter.event, lock_timeout, None) as eng:
        yield eng


class DryFmt(StrEnum):
    text = "text"
    json = "json"
    sql = "sql"


# The text report shows every statement up to this many tables; a larger plan gets one panel per
# table, and its SQL through --table, --format sql or --format json.
TEXT_SQL_MAX_TABLES = 20


def _dry_run(plan: Path, fmt: str, tables: list[str] | None = None) -> None:
    from orchestrator.run import dryrun

    with _guard("json" if fmt == "json" else "text"):
        loaded = load_plan(plan)
        with _connect() as conn:
            conn.execute("SET search_path = ''")
            d = dryrun.build(conn, loaded, tables or ())
            # Statements render on first read, with this connection's encoding.
            if fmt == "json":
                _emit_json(d.as_dict())
            elif fmt == "sql":
                sys.stdout.write(dryrun.to_sql(d) + "\n")
            else:
                show_sql = bool(tables) or len(d.tables) <= TEXT_SQL_MAX_TABLES
                tui.print_dry_run(out, d, show_sql=show_sql)
                if not show_sql:
                    out.print(
                        f"SQL not shown for {len(d.tables)} tables: `orchestrator dry-run {plan} "
                        "--table NAME` shows one unit's, `--format sql` writes the whole script"
                    )


@app.command("dry-run")
def dry_run(
    plan: PlanArg,
    table: TablesOpt = None,
    fmt: Annotated[DryFmt, typer.Option("--format", help="text, json or sql")] = DryFmt.text,
) -> None:
    """Show every stage's SQL (forward and back), locks, sizes, durations and risks."""
    _dry_run(plan, fmt.value, table)


@app.command()
def apply(
    plan: PlanArg,
    table: TablesOpt = None,
    until: Annotated[
        str,
        typer.Option(
            "--until",
            help="Last stage to run: prepare, dual_write, copy, verify (default) or cutover.",
        ),
    ] = "verify",
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Then keep replaying captured changes until interrupted."),
    ] = False,
    yes: YesOpt = False,
    lock_timeout: LockOpt = None,
    dry: Annotated[bool, typer.Option("--dry-run", help="Show what would run; change "
                                      "nothing.")] = False,
    fmt: FmtOpt = Fmt.text,
) -> None:
    """Move tables up to a stage (verify by default: cutover is a separate, explicit step)."""
    if dry:
        _dry_run(plan, fmt.value, table)
        return
    allowed = ("prepare", "dual_write", "copy", "verify", "cutover")
    with _guard(fmt):
        if until not in allowed:
            raise OrchestratorError(
                f"--until {until}: not a stage", hint=f"use one of {', '.join(allowed)}"
            )
        if until == "cutover":
            _confirm("apply through cutover (the application switches to the new tables)?", yes)
        with _engine(plan, table, lock_timeout, fmt) as eng:
            eng.apply(table, until)
            if follow:
                out.print("following: replaying captured changes (Ctrl-C to stop)")
                import time

                try:
                    while True:
                        if eng.replay_once() == 0:
                            time.sleep(1.0)
                except KeyboardInterrupt:
                    pass
    if fmt == Fmt.json:
        _emit_json({"plan": str(plan), "until": until, "ok": True})


@app.command()
def cutover(
    plan: PlanArg,
    table: TablesOpt = None,
    yes: YesOpt = False,
    lock_timeout: LockOpt = None,
    fmt: FmtOpt = Fmt.text,
) -> None:
    """Swap the application to the new tables (one short locked transaction per unit)."""
    with _guard(fmt):
        _confirm("cut over (retire the source tables behind compatibility views)?", yes)
        with _engine(plan, table, lock_timeout, fmt) as eng:
            eng.cutover(table)
    if fmt == Fmt.json:
        _emit_json({"plan": str(plan), "cutover": True})


@app.command()
def finalize(
    plan: PlanArg,
    table: TablesOpt = None,
    yes: YesOpt = False,
    lock_timeout: LockOpt = None,
    drop_views: Annotated[bool, typer.Option(
        "--drop-compat-views", help="Also drop the compatibility views in the source schema "
        "(once the application uses the new names; see compat-usage).")] = False,
    fmt: FmtOpt = Fmt.text,
) -> None:
    """Drop the retired tables and reverse capture. Cannot be undone."""
    dropped: list[str] = []
    with _guard(fmt):
        what = "the retired tables" + (" and the compatibility views" if drop_views else "")
        _confirm(f"finalize? This drops {what} and CANNOT be undone", yes)
        with _engine(plan, table, lock_timeout, fmt) as eng:
            eng.finalize(table)
            if drop_views:
                dropped = eng.drop_compat_views(table)
    if fmt == Fmt.json:
        _emit_json({"plan": str(plan), "finalized": True, "dropped_views": dropped})
    elif dropped:
        out.print(f"dropped compatibility views: {', '.join(dropped)}", highlight=False)


@app.command()
def rollback(
    plan: PlanArg,
    table: Annotated[
        str,
        typer.Option(
            "--table", "-t", help="The table to roll back (its whole unit when it is in a cycle)."
        ),
    ],
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="Keep this stage and those before it (default: undo everything)."
        ),
    ] = None,
    yes: YesOpt = False,
    lock_timeout: LockOpt = None,
    fmt: FmtOpt = Fmt.text,
) -> None:
    """Reverse a table's stages, latest first, keeping every row written meanwhile."""
    allowed = ("prepare", "dual_write", "copy", "verify")
    with _guard(fmt):
        if to is not None and to not in allowed:
            raise OrchestratorError(
                f"--to {to}: not a stage you can roll back to",
                hint=f"use one of {', '.join(allowed)}",
            )
        _confirm(f"roll back {table}" + (f" to {to}" if to else " entirely") + "?", yes)
        with _engine(plan, [table], lock_timeout, fmt) as eng:
            undone = eng.rollback(table, to)
    if fmt == Fmt.json:
        _emit_json({"plan": str(plan), "rolled_back": undone})
    else:
        out.print(f"rolled back: {', '.join(undone) or 'nothing to undo'}", highlight=False)


@app.command("set")
def set_cmd(
    plan: PlanArg,
    key: Annotated[
        str,
        typer.Argument(
            help="batch_size, sleep_ms, probe_max, max_replication_lag_bytes or "
            "max_wal_bytes_per_s"
        ),
    ],
    value: Annotated[float, typer.Argument()],
    table: Annotated[str, typer.Option("--table", "-t")] = "*",
) -> None:
    """Change a running copy's batch size or throttle (read before every batch)."""
    allowed = ("batch_size", "sleep_ms", "probe_max", "max_replication_lag_bytes",
               "max_wal_bytes_per_s")
    with _guard():
        if key not in allowed:
            raise OrchestratorError(
                f"{key}: not an adjustable setting", hint=f"use one of {', '.join(allowed)}"
            )
        loaded = load_plan(plan)
        with _connect() as conn:
            control.ensure_schema(conn, loaded.plan.control_schema)
            with conn.transaction():
                control.put_setting(
                    conn,
                    loaded.plan.control_schema,
                    loaded.plan.name,
                    key,
                    int(value) if key != "probe_max" else value,
                    table,
                )
    out.print(f"{key} = {value:g} for {table if table != '*' else 'every table'}")


def embedded_argv(argv: list[str]) -> list[str]:
    """`--embedded [DIR]`: the directory is optional, which click cannot express, so a bare
    `--embedded` becomes `--embedded=` (the default directory), and `--embedded DIR` keeps
    DIR only when it is an existing directory (never a plan file or a command)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--embedded":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("-") and Path(nxt).is_dir():
                out.append(f"--embedded={nxt}")
                i += 2
                continue
            out.append("--embedded=")
        else:
            out.append(arg)
        i += 1
    return out


def main() -> None:
    """Entry point for the console script and `python -m orchestrator`."""
    try:
        app(args=embedded_argv(sys.argv[1:]))
    except KeyboardInterrupt:
        err.print("interrupted: every committed step is recorded; rerun the same command to resume")
        sys.exit(130)


def _register_tools() -> None:
    from orchestrator.cli import tools as cli_tools

    cli_tools.register(app)


_register_tools()

"""What every command module shares: the typer apps, the consoles, the global options, the
option types, and the helpers that turn expected failures into a message and an exit code.

Command modules import this module (and the core), never each other nor the package.
"""

# No `from __future__ import annotations`: typer reads the callback's annotations at runtime.
import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import psycopg
import typer
from rich.console import Console

from orchestrator import log
from orchestrator.db import Conn, connect, resolve_dsn
from orchestrator.errors import OrchestratorError
from orchestrator.plan import load_plan
from orchestrator.tui import render as tui

if TYPE_CHECKING:
    from orchestrator.model.context import Controls
    from orchestrator.run.engine import Engine
    from orchestrator.run.gates import Gates

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


class State:
    """The root options, set by the callback before any command runs."""

    dsn: str | None = None
    embedded: str | None = None
    verbose: bool = False


state = State()

DsnOpt = Annotated[
    str | None, typer.Option("--dsn", help="PostgreSQL connection string.", envvar=None)
]
FmtOpt = Annotated[Fmt, typer.Option("--format", help="text for people, json for scripts.")]
PlanArg = Annotated[Path, typer.Argument(help="The plan YAML file.")]
TablesOpt = Annotated[
    list[str] | None,
    typer.Option("--table", "-t", help="Only this table (and its cycle unit); repeatable."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
# How a swap approaches its lock (runbook: "Blockers") and what holds it ("Cutover gates").
ForecastWaitOpt = Annotated[float, typer.Option(
    "--forecast-wait", help="Seconds a swap waits for a clear stall forecast before giving up "
    "(changing nothing).")]
IgnoreForecastOpt = Annotated[bool, typer.Option(
    "--ignore-forecast", help="Try the swap's lock even when the forecast names a session "
    "that would hold it past lock_timeout.")]
TryOpt = Annotated[int, typer.Option(
    "--try-ms", help="With the forecast on, how long one try of a swap's lock may wait (at "
    "most lock_timeout); tries are retried with jitter.")]
TerminateAfterOpt = Annotated[int | None, typer.Option(
    "--terminate-blockers-after", help="After a swap has waited this many ms, end the "
    "sessions the forecast names (never a superuser's, a replication process, a writer or a "
    "transaction older than --terminate-max-age).")]
TerminateMaxAgeOpt = Annotated[float, typer.Option(
    "--terminate-max-age", help="Seconds: never end a transaction older than this.")]
TerminateWritersOpt = Annotated[bool, typer.Option(
    "--terminate-writers", help="Also end sessions whose transaction has written.")]
WindowOpt = Annotated[str | None, typer.Option(
    "--window", help="HH:MM-HH:MM (local time): swap only inside it (overrides the plan's "
    "cutover_window).")]
PostponeOpt = Annotated[Path | None, typer.Option(
    "--postpone-file", help="Hold each swap while this file exists.")]
NoRepairOpt = Annotated[bool, typer.Option(
    "--no-repair", help="Verify only reports a range that still differs after its re-checks "
    "(by default it replaces the target's rows there from the source, and logs it).")]
FullVerifyOpt = Annotated[bool, typer.Option(
    "--full-verify", help="Verify every chunk before the swap, not only those changed since "
    "the last full pass (which sees only changes made through the capture).")]
WhenReadyOpt = Annotated[bool, typer.Option(
    "--when-ready", help="Swap a unit only once verified, its capture log short and the "
    "stall forecast clear.")]
HookOpt = Annotated[list[str] | None, typer.Option(
    "--hook", help="EVENT=COMMAND: run COMMAND on EVENT (as a plan hook; repeatable).")]


def run_controls(
    lock_timeout: int | None, forecast_wait: float = 30.0, ignore_forecast: bool = False,
    terminate_after: int | None = None, terminate_max_age: float = 600.0,
    terminate_writers: bool = False, try_ms: int = 100, no_repair: bool = False,
    full_verify: bool = False, hooks: list[str] | None = None, force: bool = False,
) -> "Controls":
    """The operator's options of a command, as the engine takes them."""
    from orchestrator.model.context import Controls, SwapControls
    from orchestrator.run.hooks import parse

    return Controls(
        lock_timeout_ms=lock_timeout,
        swap=SwapControls(
            forecast=not ignore_forecast, forecast_wait_s=forecast_wait,
            terminate_after_ms=terminate_after, terminate_max_age_s=terminate_max_age,
            terminate_writers=terminate_writers, try_ms=try_ms,
        ),
        repair=not no_repair, full_verify=full_verify, hooks=parse(hooks or ()), force=force,
    )


def cutover_gates(window: str | None, postpone: Path | None, when_ready: bool) -> "Gates":
    from orchestrator.run.gates import Gates, parse_window

    return Gates(window=parse_window(window) if window else None, postpone_file=postpone,
                 when_ready=when_ready)
LockOpt = Annotated[
    int | None,
    typer.Option("--lock-timeout", help="lock_timeout in ms for this run (overrides the plan)."),
]


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


def fail(exc: OrchestratorError, fmt: str) -> NoReturn:
    """Print an expected failure (as JSON on stdout in json format) and exit with its code."""
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
def guard(fmt: str = "text") -> Iterator[None]:
    """Turn expected failures into a message and an exit code, never a traceback."""
    try:
        yield
    except OrchestratorError as exc:
        fail(exc, fmt)
    except psycopg.errors.QueryCanceled as exc:
        # A statement ran past statement_timeout (the plan's, or the role's): the connection
        # is fine, and nothing of the interrupted step was committed.
        fail(OrchestratorError(
            f"a statement was canceled: {str(exc).strip()}",
            hint="raise the plan's statement_timeout_ms (or the role's statement_timeout), or "
            "lower batch_size with `orchestrator set PLAN batch_size N`, then rerun the same "
            "command"), fmt)
    except KeyboardInterrupt:
        # Ctrl-C, most often to cancel a wait (a cutover window, a postpone file, a forecast):
        # what was committed is recorded and nothing half-done is.
        fail(OrchestratorError(
            "interrupted: every committed step is recorded, nothing half-done was kept",
            hint="rerun the same command to go on"), fmt)
    except psycopg.OperationalError as exc:
        # The server went away or ended our session mid-step: every committed step and
        # checkpoint is recorded, so the same command resumes.
        fail(OrchestratorError(
            f"lost the database connection: {str(exc).strip()}",
            hint="check the server, then rerun the same command: it resumes from the last "
            "committed step"), fmt)


def dsn() -> str:
    """The connection string the root options name (--dsn, --embedded, DATABASE_URL)."""
    return resolve_dsn(state.dsn, state.embedded)


def connect_db(autocommit: bool = True) -> Conn:
    """A connection to the database the root options name (--dsn, --embedded, DATABASE_URL)."""
    return connect(resolve_dsn(state.dsn, state.embedded), autocommit=autocommit)


def emit_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def confirm(question: str, yes: bool) -> None:
    """Ask before a change; --yes answers, and a script without a terminal must pass it."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise OrchestratorError(
            f"{question} needs confirmation", hint="rerun with --yes in scripts"
        )
    if not typer.confirm(question):
        raise typer.Exit(1)


@contextmanager
def engine(
    plan: Path, fmt: str = "text", controls: "Controls | None" = None,
    hold: "Gates | None" = None,
) -> Iterator["Engine"]:
    """A session of the engine on the plan, its progress shown by a Reporter (on stderr in
    json format, so stdout stays one JSON document)."""
    from orchestrator.run.session import session

    loaded = load_plan(plan)
    dsn = resolve_dsn(state.dsn, state.embedded)
    reporter = tui.Reporter(err if fmt == "json" else out, json_mode=fmt == "json")
    with reporter, session(dsn, loaded, reporter.event, controls, hold) as eng:
        yield eng


@contextmanager
def serving(plan: Path, listen: str | None) -> Iterator[None]:
    """Serve the plan's Prometheus metrics while the block runs (when asked)."""
    if listen is None:
        yield
        return
    from orchestrator.observe import status as status_model
    from orchestrator.observe.metrics import Listen, serve

    loaded = load_plan(plan)
    server = serve(status_model.reader(dsn(), loaded), loaded.plan.name, Listen.parse(listen))
    try:
        yield
    finally:
        server.shutdown()


def embedded_argv(argv: list[str]) -> list[str]:
    """`--embedded [DIR]`: the directory is optional, which click cannot express, so a bare
    `--embedded` becomes `--embedded=` (the default directory), and `--embedded DIR` keeps
    DIR only when it is an existing directory (never a plan file or a command)."""
    args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--embedded":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("-") and Path(nxt).is_dir():
                args.append(f"--embedded={nxt}")
                i += 2
                continue
            args.append("--embedded=")
        else:
            args.append(arg)
        i += 1
    return args

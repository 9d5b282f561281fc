"""Commands that move tables: dry-run, apply, cutover, finalize, rollback, and set (a running
copy's batch size or throttle)."""

# No `from __future__ import annotations`: typer reads the commands' annotations at runtime.
import contextlib
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import (
    Fmt,
    FmtOpt,
    ForecastWaitOpt,
    FullVerifyOpt,
    HookOpt,
    IgnoreForecastOpt,
    LockOpt,
    NoRepairOpt,
    PlanArg,
    PostponeOpt,
    TablesOpt,
    TerminateAfterOpt,
    TerminateMaxAgeOpt,
    TerminateWritersOpt,
    TryOpt,
    WhenReadyOpt,
    WindowOpt,
    YesOpt,
    app,
    confirm,
    connect_db,
    cutover_gates,
    emit_json,
    engine,
    guard,
    out,
    run_controls,
    serving,
)
from orchestrator.errors import OrchestratorError
from orchestrator.plan import load_plan
from orchestrator.stages.registry import APPLY_UNTIL, ROLLBACK_TO
from orchestrator.state import store
from orchestrator.tui import render as tui


class DryFmt(StrEnum):
    text = "text"
    json = "json"
    sql = "sql"


# The text report shows every statement up to this many tables; a larger plan gets one panel per
# table, and its SQL through --table, --format sql or --format json.
TEXT_SQL_MAX_TABLES = 20


def _dry_run(plan: Path, fmt: str, tables: list[str] | None = None) -> None:
    from orchestrator.run import dryrun

    with guard("json" if fmt == "json" else "text"):
        loaded = load_plan(plan)
        with connect_db() as conn:
            conn.execute("SET search_path = ''")
            d = dryrun.build(conn, loaded, tables or ())
            # Statements render on first read, with this connection's encoding.
            if fmt == "json":
                emit_json(d.as_dict())
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
        typer.Option("--follow", help="Then keep replaying captured changes until interrupted "
                     "(yielding to the application unless --replay-rate is given)."),
    ] = False,
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=1, max=64, help="Move up to this many independent tables (units of "
        "one wave) side by side, each on its own session; swaps stay one at a time.")] = 1,
    replay_rate: Annotated[int | None, typer.Option(
        "--replay-rate", min=1, help="With --follow: replay at most this many logged keys per "
        "second (default: the plan's throttle.replay_rate, else yield to the application).")]
    = None,
    yes: YesOpt = False,
    lock_timeout: LockOpt = None,
    dry: Annotated[bool, typer.Option("--dry-run", help="Show what would run; change "
                                      "nothing.")] = False,
    fmt: FmtOpt = Fmt.text,
    window: WindowOpt = None,
    postpone_file: PostponeOpt = None,
    when_ready: WhenReadyOpt = False,
    forecast_wait: ForecastWaitOpt = 30.0,
    ignore_forecast: IgnoreForecastOpt = False,
    terminate_after: TerminateAfterOpt = None,
    terminate_max_age: TerminateMaxAgeOpt = 600.0,
    terminate_writers: TerminateWritersOpt = False,
    try_ms: TryOpt = 100,
    no_repair: NoRepairOpt = False,
    full_verify: FullVerifyOpt = False,
    hook: HookOpt = None,
    metrics: Annotated[str | None, typer.Option(
        "--metrics", help="HOST:PORT: serve the plan's Prometheus metrics while this runs.")]
    = None,
) -> None:
    """Move tables up to a stage (verify by default: cutover is a separate, explicit step)."""
    if dry:
        _dry_run(plan, fmt.value, table)
        return
    with guard(fmt):
        if until not in APPLY_UNTIL:
            raise OrchestratorError(
                f"--until {until}: not a stage", hint=f"use one of {', '.join(APPLY_UNTIL)}"
            )
        if until == "cutover":
            confirm("apply through cutover (the application switches to the new tables)?", yes)
        controls = run_controls(lock_timeout, forecast_wait, ignore_forecast, terminate_after,
                                terminate_max_age, terminate_writers, try_ms, no_repair,
                                full_verify, hook)
        hold = cutover_gates(window, postpone_file, when_ready)
        with serving(plan, metrics), engine(plan, fmt, controls, hold) as eng:
            eng.apply(table, until, jobs)
            if follow:
                out.print("following: replaying captured changes (Ctrl-C to stop)")
                with contextlib.suppress(KeyboardInterrupt):
                    eng.follow(rate=replay_rate)
    if fmt == Fmt.json:
        emit_json({"plan": str(plan), "until": until, "ok": True})


@app.command()
def cutover(
    plan: PlanArg,
    table: TablesOpt = None,
    yes: YesOpt = False,
    lock_timeout: LockOpt = None,
    fmt: FmtOpt = Fmt.text,
    window: WindowOpt = None,
    postpone_file: PostponeOpt = None,
    when_ready: WhenReadyOpt = False,
    forecast_wait: ForecastWaitOpt = 30.0,
    ignore_forecast: IgnoreForecastOpt = False,
    terminate_after: TerminateAfterOpt = None,
    terminate_max_age: TerminateMaxAgeOpt = 600.0,
    terminate_writers: TerminateWritersOpt = False,
    try_ms: TryOpt = 100,
    no_repair: NoRepairOpt = False,
    full_verify: FullVerifyOpt = False,
    hook: HookOpt = None,
) -> None:
    """Swap the application to the new tables (one short locked transaction per unit), when
    the gates open and the stall forecast is clear."""
    with guard(fmt):
        confirm("cut over (retire the source tables behind compatibility views)?", yes)
        controls = run_controls(lock_timeout, forecast_wait, ignore_forecast, terminate_after,
                                terminate_max_age, terminate_writers, try_ms, no_repair,
                                full_verify, hook)
        hold = cutover_gates(window, postpone_file, when_ready)
        with engine(plan, fmt, controls, hold) as eng:
            eng.cutover(table)
    if fmt == Fmt.json:
        emit_json({"plan": str(plan), "cutover": True})


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
    force: Annotated[bool, typer.Option(
        "--force", help="Finalize even though a compatibility view was used within the "
        "plan's finalize_quiet_period_s.")] = False,
    hook: HookOpt = None,
) -> None:
    """Drop the retired tables and reverse capture. Cannot be undone."""
    dropped: list[str] = []
    with guard(fmt):
        what = "the retired tables" + (" and the compatibility views" if drop_views else "")
        confirm(f"finalize? This drops {what} and CANNOT be undone", yes)
        with engine(plan, fmt, run_controls(lock_timeout, hooks=hook, force=force)) as eng:
            eng.finalize(table)
            if drop_views:
                dropped = eng.drop_compat_views(table)
    if fmt == Fmt.json:
        emit_json({"plan": str(plan), "finalized": True, "dropped_views": dropped})
    elif dropped:
        out.print(f"dropped compatibility views: {', '.join(dropped)}", highlight=False)


@app.command()
def rollback(
    plan: PlanArg,
    table: Annotated[
        str | None,
        typer.Option(
            "--table", "-t", help="The table to roll back (its whole unit when it is in a "
            "cycle); without it, every table of the plan, the last wave first."
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="Keep this stage and those before it (default: undo everything)."
        ),
    ] = None,
    yes: YesOpt = False,
    lock_timeout: LockOpt = None,
    fmt: FmtOpt = Fmt.text,
    forecast_wait: ForecastWaitOpt = 30.0,
    ignore_forecast: IgnoreForecastOpt = False,
    terminate_after: TerminateAfterOpt = None,
    terminate_max_age: TerminateMaxAgeOpt = 600.0,
    terminate_writers: TerminateWritersOpt = False,
    try_ms: TryOpt = 100,
    hook: HookOpt = None,
) -> None:
    """Reverse a table's stages (or the whole plan's), latest first, keeping every row written
    meanwhile."""
    with guard(fmt):
        if to is not None and to not in ROLLBACK_TO:
            raise OrchestratorError(
                f"--to {to}: not a stage you can roll back to",
                hint=f"use one of {', '.join(ROLLBACK_TO)}",
            )
        what = table or "every table of the plan"
        confirm(f"roll back {what}" + (f" to {to}" if to else " entirely") + "?", yes)
        controls = run_controls(lock_timeout, forecast_wait, ignore_forecast, terminate_after,
                                terminate_max_age, terminate_writers, try_ms, hooks=hook)
        with engine(plan, fmt, controls) as eng:
            undone = eng.rollback(table, to)
    if fmt == Fmt.json:
        emit_json({"plan": str(plan), "rolled_back": undone})
    else:
        out.print(f"rolled back: {', '.join(undone) or 'nothing to undo'}", highlight=False)


@app.command("set")
def set_cmd(
    plan: PlanArg,
    key: Annotated[
        str,
        typer.Argument(
            help="batch_size, sleep_ms, probe_max, max_replication_lag_bytes, "
            "max_wal_bytes_per_s, paused (true/false), adaptive (true/false: the copy yields "
            "to the application), yield_goal (0-1) or replay_rate (keys/s for apply --follow; "
            "0: yield)"
        ),
    ],
    value: Annotated[str, typer.Argument()],
    table: Annotated[str, typer.Option("--table", "-t")] = "*",
) -> None:
    """Change a running copy's batch size or throttle, or pause and resume it (read before
    every batch), or the replayer's pace (read every few seconds)."""
    with guard():
        # Checked before the plan is read: a mistyped key or value needs no plan and no
        # database.
        parsed = store.parse_setting(key, value)
        loaded = load_plan(plan)
        with connect_db() as conn:
            store.change_setting(conn, loaded, key, parsed, table)
    out.print(f"{key} = {value} for {table if table != '*' else 'every table'}")

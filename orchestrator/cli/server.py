"""The embedded server's commands (`server start`, `server stop`) and the demo that runs on it."""

# No `from __future__ import annotations`: typer reads the commands' annotations at runtime.
import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import app, guard, out, server_app, state
from orchestrator.db import stop_embedded
from orchestrator.tui import render as tui
from orchestrator.tui.reports import demo_summary


@app.command()
def demo(
    rows: Annotated[int, typer.Option("--rows", help="Turns to generate (other tables "
                                      "scale with it).")] = 200_000,
    keep: Annotated[bool, typer.Option("--keep", help="Leave the server running and print "
                                       "its DSN.")] = False,
    directory: Annotated[Path | None, typer.Option("--dir", help="Embedded server data "
                                                   "directory parent.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Application sessions.")] = 2,
    two_servers: Annotated[bool, typer.Option(
        "--two-servers", help="Move the conversation domain to a second embedded server "
        "(plans/cogito-two-servers.yaml), through logical replication.")] = False,
) -> None:
    """Run the Cogito move on the embedded server under a simulated application."""
    from orchestrator.demo import demo as demo_mod

    if two_servers:
        _two_servers(rows, keep, directory, threads)
        return

    def say(text: str) -> None:
        out.print(f"[bold cyan]»[/] {text}", highlight=False)

    reporter = tui.Reporter(out)
    started_here = state.dsn is None
    try:
        with guard(), reporter:
            summary = demo_mod.run(say, reporter.event, rows=rows, directory=directory,
                                   dsn=state.dsn, threads=threads)
    finally:
        if started_here and not keep:
            pid = stop_embedded(directory)
            if pid:
                out.print(f"stopped the embedded server (pid {pid}); --keep leaves it running")
    out.print(demo_summary(summary))
    if keep:
        where = f" {directory}" if directory else ""
        out.print(f"the server keeps running; explore with:\n  psql '{summary.dsn}'\n"
                  f"  orchestrator --dsn '{summary.dsn}' status plans/cogito.yaml\n"
                  f"stop it with: orchestrator server stop{where}")
    raise typer.Exit(0 if summary.mismatches == 0 else 1)


def _two_servers(rows: int, keep: bool, directory: Path | None, threads: int) -> None:
    from orchestrator.demo import two_servers

    def say(text: str) -> None:
        out.print(f"[bold cyan]»[/] {text}", highlight=False)

    reporter = tui.Reporter(out)
    try:
        with guard(), reporter:
            summary = two_servers.run(say, reporter.event, rows=rows, directory=directory,
                                      threads=threads)
    finally:
        if not keep:
            pids = two_servers.stop_servers(directory)
            if pids:
                out.print(f"stopped the two embedded servers (pids {', '.join(map(str, pids))})"
                          "; --keep leaves them running")
    out.print(demo_summary(summary))
    if keep:
        out.print(f"the servers keep running; explore with:\n  psql '{summary.dsn}'\n"
                  f"  psql '{summary.target_dsn}'\n"
                  f"  CONVERSATION_DSN='{summary.target_dsn}' orchestrator --dsn "
                  f"'{summary.dsn}' status plans/cogito-two-servers.yaml")
    raise typer.Exit(0 if summary.mismatches == 0 and not summary.leftovers else 1)


@server_app.command("start")
def server_start(
    directory: Annotated[Path | None, typer.Argument(help="Data directory parent.")] = None,
) -> None:
    """Start (or reuse) the embedded server and print its DSN."""
    from orchestrator.db import start_embedded

    with guard():
        sys.stdout.write(start_embedded(directory) + "\n")


@server_app.command("stop")
def server_stop(
    directory: Annotated[Path | None, typer.Argument(help="Data directory parent.")] = None,
) -> None:
    """Stop the embedded server (by its postmaster pid)."""
    pid = stop_embedded(directory)
    out.print(f"stopped embedded server pid {pid}" if pid else "no embedded server running")

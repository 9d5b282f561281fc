"""Closing reports of longer runs (the demo's summary)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from orchestrator.demo.demo import Summary


def demo_summary(summary: Summary) -> Table:
    """The demo's figures: rows compared, time per stage, what the application saw."""
    table = Table(title="Cogito demo: summary")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("rows compared (moved tables vs their retired sources"
                  + (", across the two servers)" if summary.target_dsn else ")"),
                  f"{summary.compared:,}")
    table.add_row("mismatches", f"{summary.mismatches}")
    if summary.leftovers is not None:
        table.add_row("replication slots, publications, subscriptions left after finalize",
                      f"{summary.leftovers}")
    for stage, secs in summary.stage_seconds.items():
        table.add_row(f"time: {stage}", f"{secs:.2f} s")
    table.add_row("application writes during the move", f"{summary.app_writes:,}")
    table.add_row("application reads during the move", f"{summary.app_reads:,}")
    table.add_row("application statements retried (lock waits, moved rows)",
                  f"{summary.app_retried:,}")
    table.add_row("application errors", f"{summary.app_errors}")
    table.add_row("longest application wait", f"{summary.longest_wait_ms:.0f} ms")
    return table

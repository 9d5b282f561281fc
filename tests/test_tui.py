"""What an operator sees: the renderers, recorded with rich's Console(record=True)."""

from __future__ import annotations

from datetime import UTC, datetime

from conftest import COGITO_PLAN
from rich.console import Console

from orchestrator.db import connect
from orchestrator.plan import load_plan
from orchestrator.run import dryrun
from orchestrator.state.store import StageRow
from orchestrator.tui import render as tui


def _row(table: str, stage: str, status: str, **kw: object) -> StageRow:
    now = datetime.now(UTC)
    base: dict[str, object] = dict(
        plan="cogito", table_name=table, stage=stage, status=status, started_at=now,
        finished_at=None, attempts=1, rows_done=0, rows_estimated=None, rows_per_s=None,
        checkpoint=None, last_error=None, updated_at=now)
    base.update(kw)
    return StageRow(**base)  # type: ignore[arg-type]


def test_status_shows_each_stage_progress_eta_and_the_last_error() -> None:
    plan = load_plan(COGITO_PLAN).plan
    rows = [
        _row("turns", "prepare", "done"), _row("turns", "dual_write", "done"),
        _row("turns", "copy", "running", rows_done=50_000, rows_estimated=200_000,
             rows_per_s=25_000.0),
        _row("users", "cutover", "failed", last_error="lock wait: pid 4242"),
        _row("clients", "rename", "done"),
    ]
    console = Console(record=True, width=160)
    console.print(tui.status_view(plan, rows, []))
    text = console.export_text()
    turns = next(line for line in text.splitlines() if line.startswith("│ turns"))
    assert "running" in turns and "50,000/200,000" in turns and "25,000/s" in turns
    assert "6 s" in turns  # 150,000 rows left at 25,000 rows/s
    assert "lock wait: pid 4242" in text
    clients = next(line for line in text.splitlines() if "clients (rename)" in line)
    assert "done" in clients


def test_the_status_of_a_plan_never_started_says_what_to_run() -> None:
    plan = load_plan(COGITO_PLAN).plan
    console = Console(record=True, width=120)
    console.print(tui.status_view(plan, [], []))
    assert "has not started" in console.export_text()


def test_the_dry_run_report_names_strategy_risks_and_statements(cogito_dsn: str) -> None:
    conn = connect(cogito_dsn, autocommit=True)
    conn.execute("SET search_path = ''")
    report = dryrun.build(conn, load_plan(COGITO_PLAN))
    conn.close()
    console = Console(record=True, width=200)
    tui.print_dry_run(console, report)
    text = console.export_text()
    assert "turns → conversation.turns" in text
    assert "risk: user triggers turns_touch_updated_at" in text
    assert 'CREATE TABLE "conversation"."turns"' in text
    assert "CANNOT BE UNDONE" in text

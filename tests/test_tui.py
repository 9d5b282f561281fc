"""What an operator sees: the renderers, recorded with rich's Console(record=True)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from conftest import COGITO_PLAN
from rich.console import Console

from orchestrator.db import connect
from orchestrator.observe import status as status_model
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


def _status(rows: list[StageRow]) -> Any:
    return status_model.assemble(load_plan(COGITO_PLAN), rows, {"turns": 2, "users": 0})


ROWS = [
    _row("turns", "prepare", "done"), _row("turns", "dual_write", "done"),
    _row("turns", "copy", "running", rows_done=50_000, rows_estimated=200_000,
         rows_per_s=25_000.0),
    _row("users", "cutover", "failed", last_error="lock wait: pid 4242"),
    _row("clients", "rename", "done"),
]


def test_status_shows_each_stage_progress_eta_and_the_last_error() -> None:
    console = Console(record=True, width=160)
    tui.print_status(console, _status(ROWS))
    text = console.export_text()
    turns = next(line for line in text.splitlines() if line.startswith("│ turns"))
    assert "running" in turns and "50,000/200,000" in turns and "25,000/s" in turns
    assert "6 s" in turns  # 150,000 rows left at 25,000 rows/s
    assert "error: users: lock wait: pid 4242" in text
    assert "hint: fix the cause shown, then rerun" in text
    clients = next(line for line in text.splitlines() if "clients (rename)" in line)
    assert "done" in clients
    assert "orchestrator apply" in text.split("next:")[1]


def test_status_at_80_columns_prints_a_line_per_table_and_no_wrapped_header() -> None:
    console = Console(record=True, width=80)
    tui.print_status(console, _status(ROWS))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert any(line.strip().startswith("turns: copy running  50,000/200,000  25,000/s  eta 6 s")
               for line in lines), lines
    assert any(line.strip().startswith("users: cutover failed") for line in lines)
    assert any(line.startswith("error: users: lock wait: pid 4242") for line in lines)


def test_the_next_steps_follow_the_tables() -> None:
    ps = _status(ROWS)
    plan = load_plan(COGITO_PLAN).path
    assert ps.table("turns").next_steps[0] == f"orchestrator watch {plan}"
    assert ps.table("users").next_steps == (f"orchestrator apply {plan} --table users",
                                            f"orchestrator rollback {plan} --table users")
    assert ps.table("clients").next_steps == (f"orchestrator compat-usage {plan}",
                                              f"orchestrator finalize {plan} --table clients")
    # The failed users (wave 0) comes before turns (wave 2) in the plan's next steps.
    assert ps.next_steps[0] == f"orchestrator apply {plan} --table users"


def test_the_status_of_a_plan_never_started_says_what_to_run() -> None:
    console = Console(record=True, width=120)
    tui.print_status(console, _status([]))
    text = console.export_text()
    assert "has not started" in text and f"orchestrator apply {COGITO_PLAN}" in text


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

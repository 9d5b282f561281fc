"""The dry-run an operator reviews with a DBA: every stage's SQL both ways, and no change."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from conftest import COGITO_PLAN
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.db import connect
from orchestrator.model.catalog import snapshot
from orchestrator.stages.registry import COPY_STRATEGY

SCHEMAS = ["public", "client_mgmt", "conversation", "_orchestrator", "_orchestrator_retired"]


def _state(dsn: str) -> Any:
    conn = connect(dsn, autocommit=True)
    conn.execute("SET search_path = ''")
    snap = snapshot(conn, SCHEMAS)
    control = conn.execute(
        "SELECT to_regclass('_orchestrator.stages') IS NOT NULL AS present").fetchone()
    conn.close()
    return snap, control


def test_a_dry_run_changes_nothing_and_shows_every_stage(cogito_dsn: str) -> None:
    before = _state(cogito_dsn)
    result = CliRunner().invoke(app, ["--dsn", cogito_dsn, "dry-run", str(COGITO_PLAN),
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    assert _state(cogito_dsn) == before
    data = json.loads(result.stdout)
    turns = next(t for t in data["tables"] if t["table"] == "turns")
    assert turns["strategy"] == "copy"
    stages = [s["stage"] for s in turns["stages"]]
    assert stages == list(COPY_STRATEGY.names)
    prepare = next(s for s in turns["stages"] if s["stage"] == "prepare")
    assert any('CREATE TABLE "conversation"."turns"' in st["sql"] for st in prepare["forward"])
    assert any("DROP TABLE" in st["sql"] for st in prepare["rollback"])
    finalize = next(s for s in turns["stages"] if s["stage"] == "finalize")
    assert "CANNOT BE UNDONE" in finalize["note"]
    assert any("turns_touch_updated_at" in r for r in turns["risks"])
    users = next(t for t in data["tables"] if t["table"] == "users")
    assert users["cycle"] and any("audit_log" in r for r in users["risks"])
    clients = next(t for t in data["tables"] if t["table"] == "clients")
    assert clients["strategy"] == "rename"
    blocks = next(t for t in data["tables"] if t["table"] == "blocks")
    assert "qualifies for the instant rename strategy" in blocks["reason"]
    assert data["copy_rate"] and turns["expected_s"] is not None


def test_the_sql_format_is_a_reviewable_script(cogito_dsn: str) -> None:
    result = CliRunner().invoke(app, ["--dsn", cogito_dsn, "dry-run", str(COGITO_PLAN),
                                      "--format", "sql"])
    assert result.exit_code == 0
    assert "-- ----- turns: cutover (now pending) -----" in result.stdout
    assert 'ALTER TABLE "public"."turns" SET SCHEMA "_orchestrator_retired";' in result.stdout


def test_the_dry_run_names_a_session_holding_a_lock(cogito_dsn: str) -> None:
    with psycopg.connect(cogito_dsn) as blocker:
        blocker.execute("LOCK TABLE public.turns IN ACCESS SHARE MODE")
        pid = blocker.info.backend_pid
        result = CliRunner().invoke(app, ["--dsn", cogito_dsn, "dry-run", str(COGITO_PLAN),
                                          "--format", "json"])
        blocker.rollback()
    data = json.loads(result.stdout)
    turns = next(t for t in data["tables"] if t["table"] == "turns")
    cutover = next(s for s in turns["stages"] if s["stage"] == "cutover")
    assert pid in cutover["forward"][0]["waits_behind"]


def test_the_fast_rendering_is_exactly_psycopgs(cogito_dsn: str) -> None:
    """sqlutil.render skips psycopg's per-node work; every statement of the plan, both ways,
    must come out byte for byte as psycopg renders it."""
    from orchestrator.plan import load_plan
    from orchestrator.run import dryrun
    from orchestrator.sql.compose import render

    captured: list[tuple[str, str]] = []
    with connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        d = dryrun.build(conn, load_plan(COGITO_PLAN))
        original = dryrun._statements

        def spy(c: Any, steps: Any, holders: Any) -> Any:
            for s in steps:
                captured.append((render(c, s.sql), s.sql.as_string(c)))
            return original(c, steps, holders)

        dryrun._statements = spy  # type: ignore[assignment]
        try:
            dryrun.to_sql(d)
        finally:
            dryrun._statements = original  # type: ignore[assignment]
    assert len(captured) > 300
    assert [fast for fast, _ in captured] == [slow for _, slow in captured]


def test_one_table_of_a_plan_and_a_table_the_plan_does_not_have(cogito_dsn: str) -> None:
    runner = CliRunner()
    one = runner.invoke(app, ["--dsn", cogito_dsn, "dry-run", str(COGITO_PLAN),
                              "--table", "turns", "--format", "json"])
    assert one.exit_code == 0, one.output
    assert [t["table"] for t in json.loads(one.stdout)["tables"]] == ["turns"]

    wrong = runner.invoke(app, ["--dsn", cogito_dsn, "dry-run", str(COGITO_PLAN),
                                "--table", "turn"])
    assert wrong.exit_code != 0
    assert "turn: not a table of plan" in wrong.output
    assert "Traceback" not in wrong.output


def test_a_large_plan_reads_as_one_entry_per_table_and_says_where_the_sql_is(
    cogito_dsn: str, monkeypatch: Any
) -> None:
    from orchestrator.cli import move

    monkeypatch.setattr(move, "TEXT_SQL_MAX_TABLES", 2)
    runner = CliRunner()
    big = runner.invoke(app, ["--dsn", cogito_dsn, "dry-run", str(COGITO_PLAN)])
    assert big.exit_code == 0, big.output
    assert "turns → conversation.turns" in big.output
    assert "CREATE TABLE" not in big.output
    assert "--table NAME` shows one unit's, `--format sql` writes the whole script" in big.output
    one = runner.invoke(app, ["--dsn", cogito_dsn, "dry-run", str(COGITO_PLAN), "-t", "turns"])
    assert 'CREATE TABLE "conversation"."turns"' in one.output

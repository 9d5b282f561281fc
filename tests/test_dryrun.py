"""The dry-run an operator reviews with a DBA: every stage's SQL both ways, and no change."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from conftest import COGITO_PLAN
from typer.testing import CliRunner

from orchestrator.catalog import snapshot
from orchestrator.cli import app
from orchestrator.db import connect

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
    assert stages == ["prepare", "dual_write", "copy", "verify", "cutover", "finalize"]
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

"""The command line as an operator meets it: exit codes, messages, and never a traceback.

Each test runs `orchestrator ...` in-process (typer's CliRunner) against its own database.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from typer.testing import CliRunner

from orchestrator.cli import app

Conn = psycopg.Connection[Any]


@pytest.fixture
def run() -> Any:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert "Traceback (most recent call last)" not in result.output
        return result

    return invoke


def test_validate_says_the_cogito_plan_is_valid(run: Any, cogito_dsn: str) -> None:
    result = run("--dsn", cogito_dsn, "validate", str(COGITO_PLAN))
    assert result.exit_code == 0, result.output
    assert "plan cogito is valid" in result.stdout
    assert "13 tables in" in result.stdout
    # The operator is warned about what the move will do to the hard parts.
    assert "warning: public.turns" in result.stdout


def test_validate_json_is_parseable(run: Any, cogito_dsn: str) -> None:
    result = run("--dsn", cogito_dsn, "validate", str(COGITO_PLAN), "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["plan"] == "cogito"
    assert data["valid"] is True
    assert data["problems"] == []
    assert ["participants", "users"] in data["units"]
    assert any(w["subject"] == "public.turns" for w in data["warnings"])


def test_validate_reports_live_problems_and_exits_1(
    run: Any, cogito_dsn: str, tmp_path: Path
) -> None:
    plan = tmp_path / "typo.yaml"
    plan.write_text(
        "version: 1\nname: typo\ntables:\n  - name: turnz\n    schema: conversation\n",
        encoding="utf-8",
    )
    result = run("--dsn", cogito_dsn, "validate", str(plan))
    assert result.exit_code == 1
    assert "plan typo has 1 problem(s)" in result.stdout
    assert "public.turnz: no such table" in result.stdout
    assert "fix: check the name" in result.stdout
    data = json.loads(run("--dsn", cogito_dsn, "validate", str(plan), "--format", "json").stdout)
    assert data["valid"] is False
    assert [p["subject"] for p in data["problems"]] == ["public.turnz"]


BROKEN = (
    "version: 1\nname: broken\ntables:\n  - name: turns\n    schema: conversation\n    nmae: x\n"
)


def test_a_broken_plan_names_file_and_line_without_a_traceback(
    run: Any, cogito_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("broken.yaml").write_text(BROKEN, encoding="utf-8")
    result = run("--dsn", cogito_dsn, "validate", "broken.yaml")
    assert result.exit_code == 1
    assert "broken.yaml:6: tables.0.nmae is not a known field" in result.stderr
    assert "next:" in result.stderr
    assert result.stdout == ""


def test_a_broken_plan_in_json_is_a_json_error(
    run: Any, cogito_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("broken.yaml").write_text(BROKEN, encoding="utf-8")
    result = run("--dsn", cogito_dsn, "validate", "broken.yaml", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["error"] == "PlanError"
    assert data["problems"] == ["broken.yaml:6: tables.0.nmae is not a known field"]


def test_a_long_plan_path_is_printed_whole(run: Any, cogito_dsn: str, tmp_path: Path) -> None:
    deep = tmp_path / "a-rather-long-directory-name-for-plans" / "and-another-one-below-it"
    deep.mkdir(parents=True)
    plan = deep / "broken.yaml"
    plan.write_text(BROKEN, encoding="utf-8")
    result = run("--dsn", cogito_dsn, "validate", str(plan))
    assert result.exit_code == 1
    assert f"{plan}:6: tables.0.nmae is not a known field" in result.stderr


def test_a_missing_plan_file_is_a_clear_error(run: Any, cogito_dsn: str, tmp_path: Path) -> None:
    result = run("--dsn", cogito_dsn, "validate", "no-such-plan.yaml")
    assert result.exit_code == 1
    assert "no-such-plan.yaml: cannot read the plan" in result.stderr


def test_no_database_given_is_a_clear_error(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    result = run("validate", str(COGITO_PLAN))
    assert result.exit_code == 1
    assert "error: no database given" in result.stderr
    assert "--dsn" in result.stderr
    assert "DATABASE_URL" in result.stderr


def test_database_url_is_used_when_no_dsn_is_given(
    run: Any, cogito_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", cogito_dsn)
    result = run("validate", str(COGITO_PLAN))
    assert result.exit_code == 0, result.output
    assert "plan cogito is valid" in result.stdout


def test_an_unreachable_database_is_a_clear_error(run: Any, tmp_path: Path) -> None:
    dsn = f"host={tmp_path} port=1 dbname=nowhere user=nobody connect_timeout=2"
    result = run("--dsn", dsn, "validate", str(COGITO_PLAN))
    assert result.exit_code == 1
    assert "cannot connect to the database" in result.stderr


def test_graph_as_mermaid(run: Any, cogito_dsn: str) -> None:
    result = run("--dsn", cogito_dsn, "graph", str(COGITO_PLAN), "--format", "mermaid")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("flowchart LR")
    assert "cycle" in result.stdout


def test_graph_as_dot_and_json(run: Any, cogito_dsn: str) -> None:
    dot = run("--dsn", cogito_dsn, "graph", str(COGITO_PLAN), "--format", "dot")
    assert dot.exit_code == 0
    assert dot.stdout.startswith("digraph plan {")
    data = json.loads(
        run("--dsn", cogito_dsn, "graph", str(COGITO_PLAN), "--format", "json").stdout
    )
    assert data["outside"] == ["public.audit_log"]


def test_graph_text_shows_the_cycle_unit_and_the_outside_table(run: Any, cogito_dsn: str) -> None:
    result = run("--dsn", cogito_dsn, "graph", str(COGITO_PLAN))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "wave 0" in out and "wave 3" in out
    cycle_line = next(line for line in out.splitlines() if "cycle" in line)
    assert "participants, users" in cycle_line
    assert "moves as one unit" in cycle_line
    assert "public.audit_log (outside)" in out
    assert "public.active_projects (dependent view)" in out


def test_graph_of_an_unsatisfiable_plan_exits_1(run: Any, cogito_dsn: str, tmp_path: Path) -> None:
    plan = tmp_path / "cycle.yaml"
    plan.write_text(
        "version: 1\nname: cycle\ntables:\n"
        "  - {name: clients, schema: x, depends_on: [projects]}\n"
        "  - {name: projects, schema: x}\n",
        encoding="utf-8",
    )
    result = run("--dsn", cogito_dsn, "graph", str(plan))
    assert result.exit_code == 1
    assert "cycle problem: clients, projects" in result.stdout


def test_status_on_a_fresh_database_says_nothing_is_recorded(
    run: Any, cogito_dsn: str, cogito_conn: Conn
) -> None:
    result = run("--dsn", cogito_dsn, "status", str(COGITO_PLAN))
    assert result.exit_code == 0, result.output
    assert "nothing recorded" in result.stdout
    assert "has not started" in result.stdout
    # Looking is not touching: no control schema was created to answer.
    row = cogito_conn.execute(
        "SELECT count(*) AS n FROM pg_namespace WHERE nspname = '_orchestrator'"
    ).fetchone()
    assert row == {"n": 0}


def test_status_json_on_a_fresh_database(run: Any, cogito_dsn: str) -> None:
    result = run("--dsn", cogito_dsn, "status", str(COGITO_PLAN), "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["plan"] == "cogito"
    assert data["started"] is False
    assert data["next_steps"][-1] == f"orchestrator apply {COGITO_PLAN}"


def test_history_on_a_fresh_database_is_empty(run: Any, cogito_dsn: str) -> None:
    result = run("--dsn", cogito_dsn, "history", str(COGITO_PLAN), "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_plan_schema_is_json(run: Any) -> None:
    result = run("plan-schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "tables" in schema["properties"]
    assert "TableSpec" in schema["$defs"]


def test_no_arguments_prints_help(run: Any) -> None:
    result = CliRunner().invoke(app, [])
    assert "validate" in result.output
    assert "Traceback (most recent call last)" not in result.output


def test_embedded_takes_an_optional_directory(tmp_path: Path) -> None:
    from orchestrator.cli import embedded_argv

    assert embedded_argv(["--embedded", "status", "p.yaml"]) == ["--embedded=", "status", "p.yaml"]
    assert embedded_argv(["--embedded", str(tmp_path), "graph", "p.yaml"]) == [
        f"--embedded={tmp_path}", "graph", "p.yaml"]
    assert embedded_argv(["--embedded=x", "status"]) == ["--embedded=x", "status"]

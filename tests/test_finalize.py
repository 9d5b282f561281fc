"""Finalize: the retired table goes, the move becomes final, and only then may the
compatibility view go too."""

from __future__ import annotations

from typing import Any

import psycopg
from conftest import COGITO_PLAN
from typer.testing import CliRunner

from orchestrator.cli import app


def run(dsn: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["--dsn", dsn, *args])


def test_finalize_drops_the_retired_table_and_cannot_be_undone(cogito_dsn: str) -> None:
    plan = str(COGITO_PLAN)
    assert run(cogito_dsn, "apply", plan, "--table", "turns", "--until", "cutover",
               "--yes").exit_code == 0
    result = run(cogito_dsn, "finalize", plan, "--table", "turns", "--yes",
                 "--drop-compat-views")
    assert result.exit_code == 0, result.output
    assert "dropped compatibility views: public.turns" in result.stdout
    with psycopg.connect(cogito_dsn) as conn:
        gone = conn.execute(
            "SELECT to_regclass('_orchestrator_retired.turns'), to_regclass('public.turns')"
        ).fetchone()
        assert gone == (None, None)
        assert conn.execute("SELECT count(*) FROM conversation.turns").fetchone() == (2000,)
        # Nothing of our capture is left on the new table.
        assert conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'conversation.turns'::regclass "
            "AND tgname LIKE '_orch_%'").fetchone() == (0,)
    refused = run(cogito_dsn, "rollback", plan, "--table", "turns", "--yes")
    assert refused.exit_code == 1
    assert "turns: finalized, so it cannot be rolled back" in refused.stderr
    assert "Traceback" not in refused.output


def test_a_compatibility_view_that_views_still_read_is_kept(cogito_dsn: str) -> None:
    plan = str(COGITO_PLAN)
    assert run(cogito_dsn, "cutover", plan, "--table", "projects", "--yes").exit_code == 0
    assert run(cogito_dsn, "finalize", plan, "--table", "projects", "--yes").exit_code == 0
    with psycopg.connect(cogito_dsn, autocommit=True) as conn:
        # An application view created on the compatibility view after the move.
        conn.execute("CREATE VIEW public.project_names AS SELECT name FROM public.projects")
    refused = run(cogito_dsn, "finalize", plan, "--table", "projects", "--yes",
                  "--drop-compat-views")
    assert refused.exit_code == 1
    assert "public.project_names" in refused.stderr
    with psycopg.connect(cogito_dsn) as conn:
        assert conn.execute("SELECT to_regclass('public.projects')").fetchone() == (
            "projects",)

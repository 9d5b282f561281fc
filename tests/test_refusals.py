"""What the copy strategy cannot move yet is refused by validate, naming the fix, and nothing
changes."""

from __future__ import annotations

from pathlib import Path

import psycopg
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.db import connect
from orchestrator.model.catalog import snapshot

PLAN = """version: 1
name: refusals
tables:
  - name: bookings
    schema: booking
"""


def test_an_exclusion_constraint_is_refused_for_the_copy_strategy(
    empty_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.bookings (id bigint PRIMARY KEY, during int4range, "
            "EXCLUDE USING gist (during WITH &&))"
        )
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    snap = connect(empty_dsn, autocommit=True)
    snap.execute("SET search_path = ''")
    before = snapshot(snap, ["public", "booking"])
    result = CliRunner().invoke(app, ["--dsn", empty_dsn, "validate", str(plan)])
    assert result.exit_code == 1
    assert "exclusion constraints are not supported by the copy strategy" in result.stdout
    assert "strategy: rename" in result.stdout
    applied = CliRunner().invoke(app, ["--dsn", empty_dsn, "apply", str(plan)])
    assert applied.exit_code == 1 and "Traceback" not in applied.output
    assert snapshot(snap, ["public", "booking"]) == before
    # Not even the control schema was created.
    assert snap.execute("SELECT to_regnamespace('_orchestrator') AS s").fetchone() == {"s": None}
    snap.close()

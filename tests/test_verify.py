"""Verify compares source and target by counts and chunked row checksums, and gates cutover.

It must catch a single changed value made in the target behind the orchestrator's back (and a
row lost or invented there), name the key range where the two differ, and stop the operator
with exit code 1 and no traceback; it must pass while the application keeps writing; and a
cutover without a clean verify is refused, naming the table and the command that fixes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from psycopg.rows import dict_row
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.db import connect
from orchestrator.model.catalog import snapshot
from orchestrator.stages import verify as verify_stage

Conn = psycopg.Connection[Any]
PLAN = str(COGITO_PLAN)
# Verify compares the tables chunk by chunk; the tests narrow its chunk to 500 keys so that the
# 2,000 sample turns span four chunks and a named range is narrower than the whole table.
CHUNK = 500


class Operator:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.runner = CliRunner()

    def run(self, *args: str) -> Any:
        result = self.runner.invoke(app, ["--dsn", self.dsn, *args], catch_exceptions=False)
        assert "Traceback (most recent call last)" not in result.output
        return result

    def ok(self, *args: str) -> Any:
        result = self.run(*args)
        assert result.exit_code == 0, result.output
        return result

    def stage(self, table: str, stage: str) -> dict[str, Any]:
        data = json.loads(self.ok("status", PLAN, "--format", "json").stdout)
        return dict(next(t for t in data["tables"] if t["name"] == table)["stages"][stage])


@pytest.fixture
def operator(cogito_dsn: str) -> Operator:
    return Operator(cogito_dsn)


@pytest.fixture
def db(cogito_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Conn]:
    """The application's session; verify (run in-process by the CLI) uses small chunks."""
    monkeypatch.setattr(verify_stage, "CHUNK", CHUNK)
    with psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def behind_the_triggers(conn: Conn, statement: str) -> None:
    """A change to the target that no capture trigger sees (replica mode skips triggers)."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        assert conn.execute(statement).rowcount == 1


def named_range(message: str) -> tuple[int, int | None]:
    """The key range a verify failure names: (after, up to), None for the table's end."""
    m = re.search(r"after \D*?(\d+|\(start\))\D*? up to \D*?(\d+|\(end\))", message)
    assert m, f"no key range in: {message}"
    lo = 0 if m.group(1) == "(start)" else int(m.group(1))
    hi = None if m.group(2) == "(end)" else int(m.group(2))
    return lo, hi


TAMPERING = {
    "a changed value": "UPDATE conversation.turns SET content = 'tampered' WHERE id = 1234",
    "a lost row": "DELETE FROM conversation.turns WHERE id = 1234",
    "an invented row": "INSERT INTO conversation.turns (id, participant_id, content) "
    "VALUES (5000, 1, 'invented')",
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_verify_catches_a_change_made_behind_the_triggers_and_names_its_key_range(
    operator: Operator, db: Conn, tampering: str
) -> None:
    operator.ok("apply", PLAN, "--table", "turns", "--until", "verify")
    assert operator.stage("turns", "verify")["status"] == "done"

    behind_the_triggers(db, TAMPERING[tampering])

    # Verify runs again at once before any swap: the cutover finds the difference and, told
    # not to repair it (tests/test_cutover_control.py has the repair), stops.
    refused = operator.run("cutover", PLAN, "--table", "turns", "--yes", "--no-repair",
                           "--full-verify")
    assert refused.exit_code == 1
    assert "turns: source and target differ in keys (id)" in refused.stderr
    key = 5000 if tampering == "an invented row" else 1234
    lo, hi = named_range(refused.stderr)
    assert lo < key and (hi is None or key <= hi), refused.stderr
    assert (lo, hi) != (0, None), "the whole table is not a key range"
    assert hi is None or hi - lo <= CHUNK, "at most one chunk"
    assert "rollback" in refused.stderr, "the hint says how to recopy"
    assert db.execute("SELECT relkind::text AS k FROM pg_class WHERE oid = 'public.turns'"
                      "::regclass").fetchone() == {"k": "r"}, "no swap happened"  # fmt: skip
    assert operator.stage("turns", "verify")["status"] == "failed"
    assert operator.stage("turns", "cutover")["status"] == "pending"

    # Asked explicitly, verify says the same, in JSON for scripts too.
    operator.ok("rollback", PLAN, "--table", "turns", "--to", "copy", "--yes")
    again = operator.run("apply", PLAN, "--table", "turns", "--until", "verify",
                         "--format", "json", "--no-repair")  # fmt: skip
    assert again.exit_code == 1
    error = json.loads(again.stdout)
    assert error["error"] == "StageError"
    assert named_range(error["message"]) == (lo, hi)
    stage = operator.stage("turns", "verify")
    assert stage["status"] == "failed" and named_range(stage["last_error"]) == (lo, hi)

    # The hint's way out: recopy from dual-write, and verify passes.
    operator.ok("rollback", PLAN, "--table", "turns", "--to", "dual_write", "--yes")
    operator.ok("apply", PLAN, "--table", "turns", "--until", "verify")
    assert operator.stage("turns", "verify")["status"] == "done"


def test_verify_passes_clean_after_writes_between_copy_and_verify(
    operator: Operator, db: Conn
) -> None:
    operator.ok("apply", PLAN, "--table", "turns", "--until", "copy")
    assert operator.stage("turns", "copy")["status"] == "done"

    # The application goes on writing between the copy and the verify: new rows, updates,
    # key updates and deletes, of copied rows and of new ones.
    late = [
        r["id"]
        for r in db.execute(
            "INSERT INTO turns (participant_id, content) SELECT 2, 'late ' || g "
            "FROM generate_series(1, 300) g RETURNING id"
        )
    ]
    copied = [
        r["id"]
        for r in db.execute(
            "SELECT t.id FROM turns t WHERE t.id <= 2000 AND NOT EXISTS (SELECT 1 FROM turns r "
            "WHERE r.reply_to_turn_id = t.id) AND NOT EXISTS (SELECT 1 FROM block_turns b "
            "WHERE b.turn_id = t.id) ORDER BY t.id LIMIT 100"
        )
    ]
    db.execute("UPDATE turns SET content = content || ' (edited)' WHERE id % 97 = 0")
    db.execute("UPDATE turns SET id = id + 100000 WHERE id = ANY(%s)", (copied[:50] + late[:50],))
    db.execute("DELETE FROM turns WHERE id = ANY(%s)", (copied[50:] + late[50:100],))
    db.execute('UPDATE turns SET "timestamp" = "timestamp" - interval \'1 day\' WHERE id = 1500')

    result = operator.run("apply", PLAN, "--table", "turns", "--until", "verify")
    assert result.exit_code == 0, result.output
    verify = operator.stage("turns", "verify")
    assert verify["status"] == "done"
    assert verify["last_error"] is None
    source = db.execute("SELECT * FROM turns ORDER BY id").fetchall()
    target = db.execute(
        'SELECT id, participant_id, reply_to_turn_id, content, sent_at AS "timestamp", '
        "metadata, llm_config_id, updated_at FROM conversation.turns ORDER BY id"
    ).fetchall()
    assert target == source
    assert verify["rows_done"] == len(source)


def test_cutover_refuses_without_a_clean_verify_and_changes_nothing(
    operator: Operator, cogito_dsn: str
) -> None:
    operator.ok("apply", PLAN, "--table", "turns", "--until", "copy")
    with connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        before = snapshot(conn, ["public", "client_mgmt", "conversation"])

        refused = operator.run("cutover", PLAN, "--table", "turns", "--yes")

        assert refused.exit_code == 1
        assert "turns: cutover needs a clean verify first (verify is pending)" in refused.stderr
        assert f"orchestrator apply {PLAN} --table turns" in refused.stderr
        assert snapshot(conn, ["public", "client_mgmt", "conversation"]) == before
    assert operator.stage("turns", "cutover")["status"] == "pending"


def test_cutover_of_the_whole_plan_refuses_before_changing_anything(
    operator: Operator, cogito_dsn: str
) -> None:
    operator.ok("apply", PLAN, "--table", "turns", "--until", "verify")  # only turns is ready
    with connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        before = snapshot(conn, ["public", "client_mgmt", "conversation"])

        refused = operator.run("cutover", PLAN, "--yes")

        assert refused.exit_code == 1
        assert "cutover needs a clean verify first" in refused.stderr
        assert "nothing was cut over" in refused.stderr
        assert snapshot(conn, ["public", "client_mgmt", "conversation"]) == before

"""Invariant 7: no privilege leak. Each role reads after the move exactly what it read before.

Roles are cluster-wide, so each test creates its own (unique names) and drops them. Before the
move the roles get their privileges on `public.turns`; then turns moves through cutover. After
it, each role is asked the same questions through the compatibility view `public.turns`
(security_invoker) and through the new table `conversation.turns` (once the test grants USAGE
on the schema: the plan's `schemas:` section grants nothing), and must get the same answers:
the same rows, or "denied". The retired table is out of every role's reach.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from psycopg import sql
from psycopg.rows import dict_row
from typer.testing import CliRunner

from orchestrator.cli import app

Conn = psycopg.Connection[Any]
DENIED = "denied"
OLD = "public.turns"
NEW = "conversation.turns"
RETIRED = "_orchestrator_retired.turns"


def as_role(conn: Conn, role: str, statement: sql.Composable) -> Any:
    """What `role` gets from one statement: its rows, the rows it changed, or DENIED.
    Nothing it does is kept."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else cur.rowcount
    except psycopg.errors.InsufficientPrivilege:
        return DENIED


def questions(relation: str, leaf: int) -> dict[str, sql.Composable]:
    """The questions asked of a role, in the application's column names: on the new table
    the renamed column is read as sent_at AS "timestamp"."""
    rel = sql.SQL(relation)
    ts = sql.SQL('sent_at AS "timestamp"' if relation == NEW else '"timestamp"')
    return {
        "every column": sql.SQL(
            "SELECT id, participant_id, reply_to_turn_id, content, {}, metadata, llm_config_id, "
            "updated_at FROM {} ORDER BY id"
        ).format(ts, rel),
        "id, content": sql.SQL("SELECT id, content FROM {} ORDER BY id").format(rel),
        "metadata": sql.SQL("SELECT id, metadata FROM {} ORDER BY id").format(rel),
        "timestamp": sql.SQL("SELECT id, {} FROM {} ORDER BY id").format(ts, rel),
        "insert": sql.SQL("INSERT INTO {} (participant_id, content) VALUES (1, 'x')").format(rel),
        "update": sql.SQL("UPDATE {} SET content = 'y' WHERE id = {}").format(rel, leaf),
        "delete": sql.SQL("DELETE FROM {} WHERE id = {}").format(rel, leaf),
    }


@dataclass
class World:
    dsn: str
    conn: Conn  # superuser: sets up, then asks as each role with SET ROLE
    roles: dict[str, str] = field(default_factory=dict)
    leaf: int = 0
    before: dict[str, dict[str, Any]] = field(default_factory=dict)

    def role(self, purpose: str) -> str:
        name = f"orch_t_{purpose}_{uuid.uuid4().hex[:8]}"
        self.conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(name)))
        self.roles[purpose] = name
        return name

    def grant(self, statement: str, purpose: str) -> None:
        self.conn.execute(sql.SQL(statement).format(role=sql.Identifier(self.roles[purpose])))

    def sees(self, purpose: str, relation: str) -> dict[str, Any]:
        return {
            q: as_role(self.conn, self.roles[purpose], stmt)
            for q, stmt in questions(relation, self.leaf).items()
        }

    def record(self) -> None:
        self.before = {p: self.sees(p, OLD) for p in self.roles}

    def move_turns(self, plan: Path = COGITO_PLAN) -> None:
        result = CliRunner().invoke(
            app,
            ["--dsn", self.dsn, "apply", str(plan), "--table", "turns", "--until", "cutover",
             "--yes"],
            catch_exceptions=False,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        kind = self.conn.execute("SELECT relkind::text AS k FROM pg_class "
                                 "WHERE oid = 'public.turns'::regclass").fetchone()  # fmt: skip
        assert kind == {"k": "v"}

    def open_new_schema(self) -> None:
        for name in self.roles.values():
            self.conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA conversation TO {}").format(sql.Identifier(name))
            )


@pytest.fixture
def world(cogito_dsn: str) -> Iterator[World]:
    with psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row) as conn:
        w = World(cogito_dsn, conn)
        leaf = conn.execute(
            "SELECT t.id FROM turns t WHERE NOT EXISTS (SELECT 1 FROM turns r "
            "WHERE r.reply_to_turn_id = t.id) AND NOT EXISTS (SELECT 1 FROM block_turns b "
            "WHERE b.turn_id = t.id) ORDER BY t.id LIMIT 1"
        ).fetchone()
        w.leaf = leaf["id"]
        try:
            yield w
        finally:
            for name in w.roles.values():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def granted(world: World) -> World:
    """Four application roles with table and column grants (no row-level security)."""
    world.role("nothing")
    world.role("reader")
    world.grant("GRANT SELECT ON public.turns TO {role}", "reader")
    world.role("columns")
    world.grant("GRANT SELECT (id, content) ON public.turns TO {role}", "columns")
    world.role("writer")
    world.grant("GRANT SELECT, INSERT, UPDATE, DELETE ON public.turns TO {role}", "writer")
    world.grant("GRANT USAGE ON SEQUENCE public.turns_id_seq TO {role}", "writer")
    world.record()
    world.move_turns()
    return world


def test_what_each_role_could_do_before_the_move(granted: World) -> None:
    """The baseline the other tests compare against: each grant means what it says."""
    before = granted.before
    assert set(before["nothing"].values()) == {DENIED}
    assert len(before["reader"]["every column"]) == 2000
    assert [before["reader"][q] for q in ("insert", "update", "delete")] == [DENIED] * 3
    assert len(before["columns"]["id, content"]) == 2000
    assert before["columns"]["every column"] == before["columns"]["metadata"] == DENIED
    assert before["columns"]["timestamp"] == DENIED
    assert [before["writer"][q] for q in ("insert", "update", "delete")] == [1, 1, 1]


def test_a_role_without_grants_reads_nothing_after_the_move(granted: World) -> None:
    assert granted.sees("nothing", OLD) == granted.before["nothing"]
    granted.open_new_schema()
    assert granted.sees("nothing", NEW) == granted.before["nothing"]


@pytest.mark.parametrize("purpose", ["reader", "writer"])
def test_a_role_with_table_grants_does_the_same_and_no_more_after_the_move(
    granted: World, purpose: str
) -> None:
    assert granted.sees(purpose, OLD) == granted.before[purpose]
    granted.open_new_schema()
    assert granted.sees(purpose, NEW) == granted.before[purpose]


def test_a_column_grant_reads_no_other_column_after_the_move(granted: World) -> None:
    granted.open_new_schema()
    for relation in (OLD, NEW):
        now = granted.sees("columns", relation)
        for q in ("every column", "metadata", "timestamp", "insert", "update", "delete"):
            assert now[q] == DENIED, f"{q} on {relation}"


def test_a_column_grant_still_reads_its_columns_in_the_new_table(granted: World) -> None:
    granted.open_new_schema()
    assert granted.sees("columns", NEW)["id, content"] == granted.before["columns"]["id, content"]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="known limitation (PostgreSQL): the compatibility view selects every column of "
    "conversation.turns and, being security_invoker, PostgreSQL checks SELECT on all of them "
    "for the invoker; a role with column-level SELECT (id, content) on public.turns gets "
    "'permission denied for table turns' after cutover. validate warns about such grants.",
)
def test_a_column_grant_still_reads_its_columns_through_the_compatibility_view(
    granted: World,
) -> None:
    assert granted.sees("columns", OLD)["id, content"] == granted.before["columns"]["id, content"]


def test_the_new_schema_stays_closed_when_the_plan_grants_no_usage(granted: World) -> None:
    for purpose in granted.roles:
        assert set(granted.sees(purpose, NEW).values()) == {DENIED}, purpose


def test_no_role_reaches_the_retired_table(granted: World) -> None:
    granted.open_new_schema()
    for purpose in granted.roles:
        assert set(granted.sees(purpose, RETIRED).values()) == {DENIED}, purpose


def test_row_level_security_shows_each_role_the_same_rows_after_the_move(world: World) -> None:
    world.role("own_rows")
    world.grant("GRANT SELECT ON public.turns TO {role}", "own_rows")
    world.role("no_policy")  # SELECT granted, but no policy lets it see any row
    world.grant("GRANT SELECT ON public.turns TO {role}", "no_policy")
    world.conn.execute("ALTER TABLE public.turns ENABLE ROW LEVEL SECURITY")
    world.grant(
        "CREATE POLICY participant_one ON public.turns FOR SELECT TO {role} "
        "USING (participant_id = 1)",
        "own_rows",
    )
    world.record()
    own = world.before["own_rows"]["every column"]
    assert own and {r["participant_id"] for r in own} == {1}
    assert len(own) < 2000
    assert world.before["no_policy"]["every column"] == []

    world.move_turns()

    for purpose in ("own_rows", "no_policy"):
        assert world.sees(purpose, OLD) == world.before[purpose], purpose
    world.open_new_schema()
    for purpose in ("own_rows", "no_policy"):
        assert world.sees(purpose, NEW) == world.before[purpose], purpose


def test_a_plan_grant_opens_the_new_table_and_only_it(world: World, tmp_path: Path) -> None:
    """'Unless the plan grants it explicitly': the plan's schemas section is the one way in."""
    role = world.role("analyst")
    world.record()
    assert set(world.before["analyst"].values()) == {DENIED}
    plan = tmp_path / "cogito-with-grants.yaml"
    text = COGITO_PLAN.read_text(encoding="utf-8")
    conversation = "  conversation:\n    usage: []\n    grants: []\n"
    assert conversation in text
    plan.write_text(
        text.replace(
            conversation,
            f"  conversation:\n    usage: [{role}]\n"
            f"    grants:\n      - role: {role}\n        privileges: [SELECT]\n",
        ),
        encoding="utf-8",
    )

    world.move_turns(plan)

    assert world.sees("analyst", OLD) == world.before["analyst"], "the old name stays closed"
    now = world.sees("analyst", NEW)
    assert len(now["every column"]) == 2000
    assert [now[q] for q in ("insert", "update", "delete")] == [DENIED] * 3


def test_default_privileges_do_not_reopen_a_table_closed_to_a_role(world: World) -> None:
    """A reporting role reads every new table by default, but turns was closed to it."""
    world.role("reporting")
    world.grant("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}", "reporting")
    world.grant("REVOKE SELECT ON public.turns FROM {role}", "reporting")
    world.grant("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {role}", "reporting")
    world.record()
    assert set(world.before["reporting"].values()) == {DENIED}

    world.move_turns()

    assert world.sees("reporting", OLD) == world.before["reporting"]
    world.open_new_schema()
    assert world.sees("reporting", NEW) == world.before["reporting"]

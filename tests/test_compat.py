"""After cutover the application's unchanged SQL keeps working on the old names.

`turns` (copy strategy, "timestamp" renamed to sent_at, a user trigger, a serial key) and the
users <-> participants unit are cut over, and `clients` and `projects` move by the rename
strategy. The application still says `turns`, `users`, `clients`: each is now a
security_invoker compatibility view over the moved table, and every statement kind it used
must behave as before. The retired source tables keep receiving every write (reverse capture),
so a rollback loses nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from psycopg import sql
from psycopg.rows import dict_row
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import load_plan
from orchestrator.run.session import session

Conn = psycopg.Connection[Any]
RETIRED = "_orchestrator_retired"
TURN_COLUMNS = [
    "id", "participant_id", "reply_to_turn_id", "content", "timestamp", "metadata",
    "llm_config_id", "updated_at",
]  # fmt: skip


@dataclass
class Moved:
    dsn: str
    conn: Conn  # the application's session: default search_path, unqualified names
    max_turn_id: int
    max_user_id: int
    max_client_id: int
    turns_before: list[dict[str, Any]]
    active_projects_before: list[dict[str, Any]]

    def replay(self) -> int:
        """What `apply --follow` does in a loop: replay the capture logs once."""
        with session(self.dsn, load_plan(COGITO_PLAN)) as eng:
            return eng.replay_once()

    def one(self, query: str, *params: Any) -> Any:
        return self.conn.execute(query, params).fetchone()


def _max(conn: Conn, table: str) -> int:
    query = sql.SQL("SELECT max(id) AS m FROM {}").format(sql.Identifier(*table.split(".")))
    return int(conn.execute(query).fetchone()["m"])


@pytest.fixture
def moved(cogito_dsn: str) -> Iterator[Moved]:
    with psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row) as conn:
        # A view the application made on turns: it must follow turns to its new home.
        conn.execute(
            'CREATE VIEW recent_turns AS SELECT id, content, "timestamp" FROM turns '
            "WHERE \"timestamp\" >= '2024-01-01'"
        )
        m = Moved(
            dsn=cogito_dsn,
            conn=conn,
            max_turn_id=_max(conn, "turns"),
            max_user_id=_max(conn, "users"),
            max_client_id=_max(conn, "clients"),
            turns_before=conn.execute("SELECT * FROM turns ORDER BY id").fetchall(),
            active_projects_before=conn.execute(
                "SELECT * FROM active_projects ORDER BY id"
            ).fetchall(),
        )
        runner = CliRunner()
        for table in ("turns", "users", "clients", "projects"):
            result = runner.invoke(
                app,
                ["--dsn", cogito_dsn, "apply", str(COGITO_PLAN), "--table", table,
                 "--until", "cutover", "--yes"],
                catch_exceptions=False,
            )  # fmt: skip
            assert result.exit_code == 0, result.output
        for name in ("turns", "users", "participants", "clients", "projects"):
            kind = conn.execute("SELECT relkind::text AS k FROM pg_class WHERE oid = %s::regclass",
                                (f"public.{name}",)).fetchone()  # fmt: skip
            assert kind == {"k": "v"}, f"public.{name} is now a compatibility view"
        yield m


def test_select_reads_the_moved_rows_under_the_old_names(moved: Moved) -> None:
    assert moved.conn.execute("SELECT * FROM turns ORDER BY id").fetchall() == moved.turns_before
    cols = moved.conn.execute("SELECT * FROM turns LIMIT 0").description
    assert [c.name for c in cols] == TURN_COLUMNS
    # Joins, filters and row locks through the view work as on the table.
    row = moved.one(
        "SELECT t.id, p.name FROM turns t JOIN participants p ON p.id = t.participant_id "
        "WHERE t.id = %s FOR UPDATE OF t",
        5,
    )
    assert row["id"] == 5 and row["name"]
    # The data lives in the new table: the rows are the same, under the new column name.
    assert moved.one("SELECT count(*) AS n FROM conversation.turns")["n"] == len(moved.turns_before)


def test_insert_returning_continues_the_serial_sequence_without_reissuing(moved: Moved) -> None:
    row = moved.one(
        'INSERT INTO turns (participant_id, content, "timestamp") '
        "VALUES (1, 'after the move', '2025-03-01 09:00+00') RETURNING *"
    )
    assert row["id"] > moved.max_turn_id
    assert row["updated_at"] is not None, "the column default still applies through the view"
    nxt = moved.one("INSERT INTO turns (participant_id) VALUES (1) RETURNING id")
    assert nxt["id"] > row["id"]
    stored = moved.one("SELECT sent_at, content FROM conversation.turns WHERE id = %s", row["id"])
    assert stored == {"sent_at": row["timestamp"], "content": "after the move"}
    # The same holds for users' bigserial, which moved with its cycle partner.
    user = moved.one("INSERT INTO users (email) VALUES ('new@example.org') RETURNING id")
    assert user["id"] > moved.max_user_id


def test_update_fires_the_user_trigger_once_on_the_new_table(moved: Moved) -> None:
    with moved.conn.transaction():
        now = moved.one("SELECT now() AS now")["now"]
        row = moved.one(
            "UPDATE turns SET content = 'edited', updated_at = '2000-01-01' WHERE id = 7 "
            "RETURNING *"
        )
    assert row["content"] == "edited"
    assert row["updated_at"] == now, "touch_updated_at stamped the row"
    triggers = moved.conn.execute(
        "SELECT tgrelid::regclass::text AS rel FROM pg_trigger "
        "WHERE tgname = 'turns_touch_updated_at'"
    ).fetchall()
    assert triggers == [{"rel": "conversation.turns"}], "the trigger followed the data, once"
    # Replaying the write into the retired table (later, in another transaction) must not
    # stamp it again: the retired copy keeps the application's timestamp.
    assert moved.replay() > 0
    retired = moved.conn.execute(
        sql.SQL("SELECT updated_at FROM {} WHERE id = 7").format(
            sql.Identifier(RETIRED, "turns"))).fetchone()
    assert retired == {"updated_at": now}


def test_delete_removes_the_row_from_the_new_table(moved: Moved) -> None:
    leaf = moved.one(
        "SELECT t.id FROM turns t WHERE NOT EXISTS (SELECT 1 FROM turns r "
        "WHERE r.reply_to_turn_id = t.id) AND NOT EXISTS (SELECT 1 FROM block_turns b "
        "WHERE b.turn_id = t.id) ORDER BY id LIMIT 1"
    )["id"]
    assert moved.conn.execute("DELETE FROM turns WHERE id = %s", (leaf,)).rowcount == 1
    assert moved.one("SELECT 1 AS x FROM conversation.turns WHERE id = %s", leaf) is None
    # The self-reference moved with the table: a referenced turn still cannot go.
    parent = moved.one("SELECT reply_to_turn_id AS id FROM turns WHERE reply_to_turn_id "
                       "IS NOT NULL LIMIT 1")["id"]  # fmt: skip
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        moved.conn.execute("DELETE FROM turns WHERE id = %s", (parent,))


def test_insert_on_conflict_do_update_and_do_nothing(moved: Moved) -> None:
    upserted = moved.one(
        "INSERT INTO turns (id, participant_id, content) VALUES (8, 1, 'upserted') "
        "ON CONFLICT (id) DO UPDATE SET content = excluded.content RETURNING id, content"
    )
    assert upserted == {"id": 8, "content": "upserted"}
    before = moved.one("SELECT * FROM turns WHERE id = 9")
    skipped = moved.one(
        "INSERT INTO turns (id, participant_id, content) VALUES (9, 1, 'ignored') "
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )
    assert skipped is None
    assert moved.one("SELECT * FROM turns WHERE id = 9") == before
    fresh = moved.one(
        "INSERT INTO turns (participant_id, content) VALUES (1, 'fresh') "
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )
    assert fresh["id"] > moved.max_turn_id
    stored = moved.conn.execute(
        "SELECT id, content FROM conversation.turns WHERE id IN (8, %s) ORDER BY id",
        (fresh["id"],),
    ).fetchall()
    assert stored == [{"id": 8, "content": "upserted"}, {"id": fresh["id"], "content": "fresh"}]


def test_the_renamed_column_keeps_its_old_name_through_the_view(moved: Moved) -> None:
    row = moved.one(
        'UPDATE turns SET "timestamp" = \'2030-01-01 00:00+00\' WHERE id = 10 RETURNING "timestamp"'
    )
    assert moved.one("SELECT sent_at FROM conversation.turns WHERE id = 10") == {
        "sent_at": row["timestamp"]
    }
    assert moved.one("SELECT id FROM turns WHERE \"timestamp\" >= '2030-01-01'") == {"id": 10}
    with pytest.raises(psycopg.errors.UndefinedColumn):
        moved.conn.execute("SELECT sent_at FROM turns")


def test_clients_identity_column_keeps_issuing_new_ids(moved: Moved) -> None:
    row = moved.one("INSERT INTO clients (name) VALUES ('Acme') RETURNING id")
    assert row["id"] > moved.max_client_id
    assert moved.one("SELECT name FROM client_mgmt.clients WHERE id = %s", row["id"]) == {
        "name": "Acme"
    }
    # GENERATED ALWAYS still refuses an explicit id, as it did on the table.
    with pytest.raises(psycopg.errors.GeneratedAlways):
        moved.conn.execute("INSERT INTO clients (id, name) VALUES (999, 'Forced')")


def test_the_retired_table_receives_every_write(moved: Moved) -> None:
    c = moved.conn
    first = moved.one("INSERT INTO turns (participant_id, content) VALUES (3, 'a') RETURNING id")
    second = moved.one("INSERT INTO turns (participant_id, content) VALUES (3, 'b') RETURNING id")
    c.execute("UPDATE turns SET content = 'updated', metadata = '{\"x\": 1}' WHERE id = 11")
    c.execute("UPDATE turns SET id = id + 500000 WHERE id = %s", (second["id"],))  # a key update
    c.execute("DELETE FROM turns WHERE id = %s", (first["id"],))
    c.execute(
        "INSERT INTO turns (id, participant_id, content) VALUES (12, 1, 'upsert') "
        "ON CONFLICT (id) DO UPDATE SET content = excluded.content"
    )
    # Code already using the new name writes to the new table directly: captured as well.
    c.execute("UPDATE conversation.turns SET sent_at = '2031-01-01' WHERE id = 13")
    user = moved.one("INSERT INTO users (email) VALUES ('late@example.org') RETURNING id")
    c.execute("INSERT INTO participants (user_id, name) VALUES (%s, 'late')", (user["id"],))
    c.execute("UPDATE users SET auth_info = '{\"sso\": true}' WHERE id = 1")

    moved.replay()

    for name in ("turns", "users", "participants"):
        ordered = sql.SQL("SELECT * FROM {} ORDER BY id")
        live = c.execute(ordered.format(sql.Identifier(name))).fetchall()
        retired = c.execute(ordered.format(sql.Identifier(RETIRED, name))).fetchall()
        assert retired == live, f"{RETIRED}.{name} differs from public.{name}"


def test_audit_log_now_references_the_moved_users_with_a_validated_key(moved: Moved) -> None:
    fk = moved.one(
        "SELECT confrelid::regclass::text AS parent, convalidated AS validated "
        "FROM pg_constraint WHERE conrelid = 'public.audit_log'::regclass AND contype = 'f'"
    )
    assert fk == {"parent": "client_mgmt.users", "validated": True}
    user = moved.one("INSERT INTO users (email) VALUES ('audited@example.org') RETURNING id")
    moved.conn.execute("INSERT INTO audit_log (user_id, action) VALUES (%s, 'login')",
                       (user["id"],))  # fmt: skip
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        moved.conn.execute("INSERT INTO audit_log (user_id, action) VALUES (-1, 'ghost')")


def test_dependent_views_still_return_their_rows(moved: Moved) -> None:
    rows = moved.conn.execute("SELECT * FROM active_projects ORDER BY id").fetchall()
    assert rows and rows == moved.active_projects_before
    definition = moved.one("SELECT pg_get_viewdef('active_projects'::regclass) AS d")["d"]
    assert "client_mgmt.projects" in definition and "client_mgmt.clients" in definition
    # The application's own view on turns reads the live table, not the retired one: a turn
    # written a moment ago is there at once, without any replay.
    turn = moved.one("INSERT INTO turns (participant_id, content) VALUES (1, 'now') RETURNING id")
    assert moved.one("SELECT content FROM recent_turns WHERE id = %s", turn["id"]) == {
        "content": "now"
    }


def test_a_unique_secondary_key_keeps_serving_on_conflict(moved: Moved) -> None:
    row = moved.one(
        "INSERT INTO users (email, auth_info) VALUES ('user1@example.com', '{\"again\": true}') "
        "ON CONFLICT (email) DO UPDATE SET auth_info = excluded.auth_info RETURNING id, auth_info"
    )
    assert row == {"id": 1, "auth_info": {"again": True}}
    with pytest.raises(psycopg.errors.UniqueViolation):
        moved.conn.execute("INSERT INTO users (email) VALUES ('user1@example.com')")


def test_a_session_with_prepared_statements_keeps_working_across_cutover_and_rollback(
    cogito_dsn: str,
) -> None:
    """A long-lived application session prepared its statements on the table; after the swap
    the same prepared statements run against the compatibility view, and back again."""
    plan = load_plan(COGITO_PLAN)
    with psycopg.connect(
        cogito_dsn, autocommit=True, row_factory=dict_row, prepare_threshold=0
    ) as conn:

        def work(n: int) -> int:
            conn.execute("UPDATE turns SET content = %s WHERE id = %s", (f"edit {n}", 3))
            assert conn.execute("SELECT content FROM turns WHERE id = %s", (3,)).fetchone() == {
                "content": f"edit {n}"
            }
            row = conn.execute(
                "INSERT INTO turns (participant_id, content) VALUES (%s, %s) RETURNING id",
                (1, f"turn {n}"),
            ).fetchone()
            return int(row["id"])

        ids = [work(0)]
        prepared = conn.execute("SELECT count(*) AS n FROM pg_prepared_statements").fetchone()
        assert prepared["n"] >= 3
        with session(cogito_dsn, plan) as eng:
            eng.apply(["turns"], "cutover")
        ids.append(work(1))
        with session(cogito_dsn, plan) as eng:
            eng.rollback("turns")
        ids.append(work(2))
        assert ids == sorted(ids)
        rows = conn.execute("SELECT id, content FROM turns WHERE id = ANY(%s) ORDER BY id",
                            (ids,)).fetchall()  # fmt: skip
        assert [r["content"] for r in rows] == ["turn 0", "turn 1", "turn 2"]


@dataclass
class Owner:
    dsn: str
    conn: Conn  # a superuser session that acts as `role` with SET LOCAL ROLE
    role: str

    def writes(self, statement: str) -> int:
        with self.conn.transaction():
            self.conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(self.role)))
            return self.conn.execute(sql.SQL(statement)).rowcount  # type: ignore[arg-type]


@pytest.fixture
def app_owner(cogito_dsn: str) -> Iterator[Owner]:
    """The usual set-up: the application logs in as the (non-superuser) owner of its tables."""
    role = f"orch_t_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        try:
            for table in ("clients", "users", "projects", "participants", "turns", "block_turns"):
                conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                    sql.Identifier("public", table), sql.Identifier(role)))  # fmt: skip
            yield Owner(cogito_dsn, conn, role)
        finally:
            conn.execute("RESET ROLE")
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(
                sql.Identifier(role)))  # fmt: skip
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


OWNER_WRITES = [
    # a reply: the self-reference's check reads conversation.turns
    "INSERT INTO turns (participant_id, reply_to_turn_id, content) VALUES (1, 5, 'reply')",
    # a delete: the self-reference's action reads conversation.turns
    "DELETE FROM turns WHERE id = (SELECT max(id) FROM turns)",
    # a project of a client moved by the rename strategy: the check reads client_mgmt.clients
    "INSERT INTO projects (client_id, name) VALUES (1, 'owner project')",
]


def test_the_owner_writes_before_the_move(app_owner: Owner) -> None:
    for statement in OWNER_WRITES:
        assert app_owner.writes(statement) == 1, statement


def test_the_owner_keeps_writing_after_the_move(app_owner: Owner) -> None:
    """Foreign-key checks run as the tables' owner with schema-qualified queries: the owner
    must be able to reach conversation and client_mgmt, which the orchestrator created."""
    runner = CliRunner()
    for table in ("turns", "clients"):
        result = runner.invoke(
            app,
            ["--dsn", app_owner.dsn, "apply", str(COGITO_PLAN), "--table", table,
             "--until", "cutover", "--yes"],
            catch_exceptions=False,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    for statement in OWNER_WRITES:
        assert app_owner.writes(statement) == 1, statement

"""Invariant 4: every stage reverses until finalize, exactly, and keeps every row written meanwhile.

The operator moves a table forward with `orchestrator apply ... --until STAGE` (or through
cutover), the application keeps writing through the names it always used (`public.turns`, a
compatibility view once the table has moved), and the operator rolls back with `orchestrator
rollback`. A catalog snapshot of `public` and the target schemas (relations, columns,
constraints, indexes, triggers, views, sequences, ACLs, comments, policies; by name, never OID)
taken before the move must equal the one taken after the rollback, and every row the
application wrote in between must be there with the values it wrote. Each forward stage is
first shown to change the snapshot, so an equal snapshot means something.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from psycopg import sql
from psycopg.rows import dict_row
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.db import connect
from orchestrator.model.catalog import snapshot
from orchestrator.plan import load_plan
from orchestrator.run.events import Event, Rows
from orchestrator.run.session import session
from orchestrator.stages.registry import COPY_STRATEGY

Conn = psycopg.Connection[Any]
Row = dict[str, Any]

SCHEMAS = ["public", "client_mgmt", "conversation"]
# Every stage of the copy strategy a rollback can undo, in order.
COPY_STAGES = [s.name for s in COPY_STRATEGY.reversible]


# --- the operator, the application and the catalog ---------------------------------------------


class Operator:
    """`orchestrator --dsn DSN <verb> plans/cogito.yaml ...`, as typed at a terminal."""

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

    def apply(self, *tables: str, until: str = "verify") -> None:
        args = ["apply", str(COGITO_PLAN), "--until", until]
        for t in tables:
            args += ["--table", t]
        self.ok(*args, *(["--yes"] if until == "cutover" else []))

    def rollback(self, table: str, to: str | None = None) -> str:
        args = ["rollback", str(COGITO_PLAN), "--table", table, "--yes"]
        return str(self.ok(*args, *(["--to", to] if to else [])).stdout)

    def stages(self, table: str) -> dict[str, str]:
        """The status of each of a table's stages, as `status --format json` reports it."""
        data = json.loads(self.ok("status", str(COGITO_PLAN), "--format", "json").stdout)
        row = next(t for t in data["tables"] if t["name"] == table)
        return {stage: s["status"] for stage, s in row["stages"].items()}


def catalog(dsn: str) -> dict[str, Any]:
    """The invariant-4 snapshot, taken the way our sessions print definitions."""
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        return snapshot(conn, SCHEMAS)


def relkind(conn: Conn, name: str) -> str | None:
    row = conn.execute(
        "SELECT c.relkind::text AS k FROM pg_class c WHERE c.oid = to_regclass(%s)", (name,)
    ).fetchone()
    return row["k"] if row else None


def table_rows(conn: Conn, table: str) -> list[Row]:
    query = sql.SQL("SELECT * FROM {} ORDER BY 1, 2").format(sql.Identifier(*table.split(".")))
    return list(conn.execute(query).fetchall())


class TurnsApp:
    """The application's unchanged SQL on `turns` (unqualified: the default search_path).

    Every write is remembered with the row the database returned for it (the user trigger's
    updated_at included), or None for a row the application deleted.
    """

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.expected: dict[int, Row | None] = {}
        self.round = 0

    def _leaf(self) -> int:
        """An existing turn nothing references (no reply, no block), untouched so far."""
        row = self.conn.execute(
            "SELECT t.id FROM turns t WHERE t.id <> ALL(%s) "
            "AND NOT EXISTS (SELECT 1 FROM turns r WHERE r.reply_to_turn_id = t.id) "
            "AND NOT EXISTS (SELECT 1 FROM block_turns b WHERE b.turn_id = t.id) "
            "ORDER BY t.id LIMIT 1",
            (list(self.expected),),
        ).fetchone()
        assert row is not None
        return int(row["id"])

    def write(self) -> None:
        self.round += 1
        n = self.round
        c = self.conn
        first = c.execute(
            'INSERT INTO turns (participant_id, content, "timestamp", metadata) '
            "VALUES (1, %s, '2025-06-01 12:00+00', %s) RETURNING *",
            (f"question {n}", json.dumps({"round": n})),
        ).fetchone()
        reply = c.execute(
            "INSERT INTO turns (participant_id, reply_to_turn_id, content) "
            "VALUES (2, %s, %s) RETURNING *",
            (first["id"], f"answer {n}"),
        ).fetchone()
        self.expected[first["id"]] = first
        # A key update: the reply takes a new id (nothing references it yet).
        moved = c.execute(
            "UPDATE turns SET id = id + 1000000 WHERE id = %s RETURNING *", (reply["id"],)
        ).fetchone()
        self.expected[reply["id"]] = None
        self.expected[moved["id"]] = moved
        # An update of an existing row: the user trigger stamps updated_at.
        target = self._leaf()
        updated = c.execute(
            'UPDATE turns SET content = %s, "timestamp" = "timestamp" + interval \'1 hour\', '
            "metadata = jsonb_build_object('edited', %s::int) WHERE id = %s "
            "RETURNING *, now() AS stamped",
            (f"edited {n}", n, target),
        ).fetchone()
        assert updated.pop("stamped") == updated["updated_at"], "the user trigger fired"
        self.expected[target] = updated
        gone = self._leaf()
        assert c.execute("DELETE FROM turns WHERE id = %s", (gone,)).rowcount == 1
        self.expected[gone] = None

    def assert_every_write_is_kept(self) -> None:
        found = {
            r["id"]: r
            for r in self.conn.execute(
                "SELECT * FROM turns WHERE id = ANY(%s)", (list(self.expected),)
            )
        }
        for key, row in self.expected.items():
            assert found.get(key) == row, f"turn {key}: wrote {row}, found {found.get(key)}"

    def next_id(self) -> int:
        row = self.conn.execute(
            "INSERT INTO turns (participant_id, content) VALUES (1, 'after') RETURNING id"
        ).fetchone()
        return int(row["id"])


class AccountsApp:
    """The application's SQL on the users <-> participants cycle (and audit_log, which stays)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.expected: dict[tuple[str, int], Row | None] = {}
        self.round = 0

    def write(self) -> None:
        self.round += 1
        n = self.round
        c = self.conn
        user = c.execute(
            "INSERT INTO users (email, auth_info, client_id) VALUES (%s, %s, 1) RETURNING *",
            (f"signup{n}@example.org", json.dumps({"mfa": True})),
        ).fetchone()
        persona = c.execute(
            "INSERT INTO participants (user_id, name, type, patterns_metadata) "
            "VALUES (%s, %s, 'assistant', '{}') RETURNING *",
            (user["id"], f"persona {n}"),
        ).fetchone()
        # Close the cycle: the new user's default participant is the new persona.
        user = c.execute(
            "UPDATE users SET default_participant_id = %s WHERE id = %s RETURNING *",
            (persona["id"], user["id"]),
        ).fetchone()
        audit = c.execute(
            "INSERT INTO audit_log (user_id, action) VALUES (%s, %s) RETURNING *",
            (user["id"], f"signed up {n}"),
        ).fetchone()
        old = c.execute(
            "UPDATE users SET auth_info = %s WHERE id = %s RETURNING *",
            (json.dumps({"rotated": n}), n),
        ).fetchone()
        # A short-lived account: deleting the user cascades to its participant.
        brief = c.execute(
            "INSERT INTO users (email) VALUES (%s) RETURNING id", (f"brief{n}@example.org",)
        ).fetchone()
        brief_p = c.execute(
            "INSERT INTO participants (user_id, name) VALUES (%s, 'gone') RETURNING id",
            (brief["id"],),
        ).fetchone()
        assert c.execute("DELETE FROM users WHERE id = %s", (brief["id"],)).rowcount == 1
        self.expected.update(
            {
                ("users", user["id"]): user,
                ("participants", persona["id"]): persona,
                ("audit_log", audit["id"]): audit,
                ("users", old["id"]): old,
                ("users", brief["id"]): None,
                ("participants", brief_p["id"]): None,
            }
        )

    def assert_every_write_is_kept(self) -> None:
        for (table, key), row in self.expected.items():
            found = self.conn.execute(
                sql.SQL("SELECT * FROM {} WHERE id = %s").format(
                    sql.Identifier(*table.split("."))),
                (key,),
            ).fetchone()
            assert found == row, f"{table} {key}: wrote {row}, found {found}"


@pytest.fixture
def operator(cogito_dsn: str) -> Operator:
    return Operator(cogito_dsn)


@pytest.fixture
def app_conn(cogito_dsn: str) -> Iterator[Conn]:
    """The application's session: default search_path, so `turns` is public.turns."""
    with psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def _previous(stage: str) -> str | None:
    i = COPY_STAGES.index(stage)
    return COPY_STAGES[i - 1] if i else None


def _forward_to(operator: Operator, dsn: str, tables: tuple[str, ...], stage: str) -> None:
    """Move up to `stage`, showing that the stage itself changes the catalog (verify aside)."""
    before = catalog(dsn)
    prev = _previous(stage)
    if prev is not None:
        operator.apply(*tables, until=prev)
    at_prev = catalog(dsn)
    operator.apply(*tables, until=stage)
    moved = catalog(dsn)
    assert moved != before
    if stage == "verify":
        assert moved == at_prev, "verify only reads: it must not change the catalog"
    else:
        assert moved != at_prev, f"{stage} changed nothing in the catalog"


# --- turns: a renamed column, a user trigger, a self-reference, a serial key ---------------------


@pytest.mark.parametrize("stage", COPY_STAGES)
def test_turns_rolls_back_from_each_stage_to_the_exact_catalog_keeping_every_row(
    operator: Operator, app_conn: Conn, cogito_dsn: str, stage: str
) -> None:
    before = catalog(cogito_dsn)
    _forward_to(operator, cogito_dsn, ("turns",), stage)
    assert relkind(app_conn, "public.turns") == ("v" if stage == "cutover" else "r")

    # The application writes while the move stands at `stage`.
    turns = TurnsApp(app_conn)
    turns.write()
    written = table_rows(app_conn, "turns")
    last_id = max(r["id"] for r in written if r["id"] < 1_000_000)

    out = operator.rollback("turns")
    assert f"turns:{stage}" in out and "turns:prepare" in out

    assert catalog(cogito_dsn) == before
    assert relkind(app_conn, "public.turns") == "r"
    assert relkind(app_conn, "conversation.turns") is None
    turns.assert_every_write_is_kept()
    assert table_rows(app_conn, "turns") == written
    # The serial sequence never goes back: the next turn gets a new id.
    assert turns.next_id() > last_id
    assert set(operator.stages("turns").values()) <= {"rolled_back", "pending"}


# --- users <-> participants: a foreign-key cycle that moves as one unit ------------------------


@pytest.mark.parametrize("stage", COPY_STAGES)
def test_the_users_participants_cycle_rolls_back_from_each_stage_exactly(
    operator: Operator, app_conn: Conn, cogito_dsn: str, stage: str
) -> None:
    before = catalog(cogito_dsn)
    _forward_to(operator, cogito_dsn, ("users",), stage)
    # The cycle moves as one unit: asking for users moves participants too.
    assert operator.stages("participants")[stage] == "done"
    cut = stage == "cutover"
    assert relkind(app_conn, "public.users") == ("v" if cut else "r")
    assert relkind(app_conn, "public.participants") == ("v" if cut else "r")

    accounts = AccountsApp(app_conn)
    accounts.write()
    written = {t: table_rows(app_conn, t) for t in ("users", "participants", "audit_log")}

    out = operator.rollback("users")
    assert f"users:{stage}" in out and f"participants:{stage}" in out

    assert catalog(cogito_dsn) == before
    accounts.assert_every_write_is_kept()
    for table, rows in written.items():
        assert table_rows(app_conn, table) == rows, table
    # audit_log's foreign key is back on public.users, and validated.
    fk = app_conn.execute(
        "SELECT confrelid::regclass::text AS parent, convalidated FROM pg_constraint "
        "WHERE conname = 'audit_log_user_id_fkey'"
    ).fetchone()
    assert fk == {"parent": "users", "convalidated": True}


# --- partial rollbacks: --to STAGE -------------------------------------------------------------


def test_partial_rollbacks_step_back_one_stage_at_a_time(
    operator: Operator, app_conn: Conn, cogito_dsn: str
) -> None:
    """From cutover, `rollback --to S` for S = verify, copy, dual_write, prepare, then a full
    rollback: each lands exactly on the catalog the forward move had at S, and each keeps the
    rows the application wrote in the state before it."""
    at = {"nothing": catalog(cogito_dsn)}
    for stage in COPY_STAGES[:-1]:
        operator.apply("turns", until=stage)
        at[stage] = catalog(cogito_dsn)
    operator.apply("turns", until="cutover")
    turns = TurnsApp(app_conn)

    for to in ["verify", "copy", "dual_write", "prepare", None]:
        turns.write()
        written = table_rows(app_conn, "turns")
        operator.rollback("turns", to)
        assert catalog(cogito_dsn) == at[to or "nothing"], f"rollback --to {to}"
        kept = COPY_STAGES[: COPY_STAGES.index(to) + 1] if to else []
        status = operator.stages("turns")
        assert {s for s in COPY_STAGES if status[s] == "done"} == set(kept)
        turns.assert_every_write_is_kept()
        assert table_rows(app_conn, "turns") == written


def test_rollback_to_copy_after_cutover_is_a_fresh_apply_until_verify_and_moves_on_again(
    operator: Operator, app_conn: Conn, cogito_dsn: str
) -> None:
    operator.apply("turns", until="verify")
    ready = catalog(cogito_dsn)
    operator.apply("turns", until="cutover")
    turns = TurnsApp(app_conn)
    turns.write()  # through the compatibility view

    assert operator.rollback("turns", to="copy") == "rolled back: turns:cutover, turns:verify\n"

    assert catalog(cogito_dsn) == ready
    status = operator.stages("turns")
    assert [status[s] for s in COPY_STAGES] == ["done"] * 3 + ["rolled_back"] * 2
    turns.assert_every_write_is_kept()
    # The target kept every row too: dual-write resumed, so a verify passes again...
    turns.write()
    operator.apply("turns", until="verify")
    assert operator.stages("turns")["verify"] == "done"
    target = app_conn.execute(
        'SELECT id, participant_id, reply_to_turn_id, content, sent_at AS "timestamp", '
        "metadata, llm_config_id, updated_at FROM conversation.turns ORDER BY 1, 2"
    ).fetchall()
    assert target == table_rows(app_conn, "turns")
    # ...and the move goes on to a second cutover, which keeps every row as well.
    operator.apply("turns", until="cutover")
    assert relkind(app_conn, "public.turns") == "v"
    turns.write()
    turns.assert_every_write_is_kept()


def test_an_interrupted_copy_rolls_back_exactly(
    operator: Operator, app_conn: Conn, cogito_dsn: str
) -> None:
    """The operator stops a copy half-way (Ctrl-C) and decides to roll back instead."""
    before = catalog(cogito_dsn)
    operator.ok("set", str(COGITO_PLAN), "batch_size", "300", "--table", "turns")

    def interrupt_after_two_batches(event: Event) -> None:
        if isinstance(event, Rows) and event.stage == "copy" and event.rows_done >= 600:
            raise KeyboardInterrupt

    with (
        pytest.raises(KeyboardInterrupt),
        session(cogito_dsn, load_plan(COGITO_PLAN), interrupt_after_two_batches) as eng,
    ):
        eng.apply(["turns"], "verify")
    assert operator.stages("turns")["copy"] == "running"
    # Every batch that committed did so with its checkpoint (the other worker may have
    # committed one more while the first stopped).
    copied = app_conn.execute("SELECT count(*) AS n FROM conversation.turns").fetchone()
    assert copied is not None and copied["n"] >= 600
    assert copied["n"] == app_conn.execute(
        "SELECT rows_done AS n FROM _orchestrator.stages WHERE table_name = 'turns' "
        "AND stage = 'copy'").fetchone()["n"]
    turns = TurnsApp(app_conn)
    turns.write()
    written = table_rows(app_conn, "turns")

    assert operator.rollback("turns") == (
        "rolled back: turns:copy, turns:dual_write, turns:prepare\n"
    )

    assert catalog(cogito_dsn) == before
    turns.assert_every_write_is_kept()
    assert table_rows(app_conn, "turns") == written
    # A fresh start copies everything from the beginning.
    operator.apply("turns", until="verify")
    assert app_conn.execute("SELECT count(*) AS n FROM conversation.turns").fetchone() == {
        "n": len(written)
    }


def test_an_identity_key_moved_by_copy_keeps_counting_after_rollback(
    app_conn: Conn, cogito_dsn: str, tmp_path: Path
) -> None:
    """clients has a GENERATED ALWAYS identity: moved by copy, the target's own identity
    takes over at cutover and hands its value back at rollback, never reissuing one."""
    plan = tmp_path / "clients-by-copy.yaml"
    plan.write_text(
        "version: 1\nname: clients_by_copy\nsource_schema: public\n"
        "tables:\n  - name: clients\n    schema: client_mgmt\n",
        encoding="utf-8",
    )
    before = catalog(cogito_dsn)

    def new_client(name: str) -> int:
        row = app_conn.execute("INSERT INTO clients (name) VALUES (%s) RETURNING id", (name,))
        return int(row.fetchone()["id"])

    with session(cogito_dsn, load_plan(plan)) as eng:
        eng.apply(["clients"], "cutover")
    during = [new_client("during 1"), new_client("during 2")]
    assert app_conn.execute("SELECT count(*) AS n FROM active_projects").fetchone()["n"] > 0
    with session(cogito_dsn, load_plan(plan)) as eng:
        eng.rollback("clients")

    assert catalog(cogito_dsn) == before
    assert 2 < during[0] < during[1] < new_client("after")
    names = app_conn.execute("SELECT name FROM clients WHERE id = ANY(%s) ORDER BY id", (during,))
    assert [r["name"] for r in names] == ["during 1", "during 2"]


def test_a_copy_move_without_a_compatibility_view_is_refused_before_it_starts(
    cogito_dsn: str, tmp_path: Path
) -> None:
    """Without the view nothing would put the table back under its old name on rollback, so
    the copy strategy refuses `compat_view: false` up front, and changes nothing."""
    plan = tmp_path / "turns-without-view.yaml"
    plan.write_text(
        "version: 1\nname: no_view\nsource_schema: public\ntables:\n"
        "  - name: turns\n    schema: conversation\n    options: {compat_view: false}\n"
        "    columns:\n      timestamp: {rename: sent_at}\n",
        encoding="utf-8",
    )
    operator = Operator(cogito_dsn)
    before = catalog(cogito_dsn)

    refused = operator.run("apply", str(plan), "--table", "turns", "--until", "cutover", "--yes")

    assert refused.exit_code == 1
    assert "public.turns" in refused.stderr and "compat_view: false" in refused.stderr
    assert catalog(cogito_dsn) == before


# --- the rename strategy -----------------------------------------------------------------------


def _write_prompts(conn: Conn) -> dict[int, Row | None]:
    new = conn.execute(
        "INSERT INTO prompts (client_id, name, template, variables) "
        "VALUES (1, 'welcome', 'Hello {{name}}', '{\"name\": \"text\"}') RETURNING *"
    ).fetchone()
    changed = conn.execute(
        "UPDATE prompts SET template = 'Bye' WHERE id = 1 RETURNING *"
    ).fetchone()
    gone = conn.execute("DELETE FROM prompts WHERE id = 2 RETURNING id").fetchone()
    # The CHECK constraint still guards the table behind the view.
    with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
        conn.execute("INSERT INTO prompts (client_id, name) VALUES (1, '')")
    return {new["id"]: new, changed["id"]: changed, gone["id"]: None}


def _write_clients(conn: Conn) -> dict[int, Row | None]:
    new = conn.execute(
        "INSERT INTO clients (name, billing_info) VALUES ('Newco', '{\"plan\": \"pro\"}') "
        "RETURNING *"
    ).fetchone()
    assert new["id"] > 2, "the identity column issues a new id"
    changed = conn.execute(
        'UPDATE clients SET settings = \'{"theme": "dark"}\' WHERE id = 1 RETURNING *'
    ).fetchone()
    brief = conn.execute("INSERT INTO clients (name) VALUES ('Brief') RETURNING id").fetchone()
    conn.execute("DELETE FROM clients WHERE id = %s", (brief["id"],))
    return {new["id"]: new, changed["id"]: changed, brief["id"]: None}


@pytest.mark.parametrize(
    ("table", "target", "write"),
    [
        ("prompts", "client_mgmt.prompts", _write_prompts),
        ("clients", "client_mgmt.clients", _write_clients),
    ],
)
def test_a_rename_strategy_table_moves_and_rolls_back_exactly(
    operator: Operator, app_conn: Conn, cogito_dsn: str, table: str, target: str, write: Any
) -> None:
    before = catalog(cogito_dsn)
    projects_before = app_conn.execute("SELECT * FROM active_projects ORDER BY id").fetchall()
    operator.apply(table, until="cutover")
    assert operator.stages(table) == {"rename": "done", "finalize": "pending"}
    assert catalog(cogito_dsn) != before
    assert relkind(app_conn, target) == "r"
    assert relkind(app_conn, f"public.{table}") == "v"

    expected = write(app_conn)
    written = table_rows(app_conn, table)

    assert operator.rollback(table) == f"rolled back: {table}:rename\n"

    assert catalog(cogito_dsn) == before
    assert relkind(app_conn, f"public.{table}") == "r"
    found = {r["id"]: r for r in table_rows(app_conn, table)}
    for key, row in expected.items():
        assert found.get(key) == row
    assert table_rows(app_conn, table) == written
    assert app_conn.execute("SELECT * FROM active_projects ORDER BY id").fetchall() == (
        projects_before
    )


def test_a_renamed_rename_strategy_table_rolls_back(
    app_conn: Conn, cogito_dsn: str, tmp_path: Path
) -> None:
    plan = tmp_path / "prompts-renamed.yaml"
    plan.write_text(
        "version: 1\nname: prompts_renamed\nsource_schema: public\ntables:\n"
        "  - name: prompts\n    schema: client_mgmt\n    rename_to: prompt_templates\n"
        "    options: {strategy: rename}\n",
        encoding="utf-8",
    )
    operator = Operator(cogito_dsn)
    before = catalog(cogito_dsn)
    operator.ok("apply", str(plan), "--table", "prompts", "--until", "cutover", "--yes")
    assert relkind(app_conn, "client_mgmt.prompt_templates") == "r"
    expected = _write_prompts(app_conn)

    result = operator.run("rollback", str(plan), "--table", "prompts", "--yes")

    assert result.exit_code == 0, result.output
    assert catalog(cogito_dsn) == before
    found = {r["id"]: r for r in table_rows(app_conn, "prompts")}
    assert all(found.get(key) == row for key, row in expected.items())


# --- the whole plan --------------------------------------------------------------------------


def test_the_whole_plan_through_cutover_rolls_back_to_the_exact_catalog(
    operator: Operator, app_conn: Conn, cogito_dsn: str
) -> None:
    tables = [
        "clients", "users", "client_users", "projects", "llm_configs", "prompts",
        "participants", "blocks", "turns", "block_turns", "patterns", "lens_prototypes",
        "block_lens_version", "audit_log",
    ]  # fmt: skip
    counts = {
        t: app_conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(
            sql.Identifier(*t.split(".")))).fetchone()["n"]
        for t in tables
    }
    before = catalog(cogito_dsn)
    operator.apply(until="cutover")
    assert catalog(cogito_dsn) != before
    # Every table of the plan has left public; the plan's cross-schema views now exist.
    for t in tables[:-1]:
        assert relkind(app_conn, f"public.{t}") == "v", t
    assert relkind(app_conn, "public.participant_users") == "v"
    assert relkind(app_conn, "public.project_blocks") == "v"

    # A new customer arrives through the old names while everything is moved.
    client = app_conn.execute("INSERT INTO clients (name) VALUES ('Late') RETURNING id").fetchone()
    user = app_conn.execute(
        "INSERT INTO users (email, client_id) VALUES ('late@example.org', %s) RETURNING id",
        (client["id"],),
    ).fetchone()
    app_conn.execute(
        "INSERT INTO client_users (client_id, user_id, role) VALUES (%s, %s, 'owner')",
        (client["id"], user["id"]),
    )
    persona = app_conn.execute(
        "INSERT INTO participants (user_id, name) VALUES (%s, 'Late persona') RETURNING id",
        (user["id"],),
    ).fetchone()
    turn = app_conn.execute(
        "INSERT INTO turns (participant_id, content) VALUES (%s, 'hello') RETURNING *",
        (persona["id"],),
    ).fetchone()
    assert app_conn.execute(
        "SELECT client_names FROM participant_users WHERE id = %s", (persona["id"],)
    ).fetchone() == {"client_names": ["Late"]}

    # A plan view reads the moved tables: rolling one of them back would strand it.
    refused = operator.run("rollback", str(COGITO_PLAN), "--table", "participants", "--yes")
    assert refused.exit_code == 1
    assert "would strand view public.participant_users" in refused.stderr
    assert "DROP VIEW public.participant_users" in refused.stderr
    assert relkind(app_conn, "public.participants") == "v", "a refused rollback changes nothing"

    app_conn.execute("DROP VIEW public.participant_users")
    app_conn.execute("DROP VIEW public.project_blocks")
    for t in reversed(tables[:-1]):
        operator.rollback(t)

    assert catalog(cogito_dsn) == before
    for t in tables:
        assert relkind(app_conn, f"public.{t}") == "r", t
    grown = {"clients", "users", "client_users", "participants", "turns"}
    for t, n in counts.items():
        now = app_conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(
            sql.Identifier(*t.split(".")))).fetchone()["n"]
        assert now == n + (1 if t in grown else 0), t
    assert app_conn.execute("SELECT * FROM turns WHERE id = %s", (turn["id"],)).fetchone() == turn

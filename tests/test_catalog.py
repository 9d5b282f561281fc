"""Catalog introspection on the real Cogito schema: what the orchestrator sees before it moves.

Every hard part of the legacy schema (identity, serial, enum, arrays, CHECK, cascades,
composite keys, a user trigger, a dependent view, owned sequences) must be read correctly, in a
fixed number of queries whatever the table count, and the snapshot used to prove an exact
rollback must notice every schema change and ignore data.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator.demo.sample import TABLES
from orchestrator.model import catalog
from orchestrator.model.catalog import Catalog, read_catalog, snapshot

Conn = psycopg.Connection[Any]


@pytest.fixture
def cogito(cogito_conn: Conn) -> Catalog:
    return read_catalog(cogito_conn, ["public"])


def test_all_fourteen_tables_and_the_view_are_found(cogito: Catalog) -> None:
    tables = {name for (schema, name), r in cogito.relations.items() if r.kind == "r"}
    assert tables == set(TABLES)
    assert len(tables) == 14
    assert cogito.relations[("public", "active_projects")].kind == "v"
    assert "public" in cogito.existing_schemas
    assert cogito.server_version >= 150000


def test_every_table_has_its_primary_key(cogito: Catalog) -> None:
    for name in TABLES:
        rel = cogito.table("public", name)
        assert rel is not None
        assert rel.primary_key is not None, name


def test_the_identity_column_on_clients(cogito: Catalog) -> None:
    clients = cogito.table("public", "clients")
    assert clients is not None
    col = clients.column("id")
    assert col.identity == "a"  # GENERATED ALWAYS
    assert col.type == "bigint"
    assert col.default is None
    (seq,) = cogito.owned_sequences("public", "clients")
    assert seq.identity is True
    assert seq.owner_column == "id"


def test_the_serial_default_and_owned_sequence_of_users(cogito: Catalog) -> None:
    users = cogito.table("public", "users")
    assert users is not None
    col = users.column("id")
    assert col.identity == ""
    assert col.default == "nextval('users_id_seq'::regclass)"
    assert col.not_null
    (seq,) = cogito.owned_sequences("public", "users")
    assert (seq.schema, seq.name) == ("public", "users_id_seq")
    assert (seq.owner_schema, seq.owner_table, seq.owner_column) == ("public", "users", "id")
    assert seq.identity is False
    assert seq.data_type == "bigint"


def test_the_secondary_unique_on_users_email(cogito: Catalog) -> None:
    users = cogito.table("public", "users")
    assert users is not None
    unique = [c for c in users.constraints if c.kind == "u"]
    assert [(c.name, c.columns) for c in unique] == [("users_email_key", ("email",))]
    index = next(i for i in users.indexes if i.name == "users_email_key")
    assert index.unique and not index.primary and index.valid
    assert index.constraint == "users_email_key"


def test_the_enum_column_type(cogito: Catalog) -> None:
    participants = cogito.table("public", "participants")
    assert participants is not None
    col = participants.column("type")
    assert (col.type, col.type_schema, col.type_kind) == ("participant_type", "public", "e")
    assert col.default == "'human'::participant_type"


def test_array_columns(cogito: Catalog) -> None:
    client_users = cogito.table("public", "client_users")
    blv = cogito.table("public", "block_lens_version")
    assert client_users is not None and blv is not None
    assert client_users.column("permissions").type == "text[]"
    assert blv.column("embedding").type == "real[]"


def test_the_check_constraint_on_prompts(cogito: Catalog) -> None:
    prompts = cogito.table("public", "prompts")
    assert prompts is not None
    check = next(c for c in prompts.constraints if c.kind == "c")
    assert check.name == "prompts_name_not_blank"
    assert check.definition == "CHECK ((length(name) > 0))"
    assert check.validated


def test_foreign_key_actions(cogito: Catalog) -> None:
    participants = cogito.table("public", "participants")
    assert participants is not None
    fk = next(c for c in participants.constraints if c.name == "participants_user_id_fkey")
    assert fk.kind == "f"
    assert (fk.ref_schema, fk.ref_table, fk.ref_columns) == ("public", "users", ("id",))
    assert fk.on_delete == "c"  # CASCADE
    assert fk.on_update == "a"  # NO ACTION
    assert "ON DELETE CASCADE" in fk.definition
    turns = cogito.table("public", "turns")
    assert turns is not None
    plain = next(c for c in turns.constraints if c.name == "turns_participant_id_fkey")
    assert (plain.on_delete, plain.on_update) == ("a", "a")


def test_composite_primary_keys_keep_their_column_order(cogito: Catalog) -> None:
    client_users = cogito.table("public", "client_users")
    block_turns = cogito.table("public", "block_turns")
    assert client_users is not None and block_turns is not None
    assert client_users.primary_key is not None
    assert client_users.primary_key.columns == ("client_id", "user_id")
    assert block_turns.primary_key is not None
    assert block_turns.primary_key.columns == ("block_id", "turn_id")


def test_the_user_trigger_on_turns(cogito: Catalog) -> None:
    turns = cogito.table("public", "turns")
    assert turns is not None
    (trigger,) = turns.user_triggers
    assert trigger.name == "turns_touch_updated_at"
    assert trigger.function == "touch_updated_at"
    assert trigger.enabled == "O"
    assert "BEFORE UPDATE ON public.turns" in trigger.definition
    # Foreign-key triggers are internal: they are never counted as the application's.
    users = cogito.table("public", "users")
    assert users is not None and users.user_triggers == ()


def test_the_quoted_column_and_the_self_reference_of_turns(cogito: Catalog) -> None:
    turns = cogito.table("public", "turns")
    assert turns is not None
    assert [c.name for c in turns.columns][:5] == [
        "id",
        "participant_id",
        "reply_to_turn_id",
        "content",
        "timestamp",
    ]
    (self_ref,) = [
        f
        for f in cogito.fks_from("public", "turns")
        if (f.ref_schema, f.ref_table) == ("public", "turns")
    ]
    assert self_ref.columns == ("reply_to_turn_id",)
    assert self_ref.columns_indexed


def test_the_dependent_view_reads_projects_and_clients(cogito: Catalog) -> None:
    for table in ("projects", "clients"):
        deps = cogito.dependents_of("public", table)
        assert [(d.schema, d.name, d.kind) for d in deps] == [("public", "active_projects", "v")]
        assert "JOIN clients" in deps[0].definition
    assert cogito.dependents_of("public", "turns") == []


def test_the_inbound_foreign_key_from_audit_log(cogito: Catalog) -> None:
    into_users = {(f.table, f.name) for f in cogito.fks_to("public", "users")}
    assert ("audit_log", "audit_log_user_id_fkey") in into_users
    assert ("participants", "participants_user_id_fkey") in into_users
    # The cycle: users references participants, which references users.
    assert any(f.ref_table == "participants" for f in cogito.fks_from("public", "users"))


def test_foreign_keys_into_the_schemas_are_seen_from_outside(cogito_conn: Conn) -> None:
    """A table in another schema that references a moving table must be found (re-pointed)."""
    cogito_conn.execute("CREATE SCHEMA reporting")
    cogito_conn.execute(
        "CREATE TABLE reporting.user_stats (user_id bigint PRIMARY KEY REFERENCES public.users)"
    )
    cat = read_catalog(cogito_conn, ["public"])
    assert ("reporting", "user_stats") not in cat.relations
    inbound = [f for f in cat.fks_to("public", "users") if f.schema == "reporting"]
    assert [(f.table, f.columns) for f in inbound] == [("user_stats", ("user_id",))]


def test_an_absent_schema_reads_as_empty(empty_conn: Conn) -> None:
    cat = read_catalog(empty_conn, ["client_mgmt"])
    assert cat.relations == {}
    assert "client_mgmt" not in cat.existing_schemas


# --- a fixed number of queries ---------------------------------------------------------------


class CountingConnection(psycopg.Connection[Any]):
    """Counts every statement sent through conn.execute, independently of the module's count."""

    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        type(self).statements += 1
        return super().execute(*args, **kwargs)


def make_tables(conn: Conn, schema: str, count: int) -> None:
    """`count` tables, each with a key, a foreign key, an index, a trigger, a comment, a view."""
    s = sql.Identifier(schema)
    statements = [
        sql.SQL("CREATE SCHEMA {}").format(s),
        sql.SQL(
            "CREATE FUNCTION {}.touch() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RETURN NEW; END $$"
        ).format(s),
    ]
    for i in range(1, count + 1):
        table = sql.Identifier(schema, f"T {i}")
        parent = sql.Identifier(schema, f"T {max(i - 1, 1)}")
        statements += [
            sql.SQL(
                "CREATE TABLE {} (id bigserial PRIMARY KEY, parent_id bigint REFERENCES {}, "
                "label text UNIQUE, tags text[])"
            ).format(table, parent),
            sql.SQL("CREATE INDEX ON {} (parent_id)").format(table),
            sql.SQL(
                "CREATE TRIGGER touch BEFORE UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}.touch()"
            ).format(table, s),
            sql.SQL("COMMENT ON TABLE {} IS {}").format(table, sql.Literal(f"table {i}")),
            sql.SQL("CREATE VIEW {} AS SELECT id, label FROM {}").format(
                sql.Identifier(schema, f"V {i}"), table
            ),
        ]
    # One round trip: a parameterless multi-statement script.
    conn.execute(sql.SQL(";\n").join(statements))


def test_the_query_count_does_not_grow_with_the_table_count(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as setup:
        make_tables(setup, "small", 20)
        make_tables(setup, "large", 200)
    counts = {}
    with CountingConnection.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        for schema, tables in (("small", 20), ("large", 200)):
            CountingConnection.statements = 0
            module_before = catalog.QUERY_COUNT
            cat = read_catalog(conn, [schema])
            assert sum(r.kind == "r" for r in cat.relations.values()) == tables
            assert sum(r.kind == "v" for r in cat.relations.values()) == tables
            assert len(cat.sequences) == tables
            assert len(cat.dependents) == tables
            assert all(len(r.triggers) == 1 for r in cat.relations.values() if r.kind == "r")
            counts[schema] = (
                CountingConnection.statements,
                catalog.QUERY_COUNT - module_before,
                cat.queries,
            )
    assert counts["small"] == counts["large"]
    sent, counted, reported = counts["large"]
    assert sent == counted == reported == 10


def test_make_tables_quotes_its_names(empty_conn: Conn) -> None:
    """The helper above really makes names with spaces (so the count test covers quoting)."""
    make_tables(empty_conn, "Odd Schema", 2)
    cat = read_catalog(empty_conn, ["Odd Schema"])
    assert ("Odd Schema", "T 2") in cat.relations
    t2 = cat.relations[("Odd Schema", "T 2")]
    assert t2.comment == "table 2"
    assert [f.ref_table for f in cat.fks_from("Odd Schema", "T 2")] == ["T 1"]


# --- the snapshot used to prove an exact rollback -------------------------------------------


def test_the_snapshot_is_stable(cogito_conn: Conn) -> None:
    assert snapshot(cogito_conn, ["public"]) == snapshot(cogito_conn, ["public"])


def test_the_snapshot_ignores_data_and_statistics(cogito_conn: Conn) -> None:
    before = snapshot(cogito_conn, ["public"])
    cogito_conn.execute(
        "INSERT INTO lens_prototypes (name) SELECT 'lens' FROM generate_series(1, 500)"
    )
    cogito_conn.execute("DELETE FROM audit_log")
    cogito_conn.execute("ANALYZE")
    assert snapshot(cogito_conn, ["public"]) == before


def test_the_snapshot_names_objects_not_oids(cogito_conn: Conn) -> None:
    """Dropping and recreating the same view gives it a new OID but the same snapshot."""
    before = snapshot(cogito_conn, ["public"])
    cogito_conn.execute("DROP VIEW active_projects")
    cogito_conn.execute(
        "CREATE VIEW active_projects AS SELECT p.id, p.name, c.name AS client_name "
        "FROM projects p JOIN clients c ON c.id = p.client_id"
    )
    assert snapshot(cogito_conn, ["public"]) == before


@pytest.mark.parametrize(
    "change",
    [
        "COMMENT ON TABLE turns IS 'the conversation turns'",
        "COMMENT ON COLUMN turns.content IS 'text'",
        "ALTER TABLE turns ALTER COLUMN content SET DEFAULT ''",
        "ALTER TABLE turns ALTER COLUMN content SET NOT NULL",
        "CREATE INDEX turns_content_idx ON turns (content)",
        "ALTER TABLE turns DISABLE TRIGGER turns_touch_updated_at",
        "ALTER TABLE turns ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON turns USING (participant_id > 0)",
        "ALTER TABLE turns SET (fillfactor = 90)",
        "GRANT SELECT ON turns TO PUBLIC",
        "ALTER TABLE prompts DROP CONSTRAINT prompts_name_not_blank",
        "ALTER SEQUENCE users_id_seq INCREMENT BY 2",
        "CREATE OR REPLACE VIEW active_projects AS SELECT p.id, p.name, c.name AS client_name "
        "FROM projects p JOIN clients c ON c.id = p.client_id WHERE p.id > 0",
        "ALTER TABLE audit_log SET UNLOGGED",
    ],
)
def test_the_snapshot_notices_every_kind_of_schema_change(cogito_conn: Conn, change: str) -> None:
    before = snapshot(cogito_conn, ["public"])
    cogito_conn.execute(change)
    assert snapshot(cogito_conn, ["public"]) != before

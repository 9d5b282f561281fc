"""The control schema's tables, created or upgraded in place.

`MIGRATIONS[i]` takes the schema from version i to i+1; `ensure_schema` applies what is missing
under one fixed advisory lock, so two orchestrators starting at once do not race.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.db import Conn

# One fixed key serialises control-schema creation and upgrades across plans.
_BOOTSTRAP_LOCK = 0x6F726368  # "orch"

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE {s}.meta (
            id boolean PRIMARY KEY DEFAULT true CHECK (id), version int NOT NULL)""",
        """CREATE TABLE {s}.plans (
            name text PRIMARY KEY, checksum text NOT NULL, yaml text NOT NULL,
            path text, registered_by text NOT NULL DEFAULT current_user,
            registered_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE {s}.stages (
            plan text NOT NULL REFERENCES {s}.plans ON DELETE CASCADE,
            table_name text NOT NULL, stage text NOT NULL,
            status text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending','running','done','failed','rolled_back')),
            started_at timestamptz, finished_at timestamptz,
            attempts int NOT NULL DEFAULT 0,
            rows_done bigint NOT NULL DEFAULT 0, rows_estimated bigint,
            rows_per_s double precision,
            checkpoint jsonb, last_error text,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (plan, table_name, stage))""",
        """CREATE TABLE {s}.settings (
            plan text NOT NULL, table_name text NOT NULL DEFAULT '*', key text NOT NULL,
            value jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (plan, table_name, key))""",
        """CREATE TABLE {s}.saved (
            plan text NOT NULL, table_name text NOT NULL, key text NOT NULL,
            value jsonb NOT NULL, PRIMARY KEY (plan, table_name, key))""",
        """CREATE TABLE {s}.events (
            id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(),
            plan text NOT NULL, table_name text, stage text, action text NOT NULL,
            outcome text NOT NULL, sql text, duration_ms double precision,
            detail jsonb, operator text NOT NULL DEFAULT current_user,
            client_addr text DEFAULT inet_client_addr()::text,
            backend_pid int DEFAULT pg_backend_pid())""",
        "CREATE INDEX ON {s}.events (plan, table_name, id)",
        # The event log is append-only: refuse updates and deletes outright.
        """CREATE FUNCTION {s}.events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'the orchestrator event log is append-only'; END $$""",
        """CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON {s}.events
           FOR EACH ROW EXECUTE FUNCTION {s}.events_append_only()""",
        # TRUNCATE fires no row trigger: refuse it with a statement trigger.
        """CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {s}.events
           FOR EACH STATEMENT EXECUTE FUNCTION {s}.events_append_only()""",
    ],
    [
        # What verify proved, chunk by chunk (state/proofs.py).
        """CREATE TABLE {s}.chunks (
            plan text NOT NULL, table_name text NOT NULL, part text NOT NULL DEFAULT '',
            n int NOT NULL, lo text[], hi text[], rows bigint NOT NULL,
            checksum text NOT NULL, passed_at timestamptz NOT NULL,
            checked_at timestamptz NOT NULL,
            PRIMARY KEY (plan, table_name, part, n))""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)



def q(schema: str, template: str) -> sql.Composed:
    """A control-schema statement: `{s}` in the template becomes the schema's identifier."""
    return sql.SQL(template).format(s=sql.Identifier(schema))


def schema_exists(conn: Conn, schema: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.meta', %s::text)) IS NOT NULL AS ok", (schema,)
    ).fetchone()
    return bool(row and row["ok"])


def ensure_schema(conn: Conn, schema: str) -> None:
    """Create or upgrade the control schema, in its own committed transaction."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_BOOTSTRAP_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        version = 0
        if schema_exists(conn, schema):
            row = conn.execute(q(schema, "SELECT version FROM {s}.meta")).fetchone()
            version = int(row["version"]) if row else 0
        for step in MIGRATIONS[version:]:
            for stmt in step:
                conn.execute(q(schema, stmt))
        if version < SCHEMA_VERSION:
            conn.execute(
                q(
                    schema,
                    "INSERT INTO {s}.meta (version) VALUES (%s) "
                    "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                ),
                (SCHEMA_VERSION,),
            )

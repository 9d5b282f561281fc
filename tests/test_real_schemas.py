"""Schemas as real applications have them move whole, and come back exactly (issue 13)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
from conftest import COGITO_PLAN
from psycopg import sql
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.db import connect
from orchestrator.model.catalog import snapshot

SCHEMAS = ["public", "dom"]

MOVE_P = """version: 1
name: notvalid
tables:
  - name: p
    schema: dom
"""


def run(dsn: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["--dsn", dsn, *args])


def catalog(dsn: str) -> dict[str, Any]:
    """The invariant-4 snapshot, definitions printed with every name qualified."""
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        return snapshot(conn, SCHEMAS)


def validated(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = %s", (name,)
        ).fetchone()
        assert row is not None, name
        return bool(row[0])


def test_a_not_valid_foreign_key_with_orphans_moves_and_rolls_back_as_it_was(
    empty_dsn: str, tmp_path: Path
) -> None:
    """A Rails-style `validate: false` key over orphans: the move neither validates it nor
    gets stuck on it, and a rollback restores the catalog exactly."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE c (id int PRIMARY KEY, pid int)")
        conn.execute("INSERT INTO p SELECT g, 'x' FROM generate_series(1, 100) g")
        conn.execute("INSERT INTO c VALUES (1, 5), (2, 999)")  # 999: an orphan
        conn.execute(
            "ALTER TABLE c ADD CONSTRAINT c_p FOREIGN KEY (pid) REFERENCES p(id) NOT VALID"
        )
    plan = tmp_path / "plan.yaml"
    plan.write_text(MOVE_P, encoding="utf-8")
    before = catalog(empty_dsn)

    applied = run(empty_dsn, "apply", str(plan), "--until", "cutover", "--yes")
    assert applied.exit_code == 0, applied.output
    assert not validated(empty_dsn, "c_p")
    with psycopg.connect(empty_dsn) as conn:
        target = conn.execute(
            "SELECT confrelid::regclass::text FROM pg_constraint WHERE conname = 'c_p'"
        ).fetchone()
        assert target == ("dom.p",)  # re-pointed at the new table, still NOT VALID

    rolled = run(empty_dsn, "rollback", str(plan), "--table", "p", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert not validated(empty_dsn, "c_p")
    assert catalog(empty_dsn) == before


def test_a_valid_foreign_key_is_still_validated_after_the_swap(
    empty_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE c (id int PRIMARY KEY, pid int REFERENCES p(id))")
        conn.execute("INSERT INTO p VALUES (1, 'x')")
        conn.execute("INSERT INTO c VALUES (1, 1)")
        conn.execute("CREATE TABLE d (id int PRIMARY KEY, pid int)")
        conn.execute(
            "ALTER TABLE d ADD CONSTRAINT d_p FOREIGN KEY (pid) REFERENCES p(id) NOT VALID"
        )
    plan = tmp_path / "plan.yaml"
    plan.write_text(MOVE_P, encoding="utf-8")
    before = catalog(empty_dsn)
    assert run(empty_dsn, "apply", str(plan), "--until", "cutover", "--yes").exit_code == 0
    assert validated(empty_dsn, "c_pid_fkey")
    assert not validated(empty_dsn, "d_p")
    assert run(empty_dsn, "rollback", str(plan), "--table", "p", "--yes").exit_code == 0
    assert catalog(empty_dsn) == before


COGITO_SCHEMAS = ["public", "client_mgmt", "conversation"]


def test_rollback_without_a_table_undoes_the_whole_plan_last_wave_first(cogito_dsn: str) -> None:
    """`rollback PLAN` undoes every unit; a plan view that reads a moved table is refused by
    name first, and that refusal changes nothing."""
    plan = str(COGITO_PLAN)
    with connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        before = snapshot(conn, COGITO_SCHEMAS)
    assert run(cogito_dsn, "apply", plan, "--until", "cutover", "--yes").exit_code == 0
    with connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        moved = snapshot(conn, COGITO_SCHEMAS)

    refused = run(cogito_dsn, "rollback", plan, "--yes")
    assert refused.exit_code == 1
    assert "would strand view public.participant_users" in refused.stderr
    assert "Traceback" not in refused.output
    with connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        assert snapshot(conn, COGITO_SCHEMAS) == moved
        for view in ("participant_users", "project_blocks"):
            conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier("public", view)))

    rolled = run(cogito_dsn, "rollback", plan, "--yes", "--format", "json")
    assert rolled.exit_code == 0, rolled.output
    assert "turns:cutover" in rolled.stdout and "clients:rename" in rolled.stdout
    with connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        assert snapshot(conn, COGITO_SCHEMAS) == before


MOVE_ACCOUNTS = """version: 1
name: exact
tables:
  - name: accounts
    schema: dom
"""


def structure(dsn: str, schema: str) -> dict[str, list[str]]:
    """The table's indexes, constraints and triggers as PostgreSQL prints them, the schema's
    name taken out."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET search_path = ''")
        rel = f"{schema}.accounts"

        def texts(query: str) -> list[str]:
            rows = conn.execute(query, (rel,)).fetchall()
            return sorted(str(r[0]).replace(f"{schema}.accounts", "S.accounts") for r in rows)

        return {
            "table": texts("SELECT concat_ws(' ', relpersistence, relreplident, reloptions::text, "
                           "(SELECT t.reloptions::text FROM pg_class t WHERE t.oid = "
                           "c.reltoastrelid)) FROM pg_class c WHERE c.oid = %s::regclass"),
            "columns": texts("SELECT concat_ws(' ', attname, attidentity, attstattarget, "
                             "attstorage, attcompression) FROM pg_attribute WHERE attrelid = "
                             "%s::regclass AND attnum > 0"),
            "identity": texts("SELECT concat_ws(' ', c.relname, seqincrement, seqmin, seqmax, "
                              "seqstart, seqcache, seqcycle) FROM pg_sequence s JOIN pg_class c "
                              "ON c.oid = s.seqrelid WHERE s.seqrelid = "
                              "pg_get_serial_sequence(%s, 'id')::regclass"),
            "clustered": texts("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = "
                               "i.indexrelid WHERE i.indrelid = %s::regclass AND i.indisclustered"),
            "statistics": texts("SELECT pg_get_statisticsobjdef(oid) FROM pg_statistic_ext "
                                "WHERE stxrelid = %s::regclass"),
            "indexes": texts("SELECT pg_get_indexdef(indexrelid) FROM pg_index "
                             "WHERE indrelid = %s::regclass"),
            "constraints": texts("SELECT conname || ' ' || pg_get_constraintdef(oid) FROM "
                                 "pg_constraint WHERE conrelid = %s::regclass"),
            "triggers": texts("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = "
                              "%s::regclass AND NOT tgisinternal AND tgname NOT LIKE '_orch%%'"),
        }


def test_the_table_comes_back_as_the_catalog_printed_it_and_a_rollback_restores_it(
    empty_dsn: str, tmp_path: Path
) -> None:
    """SQL-standard syntax (NORMALIZE, IS NORMALIZED, TRIM(BOTH ... FROM ...)) is not turned
    into its function-call form, and what the catalog holds about the table (identity options,
    storage parameters, statistics targets, column storage and compression, replica identity,
    extended statistics, CLUSTER ON) is carried: only the schema differs after cutover."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE accounts (id int GENERATED BY DEFAULT AS IDENTITY (INCREMENT BY 5 "
            "START WITH 100 MINVALUE 100 MAXVALUE 100000 CACHE 3 CYCLE) PRIMARY KEY, "
            "nickname text, region int, bio text COMPRESSION pglz, "
            "CONSTRAINT normalized CHECK (nickname IS NFKC NORMALIZED), "
            "CONSTRAINT trimmed CHECK (trim(both ' ' from nickname) <> '')) "
            "WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, "
            "toast.autovacuum_enabled = false)"
        )
        conn.execute("ALTER TABLE accounts ALTER COLUMN region SET STATISTICS 500")
        conn.execute("ALTER TABLE accounts ALTER COLUMN bio SET STORAGE EXTERNAL")
        conn.execute("ALTER TABLE accounts REPLICA IDENTITY FULL")
        conn.execute("CREATE STATISTICS accounts_nick_region (ndistinct, dependencies) "
                     "ON nickname, region FROM accounts")
        conn.execute("CREATE INDEX accounts_region ON accounts (region)")
        conn.execute("ALTER TABLE accounts CLUSTER ON accounts_region")
        conn.execute("CREATE INDEX ON accounts (lower(NORMALIZE(nickname, NFKC)))")
        conn.execute("CREATE INDEX ON accounts (substring(nickname from 1 for 3))")
        conn.execute("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER touch BEFORE UPDATE OF nickname ON accounts FOR EACH ROW "
                     "WHEN (OLD.nickname IS DISTINCT FROM NEW.nickname) EXECUTE FUNCTION touch()")
        conn.execute("INSERT INTO accounts (nickname, region) VALUES ('ada', 1), ('bob', 2)")
    plan = tmp_path / "plan.yaml"
    plan.write_text(MOVE_ACCOUNTS, encoding="utf-8")
    before = structure(empty_dsn, "public")
    assert any("NORMALIZE(nickname, NFKC)" in i for i in before["indexes"])
    assert "autovacuum_enabled=false" in before["table"][0]  # the toast table's option
    snapshot_before = catalog(empty_dsn)

    applied = run(empty_dsn, "apply", str(plan), "--until", "cutover", "--yes")
    assert applied.exit_code == 0, applied.output
    assert structure(empty_dsn, "dom") == before

    rolled = run(empty_dsn, "rollback", str(plan), "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert catalog(empty_dsn) == snapshot_before


def test_grants_policies_and_comments_changed_during_the_move_are_carried_at_cutover(
    empty_dsn: str, tmp_path: Path
) -> None:
    """Prepare copies the ACL, policies and comments; cutover re-syncs them, so a GRANT, a
    REVOKE, a new policy or comment made between prepare and cutover is what the new table
    has."""
    suffix = uuid.uuid4().hex[:8]
    early, late = f"orch_early_{suffix}", f"orch_late_{suffix}"
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        for role in (early, late):
            conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        try:
            conn.execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO p VALUES (1, 'a'), (2, 'b')")
            conn.execute(sql.SQL("GRANT SELECT, UPDATE ON p TO {}").format(sql.Identifier(early)))
            plan = tmp_path / "plan.yaml"
            plan.write_text(MOVE_P, encoding="utf-8")
            assert run(empty_dsn, "apply", str(plan)).exit_code == 0  # through verify

            conn.execute(sql.SQL("REVOKE UPDATE ON p FROM {}").format(sql.Identifier(early)))
            conn.execute(sql.SQL("GRANT INSERT (v) ON p TO {}").format(sql.Identifier(late)))
            conn.execute("ALTER TABLE p ENABLE ROW LEVEL SECURITY")
            conn.execute("CREATE POLICY only_a ON p USING (v = 'a')")
            conn.execute("COMMENT ON TABLE p IS 'said during the move'")
            conn.execute("COMMENT ON COLUMN p.v IS 'the value'")
            source = catalog(empty_dsn)["relations"]["public.p"]

            assert run(empty_dsn, "cutover", str(plan), "--yes").exit_code == 0
            moved = catalog(empty_dsn)["relations"]["dom.p"]
            for part in ("acl", "rls", "policies", "comment"):
                assert moved[part] == source[part], part
            assert [c[9] for c in moved["columns"]] == [c[9] for c in source["columns"]]
            assert [c[8] for c in moved["columns"]] == [c[8] for c in source["columns"]]
        finally:
            for role in (early, late):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


MOVE_ORDERS = """version: 1
name: mv
tables:
  - name: orders
    schema: dom
"""


def test_a_materialized_view_is_rebuilt_over_the_new_table_and_swapped_back(
    empty_dsn: str, tmp_path: Path
) -> None:
    """The rollup is rebuilt beside the old one before the lock, swapped in by name at
    cutover (same definition but the table's name, same indexes, grants, comment), swapped
    back by a rollback, and finalize leaves no old copy behind."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, region text, total numeric)")
        conn.execute("INSERT INTO orders SELECT g, 'r' || (g % 3), g FROM generate_series(1, 90) g")
        conn.execute("CREATE MATERIALIZED VIEW sales AS SELECT region, sum(total) AS total, "
                     "count(*) AS n FROM orders GROUP BY region")
        conn.execute("CREATE UNIQUE INDEX sales_region ON sales (region)")
        conn.execute("COMMENT ON MATERIALIZED VIEW sales IS 'rollup'")
        conn.execute("CREATE MATERIALIZED VIEW empty_sales AS SELECT id FROM orders WITH NO DATA")
    plan = tmp_path / "plan.yaml"
    plan.write_text(MOVE_ORDERS, encoding="utf-8")
    before = catalog(empty_dsn)
    applied = run(empty_dsn, "apply", str(plan), "--until", "cutover", "--yes")
    assert applied.exit_code == 0, applied.output

    after = catalog(empty_dsn)["relations"]
    old = before["relations"]
    for view in ("public.sales", "public.empty_sales"):
        assert after[view]["view"] == old[view]["view"].replace("public.orders", "dom.orders")
        for part in ("kind", "owner", "acl", "comment", "options"):
            assert after[view][part] == old[view][part], (view, part)
    assert after["public.sales"]["indexes"] == [
        (i[0], i[1], *i[2:]) for i in old["public.sales"]["indexes"]
    ]
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT relispopulated FROM pg_class WHERE oid = "
                            "'public.empty_sales'::regclass").fetchone() == (False,)
        conn.execute("INSERT INTO public.orders VALUES (91, 'r9', 5)")  # through the view
        conn.commit()
        conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY public.sales")
        assert conn.execute("SELECT n FROM public.sales WHERE region = 'r9'").fetchone() == (1,)

    rolled = run(empty_dsn, "rollback", str(plan), "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert catalog(empty_dsn) == before

    assert run(empty_dsn, "apply", str(plan), "--until", "cutover", "--yes").exit_code == 0
    assert run(empty_dsn, "finalize", str(plan), "--yes").exit_code == 0
    with psycopg.connect(empty_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE '\\_orch\\_%' "
                            "OR relnamespace = '_orchestrator_retired'::regnamespace"
                            ).fetchone()
        assert left == (0,)

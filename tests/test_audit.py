"""`orchestrator audit`: foreign keys, missing constraints with orphans, keys, cycles, domains.

On the Cogito sample and on the shop schema (tests/shop_schema.py), whose shapes differ.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from shop_schema import SHOP_TABLES, load_shop
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.demo.sample import TABLES as COGITO_TABLES
from orchestrator.model import catalog
from orchestrator.tools.audit import Audit, run_audit


def _audit(dsn: str, schema: str = "public", **kw: Any) -> Audit:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return run_audit(conn, schema, **kw)


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def test_cogito_audit(cogito_dsn: str) -> None:
    a = _audit(cogito_dsn)
    assert set(a.tables) == set(COGITO_TABLES)
    by_name = {f.name: f for f in a.foreign_keys}
    # Every reference of the sample has its constraint: nothing is missing.
    assert a.missing == ()
    assert a.keyless == ()
    cascade = by_name["participants_user_id_fkey"]
    assert (cascade.on_delete, cascade.on_update) == ("CASCADE", "NO ACTION")
    assert cascade.columns_indexed and cascade.nullable is False
    # block_turns' key (block_id, turn_id) covers block_id, not turn_id's... which has an index;
    # client_users (client_id, user_id) covers client_id but nothing covers user_id.
    assert by_name["block_turns_block_id_fkey"].columns_indexed
    unindexed = {f.name for f in a.unindexed}
    assert "client_users_user_id_fkey" in unindexed
    assert "client_users_client_id_fkey" not in unindexed
    assert "projects_client_id_fkey" in unindexed
    assert by_name["projects_client_id_fkey"].suggestion == (
        "CREATE INDEX CONCURRENTLY ON public.projects (client_id);"
    )
    # The users <-> participants cycle and the turns self-reference.
    cycles = {c.tables for c in a.cycles}
    assert cycles == {("turns",), ("participants", "users")}
    two = next(c for c in a.cycles if len(c.tables) == 2)
    # users.default_participant_id is nullable: that foreign key is how the cycle is broken.
    assert two.breakable_by == ("users_default_participant_id_fkey",)
    # Domains: every table in exactly one, deterministic.
    seen = [t for d in a.domains for t in d.tables]
    assert sorted(seen) == sorted(COGITO_TABLES)
    assert a.domains == _audit(cogito_dsn).domains
    # Asked for two domains, the split keeps the content side and the account side apart.
    two_domains = _audit(cogito_dsn, domains=2).domains
    assert len(two_domains) == 2
    content = next(d for d in two_domains if "turns" in d.tables)
    assert {"blocks", "block_turns", "block_lens_version"} <= set(content.tables)
    assert "clients" not in content.tables


def test_audit_queries_do_not_grow_with_candidates(empty_dsn: str) -> None:
    load_shop(empty_dsn)
    before = catalog.QUERY_COUNT
    _audit(empty_dsn)
    assert catalog.QUERY_COUNT - before == 10  # read_catalog; the orphan count is one more


def test_shop_audit(empty_dsn: str) -> None:
    load_shop(empty_dsn)
    a = _audit(empty_dsn)
    assert set(a.tables) == set(SHOP_TABLES)
    missing = {(m.table, m.column): m for m in a.missing}
    assert set(missing) == {("orders", "customer_id"), ("shipments", "carrier_id")}
    orders = missing[("orders", "customer_id")]
    assert (orders.ref_table, orders.ref_column) == ("customers", "id")
    assert orders.type_match == "compatible"  # bigint vs integer
    assert (orders.orphan_rows, orders.orphan_values) == (3, 2)
    assert orders.examples == ("99", "100")
    assert orders.suggestion.startswith(
        'ALTER TABLE "public"."orders" ADD FOREIGN KEY ("customer_id") '
        'REFERENCES "public"."customers" ("id") NOT VALID;'
    )
    ship = missing[("shipments", "carrier_id")]
    assert (ship.orphan_rows, ship.orphan_values, ship.examples) == (0, 0, ())
    assert ship.type_match == "exact"
    # Keys: warehouses has a unique NOT NULL key to declare; stock and event_log have none.
    keyless = {k.table: k.candidate_key for k in a.keyless}
    assert keyless == {"warehouses": ("code",), "stock": None, "event_log": None}
    # The composite foreign key of shipments is unindexed; order_lines' is covered by its key.
    fks = {f.table: f for f in a.foreign_keys if f.ref_table == "order_lines"}
    assert fks["shipments"].columns == ("order_id", "line_no")
    assert not fks["shipments"].columns_indexed
    assert fks["shipments"].on_delete == "SET NULL"
    assert fks["shipments"].suggestion == (
        "CREATE INDEX CONCURRENTLY ON public.shipments (order_id, line_no);"
    )
    lines = next(f for f in a.foreign_keys if f.table == "order_lines" and f.ref_table == "orders")
    assert lines.columns_indexed and lines.on_delete == "CASCADE"
    # Cycles: the self-reference and departments <-> employees.
    assert {c.tables for c in a.cycles} == {("employees",), ("departments", "employees")}
    selfref = next(c for c in a.cycles if c.tables == ("employees",))
    assert selfref.breakable_by == ("employees_manager_id_fkey",)
    # The isolated table forms no community of its own: it is listed as standalone.
    standalone = [d for d in a.domains if d.name == "standalone"]
    assert [d.tables for d in standalone] == [("event_log",)]
    assert sorted(t for d in a.domains for t in d.tables) == sorted(SHOP_TABLES)


def test_orphans_can_be_skipped(empty_dsn: str) -> None:
    load_shop(empty_dsn)
    a = _audit(empty_dsn, count_orphans=False)
    assert {m.orphan_rows for m in a.missing} == {None}


def test_audit_in_another_schema_and_unknown_schema(empty_dsn: str) -> None:
    load_shop(empty_dsn, "legacy")
    a = _audit(empty_dsn, "legacy")
    assert set(a.tables) == set(SHOP_TABLES)
    assert {(m.table, m.column) for m in a.missing} == {
        ("orders", "customer_id"),
        ("shipments", "carrier_id"),
    }
    result = _cli("--dsn", empty_dsn, "audit", "--schema", "nope")
    assert result.exit_code == 1
    assert "schema nope does not exist" in result.output


def test_audit_cli_text_and_json(empty_dsn: str, cogito_dsn: str) -> None:
    load_shop(empty_dsn)
    text = _cli("--dsn", empty_dsn, "audit")
    assert text.exit_code == 0, text.output
    for expected in (
        "orders.customer_id",
        "customers.id",
        "3 orphan rows",
        "warehouses",
        "key: [code]",
        "departments → employees",
        "CREATE INDEX CONCURRENTLY ON public.shipments (order_id, line_no);",
    ):
        assert expected in text.stdout, expected
    data = json.loads(_cli("--dsn", empty_dsn, "audit", "--format", "json").stdout)
    assert data["summary"]["missing_constraints"] == 2
    assert data["summary"]["missing_with_orphans"] == 1
    assert data["summary"]["tables_without_primary_key"] == 3
    data = json.loads(_cli("--dsn", cogito_dsn, "audit", "--format", "json").stdout)
    assert data["summary"]["missing_constraints"] == 0
    assert data["summary"]["cycles"] == 2


@pytest.mark.parametrize("name", ['Odd "name"', "naïve table"])
def test_audit_quotes_names(empty_dsn: str, name: str) -> None:
    from psycopg import sql

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, parent_id int)").format(
                sql.Identifier(name)
            )
        )
        conn.execute(
            sql.SQL("CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES {})").format(
                sql.Identifier(name)
            )
        )
    a = _audit(empty_dsn)
    fk = next(f for f in a.foreign_keys if f.table == "child")
    assert fk.ref_table == name
    assert fk.suggestion == "CREATE INDEX CONCURRENTLY ON public.child (p);"

"""`orchestrator init`: a starting plan from the audit that `validate` accepts unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from shop_schema import load_shop
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import load_plan
from orchestrator.tools.scaffold import build_plan

CLIENT_MGMT = ["clients", "users", "client_users", "projects", "llm_configs", "prompts"]
CONVERSATION = [
    "participants",
    "blocks",
    "turns",
    "block_turns",
    "patterns",
    "lens_prototypes",
    "block_lens_version",
]


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def _init_and_validate(dsn: str, path: Path, *args: str) -> dict[str, Any]:
    """Write a plan with init, then validate the file exactly as written."""
    result = _cli("--dsn", dsn, "init", "--output", str(path), *args)
    assert result.exit_code == 0, result.output
    text = path.read_text(encoding="utf-8")
    check = _cli("--dsn", dsn, "validate", str(path), "--format", "json")
    assert check.exit_code == 0, check.output + text
    assert path.read_text(encoding="utf-8") == text  # validate changed nothing
    data: dict[str, Any] = json.loads(check.stdout)
    assert data["valid"] is True and data["problems"] == []
    return data


def test_cogito_by_community_validates(cogito_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    _init_and_validate(cogito_dsn, path)
    plan = load_plan(path).plan
    assert plan.name == "move_public"
    assert {t.name for t in plan.tables} == set(CLIENT_MGMT + CONVERSATION + ["audit_log"])
    # The users <-> participants cycle is noted; they land in the same domain.
    assert plan.table("users").schema_ == plan.table("participants").schema_
    assert "moves together with participants (a foreign-key cycle)" in path.read_text()
    # Asked for two domains: the content tables are kept apart from the clients.
    path2 = tmp_path / "two.yaml"
    _init_and_validate(cogito_dsn, path2, "--domains", "2")
    two = load_plan(path2).plan
    assert len({t.schema_ for t in two.tables}) == 2
    assert two.table("turns").schema_ == two.table("blocks").schema_
    assert two.table("turns").schema_ != two.table("clients").schema_


def test_cogito_with_overrides_is_the_reference_split(cogito_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    _init_and_validate(
        cogito_dsn,
        path,
        "--name",
        "cogito_split",
        "--to",
        "client_mgmt=" + ",".join(CLIENT_MGMT),
        "--to",
        "conversation=" + ",".join(CONVERSATION),
        "--to",
        "public=audit_log",
    )
    plan = load_plan(path).plan
    assert plan.name == "cogito_split"
    assert {t.name: t.schema_ for t in plan.tables} == {
        **dict.fromkeys(CLIENT_MGMT, "client_mgmt"),
        **dict.fromkeys(CONVERSATION, "conversation"),
    }
    assert set(plan.schemas) == {"client_mgmt", "conversation"}
    assert "#   audit_log: kept in public by --to" in path.read_text()


def test_cogito_by_prefix_validates(cogito_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    _init_and_validate(cogito_dsn, path, "--group-by", "prefix")
    plan = load_plan(path).plan
    schema = {t.name: t.schema_ for t in plan.tables}
    # clients and client_users share a prefix; blocks, block_turns, block_lens_version another.
    assert schema["clients"] == schema["client_users"] == "client"
    assert schema["blocks"] == schema["block_turns"] == schema["block_lens_version"] == "block"
    # A table alone with its prefix follows its foreign keys (users -> clients).
    assert schema["users"] == "client"


def test_shop_validates_with_keys_and_left_out_tables(empty_dsn: str, tmp_path: Path) -> None:
    load_shop(empty_dsn)
    path = tmp_path / "plan.yaml"
    _init_and_validate(empty_dsn, path)
    text = path.read_text()
    plan = load_plan(path).plan
    names = {t.name for t in plan.tables}
    # No key at all: left out, with the reason in a comment.
    assert "stock" not in names and "event_log" not in names
    assert "#   stock: no primary key and no unique NOT NULL key to declare" in text
    # A unique NOT NULL key: kept, with key declared.
    assert plan.table("warehouses").key == ["code"]
    # The mixed-case table reads back exactly.
    assert "Invoices" in names
    assert plan.table("departments").schema_ == plan.table("employees").schema_
    # The prefix grouping validates too; `order` is a keyword, so its schema is order_domain.
    path2 = tmp_path / "prefix.yaml"
    _init_and_validate(empty_dsn, path2, "--group-by", "prefix")
    plan2 = load_plan(path2).plan
    assert plan2.table("order_lines").schema_ == "order_domain"


def test_copy_blockers_get_the_rename_strategy_with_their_cycle(
    empty_dsn: str, tmp_path: Path
) -> None:
    load_shop(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE MATERIALIZED VIEW staff AS SELECT id, name FROM employees")
    path = tmp_path / "plan.yaml"
    _init_and_validate(empty_dsn, path)
    plan = load_plan(path).plan
    for name in ("employees", "departments"):  # departments: same foreign-key cycle
        assert plan.options_for(plan.table(name)).strategy == "rename"
    assert plan.options_for(plan.table("orders")).strategy == "copy"
    text = path.read_text()
    assert "copy cannot: the materialized view public.staff reads it" in text
    assert "copy cannot: in a foreign-key cycle with employees" in text


@pytest.mark.parametrize(
    "hostile",
    ['we"ird: name', "yes", "#hash", "naïve \u2013 table", "null", "- dash", "a,b [c]"],
)
def test_hostile_names_read_back(empty_dsn: str, tmp_path: Path, hostile: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, note text)").format(
                sql.Identifier(hostile)
            )
        )
        conn.execute(
            sql.SQL("CREATE TABLE kid (id int PRIMARY KEY, up int REFERENCES {})").format(
                sql.Identifier(hostile)
            )
        )
    path = tmp_path / "plan.yaml"
    if "," in hostile:  # --to separates tables with commas: such a name keeps its domain
        _init_and_validate(empty_dsn, path)
        assert load_plan(path).plan.table(hostile).schema_ == f"domain_{hostile}"
        return
    _init_and_validate(empty_dsn, path, "--to", f"{hostile}={hostile}")
    plan = load_plan(path).plan
    assert plan.table(hostile).schema_ == hostile


def test_inherited_tables_are_left_out_and_a_partitioned_one_moves_whole(
    empty_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE m (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);"
            "CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
            "CREATE TABLE parent (id int PRIMARY KEY);"
            "CREATE TABLE child (extra text) INHERITS (parent);"
            "ALTER TABLE child ADD PRIMARY KEY (id);"
            "CREATE TABLE plain (id int PRIMARY KEY)"
        )
    path = tmp_path / "plan.yaml"
    _init_and_validate(empty_dsn, path)
    text = path.read_text()
    assert "#   parent: table inheritance is not supported" in text
    assert "#   child: table inheritance is not supported" in text
    assert sorted(t.name for t in load_plan(path).plan.tables) == ["m", "plain"]


def test_deterministic_and_stdout(empty_dsn: str) -> None:
    load_shop(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        first = build_plan(conn).text
        assert build_plan(conn).text == first
    result = _cli("--dsn", empty_dsn, "init")
    assert result.exit_code == 0
    assert result.stdout == first


def test_bad_overrides_and_existing_output(empty_dsn: str, tmp_path: Path) -> None:
    load_shop(empty_dsn)
    cases = [
        (["--to", "x=nope"], "--to names tables that are not in public: nope"),
        (["--to", "x"], "expected NAME=table,table"),
        (["--to", "a=orders", "--to", "b=orders"], "orders is sent to both a and b"),
        (["--to", "_orchestrator=orders"], "cannot move tables into that schema"),
    ]
    for args, message in cases:
        result = _cli("--dsn", empty_dsn, "init", *args)
        assert result.exit_code == 1, args
        assert message in result.output, result.output
    path = tmp_path / "plan.yaml"
    path.write_text("keep me")
    result = _cli("--dsn", empty_dsn, "init", "--output", str(path))
    assert result.exit_code == 1
    assert "exists" in result.output
    assert path.read_text() == "keep me"
    assert _cli("--dsn", empty_dsn, "init", "--output", str(path), "--force").exit_code == 0
    assert path.read_text().startswith("# Written by `orchestrator init`")

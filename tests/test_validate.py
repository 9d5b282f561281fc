"""`validate`: the live checks an operator runs before anything moves.

Every problem is found at once, names its subject and a fix, and the database is untouched:
no write at all (no transaction id is ever assigned), no control schema, and a catalog snapshot
of every schema the plan touches equal before and after.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import yaml
from conftest import COGITO_PLAN
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator.model.catalog import snapshot
from orchestrator.model.graph import Problem
from orchestrator.model.validate import Report, inspect, plan_schemas
from orchestrator.plan import LoadedPlan, load_plan, parse_plan

Conn = psycopg.Connection[Any]


def plan_of(tables: list[dict[str, Any]], **extra: Any) -> LoadedPlan:
    doc: dict[str, Any] = {"version": 1, "name": "ops", "tables": tables, **extra}
    return parse_plan(yaml.safe_dump(doc, allow_unicode=True), "ops.yaml")


def problems(report: Report) -> dict[str, Problem]:
    return {p.subject: p for p in report.problems}


def create(conn: Conn, ddl: str, *names: str) -> None:
    conn.execute(sql.SQL(ddl).format(*(sql.Identifier(n) for n in names)))


def untouched(conn: Conn, loaded: LoadedPlan) -> dict[str, Any]:
    """What must not change: every schema the plan names, the control schema included."""
    return snapshot(conn, [*plan_schemas(loaded.plan), loaded.plan.control_schema])


def inspect_without_writing(dsn: str, loaded: LoadedPlan) -> Report:
    """Run validate inside a transaction and prove it wrote nothing: no xid was assigned."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        report = inspect(conn, loaded)
        row = conn.execute("SELECT pg_current_xact_id_if_assigned() AS xid").fetchone()
        assert row is not None and row["xid"] is None, "validate wrote to the database"
        conn.rollback()
    return report


# --- the Cogito plan -------------------------------------------------------------------------


def test_the_cogito_plan_is_valid(cogito_dsn: str) -> None:
    report = inspect_without_writing(cogito_dsn, load_plan(COGITO_PLAN))
    assert report.ok, report.problems
    assert report.as_dict()["valid"] is True
    warned = {w.subject: w for w in report.warnings}
    # The operator is told what will happen to the hard parts, not refused.
    assert "user triggers (turns_touch_updated_at)" in warned["public.turns"].message
    assert "from outside the plan" in warned["public.audit_log (audit_log_user_id_fkey)"].message
    assert ["participants", "users"] in report.as_dict()["units"]


def test_validate_changes_nothing(cogito_conn: Conn) -> None:
    loaded = load_plan(COGITO_PLAN)
    before = untouched(cogito_conn, loaded)
    assert before["relations"]  # the snapshot sees the tables, so equality means something
    report = inspect(cogito_conn, loaded)
    assert report.ok
    assert untouched(cogito_conn, loaded) == before
    assert "_orchestrator" not in before["schemas"]
    row = cogito_conn.execute(
        "SELECT count(*) AS n FROM pg_namespace WHERE nspname IN "
        "('_orchestrator', 'client_mgmt', 'conversation')"
    ).fetchone()
    assert row is not None and row["n"] == 0


# --- mistakes an operator makes ---------------------------------------------------------------


def test_an_unknown_table_is_named_with_a_fix(cogito_dsn: str) -> None:
    loaded = plan_of([{"name": "Turns", "schema": "conversation"}])
    report = inspect_without_writing(cogito_dsn, loaded)
    assert not report.ok
    p = problems(report)["public.Turns"]
    assert p.message == "no such table"
    assert "case-sensitive" in p.hint
    assert "ops" in p.hint  # the plan to edit


def test_every_problem_is_reported_at_once(cogito_dsn: str) -> None:
    loaded = plan_of(
        [
            {"name": "nope", "schema": "x"},
            {"name": "turns", "schema": "public"},
            {"name": "blocks", "schema": "x", "columns": {"colour": {"rename": "color"}}},
            {"name": "prompts", "schema": "x", "depends_on": ["ghost"]},
        ]
    )
    report = inspect_without_writing(cogito_dsn, loaded)
    found = problems(report)
    assert found["public.nope"].message == "no such table"
    # One problem for turns, not a second "target name taken" by the table itself.
    assert [p.message for p in report.problems if p.subject == "public.turns"] == [
        "the target schema is the source schema"
    ]
    assert found["public.blocks.colour"].message == "no such column"
    assert "columns of blocks: " in found["public.blocks.colour"].hint
    assert found["public.prompts depends_on ghost"].message == "is not a table of this plan"


def test_a_table_without_a_primary_key_is_refused(empty_dsn: str, empty_conn: Conn) -> None:
    create(empty_conn, "CREATE TABLE {} (id int, email text NOT NULL UNIQUE)", "sessions")
    report = inspect_without_writing(empty_dsn, plan_of([{"name": "sessions", "schema": "x"}]))
    p = problems(report)["public.sessions"]
    assert p.message == "has no primary key"
    assert "declare `key: [col, ...]`" in p.hint


def test_a_declared_unique_not_null_key_makes_it_valid(empty_dsn: str, empty_conn: Conn) -> None:
    create(empty_conn, "CREATE TABLE {} (id int, email text NOT NULL UNIQUE)", "sessions")
    loaded = plan_of([{"name": "sessions", "schema": "x", "key": ["email"]}])
    report = inspect_without_writing(empty_dsn, loaded)
    assert report.ok, report.problems


@pytest.mark.parametrize(
    ("ddl", "key", "why"),
    [
        ("CREATE TABLE {} (a int, b text, UNIQUE (a))", ["a"], "nullable"),
        ("CREATE TABLE {} (a int NOT NULL, b text)", ["a"], "not unique"),
        ("CREATE TABLE {} (a int NOT NULL, b text NOT NULL, UNIQUE (a, b))", ["a"], "wider"),
        ("CREATE TABLE {} (a int NOT NULL, b text)", ["a", "zz"], "no such column"),
    ],
)
def test_a_declared_key_that_is_not_a_key_is_refused(
    empty_dsn: str, empty_conn: Conn, ddl: str, key: list[str], why: str
) -> None:
    create(empty_conn, ddl, "sessions")
    report = inspect_without_writing(
        empty_dsn, plan_of([{"name": "sessions", "schema": "x", "key": key}])
    )
    p = problems(report)["public.sessions"]
    assert p.message == "has no primary key and its declared key is not unique and NOT NULL", why


@pytest.mark.parametrize(
    "index",
    [
        "CREATE UNIQUE INDEX ON sessions (a, lower(b))",  # unique over (a, lower(b)), not a
        "CREATE UNIQUE INDEX ON sessions (a) WHERE b IS NOT NULL",  # unique over some rows
    ],
)
def test_expression_and_partial_unique_indexes_are_not_keys(
    empty_dsn: str, empty_conn: Conn, index: str
) -> None:
    empty_conn.execute("CREATE TABLE sessions (a int NOT NULL, b text)")
    empty_conn.execute(index)
    report = inspect_without_writing(
        empty_dsn, plan_of([{"name": "sessions", "schema": "x", "key": ["a"]}])
    )
    assert not report.ok


def test_a_unique_index_with_included_columns_is_a_key(empty_dsn: str, empty_conn: Conn) -> None:
    empty_conn.execute("CREATE TABLE sessions (a int NOT NULL, b text)")
    empty_conn.execute("CREATE UNIQUE INDEX ON sessions (a) INCLUDE (b)")
    report = inspect_without_writing(
        empty_dsn, plan_of([{"name": "sessions", "schema": "x", "key": ["a"]}])
    )
    assert report.ok, report.problems


def test_a_taken_target_name_is_refused(cogito_dsn: str, cogito_conn: Conn) -> None:
    cogito_conn.execute("CREATE SCHEMA conversation")
    cogito_conn.execute("CREATE TABLE conversation.turns (id int PRIMARY KEY)")
    report = inspect_without_writing(cogito_dsn, load_plan(COGITO_PLAN))
    p = problems(report)["conversation.turns"]
    assert p.message == "the target name is already taken"
    assert "rename_to" in p.hint


def test_a_view_is_not_a_table(cogito_dsn: str) -> None:
    report = inspect_without_writing(
        cogito_dsn, plan_of([{"name": "active_projects", "schema": "x"}])
    )
    p = problems(report)["public.active_projects"]
    assert p.message == "is not a table (relkind v)"


def test_a_missing_source_schema_is_refused(empty_dsn: str) -> None:
    loaded = plan_of([{"name": "t", "schema": "x"}], source_schema="legacy")
    found = problems(inspect_without_writing(empty_dsn, loaded))
    assert found["legacy"].message == "the source schema does not exist"
    assert "source_schema" in found["legacy"].hint


def test_a_partitioned_table_moves_but_its_partition_alone_is_refused(
    empty_dsn: str, empty_conn: Conn
) -> None:
    empty_conn.execute(
        "CREATE TABLE measurements (id bigint, at date, PRIMARY KEY (id, at)) "
        "PARTITION BY RANGE (at)"
    )
    empty_conn.execute(
        "CREATE TABLE measurements_2024 PARTITION OF measurements "
        "FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
    )
    whole = inspect_without_writing(empty_dsn, plan_of([{"name": "measurements", "schema": "x"}]))
    assert whole.problems == []
    alone = inspect_without_writing(
        empty_dsn, plan_of([{"name": "measurements_2024", "schema": "x"}])
    )
    assert [(p.subject, p.message) for p in alone.problems] == [
        ("public.measurements_2024", "is a partition of public.measurements"),
    ]
    assert "list measurements in the plan instead" in alone.problems[0].hint


def test_inheritance_is_refused_for_parent_and_child(empty_dsn: str, empty_conn: Conn) -> None:
    empty_conn.execute("CREATE TABLE vehicles (id int PRIMARY KEY, name text)")
    empty_conn.execute("CREATE TABLE cars (doors int, PRIMARY KEY (id)) INHERITS (vehicles)")
    for table in ("vehicles", "cars"):
        report = inspect_without_writing(empty_dsn, plan_of([{"name": table, "schema": "x"}]))
        assert [(p.subject, p.message) for p in report.problems] == [
            (f"public.{table}", "table inheritance is not supported")
        ]


def test_a_computed_column_needs_the_operator_to_confirm(cogito_dsn: str) -> None:
    mapping = {"content": {"up": "upper(content)", "down": "lower(content)"}}
    report = inspect_without_writing(
        cogito_dsn, plan_of([{"name": "turns", "schema": "x", "columns": mapping}])
    )
    p = problems(report)["public.turns.content"]
    assert "read-only through the compatibility view" in p.message
    assert "confirm_read_only_columns: true" in p.hint
    confirmed = plan_of(
        [{"name": "turns", "schema": "x", "columns": mapping, "confirm_read_only_columns": True}]
    )
    assert inspect_without_writing(cogito_dsn, confirmed).ok


def test_the_rename_strategy_cannot_change_columns(cogito_dsn: str) -> None:
    loaded = plan_of(
        [
            {
                "name": "turns",
                "schema": "x",
                "options": {"strategy": "rename"},
                "columns": {"timestamp": {"rename": "sent_at"}},
            }
        ]
    )
    p = problems(inspect_without_writing(cogito_dsn, loaded))["public.turns"]
    assert p.message == "the rename strategy cannot change columns"


def test_a_materialized_view_is_rebuilt_unless_its_shape_forbids(
    cogito_dsn: str, cogito_conn: Conn
) -> None:
    """A plain materialized view over a copy-moved table is accepted (cutover rebuilds it);
    one that views read is refused by name with the reason; rename moves it anyway."""
    cogito_conn.execute("CREATE MATERIALIZED VIEW prompt_counts AS SELECT count(*) FROM prompts")
    copy = plan_of([{"name": "prompts", "schema": "x"}])
    assert inspect_without_writing(cogito_dsn, copy).ok
    cogito_conn.execute("CREATE VIEW prompt_report AS SELECT * FROM prompt_counts")
    p = problems(inspect_without_writing(cogito_dsn, copy))["public.prompt_counts"]
    assert "materialized view reads public.prompts" in p.message
    assert "views read it" in p.message
    renamed = plan_of([{"name": "prompts", "schema": "x", "options": {"strategy": "rename"}}])
    assert inspect_without_writing(cogito_dsn, renamed).ok


def test_an_unsatisfiable_cycle_is_a_problem(cogito_dsn: str) -> None:
    loaded = plan_of(
        [
            {"name": "clients", "schema": "x", "depends_on": ["projects"]},
            {"name": "projects", "schema": "x"},
        ]
    )
    report = inspect_without_writing(cogito_dsn, loaded)
    p = problems(report)["clients, projects"]
    assert "depends_on makes a cycle" in p.message
    assert report.as_dict()["units"] == []


def test_a_plan_view_must_depend_on_plan_objects(cogito_dsn: str) -> None:
    loaded = plan_of(
        [{"name": "clients", "schema": "x"}],
        views=[{"name": "v", "sql": "SELECT 1", "depends_on": ["clients", "ghost"]}],
    )
    p = problems(inspect_without_writing(cogito_dsn, loaded))["view v depends_on ghost"]
    assert p.message == "is not a table or view of this plan"


# --- hostile identifiers ----------------------------------------------------------------------

NAME_63 = "ü" * 31 + "x"  # 63 bytes, the longest name PostgreSQL keeps
HOSTILE = [
    "Mixed Case",
    "semi;colon",
    'quo"te',
    "naïve_ünïcode",
    "drop table x; --",
    "it's",
    NAME_63,
]


def test_hostile_identifiers_validate_and_change_nothing(empty_dsn: str, empty_conn: Conn) -> None:
    previous = None
    for name in HOSTILE:
        if previous is None:
            create(empty_conn, "CREATE TABLE {} ({} bigint PRIMARY KEY)", name, "Id")
        else:
            create(
                empty_conn,
                "CREATE TABLE {} ({} bigint PRIMARY KEY, {} bigint REFERENCES {})",
                name,
                "Id",
                "parent;id",
                previous,
            )
        previous = name
    row = empty_conn.execute(
        "SELECT octet_length(relname) AS n FROM pg_class WHERE relname = %s", (NAME_63,)
    ).fetchone()
    assert row is not None and row["n"] == 63  # kept whole, not truncated

    loaded = plan_of(
        [
            {
                "name": name,
                "schema": 'Target "Schema"; x',
                "rename_to": name.upper(),
                "columns": {"parent;id": {"rename": 'Parent "Id"'}} if i else {},
            }
            for i, name in enumerate(HOSTILE)
        ],
        control_schema="Ctl; DROP",
    )
    before = untouched(empty_conn, loaded)
    assert len(before["relations"]) == len(HOSTILE)
    report = inspect_without_writing(empty_dsn, loaded)
    assert report.ok, report.problems
    assert sorted(m for members in report.as_dict()["units"] for m in members) == sorted(HOSTILE)
    assert untouched(empty_conn, loaded) == before
    assert before["schemas"] == ["public"]  # neither the target nor the control schema appeared


def test_a_schema_publication_would_lose_a_renamed_table_so_it_is_refused(
    empty_dsn: str, empty_conn: Conn
) -> None:
    empty_conn.execute("CREATE TABLE shipped (id int PRIMARY KEY)")
    empty_conn.execute("CREATE PUBLICATION everything FOR TABLES IN SCHEMA public")
    loaded = plan_of([{"name": "shipped", "schema": "x", "options": {"strategy": "rename"}}])
    found = problems(inspect_without_writing(empty_dsn, loaded))
    refusal = found["public.shipped (publication everything)"]
    assert "would silently leave the publication" in refusal.message
    assert "ALTER PUBLICATION everything ADD TABLE public.shipped" in refusal.hint
    # Listed by name too, the table stays published wherever it goes.
    empty_conn.execute("ALTER PUBLICATION everything ADD TABLE public.shipped")
    assert inspect_without_writing(empty_dsn, loaded).problems == []

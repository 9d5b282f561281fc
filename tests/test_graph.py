"""The move order an operator is shown: units (foreign-key cycles move together) in waves.

Built from the live Cogito catalog and plans/cogito.yaml, then from hand-made schemas for the
cases Cogito does not have: an unsatisfiable depends_on cycle, mixed strategies in a cycle, and
names that would break the mermaid or DOT output if they were not escaped.
"""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg
import pytest
import yaml
from conftest import COGITO_PLAN
from psycopg import sql

from orchestrator.model.catalog import read_catalog
from orchestrator.model.graph import DependencyGraph, build_graph, to_dot, to_json, to_mermaid
from orchestrator.model.validate import plan_schemas
from orchestrator.plan import Plan, load_plan, parse_plan

Conn = psycopg.Connection[Any]


def graph_of(conn: Conn, plan: Plan) -> DependencyGraph:
    return build_graph(plan, read_catalog(conn, plan_schemas(plan)))


def plan_of(tables: list[dict[str, Any]], views: list[dict[str, Any]] | None = None) -> Plan:
    doc: dict[str, Any] = {"version": 1, "name": "hand_made", "tables": tables}
    if views:
        doc["views"] = views
    return parse_plan(yaml.safe_dump(doc, allow_unicode=True)).plan


@pytest.fixture
def cogito(cogito_conn: Conn) -> DependencyGraph:
    return graph_of(cogito_conn, load_plan(COGITO_PLAN).plan)


def wave_of(dg: DependencyGraph, table: str) -> int:
    return dg.unit_of(table).wave


def test_users_and_participants_move_as_one_unit(cogito: DependencyGraph) -> None:
    assert cogito.problems == []
    unit = cogito.unit_of("users")
    assert unit is cogito.unit_of("participants")
    assert unit.members == ("participants", "users")
    assert unit.is_cycle
    cycles = [u for u in cogito.units if u.is_cycle]
    assert cycles == [unit]


def test_every_plan_table_is_in_exactly_one_unit(cogito: DependencyGraph) -> None:
    plan = load_plan(COGITO_PLAN).plan
    members = [m for u in cogito.units if u.kind == "tables" for m in u.members]
    assert sorted(members) == sorted(t.name for t in plan.tables)


def test_audit_log_is_outside_the_plan(cogito: DependencyGraph) -> None:
    assert cogito.outside_tables() == ["public.audit_log"]
    # Its foreign key points at users: it does not hold up any move.
    assert cogito.graph.has_edge("table:users", "outside:public.audit_log")
    assert all("audit_log" not in m for u in cogito.units for m in u.members)


def test_the_dependent_view_is_recreated_not_moved(cogito: DependencyGraph) -> None:
    assert cogito.dependent_views() == ["public.active_projects"]
    assert all(u.members != ("active_projects",) for u in cogito.units)


def test_parents_move_before_their_children(cogito: DependencyGraph) -> None:
    assert wave_of(cogito, "turns") > wave_of(cogito, "participants")
    assert wave_of(cogito, "participants") > wave_of(cogito, "clients")
    assert wave_of(cogito, "block_turns") > wave_of(cogito, "turns")
    assert wave_of(cogito, "block_turns") > wave_of(cogito, "blocks")
    assert wave_of(cogito, "blocks") > wave_of(cogito, "projects")
    assert wave_of(cogito, "client_users") > wave_of(cogito, "users")
    # Unit order is a topological order too: no unit comes before one it depends on.
    position = {m: u.id for u in cogito.units for m in u.members}
    for a, b in cogito.graph.edges():
        na, nb = cogito.graph.nodes[a], cogito.graph.nodes[b]
        if na["kind"] in ("table", "view") and nb["kind"] in ("table", "view"):
            assert position[na["name"]] <= position[nb["name"]], (na["name"], nb["name"])


def test_the_waves_of_cogito(cogito: DependencyGraph) -> None:
    waves = [sorted(m for u in w for m in u.members) for w in cogito.waves]
    assert waves == [
        ["clients", "lens_prototypes"],
        ["llm_configs", "participants", "projects", "prompts", "users"],
        ["blocks", "client_users", "patterns", "turns"],
        ["block_lens_version", "block_turns", "participant_users", "project_blocks"],
    ]
    assert [u.wave for u in cogito.units] == sorted(u.wave for u in cogito.units)
    assert [u.id for u in cogito.units] == list(range(1, len(cogito.units) + 1))


def test_the_self_reference_of_turns_is_allowed(cogito: DependencyGraph) -> None:
    unit = cogito.unit_of("turns")
    assert unit.members == ("turns",)
    assert not unit.is_cycle
    assert cogito.graph.nodes["table:turns"].get("self_reference") is True
    assert not cogito.graph.has_edge("table:turns", "table:turns")


def test_plan_views_come_after_every_table_they_read(cogito: DependencyGraph) -> None:
    views = {u.members[0]: u for u in cogito.units if u.kind == "view"}
    assert set(views) == {"participant_users", "project_blocks"}
    for table in ("participants", "users", "client_users", "clients"):
        assert views["participant_users"].wave > wave_of(cogito, table)
    for table in ("blocks", "projects", "clients"):
        assert views["project_blocks"].wave > wave_of(cogito, table)
    assert cogito.dependants("clients") == sorted(
        [
            "block_lens_version",
            "block_turns",
            "blocks",
            "client_users",
            "llm_configs",
            "participant_users",
            "participants",
            "patterns",
            "project_blocks",
            "projects",
            "prompts",
            "turns",
            "users",
        ]
    )


def test_depends_on_orders_unrelated_tables(cogito_conn: Conn) -> None:
    plan = plan_of(
        [
            {"name": "lens_prototypes", "schema": "x", "depends_on": ["prompts"]},
            {"name": "prompts", "schema": "x"},
            {"name": "clients", "schema": "x"},
        ]
    )
    dg = graph_of(cogito_conn, plan)
    assert dg.problems == []
    assert wave_of(dg, "lens_prototypes") > wave_of(dg, "prompts") > wave_of(dg, "clients")


def test_a_depends_on_cycle_is_a_problem_with_a_fix(cogito_conn: Conn) -> None:
    plan = plan_of(
        [
            {"name": "projects", "schema": "x", "depends_on": ["prompts"]},
            {"name": "prompts", "schema": "x", "depends_on": ["projects"]},
        ]
    )
    dg = graph_of(cogito_conn, plan)
    assert dg.units == []
    (problem,) = dg.problems
    assert problem.subject == "projects, prompts"
    assert "depends_on makes a cycle" in problem.message
    assert "remove one of the depends_on entries" in problem.hint


def test_depends_on_against_a_foreign_key_is_a_cycle_too(cogito_conn: Conn) -> None:
    """clients cannot wait for projects: projects references clients."""
    plan = plan_of(
        [
            {"name": "clients", "schema": "x", "depends_on": ["projects"]},
            {"name": "projects", "schema": "x"},
        ]
    )
    (problem,) = graph_of(cogito_conn, plan).problems
    assert problem.subject == "clients, projects"
    assert "depends_on makes a cycle" in problem.message


def test_a_foreign_key_cycle_with_two_strategies_is_a_problem(cogito_conn: Conn) -> None:
    plan = plan_of(
        [
            {"name": "users", "schema": "x"},
            {"name": "participants", "schema": "x", "options": {"strategy": "rename"}},
        ]
    )
    (problem,) = graph_of(cogito_conn, plan).problems
    assert problem.subject == "participants, users"
    assert "different strategies" in problem.message
    assert "same strategy" in problem.hint


def test_a_view_in_a_cycle_is_a_problem(cogito_conn: Conn) -> None:
    plan = plan_of(
        [{"name": "clients", "schema": "x"}],
        views=[
            {"name": "v1", "sql": "SELECT 1", "depends_on": ["clients", "v2"]},
            {"name": "v2", "sql": "SELECT 1", "depends_on": ["v1"]},
        ],
    )
    (problem,) = graph_of(cogito_conn, plan).problems
    assert problem.subject == "v1, v2"
    assert "a view is part of a dependency cycle" in problem.message


def test_a_partial_plan_treats_unmoved_parents_as_outside(cogito_conn: Conn) -> None:
    plan = plan_of([{"name": "turns", "schema": "conversation"}])
    dg = graph_of(cogito_conn, plan)
    assert [u.members for u in dg.units] == [("turns",)]
    assert dg.outside_tables() == [
        "public.block_turns",
        "public.llm_configs",
        "public.participants",
    ]


def test_the_json_output(cogito: DependencyGraph) -> None:
    data = json.loads(to_json(cogito))
    assert data["problems"] == []
    assert data["outside"] == ["public.audit_log"]
    cycle = [u for u in data["units"] if u["cycle"]]
    assert [u["members"] for u in cycle] == [["participants", "users"]]
    assert len(data["waves"]) == 4
    assert {"from": "participants", "to": "turns", "via": "fk"} in data["edges"]
    assert {"from": "users", "to": "public.audit_log", "via": "fk"} in data["edges"]


def test_the_mermaid_and_dot_outputs(cogito: DependencyGraph) -> None:
    mermaid = to_mermaid(cogito)
    assert mermaid.startswith("flowchart LR\n")
    assert "cycle" in mermaid
    assert_mermaid_well_formed(mermaid)
    dot = to_dot(cogito)
    assert dot.startswith("digraph plan {")
    assert dot.endswith("}")
    assert_dot_well_formed(dot)
    assert dot.count("subgraph cluster_u") == len(cogito.units)


# --- hostile names --------------------------------------------------------------------------

HOSTILE = 'we"ird; DROP'
NAMES = [HOSTILE, "Mixed Case", "naïve_ünïcode", "back\\slash", "semi;colon", "x#35;y"]

_ID = r"n[A-Za-z0-9_]+"
_MSTR = r'"[^"]*"'
_MERMAID_LINE = re.compile(
    rf"^(flowchart LR|  subgraph u\d+\[{_MSTR}\]|    {_ID}\[{_MSTR}\]|  end"
    rf"|  {_ID}\(\[{_MSTR}\]\)|  {_ID} (-->|-\.->) {_ID})$"
)
_DSTR = r'"(?:[^"\\]|\\.)*"'
_DOT_LINE = re.compile(
    rf"^(digraph plan \{{|  rankdir=LR;|  subgraph cluster_u\d+ \{{|    label={_DSTR};"
    rf"|    {_ID} \[label={_DSTR}\];|  \}}|\}}|  {_ID} \[label={_DSTR}, style=dashed\];"
    rf"|  {_ID} -> {_ID}( \[style=dotted\])?;)$"
)


def assert_mermaid_well_formed(text: str) -> None:
    for line in text.splitlines():
        assert _MERMAID_LINE.match(line), f"not a mermaid statement we write: {line!r}"
    # Outside entities, mermaid would read a bare ';' as the end of a statement.
    assert ";" not in re.sub(r"#\d+;", "", text)


def mermaid_labels(text: str) -> list[str]:
    return [
        re.sub(r"#(\d+);", lambda m: chr(int(m.group(1))), s)
        for s in re.findall(r'"([^"]*)"', text)
    ]


def assert_dot_well_formed(text: str) -> None:
    for line in text.splitlines():
        assert _DOT_LINE.match(line), f"not a DOT statement we write: {line!r}"


def dot_labels(text: str) -> list[str]:
    return [
        re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), s)
        for s in re.findall(r'label="((?:[^"\\]|\\.)*)"', text)
    ]


@pytest.fixture
def hostile(empty_conn: Conn) -> DependencyGraph:
    """A chain of tables with hostile names, an outside child, and a plan view over them."""
    previous = None
    for name in NAMES:
        ref = (
            sql.SQL(", parent bigint REFERENCES {}").format(sql.Identifier(previous))
            if previous
            else sql.SQL("")
        )
        empty_conn.execute(
            sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY{})").format(sql.Identifier(name), ref)
        )
        previous = name
    empty_conn.execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, w bigint REFERENCES {})").format(
            sql.Identifier('outside "child"'), sql.Identifier(HOSTILE)
        )
    )
    plan = plan_of(
        [{"name": n, "schema": 'Target "Schema"'} for n in NAMES],
        views=[{"name": 'view "of"; all', "sql": "SELECT 1", "depends_on": [NAMES[-1]]}],
    )
    return graph_of(empty_conn, plan)


def test_hostile_names_are_escaped_in_mermaid(hostile: DependencyGraph) -> None:
    assert hostile.problems == []
    text = to_mermaid(hostile)
    assert_mermaid_well_formed(text)
    labels = mermaid_labels(text)
    for name in NAMES:
        assert name in labels
    assert 'public.outside "child" (outside)' in labels
    assert 'view "of"; all' in labels
    assert HOSTILE not in text  # never raw


def test_hostile_names_are_escaped_in_dot(hostile: DependencyGraph) -> None:
    text = to_dot(hostile)
    assert_dot_well_formed(text)
    labels = dot_labels(text)
    for name in NAMES:
        assert name in labels
    assert 'public.outside "child"' in labels


def test_hostile_names_survive_json(hostile: DependencyGraph) -> None:
    data = json.loads(to_json(hostile))
    members = [m for u in data["units"] for m in u["members"]]
    assert sorted(members) == sorted([*NAMES, 'view "of"; all'])
    assert data["outside"] == ['public.outside "child"']


def test_node_ids_are_distinct_for_names_that_differ_only_in_escaping(empty_conn: Conn) -> None:
    """`a_5f_b` and `a_b` must not collapse into one mermaid/DOT node."""
    names = ["a_b", "a_5f_b", "a b", "a_20_b"]
    for name in names:
        empty_conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier(name))
        )
    dg = graph_of(empty_conn, plan_of([{"name": n, "schema": "x"} for n in names]))
    ids = set(re.findall(r"^    (n\w+)\[", to_mermaid(dg), flags=re.MULTILINE))
    assert len(ids) == len(names)

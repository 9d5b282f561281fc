"""The plan model: what an operator writes, and how a mistake in it is reported.

No database here: a plan is refused before anything connects. Every refusal is a PlanError
that names the file and the line, so the operator can go straight to the mistake.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import COGITO_PLAN

from orchestrator.errors import PlanError
from orchestrator.plan import (
    MAX_IDENT_BYTES,
    Strategy,
    load_plan,
    parse_plan,
    plan_json_schema,
)

MINIMAL = """\
version: 1
name: tiny
tables:
  - name: accounts
    schema: billing
"""


def refusal(text: str, path: str = "plan.yaml") -> PlanError:
    with pytest.raises(PlanError) as info:
        parse_plan(textwrap.dedent(text), path)
    return info.value


def test_the_cogito_plan_loads_with_its_tables_schemas_and_views() -> None:
    loaded = load_plan(COGITO_PLAN)
    plan = loaded.plan
    assert plan.name == "cogito"
    assert plan.source_schema == "public"
    assert {t.name for t in plan.tables} == {
        "clients",
        "users",
        "client_users",
        "projects",
        "llm_configs",
        "prompts",
        "participants",
        "blocks",
        "turns",
        "block_turns",
        "patterns",
        "lens_prototypes",
        "block_lens_version",
    }
    assert "audit_log" not in {t.name for t in plan.tables}  # it stays in public
    assert set(plan.schemas) == {"client_mgmt", "conversation"}
    assert plan.table("turns").columns["timestamp"].rename == "sent_at"
    # The design asks for the copy path on turns, users, participants and blocks.
    for name in ("turns", "users", "participants", "blocks"):
        assert plan.options_for(plan.table(name)).strategy == Strategy.copy
    assert plan.options_for(plan.table("clients")).strategy == Strategy.rename
    # A table override keeps the plan's other defaults.
    assert plan.options_for(plan.table("clients")).batch_size == 5000
    assert [v.name for v in plan.views] == ["participant_users", "project_blocks"]
    assert loaded.path == str(COGITO_PLAN)
    assert len(loaded.checksum) == 64


def test_the_checksum_follows_the_text() -> None:
    a = parse_plan(MINIMAL)
    b = parse_plan(MINIMAL + "# a comment\n")
    assert a.plan == b.plan
    assert a.checksum != b.checksum


def test_malformed_yaml_names_the_file_and_line() -> None:
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
            schema: [billing
        """,
        "plans/broken.yaml",
    )
    assert "plans/broken.yaml:" in err.message
    assert "not valid YAML" in err.message
    line = int(err.message.split("plans/broken.yaml:")[1].split(":")[0])
    assert line >= 5
    assert err.hint
    # Scripts reading `--format json` get the same location in the problem list.
    (problem,) = err.problems
    assert problem.startswith(f"plans/broken.yaml:{line}: not valid YAML: ")


def test_a_misspelt_field_is_named_with_its_line() -> None:
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
            schema: billing
            rename_too: ledgers
        """,
        "tiny.yaml",
    )
    assert err.problems == ["tiny.yaml:6: tables.0.rename_too is not a known field"]
    assert "tiny.yaml:6" in err.message


def test_an_unknown_top_level_field_is_refused() -> None:
    err = refusal(MINIMAL + "dry_run: true\n", "tiny.yaml")
    assert err.problems == ["tiny.yaml:6: dry_run is not a known field"]


def test_a_missing_required_field_is_named() -> None:
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
          - name: invoices
            schema: billing
        """,
        "tiny.yaml",
    )
    assert err.problems == ["tiny.yaml:4: tables.0.schema is required"]


def test_a_plan_without_tables_is_refused() -> None:
    err = refusal("version: 1\nname: tiny\n", "tiny.yaml")
    assert any("tables is required" in p for p in err.problems)


def test_every_problem_is_listed_at_once() -> None:
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
            schema: billing
            options: {batch_size: 0}
          - schema: billing
        """,
        "tiny.yaml",
    )
    assert len(err.problems) == 2
    assert any(p.startswith("tiny.yaml:6: tables.0.options.batch_size") for p in err.problems)
    assert "tiny.yaml:7: tables.1.name is required" in err.problems


def test_version_2_is_refused() -> None:
    err = refusal(MINIMAL.replace("version: 1", "version: 2"), "tiny.yaml")
    assert err.problems == ["tiny.yaml:1: version only version 1 is supported"]


def test_a_column_computed_up_without_down_is_refused() -> None:
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
            schema: billing
            columns:
              amount: {up: "amount * 100", type: bigint}
        """,
        "tiny.yaml",
    )
    assert len(err.problems) == 1
    assert err.problems[0].startswith("tiny.yaml:7: tables.0.columns.amount")
    assert "`up` and `down` go together" in err.problems[0]


def test_a_column_mapping_that_maps_nothing_is_refused() -> None:
    err = refusal(MINIMAL + "    columns:\n      amount: {}\n", "tiny.yaml")
    assert "give `rename`, or `up` and `down`" in err.message


def test_an_unknown_privilege_is_refused() -> None:
    err = refusal(
        MINIMAL + "schemas:\n  billing:\n    grants:\n      - {role: app, privileges: [SELCT]}\n",
        "tiny.yaml",
    )
    assert "unknown privilege ['SELCT']" in err.message


def test_privileges_are_normalised_to_upper_case() -> None:
    plan = parse_plan(
        MINIMAL + "schemas:\n  billing:\n    grants:\n      - {role: app, privileges: [select]}\n"
    ).plan
    assert plan.schemas["billing"].grants[0].privileges == ["SELECT"]


# A name of 63 bytes is the longest PostgreSQL keeps; at 64 it silently truncates, so two
# different names could become one. Count bytes, not characters: "ü" is two bytes in UTF-8.
NAME_63 = "ü" * 31 + "x"
NAME_64 = "ü" * 32


def test_identifier_lengths_are_counted_in_bytes() -> None:
    assert len(NAME_63.encode()) == MAX_IDENT_BYTES == 63
    assert len(NAME_64.encode()) == 64
    assert len(NAME_64) == 32  # well under 63 characters


def plan_text(**table: object) -> str:
    spec = {"name": "accounts", "schema": "billing", **table}
    return yaml.safe_dump({"version": 1, "name": "tiny", "tables": [spec]}, allow_unicode=True)


def test_a_63_byte_identifier_is_accepted() -> None:
    plan = parse_plan(plan_text(name=NAME_63, schema=NAME_63, rename_to=NAME_63)).plan
    assert plan.tables[0].name == NAME_63
    assert plan.tables[0].target_name == NAME_63


@pytest.mark.parametrize(
    ("field", "table"),
    [
        ("name", {"name": NAME_64}),
        ("schema", {"schema": NAME_64}),
        ("rename_to", {"rename_to": NAME_64}),
        ("key.0", {"key": [NAME_64]}),
        ("depends_on.0", {"depends_on": [NAME_64]}),
        (f"columns.{NAME_64}.[key]", {"columns": {NAME_64: {"rename": "x"}}}),
        ("columns.amount.rename", {"columns": {"amount": {"rename": NAME_64}}}),
    ],
)
def test_a_64_byte_identifier_is_refused_wherever_it_appears(
    field: str, table: dict[str, object]
) -> None:
    err = refusal(plan_text(**table), "tiny.yaml")
    assert len(err.problems) == 1
    assert f"tables.0.{field} is 64 bytes" in err.problems[0]
    assert "at most 63" in err.problems[0]


def test_a_64_byte_view_or_role_name_is_refused() -> None:
    err = refusal(
        MINIMAL
        + f"schemas:\n  billing:\n    usage: [{NAME_64}]\n"
        + f"views:\n  - name: {NAME_64}\n    sql: SELECT 1\n",
        "tiny.yaml",
    )
    assert sorted(p.split(": ", 1)[1] for p in err.problems) == [
        "schemas.billing.usage.0 is 64 bytes; PostgreSQL identifiers are at most 63",
        "views.0.name is 64 bytes; PostgreSQL identifiers are at most 63",
    ]


def test_an_empty_or_nul_identifier_is_refused() -> None:
    assert "tables.0.name" in refusal(plan_text(name="")).message
    assert "NUL" in refusal(plan_text(name="acc\x00ounts")).message


def test_hostile_identifiers_are_kept_exactly_as_written() -> None:
    """Quotes, semicolons, case and non-ASCII are data, never SQL: the plan keeps them verbatim."""
    names = ['we"ird; DROP TABLE x; --', "Mixed Case", "semi;colon", "naïve_ünïcode", "a.b"]
    text = yaml.safe_dump(
        {
            "version": 1,
            "name": "hostile",
            "tables": [{"name": n, "schema": "Target Schema"} for n in names],
        },
        allow_unicode=True,
    )
    plan = parse_plan(text).plan
    assert [t.name for t in plan.tables] == names
    assert {t.schema_ for t in plan.tables} == {"Target Schema"}


def test_a_table_listed_twice_is_refused() -> None:
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
            schema: billing
          - name: accounts
            schema: ledger
        """
    )
    assert "table 'accounts' is listed twice" in err.message


def test_two_tables_moving_to_the_same_name_are_refused() -> None:
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
            schema: billing
          - name: old_accounts
            schema: billing
            rename_to: accounts
        """
    )
    assert "two tables move to billing.accounts" in err.message


def test_a_key_given_twice_is_refused_not_silently_overwritten() -> None:
    """YAML keeps the last of two equal keys; a plan that says two things must not pick one."""
    err = refusal(
        """\
        version: 1
        name: tiny
        tables:
          - name: accounts
            schema: billing
            schema: ledger
        """,
        "tiny.yaml",
    )
    assert err.problems == ["tiny.yaml:6: schema is given twice (first at line 5)"]


def test_a_plan_that_is_not_a_mapping_is_refused() -> None:
    err = refusal("- just\n- a list\n", "list.yaml")
    assert err.message.startswith("list.yaml: a plan is a YAML mapping")


def test_a_missing_plan_file_is_a_plan_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(PlanError) as info:
        load_plan(missing)
    assert str(missing) in info.value.message
    assert "cannot read the plan" in info.value.message


def test_load_plan_errors_name_the_real_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(MINIMAL + "bogus: 1\n", encoding="utf-8")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert info.value.problems == [f"{path}:6: bogus is not a known field"]


def test_the_json_schema_is_valid_json_and_describes_tables() -> None:
    schema = json.loads(plan_json_schema())
    assert schema["type"] == "object"
    assert "tables" in schema["properties"]
    assert set(schema["required"]) == {"version", "name", "tables"}
    assert schema["additionalProperties"] is False
    table = schema["$defs"]["TableSpec"]
    assert "schema" in table["properties"]  # by alias, as the operator writes it
    assert "schema_" not in table["properties"]

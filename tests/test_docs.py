"""docs/plan-reference.md must not drift from the plan models.

The file is the output of `reference_markdown()`. If a field is added, renamed or re-described
in orchestrator/plan.py, this test fails until the reference is regenerated:

    .venv/bin/python -c "from orchestrator.plan import reference_markdown as r; \
        import sys; sys.stdout.write(r())" > docs/plan-reference.md
"""

from __future__ import annotations

import re

from conftest import ROOT

from orchestrator.plan import Plan, reference_markdown

REFERENCE = ROOT / "docs" / "plan-reference.md"


def sections(text: str) -> dict[str, str]:
    """The text under each `## Model` heading."""
    parts = re.split(r"^## (\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_reference_is_the_generator_output() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/plan-reference.md is stale: regenerate it (see this test's docstring)"
    )


def test_every_field_of_every_model_has_a_row_under_its_model() -> None:
    schema = Plan.model_json_schema(by_alias=True)
    models = {"Plan": schema, **schema["$defs"]}
    text = REFERENCE.read_text(encoding="utf-8")
    found = sections(text)
    assert set(found) == set(models)
    for name, model in models.items():
        for prop, spec in model.get("properties", {}).items():
            row = next(
                (line for line in found[name].splitlines() if line.startswith(f"| `{prop}` |")),
                None,
            )
            assert row is not None, f"{name}.{prop} is missing from the reference"
            if "description" in spec:
                assert spec["description"].replace("|", "\\|") in row
        if "enum" in model:
            for value in model["enum"]:
                assert f"`{value}`" in found[name]


def test_every_field_is_described() -> None:
    """An operator reads the reference: a row without a description tells them nothing."""
    schema = Plan.model_json_schema(by_alias=True)
    for name, model in {"Plan": schema, **schema["$defs"]}.items():
        for prop, spec in model.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{prop} has no description"


def test_required_fields_and_defaults_are_stated() -> None:
    found = sections(reference_markdown())
    assert "| `tables` | list of [TableSpec](#tablespec) | required |" in found["Plan"]
    assert "| `batch_size` | integer (>= 1, <= 1000000) | `10000` |" in found["Options"]
    assert '| `privileges` | list of string | `["SELECT"]` |' in found["TableGrant"]

"""The package layout: no import cycles, no oversized class or function, control tables written
only under orchestrator/state/, and docs that name every module and every command and draw the
control store's status transitions.

These tests read the source (tools/layout_check.py) and need no database. conftest.py starts a
test server in pytest_configure whatever the tests, so run them alone without it:

    .venv/bin/pytest tests/test_layout.py -q -p no:xdist --noconftest
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tools` is a top-level directory, not an installed package
    sys.path.insert(0, str(ROOT))

from tools import layout_check as layout  # noqa: E402

PACKAGE = ROOT / "orchestrator"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
RUNBOOK = ROOT / "docs" / "runbook.md"


def listing(lines: list[str]) -> str:
    return "".join(f"\n  {line}" for line in lines)


def test_every_module_parses() -> None:
    errors = layout.parse_errors(PACKAGE)
    assert not errors, "modules that cannot be parsed:" + listing([e.message for e in errors])


def test_no_import_cycles() -> None:
    cycles = layout.import_cycles(PACKAGE)
    assert not cycles, "import cycles:" + listing([" <-> ".join(c) for c in cycles])


def test_only_the_state_package_writes_control_tables() -> None:
    outside = [
        f"{w.module}:{w.line}  {w.statement}"
        for w in layout.control_writers(PACKAGE)
        if not layout.in_state_package(w.module, PACKAGE)
    ]
    assert not outside, "control tables written outside orchestrator/state/:" + listing(outside)


@pytest.mark.parametrize(
    ("kind", "limit"),
    [("class", layout.MAX_CLASS_LINES), ("function", layout.MAX_FUNCTION_LINES)],
)
def test_no_oversized_definitions(kind: str, limit: int) -> None:
    too_big = [
        f"{s.where} (lines {s.first}-{s.last}): {s.code_lines} code lines"
        for s in layout.sizes(PACKAGE)
        if s.kind == kind and s.code_lines > limit
    ]
    plural = {"class": "classes", "function": "functions"}[kind]
    assert not too_big, f"{plural} over {limit} code lines:" + listing(too_big)


def names(module: layout.Module) -> list[str]:
    """How the docs may name a module: `run/engine.py` or `orchestrator.run.engine`."""
    return [module.relpath, module.name]


def is_named(text: str, module: layout.Module) -> bool:
    path = rf"(?<![\w./]){re.escape(module.relpath)}(?!\w)"
    dotted = rf"(?<![\w.]){re.escape(module.name)}(?!\w|\.\w)"
    return bool(re.search(path, text) or re.search(dotted, text))


def test_every_module_is_named_in_the_architecture_doc() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = [
        " or ".join(names(m))
        for m in layout.modules(PACKAGE)
        if m.path.name != "__main__.py" and not m.reexport_only and not is_named(text, m)
    ]
    assert not missing, "modules not named in docs/architecture.md:" + listing(missing)


TRANSITIONS_BEGIN = "<!-- transitions:begin -->"
TRANSITIONS_END = "<!-- transitions:end -->"
# One edge of the stage state diagram: `    from --> to: change`.
EDGE = re.compile(r"^    (\w+) --> (\w+): (\w+)$")


def drawn_transitions(text: str) -> set[tuple[str, str, str]]:
    """The (from, to, change) edges drawn between the transition markers."""
    begin = text.find(TRANSITIONS_BEGIN)
    end = text.find(TRANSITIONS_END, begin + 1)
    assert begin >= 0 and end > begin, (
        f"docs/architecture.md needs a {TRANSITIONS_BEGIN} ... {TRANSITIONS_END} block"
    )
    edges: set[tuple[str, str, str]] = set()
    strays: list[str] = []
    for line in text[begin + len(TRANSITIONS_BEGIN) : end].splitlines():
        if "-->" not in line:
            continue
        match = EDGE.match(line)
        if match is None:
            strays.append(line)
        else:
            edges.add((match[1], match[2], match[3]))
    assert not strays, "arrows not in the form `    from --> to: change`:" + listing(strays)
    return edges


def store_transitions() -> set[tuple[str, str, str]]:
    """TRANSITIONS expanded: for change, (sources, target), each source -> target."""
    try:
        from orchestrator.state.store import TRANSITIONS
    except Exception as exc:  # a tree half-way through a move
        pytest.fail(f"cannot import orchestrator.state.store: {exc!r}", pytrace=False)
    return {
        (str(source.value), str(target.value), change)
        for change, (sources, target) in TRANSITIONS.items()
        for source in sources
    }


def test_the_state_diagram_draws_the_store_transitions() -> None:
    drawn = drawn_transitions(ARCHITECTURE.read_text(encoding="utf-8"))
    allowed = store_transitions()
    assert allowed, "orchestrator.state.store.TRANSITIONS is empty"

    def edges(found: set[tuple[str, str, str]]) -> list[str]:
        return [f"{a} --> {b}: {change}" for a, b, change in sorted(found)]

    assert drawn == allowed, (
        "docs/architecture.md's state diagram differs from TRANSITIONS in state/store.py"
        + ("\n missing:" + listing(edges(allowed - drawn)) if allowed - drawn else "")
        + ("\n not allowed:" + listing(edges(drawn - allowed)) if drawn - allowed else "")
    )


def commands(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    """Every visible command of a click group, sub-commands as `server start`."""
    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        path = (*prefix, name)
        if isinstance(getattr(command, "commands", None), dict):
            yield from commands(command, path) if command.commands else [" ".join(path)]
        else:
            yield " ".join(path)


def cli_commands() -> list[str]:
    try:
        import typer.main

        from orchestrator.cli import app
    except Exception as exc:  # a tree half-way through a move
        pytest.fail(f"cannot import the CLI from orchestrator.cli: {exc!r}", pytrace=False)
    return sorted(commands(typer.main.get_command(app)))


def test_every_command_is_in_the_runbook() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    found = cli_commands()
    assert found, "the CLI has no commands: is orchestrator.cli.app a group?"
    missing = [
        f"orchestrator {command}"
        for command in found
        if not re.search(
            r"(?<![\w-])orchestrator\s+"
            + r"\s+".join(map(re.escape, command.split()))
            + r"(?![\w-])",
            text,
        )
    ]
    assert not missing, "commands not mentioned in docs/runbook.md:" + listing(missing)

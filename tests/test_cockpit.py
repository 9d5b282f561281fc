"""The operator's cockpit, driven headless by keystrokes with Textual's pilot: the whole
Cogito move (apply, cutover, roll back one stage, cut over again), asserted in the database
and on the screen; read-only mode; and text snapshots of its screens."""

from __future__ import annotations

import asyncio
import html
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN

from orchestrator.cockpit.app import Cockpit, Settings
from orchestrator.plan import load_plan

SNAPSHOTS = Path(__file__).parent / "snapshots"


def screen_text(app: Cockpit) -> str:
    """The screen as lines of text, from the SVG Textual exports (what a person sees)."""
    svg = app.export_screenshot()
    lines: dict[float, list[tuple[float, str]]] = {}
    for m in re.finditer(r'<text[^>]*x="([\d.]+)"[^>]*y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        x, y, body = float(m.group(1)), float(m.group(2)), m.group(3)
        lines.setdefault(y, []).append((x, html.unescape(re.sub(r"<[^>]+>", "", body))))
    return "\n".join("".join(t for _, t in sorted(parts)).replace("\xa0", " ").rstrip()
                     for _, parts in sorted(lines.items()))


async def settle(app: Cockpit, pilot: Any, timeout: float = 120.0) -> None:
    """Wait for the action running in the background, then for the screen to catch up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await pilot.pause()
    while app.busy and loop.time() < deadline:
        await asyncio.sleep(0.1)
    assert not app.busy, f"still busy after {timeout} s: {app.busy}"
    await app.workers.wait_for_complete()
    app.action_refresh()
    await pilot.pause()


async def select(app: Cockpit, pilot: Any, table: str) -> None:
    names = [str(r.value) for r in app.query_one("#units").rows]  # type: ignore[attr-defined]
    app.query_one("#units").move_cursor(row=names.index(table))  # type: ignore[attr-defined]
    await pilot.pause()


def one(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def test_the_cockpit_drives_the_whole_move_by_keystrokes(cogito_dsn: str) -> None:
    async def story() -> None:
        app = Cockpit(Settings(cogito_dsn, load_plan(COGITO_PLAN), interval_s=3600))
        async with app.run_test(size=(160, 48)) as pilot:
            assert "apply" in screen_text(app)  # the next step of a plan never started
            await pilot.press("a")
            assert "Confirm: apply the whole plan up to verify" in screen_text(app)
            await pilot.press("y")
            await settle(app, pilot)
            assert app.status is not None
            assert {t.stage for t in app.status.tables} <= {"cutover", "rename"}, app.message
            await pilot.press("C", "y")
            await settle(app, pilot)
            assert all(t.stage == "finalize" for t in app.status.tables), app.message
            # One hold per swap: 13 tables in 12 units (participants and users swap as one).
            assert len(app.status.holds_ms) == 12, app.status.holds_ms
            assert one(cogito_dsn, "SELECT relkind FROM pg_class WHERE oid = "
                                   "'public.turns'::regclass") == "v"

            # Roll back one stage of turns: its cutover (keeping verify).
            await select(app, pilot, "turns")
            await pilot.press("u")
            assert "Confirm: roll back cutover of turns (keeping verify)" in screen_text(app)
            await pilot.press("y")
            await settle(app, pilot)
            turns = app.status.table("turns")
            assert turns.stage == "cutover" and turns.stages["cutover"].status == "rolled_back"
            assert one(cogito_dsn, "SELECT relkind FROM pg_class WHERE oid = "
                                   "'public.turns'::regclass") == "r"

            # And cut it over again.
            await pilot.press("c", "y")
            await settle(app, pilot)
            assert app.status.table("turns").stage == "finalize"
            assert one(cogito_dsn, "SELECT relkind FROM pg_class WHERE oid = "
                                   "'public.turns'::regclass") == "v"
            assert one(cogito_dsn, "SELECT count(*) FROM conversation.turns") == one(
                cogito_dsn, "SELECT count(*) FROM public.turns")
            text = screen_text(app)
            assert "done: cut turns over" in text
            # Every action is in the event log under the operator's database role.
            assert one(cogito_dsn, "SELECT count(DISTINCT operator) FROM _orchestrator.events "
                                   "WHERE plan = 'cogito'") == 1

    asyncio.run(story())


def test_read_only_watches_and_changes_nothing(cogito_dsn: str) -> None:
    async def story() -> None:
        app = Cockpit(Settings(cogito_dsn, load_plan(COGITO_PLAN), read_only=True,
                               interval_s=3600))
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.press("a", "n", "c", "U", "p")
            await pilot.pause()
            text = screen_text(app)
            assert "read-only cockpit: actions are off" in text
            assert "Confirm" not in text
            assert "(read-only)" in text

    asyncio.run(story())
    assert one(cogito_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = "
                           "'_orchestrator'") == 0


def test_pause_batch_size_and_throttle_are_keys(cogito_dsn: str) -> None:
    async def story() -> None:
        app = Cockpit(Settings(cogito_dsn, load_plan(COGITO_PLAN), interval_s=3600))
        async with app.run_test(size=(160, 48)) as pilot:
            await select(app, pilot, "turns")
            await pilot.press("p")
            await settle(app, pilot)
            assert app.status is not None and app.status.table("turns").paused
            assert "paused: the copy holds" in screen_text(app)
            await pilot.press("b", *"2500", "enter")
            await settle(app, pilot)
            await pilot.press("t", *"20", "enter")
            await settle(app, pilot)
            await pilot.press("p")  # resume
            await settle(app, pilot)
            assert not app.status.table("turns").paused

    asyncio.run(story())
    with psycopg.connect(cogito_dsn, autocommit=True) as conn:
        got = dict(conn.execute("SELECT key, value FROM _orchestrator.settings "
                                "WHERE table_name = 'turns'").fetchall())
    assert got == {"paused": False, "batch_size": 2500, "sleep_ms": 20}


def masked(text: str, role: str) -> str:
    """A screen with what changes from run to run masked: clock times, ages, paths, and the
    server's user (the operator's role in the history)."""
    text = re.sub(r"\d\d:\d\d:\d\d", "HH:MM:SS", text)
    text = re.sub(r"\d[\d,]* s ago", "N s ago", text)
    text = text.replace(f" by {role}", " by ROLE")
    return "\n".join(line.rstrip() for line in text.splitlines())


def check_snapshot(name: str, text: str) -> None:
    """Compare with tests/snapshots/NAME.txt (ORCHESTRATOR_UPDATE_SNAPSHOTS=1 rewrites)."""
    import os

    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("ORCHESTRATOR_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text + "\n", encoding="utf-8")
    assert path.exists(), f"no snapshot {path}: run with ORCHESTRATOR_UPDATE_SNAPSHOTS=1"
    assert text + "\n" == path.read_text(encoding="utf-8"), f"screen {name} changed:\n{text}"


def test_snapshots_of_the_screens(cogito_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The plan by its relative path, as an operator types it: the screen (where its lines
    # wrap) must not depend on where the repository was cloned.
    monkeypatch.chdir(COGITO_PLAN.parent.parent)
    # The detail names who holds locks on the table now: no autovacuum may turn up there.
    with psycopg.connect(cogito_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.turns SET (autovacuum_enabled = false)")

    async def story() -> None:
        app = Cockpit(Settings(cogito_dsn, load_plan(Path("plans/cogito.yaml")),
                               interval_s=3600))
        role = one(cogito_dsn, "SELECT current_user")
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.pause()
            check_snapshot("cockpit_not_started", masked(screen_text(app), role))
            await select(app, pilot, "turns")
            await pilot.press("U")  # nothing to roll back: said, not asked
            await pilot.pause()
            assert "turns: nothing to roll back" in screen_text(app)
            await pilot.press("a")
            await pilot.pause()
            check_snapshot("cockpit_confirm", masked(screen_text(app), role))
            await pilot.press("y")
            await settle(app, pilot)
            await select(app, pilot, "turns")
            await app.workers.wait_for_complete()
            await pilot.pause()
            check_snapshot("cockpit_verified", masked(screen_text(app), role))

    asyncio.run(story())

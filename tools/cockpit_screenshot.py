"""Render the cockpit to an SVG for the docs: the Cogito plan applied up to verify, turns
selected, as an operator sees it (run by hand; needs a database with the Cogito sample).

    .venv/bin/python -m tools.cockpit_screenshot DSN docs/cockpit.svg
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from orchestrator.cockpit.app import Cockpit, Settings
from orchestrator.plan import load_plan

PLAN = Path("plans/cogito.yaml")  # relative, as an operator types it (run from the repository)


async def shoot(dsn: str, out: Path) -> None:
    app = Cockpit(Settings(dsn, load_plan(PLAN), interval_s=3600))
    async with app.run_test(size=(150, 34)) as pilot:
        await pilot.press("a", "y")
        while app.busy:
            await asyncio.sleep(0.2)
        await app.workers.wait_for_complete()
        app.action_refresh()
        table = app.query_one("#units")
        names = [str(r.value) for r in table.rows]  # type: ignore[attr-defined]
        table.move_cursor(row=names.index("turns"))  # type: ignore[attr-defined]
        await pilot.pause()
        await asyncio.sleep(2.0)  # the detail loads in a worker
        await app.workers.wait_for_complete()
        await pilot.pause()
        out.write_text(app.export_screenshot(title="orchestrator cockpit"), encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(shoot(sys.argv[1], Path(sys.argv[2])))

"""Rich renderers: validation reports, the graph, status tables, the event log.

Renderers take a Console so tests can record what an operator sees.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.model.graph import DependencyGraph
from orchestrator.model.validate import Report
from orchestrator.plan import Plan, Strategy
from orchestrator.state.store import RENAME_STAGES, STAGES, StageRow

STATUS_STYLE = {
    "pending": "dim",
    "running": "bold yellow",
    "done": "green",
    "failed": "bold red",
    "rolled_back": "magenta",
}


def print_validation(console: Console, report: Report) -> None:
    if report.ok:
        console.print(
            f"[green]plan {report.plan.name} is valid[/]: "
            f"{len(report.plan.tables)} tables in "
            f"{sum(u.kind == 'tables' for u in report.graph.units)} units",
            highlight=False,
        )
    else:
        console.print(
            f"[bold red]plan {report.plan.name} has {len(report.problems)} problem(s)[/]",
            highlight=False,
        )
    for kind, items, style in (
        ("problem", report.problems, "red"),
        ("warning", report.warnings, "yellow"),
    ):
        for p in items:
            console.print(Text.assemble((f"{kind}: ", style), (p.subject, "bold"), ": ", p.message))
            console.print(Text.assemble(("  fix: ", "cyan"), p.hint))


def print_graph(console: Console, dg: DependencyGraph) -> None:
    if dg.problems:
        for p in dg.problems:
            console.print(
                Text.assemble(("cycle problem: ", "red"), (p.subject, "bold"), ": ", p.message)
            )
            console.print(Text.assemble(("  fix: ", "cyan"), p.hint))
        return
    for i, wave in enumerate(dg.waves):
        console.print(Text(f"wave {i}", style="bold"))
        for u in wave:
            tag = " [cycle: moves as one unit]" if u.is_cycle else ""
            kind = "view" if u.kind == "view" else "unit"
            console.print(
                Text.assemble(f"  {kind} {u.id}: ", (", ".join(u.members), "cyan"), (tag, "yellow"))
            )
    outside = dg.outside_tables()
    if outside:
        console.print(Text("outside the plan (not moved, foreign keys re-pointed):", style="bold"))
        for name in outside:
            console.print(Text.assemble("  ", (name, "magenta"), " (outside)"))
    dependents = dg.dependent_views()
    if dependents:
        console.print(
            Text("views outside the plan that read moved tables (recreated):", style="bold")
        )
        for name in dependents:
            console.print(Text.assemble("  ", (name, "magenta"), " (dependent view)"))


def _stages_for(plan: Plan, table: str) -> tuple[str, ...]:
    spec = plan.table(table)
    return RENAME_STAGES if plan.options_for(spec).strategy == Strategy.rename else STAGES


_SHORT = {"prepare": "prep", "dual_write": "dual", "copy": "copy", "verify": "verify",
          "cutover": "swap", "finalize": "final"}


def _progress_cells(stages: dict[str, StageRow]) -> tuple[str, str, str]:
    """rows done/estimated, rate and ETA of the copy (or of verify while it runs)."""
    row = stages.get("verify") if stages.get("verify") and stages["verify"].status == "running" \
        else stages.get("copy")
    if row is None or not row.rows_estimated:
        return "", "", ""
    done, est = row.rows_done, max(row.rows_estimated, row.rows_done)
    rate = f"{row.rows_per_s:,.0f}/s" if row.rows_per_s else ""
    eta = ""
    if row.status == "running" and row.rows_per_s:
        eta = f"{max(est - done, 0) / row.rows_per_s:,.0f} s"
    return f"{done:,}/{est:,}", rate, eta


def status_table(plan: Plan, rows: list[StageRow]) -> Table:
    """Tables by stages, coloured by status, with progress and the last error."""
    by_table: dict[str, dict[str, StageRow]] = {}
    for r in rows:
        by_table.setdefault(r.table_name, {})[r.stage] = r
    table = Table(title=f"plan {plan.name}", expand=False)
    table.add_column("table", style="bold", no_wrap=True)
    for stage in STAGES:
        table.add_column(_SHORT[stage], no_wrap=True)
    for col in ("rows", "rate", "eta"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("last error", overflow="fold", max_width=40)
    for spec in plan.tables:
        stages = by_table.get(spec.name, {})
        names = _stages_for(plan, spec.name)
        cells: list[Text] = []
        for stage in STAGES:
            # The rename strategy's one stage is its swap: shown in the cutover column.
            key = "rename" if stage == "cutover" and "rename" in names else stage
            cell = stages.get(key)
            if key not in names:
                cells.append(Text("·", style="dim"))
            elif cell is None:
                cells.append(Text("pending", style="dim"))
            else:
                cells.append(Text(cell.status, style=STATUS_STYLE.get(cell.status, "")))
        errors = [r.last_error for r in stages.values() if r.last_error]
        label = spec.name + (" (rename)" if "rename" in names else "")
        table.add_row(label, *cells, *_progress_cells(stages), errors[-1] if errors else "")
    return table


def status_view(plan: Plan, rows: list[StageRow], events: list[dict[str, Any]]) -> Any:
    """The status table and, after a lock wait, who held the lock (status and watch)."""
    from datetime import datetime

    from rich.console import Group

    if not rows:
        return Text(f"plan {plan.name} has not started: nothing recorded yet "
                    f"(run `orchestrator apply PLAN`)")
    parts: list[Any] = [status_table(plan, rows)]
    blocked = [e for e in events if e["outcome"] == "lock_timeout"]
    if blocked:
        e = blocked[-1]
        parts.append(Text.assemble(("last lock wait: ", "yellow"),
                                   f"{e['table_name']} {e['stage']} at {e['at']:%H:%M:%S}: ",
                                   _blockers_text(e.get("detail") or {})))
    parts.append(Text(f"as of {datetime.now():%H:%M:%S}", style="dim"))
    return Group(*parts)


def print_status(console: Console, plan: Plan, rows: list[StageRow],
                 events: list[dict[str, Any]]) -> None:
    console.print(status_view(plan, rows, events))


def _blockers_text(detail: dict[str, Any]) -> str:
    blockers = detail.get("blockers") or []
    if not blockers:
        return "blocker unknown"
    return "; ".join(
        f"pid {b['pid']} ({b.get('role')}, {b.get('application_name') or '-'}, "
        f"{b.get('state')}, xact age {b.get('xact_age')}): {b.get('query')}"
        for b in blockers
    )


def print_history(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="event log")
    for col in ("id", "at", "table", "stage", "action", "outcome", "ms", "operator"):
        table.add_column(col)
    for e in rows:
        table.add_row(
            str(e["id"]),
            f"{e['at']:%Y-%m-%d %H:%M:%S}",
            e["table_name"] or "",
            e["stage"] or "",
            e["action"],
            Text(e["outcome"], style="red" if e["outcome"] != "ok" else "green"),
            f"{e['duration_ms']:.1f}" if e["duration_ms"] is not None else "",
            e["operator"],
        )
    console.print(table)


class Reporter:
    """Shows engine events: progress bars on a terminal, structured log lines otherwise."""

    def __init__(self, console: Console, json_mode: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        from orchestrator import log

        self.console = console
        self.live = console.is_terminal and not json_mode
        self.log = log.get()
        self.tasks: dict[tuple[str, str], Any] = {}
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._last_log = 0.0

    def __enter__(self) -> Reporter:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def event(self, e: dict[str, Any]) -> None:
        import time

        table, stage = str(e.get("table", "")), str(e.get("stage", ""))
        if "rows_done" in e:
            if self.live:
                key = (table, stage)
                rate = f"{e.get('rate', 0):,.0f} rows/s"
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(
                        f"{stage} {table}", total=e["rows_estimated"], rate=rate
                    )
                self.progress.update(
                    self.tasks[key], completed=e["rows_done"], total=e["rows_estimated"], rate=rate
                )
            elif time.monotonic() - self._last_log > 2.0:
                self._last_log = time.monotonic()
                self.log.info(
                    "progress",
                    table=table,
                    stage=stage,
                    rows=e["rows_done"],
                    estimated=e["rows_estimated"],
                    rate=round(e.get("rate", 0)),
                )
        elif "status" in e:
            if self.live:
                mark = "[green]✓[/]" if e["status"] == "done" else "[magenta]↺[/]"
                self.progress.console.print(
                    f"{mark} {table}: {stage} {e['status']}", highlight=False
                )
            else:
                self.log.info("stage", table=table, stage=stage, status=e["status"])
        elif "lock_wait" in e:
            self.log.warning(
                "lock wait",
                table=table,
                stage=stage,
                attempt=e["lock_wait"],
                blockers=[b.get("pid") for b in e.get("blockers", [])],
            )
        elif "paused" in e:
            self.log.info("throttled", table=table, stage=stage, reason=e["paused"])


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n //= 1024
    return f"{n} PB"


def print_dry_run(console: Console, d: Any, show_sql: bool = True) -> None:
    """A dry-run for people: per table, what, why, how long, the risks and (unless the plan is
    too large to read that way) every statement."""
    from rich.panel import Panel
    from rich.syntax import Syntax

    rate = f"{d.copy_rate:,.0f} rows/s ({d.rate_source})" if d.copy_rate else d.rate_source
    console.print(Text.assemble(("dry-run of plan ", "bold"), (d.plan, "bold cyan"),
                                " — nothing is changed. Copy rate: ", rate))
    for s in d.sessions:
        console.print(Text.assemble(("long-running transaction now: ", "yellow"),
                                    f"pid {s['pid']} ({s['role']}, "
                                    f"{s['application_name'] or '-'}, {s['state']}, "
                                    f"open {s['xact_age']}): {s['query']}"))
    compact: list[Text] = []  # a large plan: a few lines per table, printed at once
    for t in d.tables:
        expected = f", expected copy {t.expected_s:,.1f} s" if t.expected_s is not None else ""
        head = Text.assemble((t.table, "bold"), " → ", (t.target, "cyan"),
                             f"  unit {t.unit}{' (cycle)' if t.cycle else ''}, wave {t.wave}, "
                             f"{t.rows:,} rows, {_size(t.bytes)}{expected}")
        body = [Text.assemble(("strategy: ", "bold"), t.reason)]
        body += [Text.assemble(("risk: ", "yellow"), r) for r in t.risks]
        if not show_sql:
            compact += [head, *(Text.assemble("    ", b) for b in body)]
            continue
        console.print(Panel(Text("\n").join(body), title=head, title_align="left"))
        for s in t.stages:
            console.print(Text.assemble(("  ", ""), (s.stage, "bold magenta"),
                                        f" [{s.status}]", (f"  {s.note}" if s.note else "",
                                                           "dim")))
            for st in s.forward:
                if st.locks:
                    waits = (f"; would wait behind pid {', '.join(map(str, st.waits_behind))}"
                             if st.waits_behind else "")
                    console.print(Text(f"    -- locks: {st.locks}{waits}", style="dim"))
                console.print(Syntax(st.sql, "sql", word_wrap=True, padding=(0, 0, 0, 4)))
            if s.rollback:
                console.print(Text("    rollback:", style="bold"))
                for st in s.rollback:
                    console.print(Syntax(st.sql, "sql", word_wrap=True, padding=(0, 0, 0, 6)))
    if compact:
        console.print(Text("\n").join(compact), soft_wrap=True)  # wrapping 6k lines: 1 s

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
from orchestrator.plan import Plan
from orchestrator.run.events import Event, LockWait, Rows, StageChanged
from orchestrator.stages.base import Kind, Phase, Stage
from orchestrator.stages.registry import COPY_STRATEGY, STRATEGIES, Strategy
from orchestrator.state.store import StageRow

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


def _column_stage(strategy: Strategy, column: Stage) -> str | None:
    """The table's stage shown in a column of the copy strategy's stages: the same stage, or
    the stage of the same phase (the rename strategy's one stage is its swap)."""
    if column.name in strategy.names:
        return column.name
    if column.phase != Phase.apply:
        same = strategy.in_phase(column.phase)
        return same[0].name if same else None
    return None


def _progress_cells(strategy: Strategy, stages: dict[str, StageRow]) -> tuple[str, str, str]:
    """rows done/estimated, rate and ETA of the first loop stage (the copy), or of a later
    one while it runs (verify)."""
    loops = [stages[s.name] for s in strategy.stages if s.kind == Kind.loop and s.name in stages]
    running = [r for r in loops if r.status == "running"]
    row = running[-1] if running else (loops[0] if loops else None)
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
    columns = COPY_STRATEGY.stages
    for column in columns:
        table.add_column(column.short, no_wrap=True)
    for col in ("rows", "rate", "eta"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("last error", overflow="fold", max_width=40)
    for spec in plan.tables:
        stages = by_table.get(spec.name, {})
        strategy = STRATEGIES[plan.options_for(spec).strategy]
        cells: list[Text] = []
        for column in columns:
            key = _column_stage(strategy, column)
            cell = stages.get(key) if key else None
            if key is None:
                cells.append(Text("·", style="dim"))
            elif cell is None:
                cells.append(Text("pending", style="dim"))
            else:
                cells.append(Text(cell.status, style=STATUS_STYLE.get(cell.status, "")))
        errors = [r.last_error for r in stages.values() if r.last_error]
        label = spec.name + ("" if strategy is COPY_STRATEGY else f" ({strategy.name})")
        table.add_row(label, *cells, *_progress_cells(strategy, stages),
                      errors[-1] if errors else "")
    return table


def status_view(plan: Plan, rows: list[StageRow], events: list[dict[str, Any]],
                proofs: dict[str, dict[str, Any]] | None = None) -> Any:
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
    for table, p in (proofs or {}).items():
        parts.append(Text.assemble(
            ("proof: ", "cyan"), f"{table}: full pass {p['full_pass_at']:%Y-%m-%d %H:%M:%S}, "
            f"{p['chunks']} chunks, all equal as of {p['checked_at']:%H:%M:%S}; "
            f"{p.get('changed_keys', 0)} keys changed since, to re-check"))
    for table, n in suspects(events).items():
        parts.append(Text.assemble(
            ("suspect: ", "red"), f"{table}: {n} chunk repairs by verify; some write path may "
            "bypass the capture trigger (a session with session_replication_role = replica, "
            "or writes straight into the new table)"))
    for e in still_waiting(events):
        detail = e.get("detail") or {}
        why = "; ".join(detail.get("gates") or [detail.get("forecast") or "?"])
        parts.append(Text.assemble(("waiting: ", "yellow"),
                                   f"{e['table_name']} {e['stage']} since {e['at']:%H:%M:%S}: ",
                                   why))
    parts.append(Text(f"as of {datetime.now():%H:%M:%S}", style="dim"))
    return Group(*parts)


def suspects(events: list[dict[str, Any]]) -> dict[str, int]:
    """Tables verify had to repair more than once: a hint of a write path the capture
    misses."""
    counts: dict[str, int] = {}
    for e in events:
        if e["outcome"] == "repair" and e["table_name"]:
            counts[e["table_name"]] = counts.get(e["table_name"], 0) + 1
    return {t: n for t, n in counts.items() if n > 1}


def still_waiting(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per table, its latest event when that is a wait (a gate or the stall forecast): the
    swap is holding, or was when its command stopped."""
    latest: dict[str, dict[str, Any]] = {}
    for e in events:  # oldest first
        if e["table_name"]:
            latest[e["table_name"]] = e
    return [e for e in latest.values() if e["outcome"] == "waiting"]


def print_status(console: Console, plan: Plan, rows: list[StageRow],
                 events: list[dict[str, Any]],
                 proofs: dict[str, dict[str, Any]] | None = None) -> None:
    console.print(status_view(plan, rows, events, proofs))


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

    def event(self, e: Event) -> None:
        import time

        if isinstance(e, Rows):
            if self.live:
                key = (e.table, e.stage)
                rate = f"{e.rate:,.0f} rows/s"
                # A partitioned table's bar names the partition being worked on.
                label = f"{e.stage} {e.table}" + (f" ({e.part})" if e.part else "")
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(
                        label, total=e.rows_estimated, rate=rate
                    )
                self.progress.update(
                    self.tasks[key], completed=e.rows_done, total=e.rows_estimated, rate=rate,
                    description=label,
                )
            elif time.monotonic() - self._last_log > 2.0:
                self._last_log = time.monotonic()
                self.log.info("progress", table=e.table, stage=e.stage, rows=e.rows_done,
                              estimated=e.rows_estimated, rate=round(e.rate), partition=e.part)
        elif isinstance(e, StageChanged):
            if self.live:
                mark = "[green]✓[/]" if e.status == "done" else "[magenta]↺[/]"
                self.progress.console.print(
                    f"{mark} {e.table}: {e.stage} {e.status}", highlight=False
                )
            else:
                self.log.info("stage", table=e.table, stage=e.stage, status=e.status)
        elif isinstance(e, LockWait):
            self.log.warning("lock wait", table=e.table, stage=e.stage, attempt=e.attempt,
                             blockers=[b.get("pid") for b in e.blockers])
        else:
            self.log.info("throttled", table=e.table, stage=e.stage, reason=e.reason)


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

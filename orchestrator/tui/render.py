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
from orchestrator.observe.status import PlanStatus, TableStatus
from orchestrator.run.events import Event, LockWait, Paused, Rows, StageChanged, StageFailed
from orchestrator.stages.base import Phase, Stage
from orchestrator.stages.registry import COPY_STRATEGY, STRATEGIES, Strategy

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


NARROW = 100  # below this many columns, status prints one line per table


def _column_stage(strategy: Strategy, column: Stage) -> str | None:
    """The table's stage shown in a column of the copy strategy's stages: the same stage, or
    the stage of the same phase (the rename strategy's one stage is its swap)."""
    if column.name in strategy.names:
        return column.name
    if column.phase != Phase.apply:
        same = strategy.in_phase(column.phase)
        return same[0].name if same else None
    return None


def _seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 120:
        return f"{s:,.0f} s"
    return f"{s / 60:,.0f} min" if s < 7200 else f"{s / 3600:,.1f} h"


def progress_cells(t: TableStatus) -> tuple[str, str, str]:
    """Rows done/estimated, rate and ETA of the table's loop stage."""
    if not t.rows_estimated:
        return "", "", ""
    rate = f"{t.rate:,.0f}/s" if t.rate else ""
    return f"{t.rows_done:,}/{t.rows_estimated:,}", rate, _seconds(t.eta_s)


def _label(t: TableStatus) -> str:
    return t.name + ("" if t.strategy == COPY_STRATEGY.name else f" ({t.strategy})")


def _log(t: TableStatus) -> str:
    if t.log_depth is None:
        return ""
    return f"{t.log_depth:,}" + (" rev" if t.log_direction == "reverse" else "")


def lag_note(t: TableStatus) -> str:
    """How far a table's subscriber on the other side is behind."""
    lag = t.lag
    assert lag is not None
    way = (f"source → {lag.server}" if lag.direction == "forward"
           else f"{lag.server} → source (the way back)")
    if lag.behind_bytes is None:
        return f"{way}: no slot"
    return f"{way}: {lag.behind_bytes:,} bytes behind ({lag.behind_s or 0:.1f} s)"


def replay_note(t: TableStatus) -> str:
    """What the replayer (`apply --follow`) does for the table's log, and when the log will
    be caught up at its rates."""
    r = t.replay
    if r is None:
        return ""
    pace = f"{r.mode} {r.duty:.0%}" if r.mode == "adaptive" else r.mode
    rates = f"replaying {r.replayed_per_s:,.0f}/s"
    if r.logged_per_s is not None:
        rates += f", logging {r.logged_per_s:,.0f}/s"
    when = ("caught up" if r.catch_up_s == 0 else
            f"caught up in ~{_seconds(r.catch_up_s)}" if r.catch_up_s is not None
            else "not catching up at these rates")
    return f"replayer ({pace}): {rates}; {when}"


def status_table(ps: PlanStatus) -> Table:
    """Tables by stages, coloured by status, with progress, log depth and proof age (wide)."""
    table = Table(title=f"plan {ps.plan}", expand=False)
    table.add_column("table", style="bold", no_wrap=True)
    table.add_column("wave", justify="right")
    columns = COPY_STRATEGY.stages
    for column in columns:
        table.add_column(column.short, no_wrap=True)
    for col in ("rows", "rate", "eta", "log", "verified"):
        table.add_column(col, justify="right", no_wrap=True)
    for t in ps.tables:
        strategy = STRATEGIES[t.strategy]
        cells: list[Text] = []
        for column in columns:
            key = _column_stage(strategy, column)
            if key is None:
                cells.append(Text("·", style="dim"))
                continue
            status = t.stages[key].status
            cells.append(Text(status, style=STATUS_STYLE.get(status, "")))
        verified = "" if t.verified_age_s is None else _seconds(t.verified_age_s) + " ago"
        table.add_row(_label(t), "" if t.wave is None else str(t.wave), *cells,
                      *progress_cells(t), _log(t), verified)
    return table


def status_lines(ps: PlanStatus) -> list[Text]:
    """One line per table (narrow terminals, CI logs, `status | less`)."""
    lines = [Text(f"plan {ps.plan}", style="bold")]
    for t in ps.tables:
        rows, rate, eta = progress_cells(t)
        where = (Text.assemble((t.stage, "bold"), " ", (t.state, STATUS_STYLE.get(t.state, "")))
                 if t.stage else Text("final", style="green"))
        extra = "  ".join(x for x in (rows, rate, f"eta {eta}" if eta else "",
                                      f"log {_log(t)}" if t.log_depth else "") if x)
        lines.append(Text.assemble("  ", (_label(t), "bold"), ": ", where,
                                   f"  {extra}" if extra else ""))
    return lines


def status_view(ps: PlanStatus, width: int = 120) -> Any:
    """Where the plan stands: the stage table (or, narrower than NARROW columns, a line per
    table), then what needs the operator: errors with their hints, lock waits, gates,
    suspects, proofs and the next steps. Long texts are their own lines, never a column."""
    from rich.console import Group

    if not ps.started:
        return Group(
            Text(f"plan {ps.plan} has not started: nothing recorded yet"),
            *_next_steps(ps))
    parts: list[Any] = [status_table(ps) if width >= NARROW else Group(*status_lines(ps))]
    for t in ps.tables:
        parts += _notes(t)
    if ps.eta_s:
        parts.append(Text(f"plan ETA: {_seconds(ps.eta_s)}", style="cyan"))
    parts += _next_steps(ps)
    parts.append(Text(f"as of {ps.as_of[11:19]} UTC", style="dim"))
    return Group(*parts)


def _notes(t: TableStatus) -> list[Text]:
    notes: list[Text] = []
    if t.last_error:
        notes.append(Text.assemble(("error: ", "bold red"), (t.name, "bold"), ": ",
                                   t.last_error))
        if t.hint:
            notes.append(Text.assemble(("  hint: ", "cyan"), t.hint))
    if t.last_lock_wait:
        w = t.last_lock_wait
        notes.append(Text.assemble(("last lock wait: ", "yellow"),
                                   f"{t.name} {w.stage} at {w.at[11:19]}: ",
                                   _blockers_text({"blockers": list(w.blockers)})))
    if t.waiting:
        notes.append(Text.assemble(("waiting: ", "yellow"), f"{t.name} {t.stage}: {t.waiting}"))
    if t.paused:
        notes.append(Text.assemble(("paused: ", "yellow"), f"{t.name}: the copy holds "
                                   "between batches (`set PLAN paused false` resumes)"))
    if t.replay:
        notes.append(Text.assemble(("log: ", "cyan"), f"{t.name}: {replay_note(t)}"))
    if t.lag:
        notes.append(Text.assemble(("replication: ", "cyan"), f"{t.name}: {lag_note(t)}"))
    if t.repairs > 1:
        notes.append(Text.assemble(
            ("suspect: ", "red"), f"{t.name}: {t.repairs} chunk repairs by verify; some write "
            "path may bypass the capture trigger (a session with session_replication_role = "
            "replica, or writes straight into the new table)"))
    if t.proof:
        p = t.proof
        notes.append(Text.assemble(
            ("proof: ", "cyan"), f"{t.name}: full pass {p['full_pass_at'][:19]}, "
            f"{p['chunks']} chunks, all equal as of {p['checked_at'][11:19]}; "
            f"{p.get('changed_keys', 0)} keys changed since, to re-check"))
    return notes


def _next_steps(ps: PlanStatus) -> list[Text]:
    if not ps.next_steps:
        return [Text("next: nothing; every table is final", style="green")]
    return [Text("next:", style="bold"), *(Text(f"  {s}") for s in ps.next_steps)]


def print_status(console: Console, ps: PlanStatus) -> None:
    console.print(status_view(ps, console.width))


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
        elif isinstance(e, Paused):
            self.log.info("throttled", table=e.table, stage=e.stage, reason=e.reason)
        elif isinstance(e, StageFailed):
            self.log.error("stage failed", table=e.table, stage=e.stage, error=e.error)


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

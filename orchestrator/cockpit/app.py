"""The operator's cockpit: the plan's units by wave, live from the control schema, a table's
detail, and keys for the next phase, each action confirmed and run through the core.

It reads the status model (observe/status.py) every second on connections of its own, so it
works beside an `apply` running elsewhere; each action opens a session like a CLI command
(run/actions.py) in a worker thread, so the screen stays live while a copy runs. The cockpit
prints nothing and decides nothing itself: what the next stage is, what a rollback keeps and
what gets recorded are the core's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.console import Group
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static

from orchestrator.cockpit.screens import Ask, Confirm, Reader
from orchestrator.errors import OrchestratorError
from orchestrator.observe import detail as details
from orchestrator.observe import status as status_model
from orchestrator.observe.status import PlanStatus, TableStatus
from orchestrator.plan import LoadedPlan
from orchestrator.run import actions
from orchestrator.run.actions import Action, Kind
from orchestrator.run.events import Event, LockWait, Paused, Rows, StageChanged, StageFailed
from orchestrator.tui.render import STATUS_STYLE, progress_cells, replay_note

COLUMNS = ("wave", "table", "stage", "state", "rows", "rate", "eta", "log", "verified",
           "lock waits")


@dataclass(frozen=True)
class Settings:
    dsn: str
    loaded: LoadedPlan
    read_only: bool = False
    interval_s: float = 1.0


def row_cells(t: TableStatus) -> tuple[Any, ...]:
    """One table's row of the units table."""
    rows, rate, eta = progress_cells(t)
    verified = "" if t.verified_age_s is None else f"{t.verified_age_s:,.0f} s ago"
    log = "" if t.log_depth is None else f"{t.log_depth:,}"
    return ("" if t.wave is None else str(t.wave), t.name, t.stage or "final",
            Text(t.state, style=STATUS_STYLE.get(t.state, "")), rows, rate, eta, log,
            verified, str(t.lock_waits) if t.lock_waits else "")


def detail_view(t: TableStatus, d: details.Detail | None) -> Group:
    """The selected table: where it stands, what holds it, what its next stage locks and who
    holds those locks now, and its latest events."""
    parts: list[Any] = [Text.assemble((t.name, "bold"), f" ({t.strategy}), wave {t.wave}: ",
                                      (f"{t.stage or 'final'} {t.state}", "bold"))]
    for label, value in (("next", "  ".join(t.next_steps)), ("error", t.last_error),
                         ("hint", t.hint), ("waiting", t.waiting)):
        if value:
            parts.append(Text.assemble((f"{label}: ", "cyan"), value))
    if t.paused:
        parts.append(Text("paused: the copy holds between batches (p resumes)", style="yellow"))
    if t.replay:
        parts.append(Text(replay_note(t), style="cyan"))
    if t.last_lock_wait:
        w = t.last_lock_wait
        who = ", ".join(f"pid {b.get('pid')} ({b.get('application_name') or '-'})"
                        for b in w.blockers) or "unknown"
        parts.append(Text(f"last lock wait: {w.stage} at {w.at[11:19]}, held by {who}",
                          style="yellow"))
    if d is not None:
        if d.locks:
            parts.append(Text(f"{d.next_stage} locks: " + "; ".join(dict.fromkeys(d.locks))))
        held = ", ".join(f"pid {h['pid']} {h['mode']} ({h.get('application_name') or '-'}, "
                         f"{h.get('state')})" for h in d.holders)
        parts.append(Text(f"held on {t.name} now: {held or 'nothing'}"))
        if d.note:
            parts.append(Text(d.note, style="dim"))
        parts.append(Text("history:", style="bold"))
        for e in d.history[-10:]:
            parts.append(Text(f"  {e['at']:%H:%M:%S} {e['action']} {e['outcome']} "
                              f"by {e['operator']}", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


class Cockpit(App[None]):
    """`orchestrator cockpit PLAN`."""

    TITLE = "orchestrator cockpit"
    CSS = """
    #units { width: 3fr; }
    #detail { width: 2fr; min-width: 30; border-left: solid $accent; padding: 0 1; }
    #plan-line { height: auto; max-height: 6; padding: 0 1; background: $boost; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "apply_all", "apply plan"),
        Binding("C", "cutover_all", "cut over plan"),
        Binding("n", "next", "next stage"),
        Binding("c", "cutover", "cut over"),
        Binding("u", "undo", "undo stage"),
        Binding("U", "rollback", "roll back unit"),
        Binding("p", "pause", "pause/resume"),
        Binding("b", "batch", "batch size"),
        Binding("t", "throttle", "throttle"),
        Binding("s", "sql", "SQL"),
        Binding("r", "refresh", "refresh"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.read: Callable[[], PlanStatus] = status_model.reader(settings.dsn, settings.loaded)
        self.status: PlanStatus | None = None
        self.detail: details.Detail | None = None
        self.busy: str | None = None
        self.message = Text("")
        self.columns: list[Any] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield DataTable(id="units", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="detail"):
                yield Static(id="detail-body")
        yield Static(id="plan-line")
        yield Footer()

    def on_mount(self) -> None:
        plan = self.settings.loaded.plan.name
        self.sub_title = f"plan {plan}" + (" (read-only)" if self.settings.read_only else "")
        self.columns = self.query_one(DataTable).add_columns(*COLUMNS)
        self.action_refresh()
        self.set_interval(self.settings.interval_s, self.action_refresh)

    # --- reading ------------------------------------------------------------------------

    @property
    def selected(self) -> TableStatus | None:
        table = self.query_one(DataTable)
        if self.status is None or not self.status.tables or table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return self.status.table(str(key))

    def action_refresh(self) -> None:
        try:
            self.status = self.read()
        except Exception as exc:  # the database may be restarting: say so, keep looking
            self._say(Text(f"cannot read the control schema: {exc}", style="red"))
            return
        self._fill(self.query_one(DataTable), self.status)
        self._show_plan()
        self._show_detail()

    def _fill(self, table: DataTable[Any], ps: PlanStatus) -> None:
        """Update the rows in place (a rebuild would move the cursor and reload the
        detail every second); rebuild only when the tables change."""
        ordered = sorted(ps.tables, key=lambda t: (t.wave if t.wave is not None else 1 << 30,
                                                   t.name))
        keys = [str(r.value) for r in table.rows]
        if keys == [t.name for t in ordered]:
            for t in ordered:
                for column, value in zip(self.columns, row_cells(t), strict=True):
                    table.update_cell(t.name, column, value, update_width=True)
            return
        table.clear()
        for t in ordered:
            table.add_row(*row_cells(t), key=t.name)

    def _show_plan(self) -> None:
        ps = self.status
        if ps is None:
            return
        steps = "; ".join(ps.next_steps) or "nothing: every table is final"
        eta = f"  plan ETA {ps.eta_s:,.0f} s" if ps.eta_s else ""
        work = Text(f"working: {self.busy}", style="bold yellow") if self.busy else Text("")
        self.query_one("#plan-line", Static).update(Group(
            Text.assemble(("next: ", "bold"), steps, eta), work, self.message))

    def _show_detail(self) -> None:
        t = self.selected
        body = self.query_one("#detail-body", Static)
        if t is None:
            body.update(Text("plan not started: n runs the first stage of the selected table"
                             if self.status and not self.status.started else ""))
            return
        d = self.detail if self.detail is not None and self.detail.table == t.name else None
        body.update(detail_view(t, d))

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        t = self.selected
        if t is not None and (self.detail is None or self.detail.table != t.name):
            self.detail = None
            self._load_detail(t)

    def _load_detail(self, t: TableStatus) -> None:
        def work() -> None:
            try:
                d = details.read(self.settings.dsn, self.settings.loaded, t.name, t.stage)
            except Exception as exc:  # shown, not raised: the pane is informational
                self.call_from_thread(self._say, Text(f"detail of {t.name}: {exc}"))
                return
            self.call_from_thread(self._set_detail, d)

        self.run_worker(work, thread=True, group="detail", exclusive=True)

    def _set_detail(self, d: details.Detail) -> None:
        self.detail = d
        self._show_detail()

    def _say(self, text: Text) -> None:
        self.message = text
        self._show_plan()

    # --- acting -------------------------------------------------------------------------

    def _act(self, make: Callable[[TableStatus], Action], confirm: bool = True) -> None:
        t = self.selected
        if t is None:
            return
        if self.settings.read_only:
            self._say(Text("read-only cockpit: actions are off", style="yellow"))
            return
        if self.busy:
            self._say(Text(f"busy: {self.busy}; wait for it to finish", style="yellow"))
            return
        try:
            action = make(t)
        except OrchestratorError as exc:
            self._say(Text(f"{exc.message} ({exc.hint})", style="yellow"))
            return
        if not confirm:
            self._run(action)
            return
        self.push_screen(Confirm(action.describe()),
                         lambda yes: self._run(action) if yes else self._say(
                             Text(f"cancelled: {action.describe()}")))

    def _run(self, action: Action) -> None:
        self.busy = action.describe()
        self._show_plan()

        def work() -> None:
            error: str | None = None
            try:
                actions.perform(self.settings.dsn, self.settings.loaded, action,
                                lambda e: self.call_from_thread(self._on_event, e))
            except OrchestratorError as exc:
                error = f"{exc.message}" + (f" ({exc.hint})" if exc.hint else "")
            except Exception as exc:  # a lost connection: shown, the cockpit stays up
                error = str(exc).strip()
            self.call_from_thread(self._finished, action, error)

        self.run_worker(work, thread=True, group="action", exclusive=True)

    def _on_event(self, e: Event) -> None:
        if isinstance(e, Rows):
            self.busy = f"{e.stage} {e.table}: {e.rows_done:,}/{e.rows_estimated:,} rows"
        elif isinstance(e, StageChanged):
            self.message = Text(f"{e.table}: {e.stage} {e.status}", style="green")
        elif isinstance(e, StageFailed):
            self.message = Text(f"{e.table}: {e.stage} failed: {e.error}", style="red")
        elif isinstance(e, (Paused, LockWait)):
            why = e.reason if isinstance(e, Paused) else f"lock wait, try {e.attempt}"
            self.message = Text(f"{e.table}: {e.stage} waits: {why}", style="yellow")
        self._show_plan()

    def _finished(self, action: Action, error: str | None) -> None:
        self.busy = None
        self.detail = None
        self.message = (Text(f"failed: {action.describe()}: {error}", style="bold red")
                        if error else Text(f"done: {action.describe()}", style="green"))
        self.action_refresh()
        t = self.selected
        if t is not None:
            self._load_detail(t)

    def action_apply_all(self) -> None:
        self._act(lambda _t: Action(Kind.apply_all, ""))

    def action_cutover_all(self) -> None:
        self._act(lambda _t: Action(Kind.cutover_all, ""))

    def action_next(self) -> None:
        self._act(actions.next_action)

    def action_cutover(self) -> None:
        def make(t: TableStatus) -> Action:
            a = actions.next_action(t)
            if a.kind != Kind.cutover:
                raise OrchestratorError(f"{t.name}: its next stage is {t.stage}, not a cutover",
                                        hint="n runs the next stage")
            return a

        self._act(make)

    def action_undo(self) -> None:
        self._act(actions.undo_action)

    def action_rollback(self) -> None:
        self._act(actions.rollback_action)

    def action_pause(self) -> None:
        self._act(lambda t: Action(Kind.resume if t.paused else Kind.pause, t.name),
                  confirm=False)

    def _ask_setting(self, key: str, question: str) -> None:
        t = self.selected
        if t is None:
            return

        def answered(value: str | None) -> None:
            if value is not None:
                self._act(lambda t: Action(Kind.setting, t.name, key=key, value=value),
                          confirm=False)

        self.push_screen(Ask(question), answered)

    def action_batch(self) -> None:
        self._ask_setting("batch_size", "copy batch size (rows):")

    def action_throttle(self) -> None:
        self._ask_setting("sleep_ms", "pause after every copy batch (ms):")

    def action_sql(self) -> None:
        t = self.selected
        if t is None:
            return
        if self.detail is None or self.detail.table != t.name:
            self._say(Text("the SQL is still loading; press s again in a moment"))
            return
        self.push_screen(Reader(f"dry-run of {t.name}: every stage, forward and rollback",
                                self.detail.sql or self.detail.note))

"""The status model: one read of where a plan stands, behind `status`, `watch`, `--format json`,
the cockpit and the metrics endpoint (so they never disagree).

It is read from the control schema with a fixed number of statements whatever the number of
tables: the stage rows, one aggregate over the event log, the chunk proofs, and the capture
logs' depths (one catalog read and one UNION ALL of counts). Next steps are derived here, as
the commands an operator would type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.model.catalog import read_catalog
from orchestrator.model.graph import build_graph
from orchestrator.model.move import object_tag
from orchestrator.model.validate import plan_schemas
from orchestrator.plan import LoadedPlan, Plan
from orchestrator.stages import proof
from orchestrator.stages.base import Kind
from orchestrator.stages.registry import STRATEGIES, Strategy
from orchestrator.state import store
from orchestrator.state.migrations import q, schema_exists
from orchestrator.state.store import StageRow, Status

_EVENTS = """
WITH e AS (
  SELECT id, at, stage, action, outcome, duration_ms, detail, unnest(string_to_array(
         table_name, ',')) AS t
  FROM {s}.events WHERE plan = %(plan)s AND table_name IS NOT NULL)
SELECT t,
  count(*) FILTER (WHERE outcome = 'lock_timeout') AS lock_waits,
  (array_agg(jsonb_build_object('at', at, 'stage', stage, 'waited_ms', duration_ms,
                                'blockers', coalesce(detail->'blockers', '[]'::jsonb))
             ORDER BY id DESC) FILTER (WHERE outcome = 'lock_timeout'))[1] AS last_lock_wait,
  count(*) FILTER (WHERE outcome = 'repair') AS repairs,
  (array_agg(jsonb_build_object('at', at, 'stage', stage, 'outcome', outcome,
                                'detail', detail) ORDER BY id DESC))[1] AS last_event,
  coalesce(array_agg(round((duration_ms - (detail->>'lock_wait_ms')::float)::numeric, 1)
                     ORDER BY id) FILTER (WHERE outcome = 'ok' AND stage = ANY(%(swaps)s)
                       AND action = stage AND detail ? 'lock_wait_ms'),
           '{{}}') AS holds_ms
FROM e GROUP BY t
"""

# Each swap once (a unit's swap is one event naming every member): its transaction's time
# after the lock was granted. The swap's own action only: not the foreign-key validations
# after it, which run under a lock that lets reads and writes go on.
_HOLDS = """
SELECT round((duration_ms - (detail->>'lock_wait_ms')::float)::numeric, 1) AS hold_ms
FROM {s}.events WHERE plan = %(plan)s AND outcome = 'ok' AND stage = ANY(%(swaps)s)
  AND action = stage AND detail ? 'lock_wait_ms' ORDER BY id
"""


@dataclass(frozen=True)
class LockWait:
    """The last time a stage of the table gave way on its locks, and who held them."""

    at: str
    stage: str
    waited_ms: float | None
    blockers: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class StageState:
    status: str
    attempts: int = 0
    rows_done: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class Replay:
    """The replayer's last record for a table (run/follow.py): its pace and the two rates,
    and from them when the log will be caught up."""

    mode: str  # adaptive | fixed | full
    duty: float  # the share of time it works (adaptive)
    replayed_per_s: float
    logged_per_s: float | None
    catch_up_s: float | None  # None: the log does not shrink at these rates
    age_s: float


REPLAY_FRESH_S = 30.0  # an older record is of a replayer that stopped


@dataclass(frozen=True)
class Lag:
    """A table moving to another server: how far its subscriber is behind (the slot's
    confirmed position against the publisher's WAL; seconds from pg_stat_replication, 0 when
    the walsender has nothing to send)."""

    direction: str  # forward (source to target, before cutover) or reverse (after)
    server: str
    behind_bytes: int | None  # None: the slot is not there (yet, or any more)
    behind_s: float | None


@dataclass(frozen=True)
class TableStatus:
    name: str
    strategy: str
    wave: int | None
    stages: dict[str, StageState]  # in the strategy's order
    stage: str  # the stage at work now, or the next to run ("" once final)
    state: str  # its status
    rows_done: int
    rows_estimated: int | None
    progress_stage: str | None  # the loop stage the rows, rate and ETA are of
    rate: float | None  # rows per second of the running loop stage
    eta_s: float | None
    log_depth: int | None  # capture-log entries waiting to be replayed
    log_direction: str | None  # forward (before cutover) or reverse (after)
    replay: Replay | None  # what `apply --follow` last measured (fresh records only)
    verified_at: str | None  # every chunk proven equal as of then
    verified_age_s: float | None
    proof: dict[str, Any] | None  # the last full pass, its chunks, keys changed since
    repairs: int  # chunks verify repaired; more than one hints at writes the capture misses
    lock_waits: int
    retries: int
    last_lock_wait: LockWait | None
    holds_ms: tuple[float, ...]  # its swaps' time holding their locks, oldest first
    waiting: str | None  # what holds its swap (a gate, the stall forecast)
    paused: bool
    last_error: str | None
    hint: str | None
    next_steps: tuple[str, ...]
    lag: Lag | None = None  # a move to another server only


@dataclass(frozen=True)
class PlanStatus:
    plan: str
    path: str
    started: bool
    as_of: str
    tables: tuple[TableStatus, ...]
    eta_s: float | None
    next_steps: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)  # tables per current stage
    holds_ms: tuple[float, ...] = ()  # every swap of the plan once (a unit's counts once)

    def table(self, name: str) -> TableStatus:
        return next(t for t in self.tables if t.name == name)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def waves(conn: Conn, loaded: LoadedPlan) -> dict[str, int]:
    """Each table's wave in the move order (read once: the catalog, the graph)."""
    try:
        dg = build_graph(loaded.plan, read_catalog(conn, plan_schemas(loaded.plan)))
    except Exception:
        return {}
    return {m: i for i, wave in enumerate(dg.waves) for u in wave for m in u.members}


def read(conn: Conn, loaded: LoadedPlan, wave_of: dict[str, int] | None = None) -> PlanStatus:
    """Where the plan stands now."""
    plan = loaded.plan
    schema = plan.control_schema
    rows = store.stage_rows(conn, schema, plan.name)
    if wave_of is None:
        wave_of = waves(conn, loaded)
    exists = bool(rows) and schema_exists(conn, schema)
    return assemble(
        loaded, rows, wave_of,
        events=_events(conn, plan) if exists else {},
        proofs=proof.status(conn, plan) if exists else {},
        depths=_log_depths(conn, plan) if exists else {},
        # `set` may pause a table before the plan has started.
        paused=_paused(conn, plan) if schema_exists(conn, schema) else set(),
        holds=_holds(conn, plan) if exists else (),
        replays=_replays(conn, plan) if exists else {},
        lags=_lags(conn, loaded, rows) if exists else {},
    )


_LAGS = """SELECT s.slot_name AS slot,
       (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint AS bytes,
       coalesce(extract(epoch FROM r.replay_lag), 0)::float AS secs
FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = ANY(%s)"""


def _lags(conn: Conn, loaded: LoadedPlan, rows: list[StageRow]) -> dict[str, Lag]:
    """For each table moving to another server and not final: the forward slot on the source
    before its cutover, the reverse slot on the target after it (one query per server)."""
    from orchestrator.remote import link

    plan = loaded.plan
    remote = plan.remote_schemas()
    done = {(r.table_name, r.stage) for r in rows if r.status == Status.done}
    wanted: dict[str | None, dict[str, tuple[str, str, str]]] = {}  # server or None: source
    for spec in plan.tables:
        server = remote.get(spec.schema_)
        if server is None or (spec.name, "finalize") in done:
            continue
        forward, reverse = link.slot_names(plan, spec.name)
        if (spec.name, "cutover") in done:
            wanted.setdefault(server, {})[reverse] = (spec.name, "reverse", server)
        else:
            wanted.setdefault(None, {})[forward] = (spec.name, "forward", server)
    out: dict[str, Lag] = {}
    for where, slots in wanted.items():
        on = conn if where is None else link.open_quietly(plan, where)
        found = {} if on is None else {
            str(r["slot"]): r for r in on.execute(_LAGS, (list(slots),)).fetchall()}
        if on is not None and on is not conn:
            on.close()
        for slot, (table, direction, server) in slots.items():
            r = found.get(slot)
            out[table] = Lag(direction, server, r and r["bytes"], r and r["secs"])
    return out


def assemble(
    loaded: LoadedPlan, rows: list[StageRow], wave_of: dict[str, int], *,
    events: dict[str, dict[str, Any]] | None = None,
    proofs: dict[str, dict[str, Any]] | None = None,
    depths: dict[str, tuple[int, str]] | None = None,
    paused: set[str] | None = None,
    holds: tuple[float, ...] = (),
    replays: dict[str, dict[str, Any]] | None = None,
    lags: dict[str, Lag] | None = None,
) -> PlanStatus:
    """The model from what was read (a pure function: the renderers' tests build it)."""
    plan = loaded.plan
    now = datetime.now(UTC)
    by_table: dict[str, dict[str, StageRow]] = {}
    for r in rows:
        by_table.setdefault(r.table_name, {})[r.stage] = r
    ev, pr, dp, pa = events or {}, proofs or {}, depths or {}, paused or set()
    rp = replays or {}
    tables = tuple(
        _table(loaded, spec.name, plan.options_for(spec).strategy, wave_of.get(spec.name),
               by_table.get(spec.name, {}), ev.get(spec.name, {}), pr.get(spec.name),
               dp.get(spec.name), spec.name in pa or "*" in pa, now,
               _replay(rp.get(spec.name), dp.get(spec.name), now))
        for spec in plan.tables
    )
    if lags:
        tables = tuple(replace(t, lag=lags.get(t.name)) for t in tables)
    etas = [t.eta_s for t in tables if t.eta_s is not None]
    counts: dict[str, int] = {}
    for t in tables:
        key = t.stage or "final"
        counts[key] = counts.get(key, 0) + 1
    return PlanStatus(
        plan=plan.name, path=str(loaded.path), started=bool(rows), as_of=now.isoformat(),
        tables=tables, eta_s=sum(etas) if etas else None,  # tables copy one after another
        next_steps=_plan_steps(loaded, tables, bool(rows)), counts=counts, holds_ms=holds,
    )


def _events(conn: Conn, plan: Plan) -> dict[str, dict[str, Any]]:
    swaps = sorted({s.swap.name for s in STRATEGIES.values()})
    found = conn.execute(q(plan.control_schema, _EVENTS),
                         {"plan": plan.name, "swaps": swaps}).fetchall()
    return {str(r["t"]): dict(r) for r in found}


def _holds(conn: Conn, plan: Plan) -> tuple[float, ...]:
    swaps = sorted({s.swap.name for s in STRATEGIES.values()})
    found = conn.execute(q(plan.control_schema, _HOLDS),
                         {"plan": plan.name, "swaps": swaps}).fetchall()
    return tuple(float(r["hold_ms"]) for r in found)


def _log_depths(conn: Conn, plan: Plan) -> dict[str, tuple[int, str]]:
    """Per table, the entries in its active capture log (the reverse log after cutover)."""
    tags = {object_tag(plan.name, plan.source_schema, t.name): t.name for t in plan.tables}
    names = {f"{kind}_{tag}": (table, kind) for tag, table in tags.items()
             for kind in ("log", "rlog")}
    present = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = ANY(%s)", (plan.control_schema, sorted(names)),
    ).fetchall()
    found = sorted(str(r["relname"]) for r in present)
    if not found:
        return {}
    union = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {} AS name, count(*) AS n FROM {}").format(
            sql.Literal(n), sql.Identifier(plan.control_schema, n))
        for n in found)
    out: dict[str, tuple[int, str]] = {}
    for r in conn.execute(union).fetchall():
        table, kind = names[str(r["name"])]
        if kind == "rlog" or table not in out:  # after cutover the reverse log is the live one
            out[table] = (int(r["n"]), "reverse" if kind == "rlog" else "forward")
    return out


def _replays(conn: Conn, plan: Plan) -> dict[str, dict[str, Any]]:
    found = conn.execute(
        q(plan.control_schema, "SELECT table_name, value FROM {s}.saved WHERE plan = %s "
                               "AND key = 'replayer'"), (plan.name,),
    ).fetchall()
    return {str(r["table_name"]): dict(r["value"]) for r in found}


def _replay(rec: dict[str, Any] | None, depth: tuple[int, str] | None,
            now: datetime) -> Replay | None:
    """A fresh replayer record with the catch-up time it implies: the log's depth over what
    the replayer takes away faster than the application adds."""
    if rec is None or depth is None:
        return None
    age = now.timestamp() - float(rec.get("at") or 0)
    if age > REPLAY_FRESH_S:
        return None
    replayed = float(rec.get("replayed_per_s") or 0)
    logged = rec.get("logged_per_s")
    net = replayed - float(logged) if logged is not None else None
    catch_up = (0.0 if depth[0] == 0 else depth[0] / net if net and net > 0 else None)
    return Replay(mode=str(rec.get("mode")), duty=float(rec.get("duty") or 0),
                  replayed_per_s=replayed,
                  logged_per_s=None if logged is None else float(logged),
                  catch_up_s=catch_up, age_s=round(age, 1))


def _paused(conn: Conn, plan: Plan) -> set[str]:
    found = conn.execute(
        q(plan.control_schema, "SELECT table_name FROM {s}.settings WHERE plan = %s "
                               "AND key = 'paused' AND value = 'true'::jsonb"), (plan.name,),
    ).fetchall()
    return {str(r["table_name"]) for r in found}


def _current(strategy: Strategy, stages: dict[str, StageRow]) -> tuple[str, str]:
    """The stage at work (running or failed), else the first not done; ("", "done") once the
    final stage is done."""
    for s in strategy.stages:
        row = stages.get(s.name)
        if row is not None and row.status in (Status.running, Status.failed):
            return s.name, row.status
    for s in strategy.stages:
        row = stages.get(s.name)
        if row is None or row.status != Status.done:
            return s.name, row.status if row else Status.pending
    return "", Status.done


def _progress(strategy: Strategy, stages: dict[str, StageRow]
              ) -> tuple[str | None, int, int | None, float | None, float | None]:
    """The stage, rows, estimate, rate and ETA of the running loop stage, else of the
    copy."""
    loops = [stages[s.name] for s in strategy.stages if s.kind == Kind.loop and s.name in stages]
    running = [r for r in loops if r.status == Status.running]
    row = running[-1] if running else (loops[0] if loops else None)
    if row is None:
        return None, 0, None, None, None
    est = max(row.rows_estimated, row.rows_done) if row.rows_estimated is not None else None
    eta = None
    if row.status == Status.running and row.rows_per_s and est is not None:
        eta = max(est - row.rows_done, 0) / row.rows_per_s
    rate = row.rows_per_s if row.status == Status.running else None
    return row.stage, row.rows_done, est, rate, eta


def _table(loaded: LoadedPlan, name: str, strategy_name: str, wave: int | None,
           stages: dict[str, StageRow], ev: dict[str, Any], verified: dict[str, Any] | None,
           depth: tuple[int, str] | None, paused: bool, now: datetime,
           replay: Replay | None = None) -> TableStatus:
    strategy = STRATEGIES[strategy_name]
    stage, state = _current(strategy, stages)
    progress_stage, rows_done, est, rate, eta = _progress(strategy, stages)
    lw = ev.get("last_lock_wait")
    last_wait = None if lw is None else LockWait(
        at=str(lw["at"]), stage=str(lw["stage"]), waited_ms=lw.get("waited_ms"),
        blockers=tuple(lw.get("blockers") or ()))
    last = ev.get("last_event") or {}
    waiting = None
    if last.get("outcome") == "waiting":
        detail = last.get("detail") or {}
        waiting = "; ".join(detail.get("gates") or [detail.get("forecast") or "?"])
    errors = [stages[s.name].last_error for s in strategy.stages
              if s.name in stages and stages[s.name].last_error]
    error = errors[-1] if errors else None
    checked = verified.get("checked_at") if verified else None
    return TableStatus(
        name=name, strategy=strategy_name, wave=wave,
        stages={s.name: _stage_state(stages.get(s.name)) for s in strategy.stages},
        stage=stage, state=str(state), rows_done=rows_done, rows_estimated=est,
        progress_stage=progress_stage, rate=rate,
        eta_s=eta, log_depth=depth[0] if depth else None,
        log_direction=depth[1] if depth else None, replay=replay,
        verified_at=checked.isoformat() if checked else None,
        verified_age_s=(now - checked).total_seconds() if checked else None,
        proof=None if verified is None else {
            k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in verified.items()},
        repairs=int(ev.get("repairs") or 0),
        lock_waits=int(ev.get("lock_waits") or 0),
        retries=sum(max(r.attempts - 1, 0) for r in stages.values()),
        last_lock_wait=last_wait,
        holds_ms=tuple(float(h) for h in ev.get("holds_ms") or ()),
        waiting=waiting, paused=paused, last_error=error,
        hint=_hint(loaded, name, stage, state) if error else None,
        next_steps=_steps(loaded, name, strategy, stage, str(state), bool(stages)),
    )


def _stage_state(row: StageRow | None) -> StageState:
    if row is None:
        return StageState(Status.pending.value)
    return StageState(
        status=row.status, attempts=row.attempts, rows_done=row.rows_done,
        started_at=row.started_at.isoformat() if row.started_at else None,
        finished_at=row.finished_at.isoformat() if row.finished_at else None,
        last_error=row.last_error)


def _hint(loaded: LoadedPlan, table: str, stage: str, state: str) -> str:
    path = loaded.path
    if state == Status.failed:
        return (f"fix the cause shown, then rerun `orchestrator apply {path} --table {table}`;"
                f" or undo with `orchestrator rollback {path} --table {table}`")
    return f"`orchestrator history {path} --table {table}` shows the attempts"


def _steps(loaded: LoadedPlan, table: str, strategy: Strategy, stage: str, state: str,
           started: bool) -> tuple[str, ...]:
    """The commands that move this table on, as the operator would type them."""
    path, t = loaded.path, f"--table {table}"
    if not stage:
        return ()  # final
    if state == Status.failed:
        return (f"orchestrator apply {path} {t}" if stage != strategy.final.name
                else f"orchestrator finalize {path} {t}",
                f"orchestrator rollback {path} {t}")
    if stage == strategy.final.name:
        return (f"orchestrator compat-usage {path}", f"orchestrator finalize {path} {t}")
    if stage == strategy.swap.name:
        return (f"orchestrator cutover {path} {t}",)
    if state == Status.running:
        return (f"orchestrator watch {path}", f"orchestrator apply {path} {t}")
    return (f"orchestrator apply {path} {t}",) if started else (
        f"orchestrator dry-run {path}", f"orchestrator apply {path}")


def _plan_steps(loaded: LoadedPlan, tables: tuple[TableStatus, ...], started: bool
                ) -> tuple[str, ...]:
    """The plan's next commands: one plan-wide command where every table waits for the same
    one, else each table's first step, the earliest wave first."""
    path = loaded.path
    if not started:
        return (f"orchestrator validate {path}", f"orchestrator dry-run {path}",
                f"orchestrator apply {path}")
    open_ = [t for t in tables if t.next_steps]
    if not open_:
        return ()
    first = {t.next_steps[0].replace(f" --table {t.name}", "") for t in open_}
    if len(first) == 1 and len(open_) == len(tables) and all(
            t.state != Status.failed for t in open_):
        return (first.pop(),)
    ordered = sorted(open_, key=lambda t: (t.wave if t.wave is not None else 1 << 30, t.name))
    steps: list[str] = []
    for t in ordered:
        if t.next_steps[0] not in steps:
            steps.append(t.next_steps[0])
    return tuple(steps)


def reader(dsn: str, loaded: LoadedPlan) -> Callable[[], PlanStatus]:
    """A function reading the model on a connection of its own each call (for the metrics
    endpoint's thread and the cockpit's refresh); the waves are read once."""
    from orchestrator.db import connect

    wave_of: dict[str, int] = {}

    def read_now() -> PlanStatus:
        with connect(dsn, autocommit=True, application="orchestrator-status") as conn:
            if not wave_of:
                wave_of.update(waves(conn, loaded))
            return read(conn, loaded, wave_of)

    return read_now

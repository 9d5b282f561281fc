"""Dual-write overhead: pgbench TPS on the source with the capture, with a replayer beside the
clients (flat out, at a fixed rate, yielding), and without any trigger.

One table of 100,000 rows (the copy benchmark's shape), one-table plan, prepare done. pgbench,
4 clients, 2 threads, runs a write mix against public.dw in interleaved runs (the order reverses
every round, so drift over the run - a growing table, a warming cache - falls on every variant):

- none: no trigger (the plan rolled back to prepare);
- capture: `apply --until dual_write`, the key-log AFTER ROW trigger; nothing replays the log
  (before the copy ends nothing does);
- capture_replay, the replayer flat out: `apply --until copy` done, and the log replayed the
  way `apply --follow` did before issue 14 (Engine.replay_once in a loop, sleeping 1 s when
  idle) beside the 4 clients: the steady state of a table waiting for its cutover. The key
  keeps its name for the history's sake;
- capture_replay_fixed: the same, with the paced replayer (`Engine.follow`, what `apply
  --follow` runs) at a fixed FIXED_RATE = 2,000 keys/s (`--replay-rate 2000`): a tenth to a
  fifth of what this mix logs, so its backlog grows - informational;
- capture_replay_adaptive: `Engine.follow` at the plan's default pace, yielding to the
  application (stages/pace.py: a duty cycle adjusted every 2 s window against the
  application's write rate in a quiet window, one in 6);
- bare log (diagnostic, single-row mix only): a minimal PL/pgSQL AFTER ROW trigger, installed
  by the benchmark itself, appending (op, key) to an unindexed table - the mechanism's floor,
  to tell the trigger's cost from the engine's log design.

The replayers run in a thread on the benchmark's engine (one connection, used by the thread
alone while it runs: pgbench is another process, and the main thread reads the log through
its own connection). For each replayer run: the entries the clients logged (the log's
inserted-rows statistic), the backlog when pgbench ends, and so the entries replayed during the
run (logged minus the backlog's growth) and their share of what was logged. Then the replayer
is stopped: asked (`until`, which Engine.follow reads after every batch and the flat-out loop
after every pass over the log), and only if it has not ended after a grace (GRACE_S)
cancelled as Ctrl-C stops `apply --follow` (psycopg cancels the running statement); how it
stopped and how long it took are recorded.

Before every run the table is reset (no trigger, the rows pgbench inserted deleted and
vacuumed), so each run starts from the same table.

Two mixes: single-row (UPDATE one row by key, INSERT one row; every variant above, 20 s a run
so the adaptive pace has windows to settle - runs before issue 14 took 10 s) and multi-row
(UPDATE 100 consecutive keys, INSERT 10 rows in one statement; none and capture, 10 s a run).
A full run takes about 17 minutes on 2 cores. The server runs with synchronous_commit = off:
with a commit flush the runs measure the disk's fsync, which would hide the trigger's CPU cost
(here: ~2,200 TPS with it, ~7,500 without).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bench.common import (
    Server,
    create_table,
    embedded_server,
    loadavg,
    machine,
    median,
    plan_text,
    run_pgbench,
    say,
    wait_quiet,
    workdir,
    write_result,
    write_script,
)

PLAN = "dwbench"
TARGET_CAPTURE = 0.85  # issue 14: the application keeps this share with the capture alone
TARGET_REPLAY = 0.80  # ... and this share with the replayer beside it (adaptive)
# The fixed-rate replayer: keys (log entries) per second. The single-row mix at 4 clients logs
# two entries a transaction, 10,000-19,000 a second on this machine (by its load), so this
# replays a tenth to a fifth of it: a rate that keeps up with an application writing up to
# 2,000 rows a second, well under what this saturating mix writes.
FIXED_RATE = 2_000
# Variant -> the replayer beside the clients (Replayer.kind).
REPLAYERS = {
    "capture_replay": "full",
    "capture_replay_fixed": "fixed",
    "capture_replay_adaptive": "adaptive",
}
# After a run, how long each replayer may take to see its stop before it is cancelled. The
# paced one reads `until` after every batch and its rest (up to a 2 s quiet window); the
# flat-out one after a pass over the log, which ends once it has caught up (at once when it
# kept up). An engine that read `until` only once caught up would leave a paced replayer
# behind the application replaying its backlog at its pace long after the run: cancelled.
GRACE_S = {"full": 60.0, "fixed": 10.0, "adaptive": 10.0}
# Variant -> the engine's state it runs in (the replayers after the copy).
ENGINE_STATE = {v: "copied" for v in REPLAYERS}
LOGGED = ("capture", *REPLAYERS)  # the variants with the engine's capture log
SINGLE_VARIANTS = ["none", "capture", "capture_replay", "capture_replay_fixed",
                   "capture_replay_adaptive", "bare_log"]

SINGLE = """\\set id random(1, :rows)
UPDATE public.dw SET account_id = account_id + 1 WHERE id = :id;
INSERT INTO public.dw (email, account_id, payload)
  VALUES (md5(random()::text || clock_timestamp()::text) || '@s.example', :id, repeat('s', 250));
"""

MULTI = """\\set id random(1, :rows - 100)
UPDATE public.dw SET account_id = account_id + 1 WHERE id BETWEEN :id AND :id + 99;
INSERT INTO public.dw (email, account_id, payload)
  SELECT md5(random()::text || clock_timestamp()::text || g) || '@m.example', :id, repeat('m', 250)
  FROM generate_series(1, 10) g;
"""


class Replayer:
    """A replayer in a thread beside the pgbench clients, on the benchmark's own engine.

    Three kinds: `full` is what `apply --follow` did before issue 14 (Engine.replay_once in a
    loop, 1 s naps when idle: flat out); `fixed` and `adaptive` are `Engine.follow`, the paced
    `apply --follow`, with `rate=FIXED_RATE` or the plan's default pace (yielding).

    The engine's connection is not shared: the main thread only starts pgbench (another
    process) and reads the log through the benchmark's own connection while the thread runs,
    and touches the engine again only once the thread has ended (`stop` raises rather than
    hand over a connection still in use).
    """

    def __init__(self, eng: Any, kind: str) -> None:
        self.eng = eng
        self.kind = kind
        self.entries = 0
        self.calls = 0
        self.error: str | None = None
        self.cancelled = False
        self.stop_error: str | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name=f"replayer-{kind}", daemon=True)

    def _run(self) -> None:
        try:
            if self.kind == "full":
                while not self._stop.is_set():
                    n = self.eng.replay_once()
                    self.calls += 1
                    self.entries += n
                    if n == 0:
                        self._stop.wait(1.0)
            else:
                self.eng.follow(until=self._stop.is_set,
                                rate=FIXED_RATE if self.kind == "fixed" else None)
        except Exception as exc:  # reported, never hidden
            text = f"{type(exc).__name__}: {exc}".strip()
            if self.cancelled:
                self.stop_error = text  # what our cancel raised in it: expected
            else:
                self.error = text

    def __enter__(self) -> Replayer:
        self._t.start()
        return self

    def stop(self, grace_s: float) -> dict[str, Any]:
        """Ask the thread to end (`until`), give it `grace_s`, then cancel its statements the
        way Ctrl-C stops `apply --follow` (psycopg cancels the running query), until it ends."""
        t0 = time.monotonic()
        self._stop.set()
        self._t.join(timeout=grace_s)
        how = "until"
        if self._t.is_alive():
            how = "cancelled"
            self.cancelled = True
            deadline = time.monotonic() + 120
            while self._t.is_alive():
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the {self.kind} replayer did not stop: its connection is still in use")
                # Ignored by the server while the session is idle (the thread resting): the
                # next one finds its next statement running.
                self.eng.conn.cancel_safe(timeout=5.0)
                self._t.join(timeout=0.05)
            time.sleep(0.3)  # a cancel still on its way finds an idle session and is ignored
        if self.eng.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise RuntimeError(f"the {self.kind} replayer left its session in a transaction")
        return {"stop_s": round(time.monotonic() - t0, 2), "stopped_by": how}

    def __exit__(self, *exc: object) -> None:
        if self._t.is_alive():
            self.stop(GRACE_S[self.kind])


BARE_LOG = [
    "CREATE TABLE public.bench_bare_log (op \"char\" NOT NULL, id bigint NOT NULL)",
    """CREATE FUNCTION public.bench_bare_cap() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF TG_OP = 'DELETE' THEN INSERT INTO public.bench_bare_log VALUES ('D', OLD.id);
  ELSE INSERT INTO public.bench_bare_log VALUES (left(TG_OP, 1), NEW.id);
  END IF;
  RETURN NULL;
END $f$""",
    "CREATE TRIGGER bench_bare_cap AFTER INSERT OR UPDATE OR DELETE ON public.dw "
    "FOR EACH ROW EXECUTE FUNCTION public.bench_bare_cap()",
]
DROP_BARE_LOG = [
    "DROP TRIGGER bench_bare_cap ON public.dw",
    "DROP FUNCTION public.bench_bare_cap()",
    "DROP TABLE public.bench_bare_log",
]


class States:
    """Moves the table between the variants: the engine's states by its own apply and
    rollback; the diagnostic bare log by the benchmark's own DDL."""

    def __init__(self, eng: Any, conn: psycopg.Connection[Any], control: str) -> None:
        self.eng = eng
        self.conn = conn
        self.control = control
        self.state = "none"

    def go(self, variant: str) -> None:
        target = ENGINE_STATE.get(variant, variant)
        if self.state == target:
            return
        if self.state == "bare_log":
            for stmt in DROP_BARE_LOG:
                self.conn.execute(stmt)
            self.state = "none"
        if target == "bare_log":
            self.go("none")
            for stmt in BARE_LOG:
                self.conn.execute(stmt)
            self.state = "bare_log"
            return
        order = ["none", "capture", "copied"]
        while self.state != target:
            i, j = order.index(self.state), order.index(target)
            if j > i:
                nxt = order[i + 1]
                self.eng.apply(["dw"], "dual_write" if nxt == "capture" else "copy")
            else:
                nxt = order[i - 1]
                self.eng.rollback("dw", to="prepare" if nxt == "none" else "dual_write")
            self.state = nxt

    def reset(self, rows: int) -> None:
        """Back to the same starting table for every run: no trigger, the rows pgbench
        inserted deleted and vacuumed away."""
        self.go("none")
        self.conn.execute("DELETE FROM public.dw WHERE id > %s", (rows,))
        self.conn.execute("VACUUM (ANALYZE) public.dw")


def _log_of(eng: Any) -> sql.Identifier:
    """The table's capture log, by the engine's own name for it (read before a run, while the
    main thread still owns the engine)."""
    from orchestrator.sql import capture

    log: sql.Identifier = capture.forward(eng.context().moves["dw"]).log
    return log


def _log_backlog(conn: psycopg.Connection[Any], log: sql.Identifier) -> int:
    """Entries waiting in the capture log, counted through the benchmark's own connection."""
    r = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(log)).fetchone()
    return int(r["n"]) if r else 0


def _log_inserted(conn: psycopg.Connection[Any], log: sql.Identifier) -> int:
    """Rows ever inserted into the log, from its statistics (pgbench's sessions report theirs
    as they end, which they have when this is read)."""
    r = conn.execute("SELECT pg_stat_get_tuples_inserted(%s::regclass)::bigint AS n",
                     (log.as_string(conn),)).fetchone()
    return int(r["n"]) if r and r["n"] is not None else 0


def _pace_reading(
    conn: psycopg.Connection[Any], control: str, since: float
) -> dict[str, Any] | None:
    """The follow replayer's last recorded reading (mode, duty, the application's rates) when
    pgbench ends, if it recorded one during the run (every few seconds: run/follow.py)."""
    from orchestrator.run.follow import REPLAYER_KEY
    from orchestrator.state.store import load_saved

    v = load_saved(conn, control, PLAN, "dw", REPLAYER_KEY)
    if isinstance(v, dict) and float(v.get("at") or 0) >= since:
        return v
    return None


def _run_once(
    srv: Server,
    conn: psycopg.Connection[Any],
    states: States,
    script: Any,
    variant: str,
    seconds: int,
    rows: int,
) -> dict[str, Any]:
    """One pgbench run of `variant`; with a replayer beside it for the replayer variants."""
    extra: dict[str, Any] = {}
    log = _log_of(states.eng) if variant in LOGGED else None
    if log is not None:
        ins0, back0 = _log_inserted(conn, log), _log_backlog(conn, log)
    kind = REPLAYERS.get(variant)
    t0 = time.time()
    if kind is None:
        res = run_pgbench(
            srv, "dwbench", script, clients=4, seconds=seconds, defines={"rows": rows}
        )
    else:
        with Replayer(states.eng, kind) as rep:
            res = run_pgbench(
                srv, "dwbench", script, clients=4, seconds=seconds, defines={"rows": rows}
            )
            assert log is not None
            back_end = _log_backlog(conn, log)  # the replayer still runs
            pace = _pace_reading(conn, states.control, t0) if kind != "full" else None
            extra.update(rep.stop(GRACE_S[kind]))
        extra.update(replayer_error=rep.error, stop_error=rep.stop_error)
        if kind == "full":
            extra.update(replayed=rep.entries, replay_calls=rep.calls)
        else:
            extra.update(rate=FIXED_RATE if kind == "fixed" else None, pace=pace)
    if log is not None:
        time.sleep(0.5)  # pgbench's sessions have ended and reported their statistics
        logged = _log_inserted(conn, log) - ins0
        after = _log_backlog(conn, log)
        if kind is None:
            back_end = after
        replayed = logged - (back_end - back0)
        extra.update(
            logged=logged,
            log_backlog_after=back_end,
            replayed_during_run=replayed,
            replayed_share=(replayed / logged) if logged else None,
            replayed_per_s=replayed / seconds,
        )
        if kind is not None:
            extra["log_backlog_after_stop"] = after
    return {**res.as_dict(), **extra}


def _mix(
    srv: Server,
    conn: psycopg.Connection[Any],
    states: States,
    script: Any,
    variants: list[str],
    rounds: int,
    seconds: int,
    rows: int,
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for v in order:
            states.reset(rows)
            states.go(v)
            conn.execute("CHECKPOINT")
            load = loadavg()
            x = _run_once(srv, conn, states, script, v, seconds, rows)
            runs[v].append({**x, "load_1m": load})
            said = f"dual-write {v}: {x['tps']:.0f} tps (load {load:.2f})"
            if v in REPLAYERS:
                said += (f"; replayed {x['replayed_during_run']:,} of {x['logged']:,} logged, "
                         f"backlog {x['log_backlog_after']:,}; stopped by {x['stopped_by']} "
                         f"in {x['stop_s']} s")
            say(said)
    med = {v: median([x["tps"] for x in runs[v]]) for v in variants}
    ratios = {v: med[v] / med["none"] for v in variants if v != "none"}
    per_round = {
        v: [x["tps"] / n["tps"] for x, n in zip(runs[v], runs["none"], strict=True)]
        for v in variants
        if v != "none"
    }
    return {
        "runs": runs,
        "median_tps": med,
        "ratio_to_none": ratios,
        "ratio_to_none_per_round": per_round,
    }


def run(quick: bool = False) -> dict[str, Any]:
    rows = 20_000 if quick else 100_000
    # The single-row mix carries the replayers: long enough for the adaptive pace's windows
    # (2 s, a quiet one in 6) to settle; every variant of the mix runs as long, so the ratios
    # compare runs on a table that grew as much.
    seconds = 8 if quick else 20
    seconds_multi = 5 if quick else 10
    rounds = 3 if quick else 5
    result: dict[str, Any] = {
        "benchmark": "dualwrite",
        "machine": machine(),
        "quick": quick,
        "clients": 4,
        "seconds_per_run": seconds,
        "seconds_per_run_multi": seconds_multi,
        "rounds": rounds,
        "rows": rows,
        "scripts": {"single": SINGLE, "multi": MULTI},
        "replay_rate_fixed": FIXED_RATE,
        "replayer_grace_s": GRACE_S,
    }
    from orchestrator.plan import parse_plan
    from orchestrator.run.session import session

    with embedded_server() as srv, workdir("dualwrite") as tmp:
        srv.configure(synchronous_commit="off", max_wal_size="4GB")
        dsn = srv.create_db("dwbench")
        result["server"] = srv.describe()
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            result["table"] = create_table(conn, "dw", rows)
            loaded = parse_plan(plan_text(PLAN, ["dw"]), "bench:dualwrite.yaml")
            throttle = loaded.plan.defaults.throttle
            result["pace"] = {"replay_rate": throttle.replay_rate,
                              "yield_goal": throttle.yield_goal}
            single = write_script(tmp, "single", SINGLE)
            multi = write_script(tmp, "multi", MULTI)
            with session(dsn, loaded) as eng:
                eng.apply(["dw"], "prepare")
                states = States(eng, conn, loaded.plan.control_schema)
                result["load"] = [wait_quiet("dual-write single-row")]
                result["single"] = _mix(
                    srv, conn, states, single, SINGLE_VARIANTS, rounds, seconds, rows
                )
                result["load"].append(wait_quiet("dual-write multi-row"))
                result["multi"] = _mix(
                    srv, conn, states, multi, ["none", "capture"], rounds, seconds_multi, rows
                )
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    s, m = result["single"]["ratio_to_none"], result["multi"]["ratio_to_none"]
    flat, fixed, adaptive = (s["capture_replay"], s["capture_replay_fixed"],
                             s["capture_replay_adaptive"])
    return {
        "single_row_capture": {
            "target": f">= {TARGET_CAPTURE:.2f} of no-trigger TPS, capture alone (issue 14)",
            "value": s["capture"],
            "met": s["capture"] >= TARGET_CAPTURE,
        },
        "multi_row_capture": {
            "target": f">= {TARGET_CAPTURE:.2f} of no-trigger TPS, capture alone (issue 14)",
            "value": m["capture"],
            "met": m["capture"] >= TARGET_CAPTURE,
        },
        "single_row_capture_with_replay_adaptive": {
            "target": f">= {TARGET_REPLAY:.2f} of no-trigger TPS with the replayer yielding "
            "(`apply --follow`, the plan's default pace)",
            "value": adaptive,
            "met": adaptive >= TARGET_REPLAY,
        },
        "single_row_capture_with_replay_fixed": {
            "target": f"informational: the replayer at a fixed {FIXED_RATE:,} keys/s "
            "(`apply --follow --replay-rate`)",
            "value": fixed,
            "met": None,
        },
        "single_row_capture_with_replay": {
            "target": "informational: the replayer flat out (`Engine.replay_once` in a loop, "
            "`apply --follow` before issue 14); docs/design.md records 0.77",
            "value": flat,
            "met": None,
        },
    }


__all__ = ["run", "write_result"]

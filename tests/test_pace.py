"""Background work that yields to the application (issue 14): the pace halves its share of
the time while the application's write rate falls under the goal, grows it back when the
application keeps up, and works flat out when nobody writes; `apply --follow` yields by
default and says in `status` when the log will be caught up; a copy and a replayer that yield
lose nothing under the application's writes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import stress
from psycopg.rows import dict_row

from orchestrator.stages import pace
from orchestrator.stages.pace import Pace, Policy

Conn = Any


class Application:
    """The application's writing transactions, as many as its rate says for the time that
    passes on the test's clock (each one takes a transaction id, as a real write does)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.now = 0.0
        self.rate = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.run_for(seconds)

    def run_for(self, seconds: float) -> None:
        n = round(self.rate * seconds)
        if n:
            # A DO block at top level may commit: one id per loop, in one round trip.
            self.conn.execute(psycopg.sql.SQL(
                "DO $$ BEGIN FOR i IN 1..{} LOOP PERFORM pg_current_xact_id(); COMMIT; "
                "END LOOP; END $$").format(psycopg.sql.Literal(n)))
        self.now += seconds


@pytest.fixture
def app(empty_dsn: str) -> Iterator[tuple[Application, Conn]]:
    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as writer, \
            psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as probe:
        yield Application(writer), probe


def batches(p: Pace, a: Application, seconds: float, took: float = 0.25) -> None:
    """Our batches for `seconds` of the application's time, resting as the pace says."""
    end = a.now + seconds
    while a.now < end:
        a.run_for(took)  # the application writes while our batch runs
        p.rest(100, took)


def test_the_pace_yields_while_the_application_slows_and_catches_up_when_idle(
    app: tuple[Application, Conn],
) -> None:
    a, probe = app
    p = Pace(probe, Policy(goal=0.85), clock=a.clock, sleep=a.sleep)
    a.rate = 500.0
    batches(p, a, 3 * pace.WINDOW_S)  # the first window is quiet: the application alone
    assert p.reading().quiet_tps == pytest.approx(500, rel=0.05)
    before = p.duty
    assert before > pace.START_DUTY  # the application kept up: the share grows from its start
    a.rate = 250.0  # our work halves the application's rate
    batches(p, a, 3 * pace.WINDOW_S)
    slowed = p.duty
    assert slowed < before
    batches(p, a, 2 * pace.WINDOW_S)
    assert p.duty < slowed  # still too slow: it halves again
    assert p.duty >= pace.MIN_DUTY
    a.rate = 480.0  # the application keeps up now: the share grows back step by step
    low = p.duty
    batches(p, a, 4 * pace.WINDOW_S)
    assert p.duty > low
    a.rate = 0.0  # nobody writes: after the next quiet window, flat out
    end = a.now + 300
    while (p.reading().quiet_tps or 0) > 5 and a.now < end:
        batches(p, a, pace.WINDOW_S)
    assert p.reading().quiet_tps == pytest.approx(0, abs=5)
    batches(p, a, 3 * pace.WINDOW_S)  # the next window's end lifts the duty
    assert p.duty == 1.0


def test_a_fixed_rate_rests_to_keep_it(app: tuple[Application, Conn]) -> None:
    a, probe = app
    p = Pace(probe, Policy(rate=200.0), clock=a.clock, sleep=a.sleep)
    for _ in range(10):
        a.run_for(0.1)
        p.rest(100, 0.1)  # 100 keys at 200/s take half a second: rest 0.4 s
    assert a.now == pytest.approx(5.0)
    assert p.reading().mode == "fixed"


def status_json(dsn: str, plan: str) -> dict[str, Any]:
    return dict(json.loads(stress.ok(dsn, "status", plan, "--format", "json")))


def test_a_yielding_copy_and_replayer_lose_nothing_and_status_says_when_the_log_catches_up(
    cogito_dsn: str, writer: stress.Writer,
) -> None:
    plan = stress.PLAN
    # The copy yields to the application (the plan's throttle.adaptive, set live).
    stress.ok(cogito_dsn, "set", plan, "adaptive", "true")
    stress.throttle(cogito_dsn, "turns", 500, 0)
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "verify")
    db = stress.connect(cogito_dsn)
    follower = stress.Proc(cogito_dsn, "apply", plan, "--table", "turns", "--follow")
    try:
        assert stress.wait_until("the replayer's first record",
                                 lambda: replayer(db, "adaptive"), follower, timeout=60), \
            follower.output()
        turns = next(t for t in status_json(cogito_dsn, plan)["tables"]
                     if t["name"] == "turns")
        assert turns["replay"]["mode"] == "adaptive"
        assert turns["log_direction"] == "forward"
        said = " ".join(stress.ok(cogito_dsn, "status", plan).split())
        assert "replayer (adaptive" in said and "replaying" in said, said
        # The operator fixes the replayer's rate; it takes it within a few seconds.
        stress.ok(cogito_dsn, "set", plan, "replay_rate", "50")
        assert stress.wait_until("the fixed rate", lambda: replayer(db, "fixed"), follower,
                                 timeout=60), follower.output()
    finally:
        follower.close()
    writer.stop.set()
    writer.join(timeout=10)
    assert writer.writes > 30
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "verify")
    extra, lost, n_new, n_old = stress.except_both_ways(db, "turns", source_schema="public")
    assert (extra, lost) == (0, 0) and n_new == n_old
    db.close()


def replayer(db: Conn, mode: str) -> bool:
    """The replayer recorded a pass in this mode (it records every few seconds)."""
    time.sleep(0.2)
    row = db.execute("SELECT value FROM _orchestrator.saved WHERE key = 'replayer' "
                     "AND table_name = 'turns'").fetchone()
    return bool(row and row["value"]["mode"] == mode)


def test_replay_settings_refuse_bad_values(cogito_dsn: str) -> None:
    r = stress.cli(cogito_dsn, "set", stress.PLAN, "yield_goal", "1.5")
    assert r.returncode != 0 and "yield_goal" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    r = stress.cli(cogito_dsn, "set", stress.PLAN, "replay_rate", "--", "-3")
    assert r.returncode != 0 and "negative" in r.stdout + r.stderr


def test_follow_takes_a_rate_on_the_command_line(cogito_dsn: str, tmp_path: Path) -> None:
    r = stress.cli(cogito_dsn, "apply", stress.PLAN, "--follow", "--replay-rate", "0")
    assert r.returncode != 0 and "--replay-rate" in r.stdout + r.stderr

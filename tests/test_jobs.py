"""`apply --jobs N` (issue 14): the independent tables of a wave move side by side, each on
its own session, under the application's writes; a SIGKILL mid-way resumes every table to
equality; swaps stay one at a time, in graph order."""

from __future__ import annotations

import json
from typing import Any

import stress

Conn = Any
PLAN = stress.PLAN


def first_wave(dsn: str) -> list[str]:
    """A copied table of each of two units of one wave (the first wave that has two)."""
    graph = json.loads(stress.ok(dsn, "graph", PLAN, "--format", "json"))
    members = {u["id"]: u["members"] for u in graph["units"]}
    for wave in graph["waves"]:
        tables = [next(t for t in members[uid] if t in stress.COPY_TABLES) for uid in wave
                  if any(t in stress.COPY_TABLES for t in members[uid])]
        if len(tables) >= 2:
            return tables[:2]
    raise AssertionError(f"no wave of two copied tables: {graph['waves']}")


def spans(db: Conn) -> dict[str, tuple[Any, Any]]:
    """Per table, when its move started (prepare) and when verify ended, from the event
    log."""
    rows = db.execute(
        "SELECT table_name, min(at) FILTER (WHERE stage = 'prepare') AS s, "
        "max(at) FILTER (WHERE stage = 'verify' AND outcome = 'ok') AS e "
        "FROM _orchestrator.events GROUP BY table_name").fetchall()
    return {str(r["table_name"]): (r["s"], r["e"]) for r in rows}


def test_two_jobs_move_a_waves_tables_side_by_side_under_writes(
    cogito_dsn: str, writer: stress.Writer,
) -> None:
    tables = first_wave(cogito_dsn)
    db = stress.connect(cogito_dsn)
    for t in tables:  # every copy long enough for the two to meet
        stress.throttle(cogito_dsn, t, 20, 20)
    args = [a for t in tables for a in ("--table", t)]
    out = stress.ok(cogito_dsn, "apply", PLAN, *args, "--until", "verify", "--jobs", "2")
    assert "Traceback" not in out
    moves = spans(db)
    (s1, e1), (s2, e2) = moves[tables[0]], moves[tables[1]]
    assert s1 < e2 and s2 < e1, moves  # the two moves overlapped
    assert all(stress.stage(db, t, "verify")["status"] == "done" for t in tables)
    stress.ok(cogito_dsn, "cutover", PLAN, *args, "--yes", "--ignore-forecast")
    writer.stop.set()
    writer.join(timeout=10)
    stress.ok(cogito_dsn, "apply", PLAN, *args, "--until", "verify")  # replays what is left
    for t in tables:
        assert stress.stage(db, t, "cutover")["status"] == "done"
        extra, lost, n_new, n_old = stress.except_both_ways(db, t)  # the retired table
        assert (extra, lost) == (0, 0) and n_new == n_old, t
    db.close()


def test_a_sigkill_of_two_jobs_resumes_every_table_to_equality(
    cogito_dsn: str, writer: stress.Writer,
) -> None:
    tables = first_wave(cogito_dsn)
    db = stress.connect(cogito_dsn)
    for t in tables:
        stress.throttle(cogito_dsn, t, 20, 20)
    args = [a for t in tables for a in ("--table", t)]
    proc = stress.Proc(cogito_dsn, "apply", PLAN, *args, "--until", "copy", "--jobs", "2")
    stress.wait_until("both copies under way", lambda: all(
        stress.stage(db, t, "copy")["rows_done"] > 0 for t in tables), proc)
    assert proc.kill(), proc.output()
    proc.close()
    for t in tables:  # each batch committed with its checkpoint: no more, no less
        s = stress.stage(db, t, "copy")
        if s["status"] == "running":
            assert stress.count(db, stress.TARGET[t], t) == s["rows_done"], (t, s)
        stress.throttle(cogito_dsn, t, 5000, 0)
    stress.ok(cogito_dsn, "apply", PLAN, *args, "--until", "verify", "--jobs", "2")
    writer.stop.set()
    writer.join(timeout=10)
    stress.ok(cogito_dsn, "apply", PLAN, *args, "--until", "verify", "--jobs", "2")
    for t in tables:
        assert stress.stage(db, t, "verify")["status"] == "done"
        extra, lost, n_new, n_old = stress.except_both_ways(db, t, source_schema="public")
        assert (extra, lost) == (0, 0) and n_new == n_old, t
    db.close()

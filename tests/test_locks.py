"""Invariants 3 and 5: short locks, and one operator at a time.

Short locks: the cutover of turns needs ACCESS EXCLUSIVE on public.turns. While an application
report holds a read lock on it, every try waits at most lock_timeout, gives way, records who
blocked it (pid, application, query) and retries with backoff. So the application, which queues
behind a waiting try, never waits much longer than lock_timeout; when retries run out the
cutover stops cleanly, naming the blocker, with nothing changed.

The same holds when the blocker is an application write on a table that turns' foreign keys
reference (the cutover re-adds those keys), and only sessions of this database are named.

One operator: a second `apply` of a plan that is being applied is refused naming the first
one's session, and so is an apply of another plan that touches one of the same tables; the
refused runs write nothing.

Every orchestrator run here is the CLI in its own process, as an operator runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN, COGITO_TEMPLATE, _fresh_db
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator.model.catalog import snapshot

Conn = psycopg.Connection[Any]
PLAN = str(COGITO_PLAN)
LOCK_TIMEOUT_MS = 200
# What an application may wait beyond lock_timeout on this slow 2-core box: the cutover's own
# hold (tens of ms) plus scheduling noise.
HOLD_MARGIN_MS = 300
SCHEMAS = ["public", "conversation", "_orchestrator", "_orchestrator_retired"]
ENV = {**os.environ, "COLUMNS": "250"}  # no wrapped lines in the CLI's tables


def orchestrator(dsn: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=ENV,
    )


_started: list[subprocess.Popen[str]] = []


def start_orchestrator(dsn: str, *args: str) -> subprocess.Popen[str]:
    """Start the CLI in the background (a failed test ends it; a passing one waits for it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_orchestrator_left_running() -> Iterator[None]:
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def cutover_turns(plan: str, lock_timeout_ms: int) -> tuple[str, ...]:
    """The operator's command: cut turns over, waiting at most lock_timeout_ms per try. It
    tries even when the stall forecast names a blocker: the tries are what is under test
    (tests/test_cutover_control.py tests the forecast)."""
    return ("cutover", plan, "--table", "turns", "--yes", "--lock-timeout", str(lock_timeout_ms),
            "--ignore-forecast")


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def given(result: subprocess.CompletedProcess[str]) -> None:
    """A set-up step of an expected-failure test: its failure is not the bug under test."""
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def lock_waits(conn: Conn, plan: str = "cogito") -> list[dict[str, Any]]:
    """The cutover's recorded tries that gave way, oldest first."""
    return conn.execute(
        "SELECT * FROM _orchestrator.events WHERE plan = %s AND action = 'cutover' "
        "AND outcome = 'lock_timeout' ORDER BY id",
        (plan,),
    ).fetchall()


def stage(conn: Conn, table: str, name: str, plan: str = "cogito") -> dict[str, Any]:
    """A stage's record (an empty one before the plan is registered)."""
    row = conn.execute(
        "SELECT * FROM _orchestrator.stages WHERE plan = %s AND table_name = %s AND stage = %s",
        (plan, table, name),
    ).fetchone()
    return row or {"status": None, "rows_done": 0}


def relkind(conn: Conn, name: str) -> str | None:
    row = conn.execute(
        "SELECT c.relkind::text AS k FROM pg_class c WHERE c.oid = to_regclass(%s)", (name,)
    ).fetchone()
    return row["k"] if row else None


def report_reading_turns(dsn: str) -> Conn:
    """An application report in a long transaction: it holds ACCESS SHARE on public.turns."""
    conn = psycopg.connect(dsn, application_name="app-report", row_factory=dict_row)
    conn.execute("SELECT count(*) FROM public.turns").fetchone()
    return conn


def plan_with(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- (a) the cutover gives way, names the blocker, and goes through once it ends -------------


def test_cutover_gives_way_to_a_reader_names_it_and_succeeds_when_it_commits(
    cogito_dsn: str, cogito_conn: Conn
) -> None:
    db = cogito_conn
    ok(orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns"))
    assert stage(db, "turns", "verify")["status"] == "done"

    report = report_reading_turns(cogito_dsn)
    try:
        proc = start_orchestrator(cogito_dsn, *cutover_turns(PLAN, LOCK_TIMEOUT_MS))
        wait_for("two tries that gave way", lambda: len(lock_waits(db)) >= 2)

        # Each try waited about lock_timeout and names the report: pid, application, query.
        for e in lock_waits(db):
            assert e["table_name"] == "turns" and e["stage"] == "cutover"
            assert LOCK_TIMEOUT_MS * 0.9 <= e["duration_ms"] < LOCK_TIMEOUT_MS + 1000
            blockers = {b["pid"]: b for b in e["detail"]["blockers"]}
            assert report.info.backend_pid in blockers, e["detail"]
            who = blockers[report.info.backend_pid]
            assert who["application_name"] == "app-report"
            assert who["mode"] == "AccessShareLock" and who["relation"] == "turns"
            assert "FROM public.turns" in who["query"]
        # Meanwhile the cutover is still running (not failed), and nothing has moved.
        assert stage(db, "turns", "cutover")["status"] == "running"
        assert relkind(db, "public.turns") == "r"
        # The operator sees who blocks, in status and in the history.
        status = ok(orchestrator(cogito_dsn, "status", PLAN))
        assert "last lock wait: turns cutover" in status
        assert f"pid {report.info.backend_pid} (" in status and "app-report" in status
        history = json.loads(ok(orchestrator(cogito_dsn, "history", PLAN, "--format", "json")))
        assert any(
            b["pid"] == report.info.backend_pid
            for e in history
            if e["outcome"] == "lock_timeout"
            for b in e["detail"]["blockers"]
        )
        assert proc.poll() is None, "the cutover gave up while retries were left"
    finally:
        report.commit()  # the report ends
        report.close()

    code, output = finish(proc)
    assert code == 0, output
    assert stage(db, "turns", "cutover")["status"] == "done"
    assert relkind(db, "public.turns") == "v"
    assert relkind(db, "conversation.turns") == "r"
    last = db.execute(
        "SELECT outcome FROM _orchestrator.events WHERE action = 'cutover' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert last is not None and last["outcome"] == "ok"


# --- (b) a blocker that never ends: the cutover stops cleanly, nothing changed ----------------


def test_cutover_out_of_retries_stops_cleanly_names_the_blocker_and_changes_nothing(
    cogito_dsn: str, cogito_conn: Conn, tmp_path: Path
) -> None:
    db = cogito_conn
    text = COGITO_PLAN.read_text(encoding="utf-8")
    assert "  lock_timeout_ms: 500\n" in text
    plan = plan_with(
        tmp_path,
        "cogito.yaml",
        text.replace("  lock_timeout_ms: 500\n", "  lock_timeout_ms: 500\n  lock_retries: 2\n"),
    )
    ok(orchestrator(cogito_dsn, "apply", plan, "--table", "turns"))
    before = snapshot(db, SCHEMAS)
    assert "conversation.turns" in before["relations"]  # the snapshot sees what matters
    rows_before = db.execute("SELECT count(*) AS n FROM conversation.turns").fetchone()

    report = report_reading_turns(cogito_dsn)
    try:
        t0 = time.monotonic()
        result = orchestrator(cogito_dsn, *cutover_turns(plan, LOCK_TIMEOUT_MS))
        elapsed = time.monotonic() - t0
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "Traceback" not in output
        assert "could not get its locks within 200 ms after 3 tries; nothing was changed" in output
        assert f"pid {report.info.backend_pid} (" in output and "app-report" in output
        assert "pg_terminate_backend" in output  # the way out is named, never taken
        assert elapsed < 30

        # Nothing changed: the same catalog, the source still a table, the report unharmed.
        assert snapshot(db, SCHEMAS) == before
        assert relkind(db, "public.turns") == "r"
        assert report.execute("SELECT count(*) AS n FROM public.turns").fetchone()["n"] > 0
        cut = stage(db, "turns", "cutover")
        assert cut["status"] == "failed"
        assert f"pid {report.info.backend_pid}" in cut["last_error"]
        waits = lock_waits(db)
        assert len(waits) == 3  # the first try and two retries
        assert all(
            report.info.backend_pid in {b["pid"] for b in e["detail"]["blockers"]} for e in waits
        )
        # The application keeps writing to the table it still has, and dual-write follows.
        db.execute(
            "UPDATE public.turns SET content = 'after the failed cutover' WHERE id = "
            "(SELECT min(id) FROM public.turns)"
        )
    finally:
        report.commit()
        report.close()

    # Once the report is gone, the operator reruns the cutover and it goes through.
    ok(orchestrator(cogito_dsn, *cutover_turns(plan, LOCK_TIMEOUT_MS)))
    assert stage(db, "turns", "cutover")["status"] == "done"
    assert db.execute("SELECT count(*) AS n FROM conversation.turns").fetchone() == rows_before
    first = db.execute("SELECT content FROM conversation.turns ORDER BY id LIMIT 1").fetchone()
    assert first == {"content": "after the failed cutover"}


def test_a_failed_cutover_rolls_back_to_the_exact_catalog(
    cogito_dsn: str, cogito_conn: Conn, tmp_path: Path
) -> None:
    """The operator gives up on a cutover that ran out of retries and rolls the table back
    entirely: nothing of the move is left, whatever state the cutover stage was left in."""
    db = cogito_conn
    text = COGITO_PLAN.read_text(encoding="utf-8")
    plan = plan_with(
        tmp_path,
        "cogito.yaml",
        text.replace("  lock_timeout_ms: 500\n", "  lock_timeout_ms: 500\n  lock_retries: 0\n"),
    )
    user_schemas = ["public", "conversation", "_orchestrator_retired"]
    before = snapshot(db, user_schemas)
    ok(orchestrator(cogito_dsn, "apply", plan, "--table", "turns"))
    report = report_reading_turns(cogito_dsn)
    try:
        result = orchestrator(cogito_dsn, *cutover_turns(plan, LOCK_TIMEOUT_MS))
        assert result.returncode == 1, result.stdout + result.stderr
        assert stage(db, "turns", "cutover")["status"] == "failed"
    finally:
        report.commit()
        report.close()
    ok(orchestrator(cogito_dsn, "rollback", plan, "--table", "turns", "--yes"))
    assert snapshot(db, user_schemas) == before


# --- (c) the application's own latency while the cutover waits -------------------------------


@dataclass
class Probe:
    """An application session timing its own statements on public.turns, in a loop."""

    dsn: str
    query: str
    samples: list[tuple[float, float]] = field(default_factory=list)  # (started, ms)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="app-probe") as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    conn.execute(self.query, {"n": n}).fetchall()
                except psycopg.Error as exc:
                    self.errors.append(repr(exc))
                self.samples.append((t0, (time.monotonic() - t0) * 1000))
                time.sleep(0.005)

    def worst_ms(self) -> float:
        return max(ms for _, ms in self.samples)


def test_application_never_waits_much_longer_than_lock_timeout_while_cutover_queues(
    cogito_dsn: str, cogito_conn: Conn
) -> None:
    db = cogito_conn
    ok(orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns"))
    reader = Probe(
        cogito_dsn,
        "SELECT id, content FROM public.turns WHERE participant_id = "
        "(SELECT min(id) FROM public.participants) + mod(%(n)s, 10)",
    )
    writer = Probe(
        cogito_dsn,
        "UPDATE public.turns SET content = 'probe ' || %(n)s::text "
        "WHERE id = (SELECT min(id) FROM public.turns) + mod(%(n)s, 50) RETURNING id",
    )
    threads = [threading.Thread(target=p.run, daemon=True) for p in (reader, writer)]
    for t in threads:
        t.start()
    try:
        wait_for("a baseline", lambda: len(reader.samples) > 20 and len(writer.samples) > 20)
        report = report_reading_turns(cogito_dsn)
        try:
            blocked_from = time.monotonic()
            proc = start_orchestrator(cogito_dsn, *cutover_turns(PLAN, LOCK_TIMEOUT_MS))
            wait_for("three tries that gave way", lambda: len(lock_waits(db)) >= 3)
        finally:
            report.commit()
            report.close()
        code, output = finish(proc)
        assert code == 0, output
        time.sleep(0.3)  # and a little life through the compatibility view
    finally:
        reader.stop.set()
        writer.stop.set()
        for t in threads:
            t.join(timeout=10)

    assert stage(db, "turns", "cutover")["status"] == "done"
    # The report kept the cutover out for three tries and the pauses between them: an
    # application queued behind a wait that did not give way would have waited all of that.
    waits = lock_waits(db)
    kept_out_ms = (waits[-1]["at"] - waits[0]["at"]).total_seconds() * 1000
    assert kept_out_ms + waits[0]["duration_ms"] > LOCK_TIMEOUT_MS + HOLD_MARGIN_MS
    for probe in (reader, writer):
        assert probe.errors == []
        during = [ms for t0, ms in probe.samples if t0 >= blocked_from]
        assert len(during) > 10, "the application was not running while the cutover waited"
        # It did queue behind the waiting tries (so we measured the lock queue, not an idle
        # table)...
        assert len([ms for ms in during if ms >= LOCK_TIMEOUT_MS * 0.75]) >= 2, sorted(during)[-5:]
        # ...and never for longer than lock_timeout plus the hold.
        assert probe.worst_ms() <= LOCK_TIMEOUT_MS + HOLD_MARGIN_MS, sorted(during)[-5:]


# --- (d) one operator at a time ----------------------------------------------------------------

TURNS_ONLY = """\
version: 1
name: turns_elsewhere
tables:
  - name: turns
    schema: archive
"""


def test_a_second_operator_on_the_same_plan_or_table_is_refused_naming_the_first(
    cogito_dsn: str, cogito_conn: Conn, tmp_path: Path
) -> None:
    db = cogito_conn
    # A slow copy keeps the first operator busy: 20-row batches, 100 ms apart.
    ok(orchestrator(cogito_dsn, "set", PLAN, "batch_size", "20", "--table", "turns"))
    ok(orchestrator(cogito_dsn, "set", PLAN, "sleep_ms", "100", "--table", "turns"))
    first = start_orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns")
    wait_for("the copy to be under way", lambda: stage(db, "turns", "copy")["rows_done"] > 0)
    holder = db.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'orchestrator-lock'"
    ).fetchall()
    assert len(holder) == 1
    pid = holder[0]["pid"]

    # The same plan, even for another table: refused, naming the first operator's session.
    second = orchestrator(cogito_dsn, "apply", PLAN, "--table", "users", "--format", "json")
    assert second.returncode == 1, second.stdout + second.stderr
    refusal = json.loads(second.stdout)
    assert refusal["error"] == "LockHeld"
    assert "plan cogito is being worked on by another orchestrator" in refusal["message"]
    assert f"pid {pid} (" in refusal["message"]

    # Another plan that moves turns elsewhere: refused on the table, naming the same session.
    other = plan_with(tmp_path, "turns-elsewhere.yaml", TURNS_ONLY)
    third = orchestrator(cogito_dsn, "apply", other, "--yes")
    output = third.stdout + third.stderr
    assert third.returncode == 1, output
    assert re.search(r"table (public\.)?turns is being worked on by another orchestrator", output)
    assert f"pid {pid} (" in output
    assert "Traceback" not in output
    assert first.poll() is None, "the first operator was disturbed"

    # The operator speeds the running copy up; the first apply finishes undisturbed.
    ok(orchestrator(cogito_dsn, "set", PLAN, "sleep_ms", "0", "--table", "turns"))
    ok(orchestrator(cogito_dsn, "set", PLAN, "batch_size", "5000", "--table", "turns"))
    code, out = finish(first)
    assert code == 0, out

    # Never interleaved: every event of the plan came from the first operator's one session,
    # and the refused plan left no trace at all.
    sessions = db.execute(
        "SELECT DISTINCT backend_pid FROM _orchestrator.events WHERE plan = 'cogito'"
    ).fetchall()
    assert len(sessions) == 1
    other_plan = "SELECT count(*) AS n FROM _orchestrator.plans WHERE name = 'turns_elsewhere'"
    assert db.execute(other_plan).fetchone() == {"n": 0}
    assert db.execute("SELECT to_regnamespace('archive') AS s").fetchone()["s"] is None
    assert stage(db, "turns", "verify")["status"] == "done"
    assert stage(db, "users", "prepare")["status"] == "pending"

    # With the first operator gone, the same command is welcome (and has nothing left to do).
    ok(orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns"))


# --- (e, f) writers on the tables the new table's foreign keys reference -----------------------


def waits_for_lock(conn: Conn, application: str, relation: str) -> bool:
    """Whether a session of this database, by application name, waits for a lock on relation."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE NOT l.granted AND a.datname = current_database() AND a.application_name = %s "
        "AND l.relation = to_regclass(%s)) AS waits",
        (application, relation),
    ).fetchone()
    return bool(row and row["waits"])


def writing(dsn: str, table: str, column: str) -> Conn:
    """An application transaction that updated one row of table and has not committed yet."""
    conn = psycopg.connect(dsn, application_name=f"app-{table}", row_factory=dict_row)
    conn.execute(
        sql.SQL("UPDATE {t} SET {c} = {c} WHERE id = (SELECT min(id) FROM {t})").format(
            t=sql.Identifier("public", table), c=sql.Identifier(column))
    )
    return conn


def test_cutover_names_a_writer_on_a_referenced_table_that_blocks_it(
    cogito_dsn: str, cogito_conn: Conn, tmp_path: Path
) -> None:
    """The cutover re-adds turns' foreign keys, which locks the tables they reference: an open
    application write on participants blocks it, and that writer is the one to name.
    (Regression: these tables were once left out of the locks taken and of the blockers named.)
    """
    db = cogito_conn
    text = COGITO_PLAN.read_text(encoding="utf-8")
    plan = plan_with(
        tmp_path,
        "cogito.yaml",
        text.replace("  lock_timeout_ms: 500\n", "  lock_timeout_ms: 500\n  lock_retries: 1\n"),
    )
    ok(orchestrator(cogito_dsn, "apply", plan, "--table", "turns"))
    before = snapshot(db, SCHEMAS)
    writer = writing(cogito_dsn, "participants", "name")
    try:
        result = orchestrator(cogito_dsn, *cutover_turns(plan, LOCK_TIMEOUT_MS))
        output = result.stdout + result.stderr
        # It stops cleanly...
        assert result.returncode == 1, output
        assert "nothing was changed" in output
        assert snapshot(db, SCHEMAS) == before
        waits = lock_waits(db)
        assert len(waits) == 2
        # ...but the operator is told who blocks it.
        pid = writer.info.backend_pid
        assert f"pid {pid} (" in output and "app-participants" in output, output
        assert all(pid in {b["pid"] for b in e["detail"]["blockers"]} for e in waits)
    finally:
        writer.rollback()
        writer.close()


def test_application_wait_stays_bounded_when_writers_hold_referenced_tables(
    cogito_dsn: str, cogito_conn: Conn
) -> None:
    """Two writers, on participants and on llm_configs, each delay the cutover a little less
    than lock_timeout. The cutover's whole wait, not each of its waits, must stay under
    lock_timeout while it holds public.turns. (Regression: the waits once added up to about
    2 x lock_timeout for the application.)"""
    db = cogito_conn
    lock_timeout = 2000
    ok(orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns"))
    reader = Probe(cogito_dsn, "SELECT id, content FROM public.turns WHERE id = 1 + mod(%(n)s, 50)")
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    writers = {
        "public.participants": writing(cogito_dsn, "participants", "name"),
        "public.llm_configs": writing(cogito_dsn, "llm_configs", "model"),
    }
    try:
        wait_for("a baseline", lambda: len(reader.samples) > 20)
        proc = start_orchestrator(cogito_dsn, *cutover_turns(PLAN, lock_timeout))
        # Each writer commits 1.5 s after the cutover starts waiting for it: each single wait
        # is shorter than lock_timeout, but one after the other they are not.
        while writers:
            waited = wait_for(
                "the cutover to wait for a writer",
                lambda: next((r for r in writers if waits_for_lock(db, "orchestrator", r)), None),
            )
            time.sleep(1.5)
            writers.pop(waited).commit()
        code, output = finish(proc)
        assert code == 0, output
        time.sleep(0.2)
    finally:
        for w in writers.values():
            w.rollback()
        reader.stop.set()
        thread.join(timeout=10)
    assert reader.errors == []
    assert reader.worst_ms() <= lock_timeout + HOLD_MARGIN_MS, reader.worst_ms()


def test_only_sessions_of_this_database_are_named_as_blockers(
    cogito_dsn: str, cogito_conn: Conn, server_dsn: str, tmp_path: Path
) -> None:
    db = cogito_conn
    text = COGITO_PLAN.read_text(encoding="utf-8")
    plan = plan_with(
        tmp_path,
        "cogito.yaml",
        text.replace("  lock_timeout_ms: 500\n", "  lock_timeout_ms: 500\n  lock_retries: 0\n"),
    )
    given(orchestrator(cogito_dsn, "apply", plan, "--table", "turns"))
    turns_oid = "SELECT 'public.turns'::regclass::oid AS oid"
    # Another database made from the same template (a staging copy, a second tenant): a report
    # there reads its own public.turns, which has the same OID as ours.
    for other in _fresh_db(server_dsn, COGITO_TEMPLATE):
        with psycopg.connect(other, application_name="other-db-report", row_factory=dict_row) as o:
            o.execute("SELECT count(*) FROM public.turns").fetchone()
            if o.execute(turns_oid).fetchone() != db.execute(turns_oid).fetchone():
                raise RuntimeError("the two databases do not share OIDs: nothing to show")
            report = report_reading_turns(cogito_dsn)
            try:
                result = orchestrator(cogito_dsn, *cutover_turns(plan, LOCK_TIMEOUT_MS))
                output = result.stdout + result.stderr
                if result.returncode != 1 or f"pid {report.info.backend_pid} (" not in output:
                    raise RuntimeError(f"the cutover did not stop on the report: {output}")
                named = {b["pid"] for e in lock_waits(db) for b in e["detail"]["blockers"]}
                assert named == {report.info.backend_pid}, output
                assert "other-db-report" not in output
            finally:
                report.rollback()
                report.close()


@pytest.fixture
def slow_autovacuum_server() -> Iterator[str]:
    """A server of this test's own (its autovacuum settings would disturb the others'), with
    autovacuum looking every second, and the Cogito sample."""
    from conftest import own_cogito_server

    def naptime(_: Path, base: str) -> str:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET autovacuum_naptime = '1s'")
            admin.execute("SELECT pg_reload_conf()")
        return base

    with own_cogito_server("orch-locks-av-", naptime) as (_, dsn):
        yield dsn


def test_cutover_cancels_an_autovacuum_in_its_way_as_postgres_would(
    slow_autovacuum_server: str,
) -> None:
    """An autovacuum of public.turns holds SHARE UPDATE EXCLUSIVE for seconds. PostgreSQL
    cancels it for a lock waiter only after deadlock_timeout (1 s), longer than our
    lock_timeout: the cutover cancels it itself, says so in the event log, and goes through."""
    dsn = slow_autovacuum_server
    assert orchestrator(dsn, "apply", PLAN, "--table", "turns").returncode == 0
    db = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
    # A vacuum that sleeps 100 ms after every page, and dead rows to give it work now.
    db.execute(
        "ALTER TABLE public.turns SET (autovacuum_vacuum_cost_delay = 100, "
        "autovacuum_vacuum_cost_limit = 1, autovacuum_vacuum_threshold = 0, "
        "autovacuum_vacuum_scale_factor = 0)"
    )
    db.execute("UPDATE public.turns SET content = content")
    deadline = time.monotonic() + 60
    worker = None
    while worker is None and time.monotonic() < deadline:
        worker = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' "
            "AND query LIKE '%%public.turns%%'"
        ).fetchone()
        time.sleep(0.2)
    assert worker is not None, "no autovacuum of public.turns started within 60 s"

    r = orchestrator(dsn, "cutover", PLAN, "--table", "turns", "--yes",
                     "--lock-timeout", str(LOCK_TIMEOUT_MS))
    assert r.returncode == 0, r.stdout + r.stderr
    detail = db.execute(
        "SELECT detail FROM _orchestrator.events WHERE action = 'cutover' "
        "AND outcome IN ('lock_timeout', 'autovacuum') AND detail ? 'autovacuum' "
        "ORDER BY id LIMIT 1"
    ).fetchone()
    assert detail is not None, "the cutover never met the autovacuum"
    assert worker["pid"] in detail["detail"]["autovacuum"]["cancelled"]
    db.close()


def test_the_drain_inside_the_lock_looks_keys_up_whatever_the_logs_statistics(
    cogito_dsn: str,
) -> None:
    """The log's statistics lie: autovacuum analyzed it full, and entries leave by deletion.
    Planned from them, the last drain (inside the cutover lock) scanned the whole table
    (557 ms at 1M rows in docs/benchmarks.md); it must look each logged key up instead."""
    from orchestrator.plan import load_plan
    from orchestrator.run.session import session
    from orchestrator.sql import capture

    ok(orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns", "--until", "copy"))
    with session(cogito_dsn, load_plan(COGITO_PLAN)) as eng:
        d = capture.forward(eng.context().moves["turns"])
    db = psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row)
    # A large fill, analyzed, then deleted down to a short tail: the statistics of a big log.
    db.execute("UPDATE public.turns SET content = content")
    db.execute(sql.SQL("ANALYZE {}").format(d.log))
    db.execute(sql.SQL("DELETE FROM {} WHERE ctid IN (SELECT ctid FROM {} OFFSET 20)").format(
        d.log, d.log))
    with db.transaction():
        plans = []
        for stmt in capture.replay_all_sql(d):
            text = stmt.as_string(db)
            if text.startswith("SELECT set_config"):
                db.execute(stmt)
                continue
            rows = db.execute(sql.SQL("EXPLAIN {}").format(stmt)).fetchall()
            plans.append("\n".join(r["QUERY PLAN"] for r in rows))
    assert all("Seq Scan on log_turns" in plan for plan in plans)  # what the plans read
    for plan in plans[:2]:  # the delete from the copy and the insert from the live table
        assert "Seq Scan on turns" not in plan, plan
    db.close()

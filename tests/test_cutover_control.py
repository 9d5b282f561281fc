"""Cutover without surprises (issue 15): the stall forecast, opt-in termination of blockers
under safety rules, and the gates that hold a swap (a window, a postpone file, --when-ready).

The operator's story: `orders` has been copied and verified; an application session sits in
a transaction that read it. The swap does not queue behind that session (which would make
every later statement on the table wait its whole lock_timeout): it names it and waits, and
it ends it only when told to and only when the rules allow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

Conn = psycopg.Connection[Any]
LOCK_MS = "200"
ENV = {**os.environ, "COLUMNS": "250"}
PLAN = """version: 1
name: ctl
tables:
  - name: orders
    schema: dom
"""

_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_orchestrator_left_running() -> Iterator[None]:
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def cli(dsn: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=timeout, check=False, env=ENV)


def start(dsn: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _started.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def events(db: Conn, outcome: str, action: str | None = None) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT * FROM _orchestrator.events WHERE plan = 'ctl' AND outcome = %s "
        "AND (%s::text IS NULL OR action = %s) ORDER BY id", (outcome, action, action),
    ).fetchall()


def relkind(db: Conn, name: str) -> str | None:
    r = db.execute("SELECT relkind::text AS k FROM pg_class WHERE oid = to_regclass(%s)",
                   (name,)).fetchone()
    return r["k"] if r else None


@pytest.fixture
def ready(empty_dsn: str, tmp_path: Path) -> Iterator[tuple[str, str, Conn, str]]:
    """orders copied and verified; an application role that may read and write it."""
    role = f"ctl_app_{uuid.uuid4().hex[:8]}"
    db = psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row)
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    db.execute("INSERT INTO orders SELECT g, g FROM generate_series(1, 1000) g")
    db.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
    db.execute(sql.SQL("GRANT SELECT, UPDATE ON orders TO {}").format(sql.Identifier(role)))
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    assert cli(empty_dsn, "apply", str(plan)).returncode == 0
    try:
        yield empty_dsn, str(plan), db, role
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        db.close()


def as_role(dsn: str, role: str, **kw: Any) -> Conn:
    conninfo = psycopg.conninfo.make_conninfo(dsn, user=role, **kw)
    return psycopg.connect(conninfo, application_name="app-batch")


def blocker(dsn: str, role: str | None = None, write: bool = False, **kw: Any) -> Conn:
    """An application session left in a transaction that read (or wrote) orders."""
    conn = as_role(dsn, role, **kw) if role else psycopg.connect(dsn, application_name="app-batch")
    if write:
        conn.execute("UPDATE public.orders SET total = total WHERE id = 1")
    else:
        conn.execute("SELECT count(*) FROM public.orders").fetchone()
    time.sleep(0.3)  # older than the 200 ms lock_timeout
    return conn


def alive(db: Conn, conn: Conn) -> bool:
    return db.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s",
                      (conn.info.backend_pid,)).fetchone() == {"n": 1}


def test_the_swap_names_an_idle_transaction_and_waits_instead_of_queueing(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, role = ready
    held = blocker(dsn, role)
    try:
        proc = start(dsn, "cutover", plan, "--yes", "--lock-timeout", LOCK_MS)
        waiting = wait_for("the forecast", lambda: events(db, "waiting", "cutover"))
        forecast = waiting[0]["detail"]["forecast"]
        assert f"will wait behind pid {held.info.backend_pid}, idle in transaction" in forecast
        assert f"role {role}" in forecast and "app-batch" in forecast
        # The swap did not queue: the application reads and writes the table meanwhile.
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("SET lock_timeout = '50ms'")
            app.execute("UPDATE public.orders SET total = total + 1 WHERE id = 2")
        status = cli(dsn, "status", plan).stdout
        assert "waiting: orders cutover" in status
        assert f"pid {held.info.backend_pid}" in status
        assert proc.poll() is None
    finally:
        held.commit()
        held.close()
    code, output = finish(proc)
    assert code == 0, output
    assert relkind(db, "public.orders") == "v"
    assert events(db, "lock_timeout") == []  # it tried once, when the forecast was clear


def test_a_forecast_that_stays_unclear_gives_up_and_changes_nothing(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, role = ready
    held = blocker(dsn, role)
    pid = held.info.backend_pid
    try:
        r = cli(dsn, "cutover", plan, "--yes", "--lock-timeout", LOCK_MS, "--forecast-wait", "1")
    finally:
        held.commit()
        held.close()
    assert r.returncode == 1
    text = " ".join((r.stdout + r.stderr).split())
    assert "did not try its lock, nothing was changed" in text
    assert f"pid {pid}, idle in transaction" in text
    assert "--terminate-blockers-after" in text and "Traceback" not in text
    assert relkind(db, "public.orders") == "r"


def test_an_idle_reader_is_ended_when_the_operator_allows_it_and_logged(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, role = ready
    held = blocker(dsn, role)
    pid = held.info.backend_pid
    r = cli(dsn, "cutover", plan, "--yes", "--lock-timeout", LOCK_MS,
            "--terminate-blockers-after", "300")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not alive(db, held)
    ended = [s for e in events(db, "terminated", "terminate_blockers")
             for s in e["detail"]["sessions"] if s["terminated"]]
    assert [(s["pid"], s["role"], s["state"]) for s in ended] == [
        (pid, role, "idle in transaction")]
    assert "FROM public.orders" in ended[0]["query"] and ended[0]["xact_age"]
    assert relkind(db, "public.orders") == "v"
    held.close()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("superuser", "a superuser's session"),
        ("writer", "its transaction has written"),
        ("old", "its transaction is older than 0.1 s"),
        ("replication", "a walsender process, not a client"),
    ],
)
def test_termination_spares_what_the_rules_protect(
    ready: tuple[str, str, Conn, str], case: str, reason: str
) -> None:
    dsn, plan, db, role = ready
    extra: list[str] = []
    if case == "superuser":
        held = blocker(dsn)  # the tests' own superuser
    elif case == "writer":
        held = blocker(dsn, role, write=True)
    elif case == "old":
        held = blocker(dsn, role)
        extra = ["--terminate-max-age", "0.1"]
    else:
        held = blocker(dsn, role, replication="database")
    try:
        r = cli(dsn, "cutover", plan, "--yes", "--lock-timeout", LOCK_MS,
                "--terminate-blockers-after", "100", "--forecast-wait", "2", *extra)
        assert r.returncode == 1, r.stdout + r.stderr
        assert alive(db, held)
        spared = [s for e in events(db, "spared", "terminate_blockers")
                  for s in e["detail"]["sessions"]]
        assert spared and all(s["pid"] == held.info.backend_pid for s in spared)
        assert reason in spared[0]["spared"]
        assert relkind(db, "public.orders") == "r"
    finally:
        held.rollback()
        held.close()


def test_a_writer_is_ended_only_with_terminate_writers(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, role = ready
    held = blocker(dsn, role, write=True)
    r = cli(dsn, "cutover", plan, "--yes", "--lock-timeout", LOCK_MS,
            "--terminate-blockers-after", "100", "--terminate-writers")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not alive(db, held)
    held.close()


def test_a_postpone_file_holds_the_swap_across_a_sigkill(
    ready: tuple[str, str, Conn, str], tmp_path: Path
) -> None:
    dsn, plan, db, _ = ready
    hold = tmp_path / "hold-cutover"
    hold.touch()
    args = ("cutover", plan, "--yes", "--postpone-file", str(hold))
    proc = start(dsn, *args)
    wait_for("the hold", lambda: events(db, "waiting", "cutover"))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert relkind(db, "public.orders") == "r"
    assert f"postponed while {hold} exists" in " ".join(cli(dsn, "status", plan).stdout.split())

    again = start(dsn, *args)  # the rerun holds too, until the file goes
    wait_for("the rerun's hold", lambda: len(events(db, "waiting", "cutover")) >= 2)
    time.sleep(0.5)
    assert again.poll() is None and relkind(db, "public.orders") == "r"
    hold.unlink()
    code, output = finish(again)
    assert code == 0, output
    assert relkind(db, "public.orders") == "v"
    assert events(db, "gate_open", "cutover")


def test_a_window_holds_the_swap_across_a_sigkill_until_it_opens_and_ctrl_c_cancels(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, _ = ready
    now = time.localtime()
    # A window that opened two hours ago and closed one hour ago: not now.
    closed = f"{(now.tm_hour - 2) % 24:02d}:00-{(now.tm_hour - 1) % 24:02d}:00"
    proc = start(dsn, "cutover", plan, "--yes", "--window", closed)
    wait_for("the window", lambda: events(db, "waiting", "cutover"))
    detail = events(db, "waiting", "cutover")[-1]["detail"]
    assert detail["gates"] == [f"outside the cutover window {closed}"]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert relkind(db, "public.orders") == "r"
    proc = start(dsn, "cutover", plan, "--yes", "--window", closed)  # holds again
    wait_for("the window again", lambda: len(events(db, "waiting", "cutover")) == 2)
    assert relkind(db, "public.orders") == "r"
    proc.send_signal(signal.SIGINT)  # the operator's Ctrl-C
    code, output = finish(proc)
    assert code == 1 and "interrupted" in output and "Traceback" not in output
    assert relkind(db, "public.orders") == "r"

    open_now = f"{(now.tm_hour - 1) % 24:02d}:00-{(now.tm_hour + 1) % 24:02d}:00"
    r = cli(dsn, "cutover", plan, "--yes", "--window", open_now)
    assert r.returncode == 0, r.stdout + r.stderr
    assert relkind(db, "public.orders") == "v"


def test_a_bad_window_is_a_clear_error(ready: tuple[str, str, Conn, str]) -> None:
    dsn, plan, db, _ = ready
    r = cli(dsn, "cutover", plan, "--yes", "--window", "2am-4am")
    assert r.returncode == 1
    assert "cutover window '2am-4am': not HH:MM-HH:MM" in r.stdout + r.stderr
    assert relkind(db, "public.orders") == "r"


def test_when_ready_waits_for_a_clear_forecast_then_swaps(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, role = ready
    held = blocker(dsn, role)
    pid = held.info.backend_pid
    try:
        proc = start(dsn, "cutover", plan, "--yes", "--lock-timeout", LOCK_MS, "--when-ready")
        waiting = wait_for("the gate", lambda: events(db, "waiting", "cutover"))
        assert any(f"pid {pid}" in g for g in waiting[0]["detail"]["gates"])
    finally:
        held.commit()
        held.close()
    code, output = finish(proc)
    assert code == 0, output
    assert relkind(db, "public.orders") == "v"
    history = json.loads(cli(dsn, "history", plan, "--format", "json").stdout)
    assert [e["outcome"] for e in history if e["action"] == "cutover"][-3:] == [
        "waiting", "gate_open", "ok"]


def corrupt(db: Conn) -> None:
    """Changes the capture never saw: one by a session that fires no triggers (a logical
    replication worker writes this way) on the source, one straight into the target."""
    with db.transaction():
        db.execute("SET LOCAL session_replication_role = replica")
        db.execute("UPDATE public.orders SET total = -1 WHERE id = 10")
    db.execute("DELETE FROM dom.orders WHERE id = 500")


def test_verify_repairs_a_range_the_capture_missed_and_logs_it(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, _ = ready
    corrupt(db)
    # A write behind the triggers is seen by a full pass (the re-check of changed chunks
    # sees what the capture saw).
    r = cli(dsn, "cutover", plan, "--yes", "--full-verify")
    assert r.returncode == 0, r.stdout + r.stderr
    repairs = events(db, "repair", "verify")
    assert len(repairs) == 2
    first, second = (e["detail"] for e in repairs)
    assert first["lo"] is None or int(first["lo"][0]) < 10 <= int(first["hi"][0])
    assert (first["deleted"], first["inserted"]) == (first["inserted"], first["inserted"])
    assert int(second["lo"][0]) < 500 <= int(second["hi"][0])
    assert second["inserted"] == second["deleted"] + 1
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT total FROM dom.orders WHERE id = 10").fetchone() == (-1,)
        assert conn.execute("SELECT count(*) FROM dom.orders").fetchone() == (1000,)
    status = " ".join(cli(dsn, "status", plan).stdout.split())
    assert "suspect: orders: 2 chunk repairs" in status


def test_no_repair_only_reports_the_range(ready: tuple[str, str, Conn, str]) -> None:
    dsn, plan, db, _ = ready
    corrupt(db)
    r = cli(dsn, "cutover", plan, "--yes", "--no-repair", "--full-verify")
    assert r.returncode == 1
    text = " ".join((r.stdout + r.stderr).split())
    assert "source and target differ in keys (id)" in text and "Traceback" not in text
    assert events(db, "repair", "verify") == []
    assert relkind(db, "public.orders") == "r"


# --- incremental verification -----------------------------------------------------------------


def inproc(dsn: str, *args: str) -> Any:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    return CliRunner().invoke(app, ["--dsn", dsn, *args])


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 100 keys: orders' 1,000 rows make ten, and an eleventh from the last key on
    (the CLI runs in this process)."""
    from orchestrator.stages import verify as verify_stage

    monkeypatch.setattr(verify_stage, "CHUNK", 100)


def test_the_cutover_rechecks_only_the_rows_written_since_the_full_pass(
    empty_dsn: str, tmp_path: Path, small_chunks: None
) -> None:
    db = psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row)
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    db.execute("INSERT INTO orders SELECT g, g FROM generate_series(1, 1000) g")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    assert inproc(empty_dsn, "apply", str(plan)).exit_code == 0
    chunks = db.execute("SELECT count(*) AS n FROM _orchestrator.chunks").fetchone()
    assert chunks == {"n": 11}

    # A day of writes: updates, a delete, an insert past the last key (five keys).
    db.execute("UPDATE public.orders SET total = 0 WHERE id IN (5, 7, 950)")
    db.execute("DELETE FROM public.orders WHERE id = 955")
    db.execute("INSERT INTO public.orders VALUES (1001, 1)")
    done = inproc(empty_dsn, "cutover", str(plan), "--yes")
    assert done.exit_code == 0, done.output
    rechecks = events(db, "recheck", "verify")
    assert [(e["detail"]["keys"], e["detail"]["repaired"]) for e in rechecks] == [(5, 0)]
    assert events(db, "full_pass", "verify") == []
    assert db.execute("SELECT count(*) AS n FROM dom.orders").fetchone() == {"n": 1000}
    db.close()


def test_a_stale_full_proof_is_repeated_in_full_and_says_why(
    empty_dsn: str, tmp_path: Path, small_chunks: None
) -> None:
    db = psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row)
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    db.execute("INSERT INTO orders SELECT g, g FROM generate_series(1, 1000) g")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    assert inproc(empty_dsn, "apply", str(plan)).exit_code == 0
    # The proof ages: as if verify had run 25 hours ago.
    db.execute("UPDATE _orchestrator.chunks SET passed_at = passed_at - interval '25 hours'")
    db.execute("UPDATE public.orders SET total = 0 WHERE id = 5")
    done = inproc(empty_dsn, "cutover", str(plan), "--yes")
    assert done.exit_code == 0, done.output
    full = events(db, "full_pass", "verify")
    assert len(full) == 1 and "last full proof is 25.0 h old" in full[0]["detail"]["reason"]
    assert events(db, "recheck", "verify") == []
    db.close()


def test_status_shows_the_proof_and_the_keys_changed_since(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, _ = ready
    db.execute("UPDATE public.orders SET total = 0 WHERE id IN (1, 2, 3)")
    assert cli(dsn, "apply", plan).returncode == 0  # replays the log: three keys touched
    status = json.loads(cli(dsn, "status", plan, "--format", "json").stdout)
    proof = next(t for t in status["tables"] if t["name"] == "orders")["proof"]
    assert proof["chunks"] == 1 and proof["changed_keys"] == 3
    text = " ".join(cli(dsn, "status", plan).stdout.split())
    assert "proof: orders: full pass" in text and "3 keys changed since" in text


def test_the_recheck_repairs_a_written_row_that_differs_or_names_it(
    ready: tuple[str, str, Conn, str],
) -> None:
    dsn, plan, db, _ = ready
    db.execute("UPDATE public.orders SET total = 7 WHERE id = 5")
    assert cli(dsn, "apply", plan).returncode == 0  # replays it: key 5 is noted
    db.execute("UPDATE dom.orders SET total = -7 WHERE id = 5")  # then damaged behind us
    refused = cli(dsn, "cutover", plan, "--yes", "--no-repair")
    assert refused.returncode == 1
    assert "source and target differ for keys (id) (5)" in " ".join(refused.stderr.split())
    assert relkind(db, "public.orders") == "r"
    assert f"orchestrator apply {plan} --table orders" in refused.stderr
    # Verify failed: the operator verifies in full (repairing), then cuts over.
    assert cli(dsn, "apply", plan).returncode == 0
    r = cli(dsn, "cutover", plan, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    # The range narrowed to at most 64 rows around key 5 was replaced from the source.
    repairs = [e["detail"] for e in events(db, "repair", "verify")]
    assert len(repairs) == 1 and 1 <= repairs[0]["deleted"] == repairs[0]["inserted"] <= 64
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT total FROM dom.orders WHERE id = 5").fetchone() == (7,)

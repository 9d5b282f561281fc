"""Invariant 2, crash-safe: a SIGKILLed orchestrator, run again, ends where an uninterrupted
run ends.

The orchestrator runs as the operator runs it (`python -m orchestrator`, its own process) and
is killed with a real SIGKILL at three points: in the middle of the copy of turns (some batches
committed, not all), during verify, and between two tries of a cutover that a reader keeps
waiting. While it is dead the application goes on writing. Then the operator reruns it; a rerun
may be refused for a moment while the server notices the dead session and frees its advisory
locks, and is retried.

A fourth kill lands after the swap committed, while the re-pointed foreign keys wait to be
validated (a known engine bug: the rerun never validates them).

The end state must equal an uninterrupted run's (in a database of its own): the same catalog of
every schema involved (so no stage is half-applied: no target without its indexes or keys, no
leftover capture trigger, log or schema), every stage done, and the new table holding exactly
the rows of the retired source, which include every write made while the orchestrator was dead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN, COGITO_TEMPLATE, COGITO_TEST_TURNS, _fresh_db
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator.model.catalog import snapshot
from orchestrator.stages.registry import COPY_STRATEGY

Conn = psycopg.Connection[Any]
PLAN = str(COGITO_PLAN)
SCHEMAS = ["public", "conversation", "_orchestrator", "_orchestrator_retired"]
STAGES = tuple(s.name for s in COPY_STRATEGY.reversible)  # the copy strategy's, to its swap
REFUSED = "is being worked on by another orchestrator"
MOVE = ("apply", PLAN, "--table", "turns", "--until", "cutover", "--yes")


def orchestrator(dsn: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_orchestrator(dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    if proc.wait(timeout=10) != -signal.SIGKILL:
        raise RuntimeError(f"the orchestrator ended before the kill (exit {proc.returncode})")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def rerun(dsn: str, *args: str, within: float = 10) -> int:
    """Run again until done; a refusal naming the dead session's locks is retried (for up to
    `within` seconds). Returns how many times it was refused."""
    refused = 0
    deadline = time.monotonic() + within
    while True:
        r = orchestrator(dsn, *args)
        output = r.stdout + r.stderr
        if r.returncode == 0:
            return refused
        if REFUSED not in output or time.monotonic() > deadline:
            raise RuntimeError(f"the rerun failed: {output}")
        refused += 1
        time.sleep(0.5)


def stage(conn: Conn, table: str, name: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT * FROM _orchestrator.stages WHERE plan = 'cogito' AND table_name = %s "
        "AND stage = %s",
        (table, name),
    ).fetchone()
    return row or {"status": None, "rows_done": 0}


def statuses(conn: Conn) -> dict[str, str]:
    return {s: stage(conn, "turns", s)["status"] for s in COPY_STRATEGY.names}


def events(conn: Conn, action: str, outcome: str) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT * FROM _orchestrator.events WHERE plan = 'cogito' AND table_name = 'turns' "
        "AND action = %s AND outcome = %s ORDER BY id",
        (action, outcome),
    ).fetchall()


def application_writes(conn: Conn) -> None:
    """The application while the orchestrator is dead: edits across the whole key range, new
    turns, and key changes and deletes of turns nothing refers to."""
    conn.execute("UPDATE public.turns SET content = 'edited while it was down' WHERE id % 97 = 0")
    free = [
        r["id"]
        for r in conn.execute(
            "SELECT id FROM public.turns t WHERE NOT EXISTS (SELECT 1 FROM public.block_turns b "
            "WHERE b.turn_id = t.id) AND NOT EXISTS (SELECT 1 FROM public.turns r "
            "WHERE r.reply_to_turn_id = t.id) ORDER BY id"
        ).fetchall()
    ]
    assert len(free) > 20
    picks = free[:3] + free[len(free) // 2 : len(free) // 2 + 3] + free[-3:]
    conn.execute("DELETE FROM public.turns WHERE id = ANY(%s)", (picks[::2],))
    for key in picks[1::2]:
        conn.execute("UPDATE public.turns SET id = id + 5000000 WHERE id = %s", (key,))
    conn.execute(
        "INSERT INTO public.turns (participant_id, content) SELECT id, 'new while it was down' "
        "FROM public.participants ORDER BY id LIMIT 5"
    )


# The new table and the retired source, column for column ("timestamp" was renamed sent_at).
NEW_ROWS = (
    "SELECT id, participant_id, reply_to_turn_id, content, sent_at, metadata, llm_config_id, "
    "updated_at FROM conversation.turns"
)
OLD_ROWS = (
    'SELECT id, participant_id, reply_to_turn_id, content, "timestamp", metadata, llm_config_id, '
    "updated_at FROM _orchestrator_retired.turns"
)


def waits_for_lock(conn: Conn, application: str, relation: str) -> bool:
    """Whether a session of this database, by application name, waits for a lock on relation."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE NOT l.granted AND a.datname = current_database() AND a.application_name = %s "
        "AND l.relation = to_regclass(%s)) AS waits",
        (application, relation),
    ).fetchone()
    return bool(row and row["waits"])


def foreign_keys_of_new_table(conn: Conn) -> dict[str, bool]:
    """The foreign keys to and from conversation.turns, and whether each is validated."""
    rows = conn.execute(
        "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f' AND "
        "(conrelid = 'conversation.turns'::regclass OR confrelid = 'conversation.turns'::regclass)"
    ).fetchall()
    return {r["conname"]: r["convalidated"] for r in rows}


def except_both_ways(conn: Conn) -> tuple[int, int]:
    """Rows of the new table missing from the retired source, and the other way round."""
    count = sql.SQL("SELECT count(*) AS n FROM ({} EXCEPT {}) x")
    extra = conn.execute(count.format(sql.SQL(NEW_ROWS), sql.SQL(OLD_ROWS))).fetchone()
    lost = conn.execute(count.format(sql.SQL(OLD_ROWS), sql.SQL(NEW_ROWS))).fetchone()
    assert extra is not None and lost is not None
    return extra["n"], lost["n"]


@pytest.fixture(scope="module")
def uninterrupted(server_dsn: str) -> Iterator[dict[str, Any]]:
    """The end state of the same move run once, start to finish, in a database of its own."""
    for dsn in _fresh_db(server_dsn, COGITO_TEMPLATE):
        r = orchestrator(dsn, *MOVE)
        assert r.returncode == 0, r.stdout + r.stderr
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            end = {"catalog": snapshot(conn, SCHEMAS), "statuses": statuses(conn)}
        yield end


def assert_same_end_state(
    conn: Conn, uninterrupted: dict[str, Any], written_meanwhile: bool = True
) -> None:
    assert statuses(conn) == uninterrupted["statuses"]
    assert set(uninterrupted["statuses"].values()) == {"done", "pending"}  # finalize waits
    # Nothing half-applied: the new table has its key, indexes and foreign keys (validated);
    # the retired one has its reverse capture; no stray invalid index, trigger, log or schema.
    assert snapshot(conn, SCHEMAS) == uninterrupted["catalog"]
    indexes = conn.execute(
        "SELECT count(*) FILTER (WHERE i.indisvalid) AS valid, count(*) AS n FROM pg_index i "
        "WHERE i.indrelid = 'conversation.turns'::regclass"
    ).fetchone()
    assert indexes == {"valid": 3, "n": 3}
    # The rows: the new table is the retired source, every write made meanwhile included.
    assert except_both_ways(conn) == (0, 0)
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM conversation.turns) AS target, "
        "(SELECT count(*) FROM _orchestrator_retired.turns) AS source, "
        "(SELECT count(*) FROM conversation.turns WHERE content LIKE '%while it was down') "
        "AS written_meanwhile"
    ).fetchone()
    assert counts is not None
    assert counts["target"] == counts["source"] == COGITO_TEST_TURNS  # 5 deleted, 5 inserted
    assert (counts["written_meanwhile"] >= 20) is written_meanwhile


def test_killed_in_the_middle_of_the_copy_resumes_from_its_checkpoint(
    cogito_dsn: str, cogito_conn: Conn, uninterrupted: dict[str, Any]
) -> None:
    db = cogito_conn
    # A slow copy: 100-row batches, 200 ms apart.
    for key, value in (("batch_size", "100"), ("sleep_ms", "200")):
        assert orchestrator(cogito_dsn, "set", PLAN, key, value, "--table", "turns").returncode == 0
    proc = start_orchestrator(cogito_dsn, *MOVE)
    try:
        wait_for("a few batches", lambda: stage(db, "turns", "copy")["rows_done"] >= 300)
    finally:
        sigkill(proc)

    # Dead mid-copy: some batches committed, each with its checkpoint, and no more.
    copy = stage(db, "turns", "copy")
    assert copy["status"] == "running"
    assert 0 < copy["rows_done"] < COGITO_TEST_TURNS
    copied = db.execute("SELECT count(*) AS n FROM conversation.turns").fetchone()
    assert copied == {"n": copy["rows_done"]}
    # Heap order, a range per worker: each worker's committed batches are exactly what lies
    # in the target below its range's checkpoint.
    cp = copy["checkpoint"]
    assert cp["mode"] == "heap" and len(cp["ranges"]) >= 1
    for r in cp["ranges"]:
        assert r["next"] <= r["hi"]

    application_writes(db)
    # The operator lifts the throttle and runs the same command again.
    r = orchestrator(cogito_dsn, "set", PLAN, "sleep_ms", "0", "--table", "turns")
    assert r.returncode == 0, r.stdout + r.stderr
    rerun(cogito_dsn, *MOVE)

    # The rerun went on from the checkpoint: one copy start, one copy end, nothing recopied.
    assert len(events(db, "copy", "started")) == 1
    assert len(events(db, "copy", "ok")) == 1
    assert_same_end_state(db, uninterrupted)


def test_killed_during_verify_verifies_again_and_moves_on(
    cogito_dsn: str, cogito_conn: Conn, uninterrupted: dict[str, Any]
) -> None:
    db = cogito_conn
    r = orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns", "--until", "copy")
    assert r.returncode == 0, r.stdout + r.stderr
    # A session holding SHARE on the new table keeps verify's first replay waiting, so the
    # kill lands while verify runs.
    with psycopg.connect(cogito_dsn) as holder:
        holder.execute("LOCK TABLE conversation.turns IN SHARE MODE")
        proc = start_orchestrator(cogito_dsn, *MOVE)
        try:
            wait_for("verify to run", lambda: stage(db, "turns", "verify")["status"] == "running")
            time.sleep(0.3)
        finally:
            sigkill(proc)
        holder.commit()

    assert statuses(db) == {
        "prepare": "done",
        "dual_write": "done",
        "copy": "done",
        "verify": "running",
        "cutover": "pending",
        "finalize": "pending",
    }
    assert events(db, "verify", "ok") == []

    application_writes(db)
    rerun(cogito_dsn, *MOVE)
    assert len(events(db, "verify", "ok")) >= 1
    assert_same_end_state(db, uninterrupted)


def test_killed_between_cutover_retries_leaves_nothing_half_done(
    cogito_dsn: str, cogito_conn: Conn, uninterrupted: dict[str, Any]
) -> None:
    db = cogito_conn
    r = orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns")
    assert r.returncode == 0, r.stdout + r.stderr
    before = snapshot(db, SCHEMAS)

    # A report reads public.turns in a long transaction: the cutover gives way and retries.
    report = psycopg.connect(cogito_dsn, application_name="app-report")
    try:
        report.execute("SELECT count(*) FROM public.turns").fetchone()
        proc = start_orchestrator(
            cogito_dsn, "cutover", PLAN, "--table", "turns", "--yes", "--lock-timeout", "200",
            "--ignore-forecast",
        )
        try:
            wait_for("the first try to give way", lambda: events(db, "cutover", "lock_timeout"))
        finally:
            sigkill(proc)
        waits = events(db, "cutover", "lock_timeout")
        assert waits and report.info.backend_pid in {
            b["pid"] for b in waits[0]["detail"]["blockers"]
        }
    finally:
        report.commit()
        report.close()

    # Dead between tries: the swap was all or nothing, so nothing of it is there.
    assert stage(db, "turns", "cutover")["status"] == "running"
    assert events(db, "cutover", "ok") == []
    assert snapshot(db, SCHEMAS) == before
    assert db.execute(
        "SELECT relkind::text AS k FROM pg_class WHERE oid = 'public.turns'::regclass"
    ).fetchone() == {"k": "r"}

    application_writes(db)
    rerun(cogito_dsn, "cutover", PLAN, "--table", "turns", "--yes", "--lock-timeout", "200")
    assert len(events(db, "cutover", "ok")) == 1
    assert_same_end_state(db, uninterrupted)


def kill_while_validation_waits(dsn: str, db: Conn, args: tuple[str, ...], swapped: str) -> None:
    """SIGKILL the orchestrator between a swap's commit and the validation of the foreign keys
    it re-added NOT VALID. An application transaction that wrote a participant holds the swap
    (which adds a key referencing participants) for a moment; meanwhile a maintenance session
    queues for block_turns, so it holds that table right after the swap commits, and the
    validation of block_turns' re-pointed key waits for it. That is where the orchestrator
    dies. `swapped` is the cutover status the swap commits."""
    writer = psycopg.connect(dsn, application_name="app-writer")
    maintenance = psycopg.connect(dsn, application_name="app-maintenance")
    queued = threading.Thread(
        target=lambda: maintenance.execute("LOCK TABLE public.block_turns IN SHARE MODE")
    )
    try:
        writer.execute(
            "UPDATE public.participants SET name = name "
            "WHERE id = (SELECT min(id) FROM public.participants)"
        )
        proc = start_orchestrator(dsn, *args, "--yes", "--lock-timeout", "10000")
        try:
            wait_for(
                "the swap to wait for the writer",
                lambda: waits_for_lock(db, "orchestrator", "public.participants"),
            )
            queued.start()
            wait_for(
                "the maintenance session to queue",
                lambda: waits_for_lock(db, "app-maintenance", "public.block_turns"),
            )
            writer.commit()
            queued.join(timeout=10)
            wait_for(
                "the validation to wait",
                lambda: (
                    stage(db, "turns", "cutover")["status"] == swapped
                    and waits_for_lock(db, "orchestrator", "public.block_turns")
                ),
            )
        finally:
            sigkill(proc)
    finally:
        writer.close()
        maintenance.commit()
        maintenance.close()


def test_killed_after_the_swap_before_its_foreign_keys_are_validated(
    cogito_dsn: str, cogito_conn: Conn, uninterrupted: dict[str, Any]
) -> None:
    db = cogito_conn
    r = orchestrator(cogito_dsn, "apply", PLAN, "--table", "turns")
    if r.returncode != 0:
        raise RuntimeError(r.stdout + r.stderr)

    kill_while_validation_waits(
        cogito_dsn, db, ("cutover", PLAN, "--table", "turns"), swapped="done"
    )

    # Dead after the swap: the new table is live, some of its foreign keys not yet validated.
    if not events(db, "cutover", "ok") or all(foreign_keys_of_new_table(db).values()):
        raise RuntimeError("the kill did not land between the swap and the validation")

    rerun(cogito_dsn, "cutover", PLAN, "--table", "turns", "--yes")
    assert all(foreign_keys_of_new_table(db).values()), foreign_keys_of_new_table(db)
    assert_same_end_state(db, uninterrupted, written_meanwhile=False)


def foreign_keys_of_old_table(conn: Conn) -> dict[str, bool]:
    """The foreign keys to and from public.turns, and whether each is validated."""
    rows = conn.execute(
        "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f' AND "
        "(conrelid = 'public.turns'::regclass OR confrelid = 'public.turns'::regclass)"
    ).fetchall()
    return {r["conname"]: r["convalidated"] for r in rows}


def test_killed_after_the_rollback_swap_before_its_foreign_keys_are_validated(
    cogito_dsn: str, cogito_conn: Conn
) -> None:
    """Found by `make stress` (seed 1795610319): a rollback of cutover killed after its swap
    committed left the keys it re-added to public.turns NOT VALID, and the rerun, seeing the
    cutover already rolled back, went on without validating them."""
    db = cogito_conn
    user = ["public", "conversation"]  # _orchestrator_retired stays, empty, as it always does
    before = snapshot(db, user)
    r = orchestrator(cogito_dsn, *MOVE)
    if r.returncode != 0:
        raise RuntimeError(r.stdout + r.stderr)

    kill_while_validation_waits(
        cogito_dsn, db, ("rollback", PLAN, "--table", "turns", "--to", "verify"),
        swapped="rolled_back",
    )

    if all(foreign_keys_of_old_table(db).values()):
        raise RuntimeError("the kill did not land between the swap back and the validation")

    # The operator reruns, now all the way back: the keys are validated, the catalog exact.
    rerun(cogito_dsn, "rollback", PLAN, "--table", "turns", "--yes")
    assert all(foreign_keys_of_old_table(db).values()), foreign_keys_of_old_table(db)
    assert snapshot(db, user) == before

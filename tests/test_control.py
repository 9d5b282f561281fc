"""The control schema: where the orchestrator records what it did, and who may act.

State commits with the work it records (a rolled-back step leaves no trace), the event log is
append-only, and one operator at a time holds a plan and its tables: a second is refused with
the first holder named, and a holder that dies releases its locks.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from psycopg import sql

from orchestrator.db import APP_NAME, connect
from orchestrator.errors import IllegalTransition, LockHeld, StageError
from orchestrator.model.catalog import snapshot
from orchestrator.plan import LoadedPlan, load_plan, parse_plan
from orchestrator.stages.registry import TERMINAL, stage_names
from orchestrator.state import locks
from orchestrator.state import store as control
from orchestrator.state.locks import operator_lock
from orchestrator.state.migrations import SCHEMA_VERSION, ensure_schema
from orchestrator.state.store import Store, stage_rows

Conn = psycopg.Connection[Any]
CTL = "_orchestrator"


def stages_for(loaded: LoadedPlan) -> dict[str, tuple[str, ...]]:
    plan = loaded.plan
    return {t.name: stage_names(plan.options_for(t).strategy) for t in plan.tables}


def store(conn: Conn) -> Store:
    return Store(conn, CTL, "cogito", TERMINAL)


@pytest.fixture
def registered(cogito_conn: Conn) -> LoadedPlan:
    loaded = load_plan(COGITO_PLAN)
    ensure_schema(cogito_conn, CTL)
    with cogito_conn.transaction():
        store(cogito_conn).register(loaded, stages_for(loaded))
    return loaded


def ctl(query: str) -> sql.Composed:
    """A query on the control schema, its name quoted."""
    return sql.SQL(query).format(sql.Identifier(CTL))


def status_of(conn: Conn, table: str, stage: str) -> str:
    return control.get_stage(conn, CTL, "cogito", table, stage).status


# --- the schema ------------------------------------------------------------------------------


def test_ensure_schema_creates_the_control_tables(empty_conn: Conn) -> None:
    assert not control.schema_exists(empty_conn, CTL)
    ensure_schema(empty_conn, CTL)
    assert control.schema_exists(empty_conn, CTL)
    row = empty_conn.execute(ctl("SELECT version FROM {}.meta")).fetchone()
    assert row is not None and row["version"] == SCHEMA_VERSION
    tables = {
        r["relname"]
        for r in empty_conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE nspname = %s AND relkind = 'r'",
            (CTL,),
        )
    }
    assert tables == {"meta", "plans", "stages", "settings", "saved", "events", "chunks"}


def test_ensure_schema_is_idempotent(empty_conn: Conn) -> None:
    ensure_schema(empty_conn, CTL)
    first = snapshot(empty_conn, [CTL])
    ensure_schema(empty_conn, CTL)
    ensure_schema(empty_conn, CTL)
    assert snapshot(empty_conn, [CTL]) == first
    row = empty_conn.execute(ctl("SELECT count(*) AS n, max(version) AS v FROM {}.meta")).fetchone()
    assert row == {"n": 1, "v": SCHEMA_VERSION}


def test_two_orchestrators_creating_the_schema_at_once_both_succeed(empty_dsn: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        try:
            with connect(empty_dsn, autocommit=True) as conn:
                barrier.wait()
                ensure_schema(conn, CTL)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with connect(empty_dsn, autocommit=True) as conn:
        row = conn.execute(ctl("SELECT version FROM {}.meta")).fetchone()
        assert row is not None and row["version"] == SCHEMA_VERSION


def test_a_hostile_control_schema_name_is_quoted(empty_conn: Conn) -> None:
    name = 'Ctl "x"; DROP SCHEMA public; --'
    ensure_schema(empty_conn, name)
    assert control.schema_exists(empty_conn, name)
    assert control.schema_exists(empty_conn, "public") is False  # public has no meta table
    row = empty_conn.execute("SELECT count(*) AS n FROM pg_namespace WHERE nspname = 'public'")
    assert row.fetchone() == {"n": 1}


def test_reading_a_missing_control_schema_creates_nothing(empty_conn: Conn) -> None:
    assert stage_rows(empty_conn, CTL, "cogito") == []
    assert control.events(empty_conn, CTL, "cogito") == []
    row = empty_conn.execute("SELECT count(*) AS n FROM pg_namespace WHERE nspname = %s", (CTL,))
    assert row.fetchone() == {"n": 0}


# --- the plan and its stages -----------------------------------------------------------------


def test_register_plan_creates_a_row_per_table_and_stage(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    rows = stage_rows(cogito_conn, CTL, "cogito")
    expected = {(t, s) for t, names in stages_for(registered).items() for s in names}
    assert {(r.table_name, r.stage) for r in rows} == expected
    assert ("turns", "copy") in expected and ("clients", "rename") in expected
    assert {r.status for r in rows} == {"pending"}
    plan = cogito_conn.execute(ctl("SELECT * FROM {}.plans")).fetchone()
    assert plan is not None
    assert plan["checksum"] == registered.checksum
    assert plan["yaml"] == registered.text
    assert plan["path"] == str(COGITO_PLAN)


def test_registering_again_keeps_progress_and_follows_the_text(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    with cogito_conn.transaction():
        store(cogito_conn).start("turns", "prepare")
        store(cogito_conn).finish("turns", "prepare")
    edited = parse_plan(registered.text + "# edited\n", registered.path)
    with cogito_conn.transaction():
        store(cogito_conn).register(edited, stages_for(edited))
    assert status_of(cogito_conn, "turns", "prepare") == "done"
    assert len(stage_rows(cogito_conn, CTL, "cogito")) == sum(
        len(s) for s in stages_for(edited).values()
    )
    row = cogito_conn.execute(ctl("SELECT checksum FROM {}.plans")).fetchone()
    assert row == {"checksum": edited.checksum}


def test_a_status_change_commits_with_its_work(cogito_conn: Conn, registered: LoadedPlan) -> None:
    with cogito_conn.transaction():
        store(cogito_conn).start("turns", "prepare")
        cogito_conn.execute("CREATE SCHEMA conversation")
        store(cogito_conn).finish("turns", "prepare")
    row = control.get_stage(cogito_conn, CTL, "cogito", "turns", "prepare")
    assert row.status == "done"
    assert row.attempts == 1
    assert row.started_at is not None and row.finished_at is not None
    assert row.finished_at >= row.started_at
    assert "conversation" in {
        r["nspname"] for r in cogito_conn.execute("SELECT nspname FROM pg_namespace")
    }


def test_a_rolled_back_step_leaves_no_trace(cogito_conn: Conn, registered: LoadedPlan) -> None:
    before = snapshot(cogito_conn, ["public", CTL])

    class Crash(Exception):
        pass

    with pytest.raises(Crash), cogito_conn.transaction():
        store(cogito_conn).start("turns", "prepare")
        store(cogito_conn).log("prepare", "ok", table="turns")
        store(cogito_conn).save("turns", "acl", ["x"])
        cogito_conn.execute("CREATE SCHEMA conversation")
        cogito_conn.execute("CREATE TABLE conversation.turns (id bigint PRIMARY KEY)")
        raise Crash
    assert status_of(cogito_conn, "turns", "prepare") == "pending"
    assert control.events(cogito_conn, CTL, "cogito") == []
    assert control.load_saved(cogito_conn, CTL, "cogito", "turns", "acl") is None
    assert snapshot(cogito_conn, ["public", CTL]) == before
    row = cogito_conn.execute(
        "SELECT count(*) AS n FROM pg_namespace WHERE nspname = 'conversation'"
    ).fetchone()
    assert row == {"n": 0}


def test_a_failure_is_recorded_with_its_error_and_retried(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    with cogito_conn.transaction():
        store(cogito_conn).start("turns", "copy")
    with cogito_conn.transaction():
        store(cogito_conn).fail("turns", "copy", "lock timeout on turns")
    failed = control.get_stage(cogito_conn, CTL, "cogito", "turns", "copy")
    assert (failed.status, failed.last_error, failed.attempts) == (
        "failed",
        "lock timeout on turns",
        1,
    )
    with cogito_conn.transaction():
        store(cogito_conn).start("turns", "copy")
    again = control.get_stage(cogito_conn, CTL, "cogito", "turns", "copy")
    assert (again.status, again.last_error, again.attempts) == ("running", None, 2)
    assert again.finished_at is None


def test_progress_checkpoints_and_their_reset(cogito_conn: Conn, registered: LoadedPlan) -> None:
    with cogito_conn.transaction():
        store(cogito_conn).start("turns", "copy")
        store(cogito_conn).checkpoint(
            "turns", "copy", rows_done=500, checkpoint={"last_key": [500]}, rows_per_s=1234.5,
            rows_estimated=2000,
        )
    row = control.get_stage(cogito_conn, CTL, "cogito", "turns", "copy")
    assert (row.rows_done, row.rows_estimated, row.checkpoint, row.rows_per_s) == (
        500,
        2000,
        {"last_key": [500]},
        1234.5,
    )
    with cogito_conn.transaction():
        store(cogito_conn).roll_back("turns", "copy", reset=True)
    row = control.get_stage(cogito_conn, CTL, "cogito", "turns", "copy")
    assert (row.status, row.rows_done, row.checkpoint) == ("rolled_back", 0, None)


def test_an_unknown_stage_is_refused(cogito_conn: Conn, registered: LoadedPlan) -> None:
    with pytest.raises(StageError) as info:
        control.get_stage(cogito_conn, CTL, "cogito", "audit_log", "copy")
    assert "audit_log: no copy stage recorded for plan cogito" in info.value.message


# --- guarded transitions: only what the state diagram allows ----------------------------------


def test_a_stage_cannot_finish_or_fail_before_it_started(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    for change in (store(cogito_conn).finish, store(cogito_conn).forget):
        with pytest.raises(IllegalTransition, match=r"turns: prepare cannot .* from pending"):
            change("turns", "prepare")
    with pytest.raises(IllegalTransition, match="from pending"):
        store(cogito_conn).fail("turns", "prepare", "boom")
    assert status_of(cogito_conn, "turns", "prepare") == "pending"


def test_a_done_stage_does_not_start_again_unless_it_re_verifies(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    s = store(cogito_conn)
    with cogito_conn.transaction():
        s.start("turns", "copy")
        s.finish("turns", "copy")
    with pytest.raises(IllegalTransition, match="turns: copy cannot start from done"):
        s.start("turns", "copy")
    with cogito_conn.transaction():
        s.start("turns", "verify")
        s.finish("turns", "verify")
        s.start("turns", "verify", again=True)
    assert status_of(cogito_conn, "turns", "verify") == "running"


def test_a_finalized_stage_cannot_be_rolled_back(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    s = store(cogito_conn)
    with cogito_conn.transaction():
        s.start("turns", "finalize")
        s.finish("turns", "finalize")
    with pytest.raises(IllegalTransition, match="finalize is done and final"):
        s.roll_back("turns", "finalize")
    assert status_of(cogito_conn, "turns", "finalize") == "done"


def test_a_checkpoint_needs_a_running_stage(cogito_conn: Conn, registered: LoadedPlan) -> None:
    with pytest.raises(IllegalTransition, match="turns: copy is pending, not running"):
        store(cogito_conn).checkpoint("turns", "copy", rows_done=1, checkpoint={"last": [1]})


def test_an_illegal_change_inside_a_step_undoes_the_step(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    """The guard raises inside the work's transaction, so the work goes with it."""
    with pytest.raises(IllegalTransition), cogito_conn.transaction():
        cogito_conn.execute("CREATE SCHEMA conversation")
        store(cogito_conn).finish("turns", "prepare")
    row = cogito_conn.execute(
        "SELECT count(*) AS n FROM pg_namespace WHERE nspname = 'conversation'"
    ).fetchone()
    assert row == {"n": 0}


def test_settings_a_table_value_beats_the_plan_value(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    assert control.setting(cogito_conn, CTL, "cogito", "turns", "batch_size", 5000) == 5000
    store(cogito_conn).put_setting("batch_size", 2000)
    store(cogito_conn).put_setting("batch_size", 100, table="turns")
    assert control.setting(cogito_conn, CTL, "cogito", "turns", "batch_size", 5000) == 100
    assert control.setting(cogito_conn, CTL, "cogito", "users", "batch_size", 5000) == 2000
    store(cogito_conn).put_setting("batch_size", 50, table="turns")
    assert control.setting(cogito_conn, CTL, "cogito", "turns", "batch_size", 5000) == 50
    # The copy reads them all at once, with the same precedence.
    store(cogito_conn).put_setting("sleep_ms", 20)
    assert control.settings(cogito_conn, CTL, "cogito", "turns") == {
        "batch_size": 50, "sleep_ms": 20}
    assert control.settings(cogito_conn, CTL, "cogito", "users") == {
        "batch_size": 2000, "sleep_ms": 20}


def test_saved_values_are_kept_for_a_rollback(cogito_conn: Conn, registered: LoadedPlan) -> None:
    store(cogito_conn).save("turns", "acl", {"app": ["SELECT"]})
    store(cogito_conn).save("turns", "acl", {"app": ["SELECT", "INSERT"]})
    saved = control.load_saved(cogito_conn, CTL, "cogito", "turns", "acl")
    assert saved == {"app": ["SELECT", "INSERT"]}


# --- the event log ---------------------------------------------------------------------------


def test_events_are_recorded_in_order_with_who_did_what(
    cogito_conn: Conn, registered: LoadedPlan
) -> None:
    for i in range(5):
        store(cogito_conn).log(
            "copy",
            "ok",
            table="turns",
            stage="copy",
            statement=f"-- batch {i}",
            duration_ms=1.5,
            detail={"batch": i},
        )
    store(cogito_conn).log("prepare", "ok", table="users")
    events = control.events(cogito_conn, CTL, "cogito", "turns")
    assert [e["detail"]["batch"] for e in events] == [0, 1, 2, 3, 4]
    assert events[0]["operator"] == "postgres"
    assert events[0]["backend_pid"] == cogito_conn.info.backend_pid
    assert [
        e["detail"]["batch"] for e in control.events(cogito_conn, CTL, "cogito", "turns", 2)
    ] == [
        3,
        4,
    ]
    assert len(control.events(cogito_conn, CTL, "cogito")) == 6


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE {}.events SET outcome = 'ok'",
        "DELETE FROM {}.events",
        "TRUNCATE {}.events",
    ],
)
def test_the_event_log_is_append_only(
    cogito_conn: Conn, registered: LoadedPlan, tamper: str
) -> None:
    store(cogito_conn).log("cutover", "lock_timeout", table="turns")
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        cogito_conn.execute(sql.SQL(tamper).format(sql.Identifier(CTL)))
    assert [e["outcome"] for e in control.events(cogito_conn, CTL, "cogito")] == ["lock_timeout"]


# --- one operator at a time ------------------------------------------------------------------


def advisory_locks(conn: Conn, pid: int) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND pid = %s", (pid,)
    ).fetchone()
    assert row is not None
    return int(row["n"])


def test_lock_keys_are_stable_signed_64_bit() -> None:
    a = locks.lock_key("plan", "cogito")
    assert a == locks.lock_key("plan", "cogito")
    assert a != locks.lock_key("table", "cogito")
    keys = {locks.lock_key("table", f"t{i}") for i in range(1000)}
    assert len(keys) == 1000
    assert all(-(2**63) <= k < 2**63 for k in keys)


def test_a_second_operator_is_refused_and_told_who_holds_the_plan(cogito_dsn: str) -> None:
    with (
        connect(cogito_dsn, autocommit=True) as first,
        connect(cogito_dsn, autocommit=True) as second,
    ):
        with operator_lock(first, "cogito", ["users", "turns"]):
            with (
                pytest.raises(LockHeld) as info,
                operator_lock(second, "cogito", ["users", "turns"]),
            ):
                pytest.fail("two operators held one plan")
            message = info.value.message
            assert message.startswith("plan cogito is being worked on by another orchestrator")
            assert f"pid {first.info.backend_pid} " in message
            assert f"application {APP_NAME}" in message
            assert "pg_terminate_backend" in info.value.hint
            # The refused operator keeps nothing.
            assert advisory_locks(first, second.info.backend_pid) == 0
            assert advisory_locks(second, first.info.backend_pid) == 3  # plan + two tables
        # Released on exit: the second operator may now go.
        assert advisory_locks(second, first.info.backend_pid) == 0
        with operator_lock(second, "cogito", ["users", "turns"]):
            assert advisory_locks(first, second.info.backend_pid) == 3


def test_another_plan_touching_the_same_table_is_refused(cogito_dsn: str) -> None:
    with (
        connect(cogito_dsn, autocommit=True) as first,
        connect(cogito_dsn, autocommit=True) as second,
        operator_lock(first, "cogito", ["users", "participants"]),
    ):
        with (
            pytest.raises(LockHeld) as info,
            operator_lock(second, "accounts_split", ["clients", "users"]),
        ):
            pytest.fail("two plans held one table")
        assert info.value.message.startswith("table users is being worked on")
        assert f"pid {first.info.backend_pid} " in info.value.message
        assert advisory_locks(first, second.info.backend_pid) == 0
        # A plan on other tables is not held up.
        with operator_lock(second, "lenses", ["lens_prototypes"]):
            assert advisory_locks(first, second.info.backend_pid) == 2


def test_a_dead_holder_releases_its_locks(cogito_dsn: str, server_dsn: str) -> None:
    """The holder's session ends without unlocking (closed, or killed): the lock is free."""
    with connect(cogito_dsn, autocommit=True) as second:
        for end in ("close", "terminate"):
            holder = connect(cogito_dsn, autocommit=True)
            pid = holder.info.backend_pid
            lock = operator_lock(holder, "cogito", ["users"])
            lock.__enter__()  # and never __exit__: the process dies holding it
            with (
                pytest.raises(LockHeld, match=f"pid {pid} "),
                operator_lock(second, "cogito", ["users"]),
            ):
                pass
            if end == "close":
                holder.close()
            else:
                with psycopg.connect(server_dsn, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_for_exit(second, pid)
            with operator_lock(second, "cogito", ["users"]):
                assert advisory_locks(second, second.info.backend_pid) == 2
            holder.close()


def wait_for_exit(conn: Conn, pid: int) -> None:
    for _ in range(100):
        row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s", (pid,))
        if row.fetchone() == {"n": 0}:
            return
        conn.execute("SELECT pg_sleep(0.05)")
    pytest.fail(f"backend {pid} did not exit")


def test_the_holder_is_described_for_the_operator(cogito_dsn: str) -> None:
    with (
        connect(cogito_dsn, autocommit=True) as first,
        connect(cogito_dsn, autocommit=True) as second,
    ):
        with operator_lock(first, "cogito", []):
            holder = locks.lock_holder(second, locks.lock_key("plan", "cogito"))
            assert holder is not None
            assert holder["pid"] == first.info.backend_pid
            assert holder["role"] == "postgres"
            assert holder["application_name"] == APP_NAME
            text = locks.describe_holder(holder)
            assert text.startswith(f"pid {first.info.backend_pid} (role postgres")
        assert locks.lock_holder(second, locks.lock_key("plan", "cogito")) is None
    assert "ended before we could name it" in locks.describe_holder(None)

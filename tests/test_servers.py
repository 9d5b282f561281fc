"""A plan that moves a schema to another server (issue 17): the plan names the server by an
environment variable, `validate` checks both servers and every reference that would cross
them, and a plan with problems changes nothing. The move itself: tests/test_remote_move.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN, dsn_for, own_cogito_server

from orchestrator.db import start_embedded, stop_embedded

TARGET_ENV = "ORCH_TEST_CONVERSATION_DSN"


def remote_plan(tmp_path: Path, server: str = f"    dsn_env: {TARGET_ENV}\n") -> str:
    """The Cogito plan with `conversation` on a server of its own."""
    text = COGITO_PLAN.read_text(encoding="utf-8")
    text = text.replace("  conversation:\n    usage: []\n",
                        "  conversation:\n    server: conversation_db\n    usage: []\n")
    assert "server: conversation_db" in text
    path = tmp_path / "remote.yaml"
    path.write_text(text + "\nservers:\n  conversation_db:\n" + server, encoding="utf-8")
    return str(path)


def run(dsn: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    return r.returncode, out


def problems(dsn: str, plan: str, env: dict[str, str]) -> list[dict[str, str]]:
    code, out = run(dsn, "validate", plan, "--format", "json", env=env)
    assert code == 1, out
    return list(json.loads(out)["problems"])


def about(found: list[dict[str, str]], subject: str) -> list[str]:
    return [p["message"] for p in found if p["subject"] == subject]


@pytest.fixture(scope="module")
def logical_server() -> Iterator[str]:
    """A server of this module's own with wal_level = logical and workers for a
    subscription per table (a restart), the Cogito sample in database `cogito`."""

    def logical(tmp: Path, base: str) -> str:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET wal_level = logical")
            # A subscription per moved table, all alive until finalize: a worker each.
            conn.execute("ALTER SYSTEM SET max_logical_replication_workers = 12")
            conn.execute("ALTER SYSTEM SET max_worker_processes = 20")
        stop_embedded(tmp)
        return start_embedded(tmp)

    with own_cogito_server("orch-logical-", logical) as (_, dsn):
        yield dsn


@pytest.fixture
def target_db(logical_server: str) -> Iterator[str]:
    """An empty database on the logical server: the conversation domain's new home."""
    with psycopg.connect(logical_server, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS conversation_home")
        admin.execute("CREATE DATABASE conversation_home")
    yield dsn_for(logical_server, "conversation_home")
    with psycopg.connect(logical_server, autocommit=True) as admin:
        admin.execute("DROP DATABASE conversation_home WITH (FORCE)")


def test_a_password_in_the_plan_and_an_unknown_server_are_refused(tmp_path: Path,
                                                                  cogito_dsn: str) -> None:
    plan = remote_plan(tmp_path, "    dsn: host=elsewhere password=hunter2\n")
    code, out = run(cogito_dsn, "validate", plan)
    assert code != 0 and "carries a password" in out and "dsn_env" in out
    assert "hunter2" not in out
    text = Path(remote_plan(tmp_path)).read_text().replace("server: conversation_db",
                                                           "server: nowhere")
    Path(plan).write_text(text)
    code, out = run(cogito_dsn, "validate", plan)
    assert code != 0 and "names server 'nowhere'" in " ".join(out.split())


def test_validate_names_what_both_servers_lack_and_every_crossing_reference(
    tmp_path: Path, cogito_dsn: str, server_dsn: str,
) -> None:
    plan = remote_plan(tmp_path)
    found = problems(cogito_dsn, plan, {TARGET_ENV: ""})
    assert any(f"{TARGET_ENV} that holds its connection string is not set" in m
               for m in about(found, "server conversation_db")), found
    # The shared test server runs with wal_level = replica: the source says so, with the fix.
    found = problems(cogito_dsn, plan, {TARGET_ENV: dsn_for(server_dsn, "postgres")})
    source = " ".join(about(found, "the source server"))
    assert "wal_level is replica" in source
    hints = [p["hint"] for p in found if p["subject"] == "the source server"]
    assert any("wal_level = logical" in h and "restart" in h for h in hints), hints
    target = " ".join(about(found, "server conversation_db"))
    assert "wal_level is replica" in target  # the way back replicates from it
    # Keys and views that would join the two servers are named one by one.
    keys = [p["subject"] for p in found if p["subject"].startswith("foreign key ")]
    assert keys and all("cross" in m for k in keys for m in about(found, k))
    hints = [p["hint"] for p in found if p["subject"].startswith("foreign key ")]
    assert all("cross_server_keys: drop" in h for h in hints), hints
    # A subscription matches columns by name: the plan's column rename is refused.
    [said] = about(found, "public.turns")
    assert "column mappings" in said and "matches columns by name" in said


def test_two_logical_servers_leave_only_the_references_and_an_unreachable_source(
    tmp_path: Path, logical_server: str, target_db: str,
) -> None:
    plan = remote_plan(tmp_path)
    env = {TARGET_ENV: target_db}
    found = problems(logical_server, plan, env)
    assert not about(found, "the source server"), found
    assert not about(found, "server conversation_db"), found  # it reaches the source, too
    with psycopg.connect(target_db) as conn:  # the probe subscription was rolled back
        assert conn.execute("SELECT count(*) FROM pg_subscription").fetchone() == (0,)
    # A source the target cannot reach is named, with where to say how it can.
    text = Path(plan).read_text() + "    source_dsn: host=/nonexistent dbname=cogito\n"
    Path(plan).write_text(text)
    found = problems(logical_server, plan, env)
    said = about(found, "server conversation_db")
    assert any(m.startswith("it cannot subscribe to the source") for m in said), said


def test_a_table_without_a_replica_identity_is_named(
    tmp_path: Path, logical_server: str, target_db: str,
) -> None:
    with psycopg.connect(logical_server, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.turns REPLICA IDENTITY NOTHING")
    try:
        found = problems(logical_server, remote_plan(tmp_path), {TARGET_ENV: target_db})
        said = " ".join(about(found, "public.turns"))  # its column mapping is named too
        assert "no replica identity" in said and "UPDATE and DELETE" in said
    finally:
        with psycopg.connect(logical_server, autocommit=True) as conn:
            conn.execute("ALTER TABLE public.turns REPLICA IDENTITY DEFAULT")


def test_a_plan_with_problems_changes_nothing_on_either_server(
    tmp_path: Path, logical_server: str, target_db: str,
) -> None:
    plan = remote_plan(tmp_path)
    env = {TARGET_ENV: target_db}
    code, out = run(logical_server, "apply", plan, "--until", "prepare", env=env)
    said = " ".join(out.split())
    assert code == 1 and "cross_server_keys: drop" in said, out
    assert "orchestrator validate" in said
    with psycopg.connect(logical_server) as conn:
        row: Any = conn.execute(
            "SELECT to_regnamespace('_orchestrator') IS NULL AND "
            "to_regnamespace('conversation') IS NULL").fetchone()
        assert row == (True,)
    with psycopg.connect(target_db) as conn:
        assert conn.execute("SELECT to_regnamespace('conversation') IS NULL").fetchone() == (
            True,)


def test_the_two_server_plan_validates_with_its_choices_stated(
    tmp_path: Path, logical_server: str, target_db: str,
) -> None:
    text = (COGITO_PLAN.parent / "cogito-two-servers.yaml").read_text(encoding="utf-8")
    path = tmp_path / "two.yaml"
    path.write_text(text, encoding="utf-8")
    code, out = run(logical_server, "validate", str(path), "--format", "json",
                    env={"CONVERSATION_DSN": target_db})
    assert code == 0, out
    warnings = json.loads(out)["warnings"]
    said = {w["subject"]: w["message"] for w in warnings}
    assert "the plan drops it" in said["foreign key participants_user_id_fkey"]
    assert "created on the source" in said["view public.participant_users"]
    # A plan may not ask for the remote strategy itself: the schema's server decides.
    path.write_text(text.replace("strategy: copy", "strategy: remote", 1), encoding="utf-8")
    code, out = run(logical_server, "validate", str(path), env={"CONVERSATION_DSN": target_db})
    assert code != 0 and "strategy remote is not written in a plan" in out

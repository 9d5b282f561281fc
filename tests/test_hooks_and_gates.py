"""Hooks on every phase change, the before-cutover hook as a gate, and finalize's gate on
compatibility-view traffic (issue 16).

The operator's story: a chat webhook is told of every phase; a change-freeze check (the
operator's own script) holds the cutover while a deploy runs; finalize waits while the
application still reads the old name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from test_cutover_control import cli, events, finish, relkind, start, wait_for

Conn = psycopg.Connection[Any]

PLAN = """version: 1
name: ctl
finalize_quiet_period_s: 600
defaults: {{batch_size: 250}}
hooks:
  - events: ["*"]
    run: "cat >> {log}"
    every_pct: 50
  - events: [before-cutover]
    run: "test -f {ok} || {{ echo 'change freeze: deploy 4711 in progress' >&2; exit 3; }}"
    recheck_s: 0.3
tables:
  - name: orders
    schema: dom
"""


@pytest.fixture
def shop(empty_dsn: str, tmp_path: Path) -> Iterator[tuple[str, str, Conn, Path, Path]]:
    """orders, and a plan whose hooks log every event and check a change freeze."""
    db = psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row)
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    db.execute("INSERT INTO orders SELECT g, g FROM generate_series(1, 1000) g")
    db.execute("ANALYZE orders")
    log, ok = tmp_path / "hook.log", tmp_path / "no-freeze"
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(log=log, ok=ok), encoding="utf-8")
    try:
        yield empty_dsn, str(plan), db, log, ok
    finally:
        db.close()


def seen(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_a_hook_sees_every_phase_in_order(
    shop: tuple[str, str, Conn, Path, Path],
) -> None:
    dsn, plan, _db, log, ok = shop
    assert cli(dsn, "apply", plan).returncode == 0
    ok.touch()
    assert cli(dsn, "cutover", plan, "--yes").returncode == 0
    assert cli(dsn, "rollback", plan, "--table", "orders", "--to", "verify",
               "--yes").returncode == 0
    names = [e["event"] for e in seen(log)]
    phases = [n for n in names if n != "copy-progress"]
    assert phases == [
        "before-prepare", "after-prepare", "before-dual_write", "after-dual_write",
        "before-copy", "after-copy", "before-verify", "after-verify",
        "before-cutover", "after-cutover", "cutover-done",
        "before-rollback", "rollback",
    ], names
    first = seen(log)[0]
    assert first["plan"] == "ctl" and first["table"] == "orders" and first["stage"] == "prepare"
    # Progress comes between the copy's start and end, each time another 50 % is passed
    # (two workers may pass both marks in one batch each).
    progress = [i for i, n in enumerate(names) if n == "copy-progress"]
    assert progress and names.index("before-copy") < progress[0]
    assert progress[-1] < names.index("after-copy")
    percents = [e["percent"] for e in seen(log) if e["event"] == "copy-progress"]
    assert percents == sorted(percents) and percents[-1] == 100.0 and len(percents) <= 2


def test_a_failing_before_cutover_hook_holds_the_swap_until_it_passes(
    shop: tuple[str, str, Conn, Path, Path],
) -> None:
    dsn, plan, db, log, ok = shop
    assert cli(dsn, "apply", plan).returncode == 0
    proc = start(dsn, "cutover", plan, "--yes")
    held = wait_for("the hook to hold the swap", lambda: [
        e for e in events(db, "waiting", "cutover")
        if "change freeze: deploy 4711" in json.dumps(e["detail"])])
    assert "before-cutover hook" in held[0]["detail"]["gates"][0]
    time.sleep(1.0)  # it keeps asking, and keeps holding
    assert relkind(db, "public.orders") == "r"
    status = json.loads(cli(dsn, "status", plan, "--format", "json").stdout)
    assert "change freeze" in status["tables"][0]["waiting"]
    ok.touch()
    code, output = finish(proc)
    assert code == 0, output
    assert relkind(db, "public.orders") == "v"
    # The "*" hook heard the postponement, with the hook's reason, before the swap.
    names = [e["event"] for e in seen(log)]
    postponed = next(e for e in seen(log) if e["event"] == "cutover-postponed")
    assert "change freeze" in postponed["reason"]
    assert names.index("cutover-postponed") < names.index("cutover-done")


def test_a_command_hook_hears_of_a_refusal(
    shop: tuple[str, str, Conn, Path, Path], tmp_path: Path,
) -> None:
    dsn, plan, _db, _log, _ok = shop
    out = tmp_path / "failure.json"
    r = cli(dsn, "finalize", plan, "--yes", "--hook", f"failure=cat > {out}")
    assert r.returncode == 1
    event = json.loads(out.read_text())
    assert event["event"] == "failure" and "needs cutover done first" in event["error"]


def test_finalize_refuses_while_the_application_reads_the_old_name(
    shop: tuple[str, str, Conn, Path, Path],
) -> None:
    dsn, plan, db, _log, ok = shop
    ok.touch()
    assert cli(dsn, "apply", plan, "--until", "cutover", "--yes").returncode == 0
    reader = psycopg.connect(dsn, application_name="billing-report")
    reader.execute("SELECT sum(total) FROM public.orders").fetchone()  # open transaction
    try:
        r = cli(dsn, "finalize", plan, "--yes")
        assert r.returncode == 1
        said = " ".join(r.stdout.split() + r.stderr.split())
        assert "finalize refused" in said and "public.orders is in use now" in said, said
        assert "billing-report" in said and "--force" in said
        # Nothing was finalized: the retired table and the way back are still there.
        assert relkind(db, "_orchestrator_retired.orders") == "r"
    finally:
        reader.close()
    assert cli(dsn, "finalize", plan, "--yes").returncode == 0
    assert relkind(db, "_orchestrator_retired.orders") is None


@pytest.fixture
def pgss_server() -> Iterator[str]:
    """A server of this test's own with pg_stat_statements loaded (a restart)."""
    from conftest import own_cogito_server

    from orchestrator.db import start_embedded, stop_embedded

    def preload(tmp: Path, base: str) -> str:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        stop_embedded(tmp)
        return start_embedded(tmp)

    with own_cogito_server("orch-pgss-", preload) as (_, dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        yield dsn


def test_finalize_waits_a_quiet_period_after_statements_used_the_old_name(
    pgss_server: str, tmp_path: Path,
) -> None:
    from conftest import COGITO_PLAN

    dsn = pgss_server
    plan = tmp_path / "cogito.yaml"
    plan.write_text(COGITO_PLAN.read_text() + "\nfinalize_quiet_period_s: 3\n")
    assert cli(dsn, "apply", str(plan), "--table", "turns", "--until", "cutover",
               "--yes").returncode == 0
    with psycopg.connect(dsn, autocommit=True) as app:  # the application, done at once
        app.execute("SELECT count(*) FROM public.turns WHERE participant_id = 1").fetchone()
    r = cli(dsn, "finalize", str(plan), "--table", "turns", "--yes")
    said = " ".join(r.stdout.split() + r.stderr.split())
    assert r.returncode == 1 and "finalize refused" in said, said
    assert "first seen now" in said and "FROM public.turns WHERE participant_id" in said, said
    assert "hash_record" not in said and "ALTER TABLE" not in said  # not our own statements
    time.sleep(3.5)  # quiet: nothing used the old name since
    r = cli(dsn, "finalize", str(plan), "--table", "turns", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr

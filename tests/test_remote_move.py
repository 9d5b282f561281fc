"""The conversation domain moves to a server of its own (issue 17), on two real servers of
the suite's version, while the application writes through the source's public names: every
stage, a rollback after cutover that keeps what was written on either side, finalize, a full
rollback, SIGKILLs at random points; and never a slot, publication or subscription left."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import stress
from conftest import ROOT
from psycopg import sql
from two_servers import TARGET_ENV, Pair, databases, logical_servers, ours

MOVED = ("participants", "blocks", "turns", "block_turns", "patterns", "lens_prototypes",
         "block_lens_version")
RETIRED = "_orchestrator_retired"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    with logical_servers("orch-remote-") as pair:
        yield pair


@pytest.fixture
def pair(servers: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    with databases(servers) as p:
        monkeypatch.setenv(TARGET_ENV, p.target)
        yield p


def plan_file(tmp_path: Path, application: str = "source") -> str:
    text = (ROOT / "plans" / "cogito-two-servers.yaml").read_text(encoding="utf-8")
    text = text.replace("dsn_env: CONVERSATION_DSN", f"dsn_env: {TARGET_ENV}")
    if application != "source":
        text = text.replace("    cross_server_keys: drop\n",
                            f"    cross_server_keys: drop\n    application: {application}\n")
    path = tmp_path / "two-servers.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def digest(conn: psycopg.Connection[dict[str, object]], relation: str) -> tuple[int, str]:
    """Rows and a hash of their text, in key order (enums as labels; times in UTC)."""
    conn.execute("SET TimeZone = 'UTC'")
    r = conn.execute(sql.SQL("SELECT count(*) AS n, md5(coalesce(string_agg(t::text, '|' "
                             "ORDER BY t.id), '')) AS h FROM {} t").format(
        sql.Identifier(*relation.split(".")))).fetchone()
    assert r is not None
    return int(str(r["n"])), str(r["h"])


def equal_both_ways(pair: Pair, source_schema: str, target_schema: str,
                    tables: tuple[str, ...]) -> None:
    """The source's copy of each table and the target's, row for row."""
    with pair.conn("source") as s, pair.conn("target") as t:
        for table in tables:
            ours, theirs = f"{source_schema}.{table}", f"{target_schema}.{table}"
            if digest(s, ours) != digest(t, theirs):
                raise AssertionError(f"{table}: {differences(s, t, ours, theirs)}")


def differences(s: psycopg.Connection[dict[str, object]],
                t: psycopg.Connection[dict[str, object]], ours: str, theirs: str) -> str:
    """The rows (by id) only one side has, or has otherwise."""
    q = sql.SQL("SELECT id, t::text AS row FROM {} t")
    a = {r["id"]: r["row"] for r in s.execute(q.format(sql.Identifier(*ours.split("."))))}
    b = {r["id"]: r["row"] for r in t.execute(q.format(sql.Identifier(*theirs.split("."))))}
    return str({k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys(), key=str)
                if a.get(k) != b.get(k)})


# The tables with an `id` to order by (the others are pairs of keys).
KEYED = ("participants", "blocks", "turns", "patterns", "lens_prototypes")


def wait_equal(pair: Pair, source: str, target: str, tables: tuple[str, ...] = KEYED,
               within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            equal_both_ways(pair, source, target, tables)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def kind(pair: Pair, side: str, name: str) -> str | None:
    with pair.conn(side) as conn:
        r = conn.execute("SELECT c.relkind::text AS k FROM pg_class c WHERE c.oid = "
                         "to_regclass(%s)", (name,)).fetchone()
    return str(r["k"]) if r else None


@contextmanager
def application(dsn: str) -> Iterator[stress.Writer]:
    """The application writing through the source's public names while the block runs; its
    writes must all succeed. Stopped at the end, so that both servers can be compared."""
    app = stress.Writer(dsn)
    app.start()
    try:
        yield app
        time.sleep(0.3)
        assert app.is_alive(), f"the application's writes failed: {app.error!r}"
        assert app.writes > 30
    finally:
        app.stop.set()
        app.join(timeout=10)


def test_the_domain_moves_under_load_goes_back_after_cutover_and_is_finalized(
    pair: Pair, tmp_path: Path,
) -> None:
    plan = plan_file(tmp_path)
    with application(pair.source):
        stress.ok(pair.source, "apply", plan)
    # Before cutover the target holds a replica under the source's names.
    wait_equal(pair, "public", "public")
    with application(pair.source):
        stress.ok(pair.source, "cutover", plan, "--yes")
    assert kind(pair, "source", "public.turns") == "v"
    assert kind(pair, "source", "conversation.turns") == "f"
    assert kind(pair, "target", "conversation.turns") == "v"  # its final name, until finalize
    # The application's INSERT relying on defaults works through the old name, RETURNING the
    # key the source's generator gave; a write made on the target directly gets another.
    with pair.conn("source") as s:
        row = s.execute("INSERT INTO public.turns (participant_id, content) VALUES (1, "
                        "'through the old name') RETURNING id, timestamp").fetchone()
        assert row is not None and row["id"] and row["timestamp"]
        via_source = int(str(row["id"]))
    with pair.conn("target") as t:
        row = t.execute("INSERT INTO conversation.turns (participant_id, content) VALUES "
                        "(1, 'on the new server') RETURNING id").fetchone()
        assert row is not None
        on_target = int(str(row["id"]))
    assert on_target != via_source
    # The reverse stream keeps the retired tables equal to the target.
    wait_equal(pair, RETIRED, "conversation")
    with application(pair.source):
        # The way back: turns returns to the source with every row written on either side.
        stress.ok(pair.source, "rollback", plan, "--table", "turns", "--to", "verify", "--yes")
        assert kind(pair, "source", "public.turns") == "r"
        with pair.conn("source") as s:
            ids = {r["id"] for r in s.execute("SELECT id FROM public.turns WHERE id = ANY(%s)",
                                              ([via_source, on_target],)).fetchall()}
        assert ids == {via_source, on_target}
    wait_equal(pair, "public", "public", ("turns",))
    with application(pair.source):
        stress.ok(pair.source, "cutover", plan, "--table", "turns", "--yes")
    wait_equal(pair, RETIRED, "conversation")
    stress.ok(pair.source, "finalize", plan, "--yes", "--force")
    assert ours(pair) == {"source": [], "target": []}
    assert kind(pair, "target", "conversation.turns") == "r"
    assert kind(pair, "source", f"{RETIRED}.turns") is None
    with pair.conn("source") as s:
        row = s.execute("INSERT INTO public.turns (participant_id, content) VALUES (1, 'after "
                        "finalize') RETURNING id").fetchone()
        assert row is not None
        # The cross-server views answer on the source, reading the target through postgres_fdw.
        for view in ("public.participant_users", "public.project_blocks"):
            r = s.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(
                sql.Identifier(*view.split(".")))).fetchone()
            assert r is not None and int(str(r["n"])) > 0, view
    with pair.conn("target") as t:
        assert t.execute("SELECT 1 FROM conversation.turns WHERE id = %s",
                         (row["id"],)).fetchone() is not None


def test_a_full_rollback_after_cutover_brings_every_row_back_and_leaves_nothing(
    pair: Pair, tmp_path: Path,
) -> None:
    plan = plan_file(tmp_path)
    stress.ok(pair.source, "apply", plan)
    stress.ok(pair.source, "cutover", plan, "--yes")
    with pair.conn("source") as s, pair.conn("target") as t:
        s.execute("INSERT INTO public.turns (participant_id, content) VALUES (1, 'via source')")
        t.execute("INSERT INTO conversation.turns (participant_id, content) VALUES (1, "
                  "'on the target')")
    with application(pair.source):
        time.sleep(1.0)
        # The plan's views read the moved tables: they go first, as the rollback says.
        code, out = _run(pair.source, "rollback", plan, "--yes")
        assert code != 0 and "would strand view" in out
        with pair.conn("source") as s:
            s.execute("DROP VIEW public.participant_users, public.project_blocks")
        stress.ok(pair.source, "rollback", plan, "--yes")
    with pair.conn("source") as s:
        for table in MOVED:
            assert kind(pair, "source", f"public.{table}") == "r", table
        # Rows written after cutover on either server, and the application's updates.
        # (The application's updates append dots to random rows, ours among them.)
        r = s.execute("SELECT count(*) FILTER (WHERE content LIKE 'via source%' OR content "
                      "LIKE 'on the target%') AS mine, count(*) FILTER (WHERE content LIKE "
                      "'%.') AS updated FROM public.turns").fetchone()
        assert r is not None and r["mine"] == 2 and int(str(r["updated"])) > 0, r
    assert ours(pair) == {"source": [], "target": []}
    with pair.conn("target") as t:
        left = t.execute("SELECT n.nspname || '.' || c.relname AS r FROM pg_class c JOIN "
                         "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN "
                         "('pg_catalog', 'information_schema', 'pg_toast')").fetchall()
        assert [r["r"] for r in left] == []


def test_with_the_application_on_the_target_the_old_name_refuses_writes(
    pair: Pair, tmp_path: Path,
) -> None:
    plan = plan_file(tmp_path, application="target")
    stress.ok(pair.source, "apply", plan, "--table", "blocks")
    stress.ok(pair.source, "cutover", plan, "--table", "blocks", "--yes")
    with pair.conn("source") as s:
        assert s.execute("SELECT count(*) AS n FROM public.blocks").fetchone() == {"n": 20}
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction,
                           match=r"moved to conversation\.blocks on server conversation_home"):
            s.execute("DELETE FROM public.blocks")


def test_sigkill_at_random_points_of_every_stage_resumes_to_equality(
    pair: Pair, tmp_path: Path,
) -> None:
    plan = plan_file(tmp_path)
    rng = random.Random(17)
    steps = [("apply", plan), ("cutover", plan, "--yes"),
             ("rollback", plan, "--table", "turns", "--to", "verify", "--yes"),
             ("cutover", plan, "--table", "turns", "--yes"),
             ("rollback", plan, "--table", "blocks", "--to", "prepare", "--yes"),
             ("apply", plan, "--table", "blocks"), ("cutover", plan, "--yes"),
             ("finalize", plan, "--yes", "--force")]
    kills = 0
    with application(pair.source):
        for args in steps:
            if args[0] == "rollback" and "blocks" in args:
                with pair.conn("source") as s:  # project_blocks reads blocks
                    s.execute("DROP VIEW IF EXISTS public.project_blocks")
            proc = stress.Proc(pair.source, *args)
            time.sleep(rng.uniform(0.05, 1.2))
            kills += proc.kill()
            proc.close()
            stress.rerun(pair.source, *args)
    assert kills >= 3, "too few kills landed to prove anything"
    assert ours(pair) == {"source": [], "target": []}
    with pair.conn("source") as s, pair.conn("target") as t:
        for table in KEYED:
            assert digest(s, f"public.{table}") == digest(t, f"conversation.{table}"), table
        for view in ("public.participant_users", "public.project_blocks"):
            r = s.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(
                sql.Identifier(*view.split(".")))).fetchone()
            assert r is not None and int(str(r["n"])) > 0, view


def _run(dsn: str, *args: str) -> tuple[int, str]:
    r = stress.cli(dsn, *args)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    return r.returncode, out


def test_the_two_server_demo_ends_with_no_mismatch_and_nothing_left(tmp_path: Path) -> None:
    import subprocess
    import sys

    base = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "orchestrator", "demo", "--two-servers",
                        "--rows", "3000", "--dir", str(base)], capture_output=True, text=True,
                       timeout=600)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0 and "Traceback" not in out, out
    assert "mismatches │ 0 │" in out, out
    assert "subscriptions left after finalize │ 0 │" in out, out
    assert "stopped the two embedded servers" in out


def test_dry_run_status_and_scan_code_say_what_changes_for_the_application(
    pair: Pair, tmp_path: Path,
) -> None:
    plan = plan_file(tmp_path)
    import json

    report = json.loads(stress.ok(pair.source, "dry-run", plan, "--format", "json"))
    turns = next(t for t in report["tables"] if t["table"] == "turns")
    assert turns["reason"].startswith("remote: schema conversation lives on another server")
    risks = " ".join(turns["risks"])
    assert "ON CONFLICT with a conflict target" in risks and "not atomic" in risks
    stress.ok(pair.source, "apply", plan, "--table", "turns")
    out = " ".join(stress.ok(pair.source, "status", plan).split())
    assert "replication: turns: source → conversation_home:" in out, out
    stress.ok(pair.source, "cutover", plan, "--table", "turns", "--yes")
    status = json.loads(stress.ok(pair.source, "status", plan, "--format", "json"))
    lag = next(t for t in status["tables"] if t["name"] == "turns")["lag"]
    assert lag["direction"] == "reverse" and lag["behind_bytes"] is not None, lag
    code = tmp_path / "app.sql"
    code.write_text(
        "INSERT INTO turns (participant_id, content) VALUES (1, 'x') ON CONFLICT (id) DO "
        "NOTHING;\nBEGIN;\nUPDATE users SET email = 'a' WHERE id = 1;\nINSERT INTO "
        "conversation.turns (participant_id, content) VALUES (1, 'y');\nCOMMIT;\n")
    found, out = _run(pair.source, "scan-code", "--plan", plan, str(code))
    assert found == 1  # it found something
    out = " ".join(out.split())
    assert "app.sql:1: turns: INSERT ... ON CONFLICT with a conflict target" in out, out
    assert "app.sql:2: conversation.turns: this transaction writes conversation.turns" in out
    assert "2 statement(s) that cannot work once their table lives on another server" in out


def test_a_swap_cut_short_between_the_two_servers_is_undone_and_loses_nothing(
    pair: Pair, tmp_path: Path,
) -> None:
    plan = plan_file(tmp_path)
    stress.ok(pair.source, "apply", plan, "--table", "turns")
    # The source's part fails after the target's committed: the target's is undone.
    with pair.conn("source") as s:
        s.execute("CREATE SCHEMA conversation")
        s.execute("CREATE TABLE conversation.turns (id int)")
    code, out = _run(pair.source, "cutover", plan, "--table", "turns", "--yes")
    assert code == 1 and "rolled back, nothing changed" in out and "already exists" in out, out
    assert kind(pair, "source", "public.turns") == "r"
    assert kind(pair, "target", "public.turns") == "r"
    assert kind(pair, "target", f"{RETIRED}.turns") is None
    with pair.conn("source") as s:
        s.execute("DROP TABLE conversation.turns")
        s.execute("INSERT INTO public.turns (participant_id, content) VALUES (1, 'after the "
                  "failed swap')")
    wait_equal(pair, "public", "public", ("turns",))  # the forward stream runs again
    # A crash right after the target's part committed, as the target then is: the next try
    # puts the target back first, and the forward slot kept what the source wrote meanwhile.
    names = plan_slot_names(pair)
    with pair.conn("target") as t:
        t.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(names[0])))
        retired = sql.Identifier(RETIRED)
        t.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(retired))
        t.execute(sql.SQL("ALTER TABLE public.turns SET SCHEMA {}").format(retired))
        t.execute("CREATE SCHEMA IF NOT EXISTS conversation")
        t.execute(sql.SQL("CREATE VIEW conversation.turns AS SELECT * FROM {}").format(
            sql.Identifier(RETIRED, "turns")))
        # (The reverse publication exists already: the failed try made it before its lock.)
        assert t.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                         (names[1],)).fetchone() is not None
    with pair.conn("source") as s:
        s.execute("INSERT INTO public.turns (participant_id, content) VALUES (1, 'while the "
                  "target was half switched')")
    stress.ok(pair.source, "cutover", plan, "--table", "turns", "--yes")
    wait_equal(pair, RETIRED, "conversation", ("turns",))
    with pair.conn("target") as t:
        r = t.execute("SELECT count(*) AS n FROM conversation.turns WHERE content IN ('after the "
                      "failed swap', 'while the target was half switched')").fetchone()
        assert r == {"n": 2}


def plan_slot_names(pair: Pair) -> tuple[str, str]:
    """The forward and reverse names of turns' replication objects (from the target)."""
    with pair.conn("target") as t:
        r = t.execute("SELECT subname FROM pg_subscription WHERE subname LIKE 'orch\\_f\\_%turns%'"
                      ).fetchone()
    assert r is not None
    forward = str(r["subname"])
    return forward, "orch_r_" + forward[len("orch_f_"):]


def test_identity_enum_domain_generated_and_unique_columns_move_and_keep_working(
    pair: Pair, tmp_path: Path,
) -> None:
    with pair.conn("source") as s:
        s.execute("CREATE TYPE public.size AS ENUM ('s', 'm', 'l')")
        s.execute("CREATE DOMAIN public.positive AS integer CHECK (VALUE > 0)")
        s.execute("""CREATE TABLE public.gadgets (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            code text NOT NULL UNIQUE,
            size public.size NOT NULL DEFAULT 'm',
            qty public.positive NOT NULL,
            twice integer GENERATED ALWAYS AS (qty * 2) STORED,
            made timestamptz NOT NULL DEFAULT now(),
            CHECK (code <> ''))""")
        s.execute("CREATE INDEX ON public.gadgets (size)")
        s.execute("INSERT INTO public.gadgets (code, qty) SELECT 'g' || g, g FROM "
                  "generate_series(1, 500) g")
    text = (f"version: 1\nname: gadgets\nsource_schema: public\nschemas:\n  store:\n"
            f"    server: home\ntables:\n  - name: gadgets\n    schema: store\n"
            f"servers:\n  home:\n    dsn_env: {TARGET_ENV}\n")
    plan = tmp_path / "gadgets.yaml"
    plan.write_text(text, encoding="utf-8")
    stress.ok(pair.source, "apply", str(plan))
    stress.ok(pair.source, "cutover", str(plan), "--yes")
    with pair.conn("source") as s:
        row = s.execute("INSERT INTO public.gadgets (code, qty) VALUES ('new', 4) RETURNING id, "
                        "size, twice, made").fetchone()
        assert row is not None and row["size"] == "m" and row["twice"] == 8, row
        with pytest.raises(psycopg.errors.CheckViolation):
            s.execute("INSERT INTO public.gadgets (code, qty) VALUES ('bad', -1)")
    with pair.conn("target") as t:
        r = t.execute("SELECT id, size::text AS size, twice FROM store.gadgets WHERE code = "
                      "'new'").fetchone()
        assert r == {"id": row["id"], "size": "m", "twice": 8}
        mine = t.execute("INSERT INTO store.gadgets (code, qty) VALUES ('there', 1) RETURNING id"
                         ).fetchone()
        assert mine is not None and mine["id"] != row["id"]
    stress.ok(pair.source, "finalize", str(plan), "--yes", "--force")
    with pair.conn("target") as t:
        idx = {r["indexdef"].split(" USING ")[1] for r in t.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'gadgets'")}
        assert idx == {"btree (id)", "btree (code)", "btree (size)"}, idx
    assert ours(pair) == {"source": [], "target": []}


def test_a_paused_plan_holds_the_initial_sync_before_it_starts(pair: Pair, tmp_path: Path) -> None:
    plan = plan_file(tmp_path)
    stress.ok(pair.source, "apply", plan, "--table", "blocks", "--until", "prepare")
    stress.ok(pair.source, "set", plan, "paused", "true")
    proc = stress.Proc(pair.source, "apply", plan, "--table", "blocks", "--until", "sync")
    try:
        time.sleep(3.0)
        assert proc.running(), proc.output()
        with pair.conn("target") as t:  # the subscription was not enabled
            assert t.execute("SELECT bool_or(subenabled) AS on FROM pg_subscription"
                             ).fetchone() == {"on": False}
        stress.ok(pair.source, "set", plan, "paused", "false")
        code, out = proc.finish(timeout=120)
        assert code == 0, out
    finally:
        proc.close()
    with pair.conn("target") as t:
        assert t.execute("SELECT count(*) AS n FROM public.blocks").fetchone() == {"n": 20}

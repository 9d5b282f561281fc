"""Randomized fault injection: SIGKILL the orchestrator at a random point, rerun it, compare.

Every run is drawn from one integer seed. The seed picks a set of Cogito tables, the kind of
point at which the orchestrator (`python -m orchestrator`, its own process, as the operator runs
it) is killed, and where exactly inside that kind:

- copy: a throttled copy with `0 < rows_done < total`, at a random row count, sometimes in the
  middle of a batch;
- verify: verify running (its first replay held up by a session on the new table);
- reverify: the verification cutover repeats just before its swap;
- cutover_retry: after the k-th try of a cutover gave way to an application reader;
- cutover_wait: while the cutover's swap transaction waits for its lock;
- rollback: a full rollback from a random stage (dual_write, copy, verify or cutover), either
  after the k-th try of one of its steps gave way to a reader, or at a random moment;
- finalize: after the k-th try of finalize gave way to a reader of the retired table;
- random: at a random moment of a forward move started from a random stage.

Sometimes the first rerun is killed too, at a random moment. All the while the application
of tests/test_concurrency.py writes turns, users and block_turns by their public names
(inserts, updates, primary-key updates, deletes) and keeps a ledger of what every key must
finally hold. After the rerun (and, for some forward runs, a full rollback), the application
stops and the checks run:

- the application saw no unexpected error and no row of its vanished, and every table it
  wrote holds exactly its ledger;
- each moved table equals its retired source, EXCEPT both ways, column for column;
- after a move: every stage's status and a catalog snapshot of every schema involved equal
  those of an uninterrupted run of the same commands in a database of its own; no invalid
  index, no unvalidated foreign key; the copy was started once (the rerun resumed it);
- after a full rollback: the snapshot of the source and target schemas equals the one taken
  before the move, and nothing of ours is left but the control tables.

`make stress` runs many seeds (tests/test_stress.py); `make test` runs a few fixed ones.
A failure prints `ORCHESTRATOR_SEED=<seed> make stress`, which replays that run alone.
`python tests/stress.py summary FILE` sums up the JSON lines the runs append to
$ORCHESTRATOR_STRESS_LOG.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row

Conn = psycopg.Connection[Any]
ROOT = Path(__file__).resolve().parent.parent
PLAN = str(ROOT / "plans" / "cogito.yaml")
PLAN_NAME = "cogito"
REFUSED = "is being worked on by another orchestrator"
GAVE_UP = "could not get its locks within"

# Source and target schemas of the Cogito plan, and where the orchestrator keeps its own.
DATA_SCHEMAS = ["public", "client_mgmt", "conversation"]
OUR_SCHEMAS = ["_orchestrator", "_orchestrator_retired"]
ALL_SCHEMAS = DATA_SCHEMAS + OUR_SCHEMAS
CONTROL_TABLES = {
    "meta", "plans", "stages", "settings", "saved", "events", "events_id_seq", "chunks",
}

# The tables a run may move, in the plan's graph order (users moves with participants: they
# reference each other). block_turns moves by the rename strategy, the others by copy.
ORDER = ("users", "blocks", "turns", "block_turns")
UNIT = {"users": ("users", "participants")}
COPY_TABLES = {"users", "participants", "blocks", "turns"}
TARGET = {
    "users": "client_mgmt",
    "participants": "conversation",
    "blocks": "conversation",
    "turns": "conversation",
    "block_turns": "conversation",
}
RENAMED = {"turns": {"timestamp": "sent_at"}}  # the plan's column mapping

TABLE_SETS: list[tuple[str, ...]] = [
    ("turns",),
    ("users",),
    ("blocks",),
    ("blocks", "turns"),
    ("users", "turns"),
    ("turns", "block_turns"),
]
# Engine bugs that refuse a rerun, by the message of the refusal (each with a strict xfail in
# test_stress.py): the harness follows the printed hint and counts each hit. Empty now: the
# one found here (a cutover killed while it verified again was refused, 'cutover needs a
# clean verify first (verify is running)') was fixed in 0e1086f and is a plain test again.
KNOWN_BUGS: dict[str, str] = {}
# Found by the watchdog below: a throttled copy chasing rows the application inserts below the
# copy's upper bound. Fixed (batches leave out rows written since the copy started; see
# test_stress.py); the watchdog stays, and a chase now fails the run.
CHASE = "copy_chases_inserts_below_its_upper_bound"
KINDS: dict[str, int] = {
    "copy": 4,
    "verify": 2,
    "reverify": 2,
    "cutover_retry": 3,
    "cutover_wait": 2,
    "rollback": 4,
    "finalize": 2,
    "random": 3,
}


# --- the scenario a seed picks ------------------------------------------------------------------


@dataclass
class Scenario:
    seed: int
    kind: str
    tables: tuple[str, ...]
    table: str  # the copy-strategy table the kill aims at
    prefix: str | None  # `apply --until PREFIX` run uninterrupted before the killed command
    params: dict[str, Any]
    second_kill: bool  # kill the first rerun too, at a random moment
    then_rollback: bool  # after a forward move, roll everything back (uninterrupted)

    @property
    def goal(self) -> str:
        """How the run ends: cutover, finalize or rollback."""
        if self.kind == "rollback" or self.then_rollback:
            return "rollback"
        return "finalize" if self.kind == "finalize" else "cutover"

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return (
            f"seed {self.seed}: {self.kind} kill aimed at {self.table} of {'+'.join(self.tables)}"
            f"{f' after apply --until {self.prefix}' if self.prefix else ''} ({extra})"
            f"{'; the first rerun is killed too' if self.second_kill else ''}"
            f"{'; then a full rollback' if self.then_rollback else ''}"
        )


def scenario(seed: int) -> Scenario:
    rng = random.Random(seed)
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    tables = rng.choice(TABLE_SETS)
    table = rng.choice([t for t in tables if t in COPY_TABLES])
    params: dict[str, Any] = {}
    prefix: str | None = None
    if kind == "copy":
        params["batches"] = rng.randint(8, 16)  # the copy of `table` in this many batches
        params["sleep_ms"] = rng.randint(30, 90)
        params["at"] = round(rng.uniform(0.05, 0.85), 3)  # fraction of the rows copied
        params["extra_ms"] = rng.randint(0, params["sleep_ms"])
        params["lift_throttle"] = rng.random() < 0.5
        prefix = rng.choice([None, None, "dual_write"])
    elif kind == "verify":
        prefix = "copy"
        params["extra_ms"] = rng.randint(0, 400)
    elif kind == "reverify":
        prefix = "verify"
        params["extra_ms"] = rng.randint(0, 400)
        # In full (--full-verify), or the re-check of the chunks changed since the full pass.
        params["full"] = rng.random() < 0.5
    elif kind == "cutover_retry":
        prefix = "verify"
        params["lock_timeout_ms"] = rng.choice([100, 200, 300])
        params["tries"] = rng.randint(1, 3)
        params["extra_ms"] = rng.randint(0, 300)
    elif kind == "cutover_wait":
        prefix = "verify"
        params["lock_timeout_ms"] = 4000
        params["extra_ms"] = rng.randint(0, 1500)
    elif kind == "rollback":
        prefix = rng.choice(["dual_write", "copy", "verify", "cutover", "cutover"])
        params["mode"] = rng.choice(["blocked", "random"])
        if params["mode"] == "blocked":
            params["lock_timeout_ms"] = rng.choice([100, 200, 300])
            params["tries"] = rng.randint(1, 3)
            params["extra_ms"] = rng.randint(0, 300)
        else:
            params["after_s"] = round(rng.uniform(0.0, 0.3), 3)
    elif kind == "finalize":
        prefix = "cutover"
        params["lock_timeout_ms"] = rng.choice([100, 200])
        params["tries"] = rng.randint(1, 2)
        params["extra_ms"] = rng.randint(0, 300)
    else:  # random
        prefix = rng.choice([None, "dual_write", "copy", "verify"])
        params["after_s"] = round(rng.uniform(0.0, 0.4 if prefix == "verify" else 0.6), 3)
    second_kill = rng.random() < 0.25
    then_rollback = kind in ("copy", "verify", "reverify", "random") and rng.random() < 0.3
    # Half the runs move the set's independent tables side by side (apply --jobs 2).
    params["jobs"] = rng.choice([1, 2])
    return Scenario(seed, kind, tables, table, prefix, params, second_kill, then_rollback)


# --- the orchestrator as the operator runs it -----------------------------------------------------


def table_args(tables: tuple[str, ...]) -> list[str]:
    return [a for t in tables for a in ("--table", t)]


def cli(dsn: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the CLI to its end. One that hangs is killed, and the error shows what every
    session of the database was doing then (the orchestrator's output included)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        sessions = diagnose(dsn)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"`orchestrator {' '.join(args)}` hung for {timeout} s; sessions then:\n{sessions}"
            f"\noutput:\n{out[-3000:]}{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def diagnose(dsn: str) -> str:
    """Every session of the database: what it runs, what it waits for, and who blocks it."""
    try:
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            rows = conn.execute(
                "SELECT pid, application_name AS app, state, wait_event_type AS wt, "
                "wait_event AS we, pg_blocking_pids(pid) AS blocked_by, "
                "round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_s, "
                "left(query, 300) AS query FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() ORDER BY pid"
            ).fetchall()
    except psycopg.Error as exc:
        return f"(could not read pg_stat_activity: {exc})"
    return "\n".join(str(dict(r)) for r in rows)


def ok(dsn: str, *args: str) -> str:
    r = cli(dsn, *args)
    output = r.stdout + r.stderr
    if r.returncode != 0 or "Traceback" in output:
        raise AssertionError(f"`orchestrator {' '.join(args)}` failed ({r.returncode}): {output}")
    return output


class Proc:
    """A background orchestrator; its output goes to a file, so it never blocks on a pipe."""

    def __init__(self, dsn: str, *args: str) -> None:
        self.args = args
        self.out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by close()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.started = time.monotonic()

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> bool:
        """SIGKILL it; False when it had already ended by itself."""
        if not self.running():
            return False
        os.kill(self.popen.pid, signal.SIGKILL)
        code = self.popen.wait(timeout=10)
        return code == -signal.SIGKILL

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        code = self.popen.wait(timeout=timeout)
        return code, self.output()

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def close(self) -> None:
        if self.running():
            self.popen.kill()
            self.popen.wait(timeout=10)
        self.out.close()


class Writer(threading.Thread):
    """The application: inserts, updates, key updates and deletes on public.turns."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.writes = 0
        self.error: BaseException | None = None  # what ended it, if not `stop`

    def run(self) -> None:
        try:
            self._write()
        except BaseException as exc:
            self.error = exc
            raise

    def _write(self) -> None:
        with connect(self.dsn, "app-writer") as app:
            n = 0
            while not self.stop.is_set():
                n += 1
                app.execute("INSERT INTO public.turns (participant_id, content) "
                            "VALUES (1, %s)", (f"new {n}",))
                app.execute("UPDATE public.turns SET content = content || '.' "
                            "WHERE id = (SELECT id FROM public.turns ORDER BY random() LIMIT 1)")
                app.execute("DELETE FROM public.turns WHERE id = (SELECT max(id) FROM "
                            "public.turns) AND content LIKE 'new %%'")
                self.writes += 3
                time.sleep(0.005)


def rerun(dsn: str, *args: str, within: float = 180) -> int:
    """Run to completion. Retried for up to `within` seconds: a refusal while the server frees
    the dead session's advisory locks, and a step that gave up waiting for the application's
    locks after all its tries (it changed nothing and says to rerun, or to raise the timeout
    with --lock-timeout: the retry does, to 2000 ms). Returns the number of retries."""
    retried = 0
    deadline = time.monotonic() + within
    while True:
        r = cli(dsn, *args)
        output = r.stdout + r.stderr
        if "Traceback" in output:
            raise AssertionError(f"`orchestrator {' '.join(args)}` printed a traceback: {output}")
        if r.returncode == 0:
            return retried
        if not (REFUSED in output or GAVE_UP in output) or time.monotonic() > deadline:
            raise AssertionError(f"the rerun `orchestrator {' '.join(args)}` failed: {output}")
        if GAVE_UP in output:
            args = raise_lock_timeout(args, 2000)
        retried += 1
        time.sleep(0.3)


def raise_lock_timeout(args: tuple[str, ...], ms: int) -> tuple[str, ...]:
    out = list(args)
    if "--lock-timeout" in out:
        i = out.index("--lock-timeout")
        del out[i : i + 2]
    return (*out, "--lock-timeout", str(ms))


# --- reading the database -------------------------------------------------------------------------


def connect(dsn: str, application: str = "stress-observer") -> Conn:
    conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row, application_name=application)
    conn.execute("SET search_path = ''")  # definitions print schema-qualified, as ours do
    return conn


def catalog(conn: Conn, schemas: list[str]) -> dict[str, Any]:
    from orchestrator.model.catalog import snapshot

    return snapshot(conn, schemas)


def stage(conn: Conn, table: str, name: str) -> dict[str, Any]:
    try:
        row = conn.execute(
            "SELECT status, rows_done, rows_estimated FROM _orchestrator.stages "
            "WHERE plan = %s AND table_name = %s AND stage = %s",
            (PLAN_NAME, table, name),
        ).fetchone()
    except errors.UndefinedTable:
        row = None
    return row or {"status": None, "rows_done": 0, "rows_estimated": None}


def statuses(conn: Conn) -> dict[str, str]:
    rows = conn.execute(
        "SELECT table_name, stage, status FROM _orchestrator.stages WHERE plan = %s",
        (PLAN_NAME,),
    ).fetchall()
    return {f"{r['table_name']}:{r['stage']}": r["status"] for r in rows}


def events(conn: Conn, table: str, action: str, outcome: str) -> int:
    """How many events of an action and outcome name the table (alone or in its unit)."""
    try:
        row = conn.execute(
            "SELECT count(*) AS n FROM _orchestrator.events WHERE plan = %s AND action LIKE %s "
            "AND outcome = %s AND %s = ANY(string_to_array(table_name, ','))",
            (PLAN_NAME, action, outcome, table),
        ).fetchone()
    except errors.UndefinedTable:
        return 0
    return int(row["n"]) if row else 0


def waits_for_lock(conn: Conn, application: str = "orchestrator") -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE NOT l.granted AND a.datname = current_database() "
        "AND a.application_name = %s) AS w",
        (application,),
    ).fetchone()
    return bool(row and row["w"])


def count(conn: Conn, schema: str, table: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(schema, table))
    ).fetchone()
    return int(row["n"]) if row else 0


def columns(conn: Conn, schema: str, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return [r["attname"] for r in rows]


def except_both_ways(
    conn: Conn, table: str, source_schema: str = "_orchestrator_retired"
) -> tuple[int, int, int, int]:
    """(rows only in the new table, rows only in the source, and both counts). The source is
    the retired table after cutover, the live one (source_schema="public") before it."""
    source = columns(conn, source_schema, table)
    mapping = RENAMED.get(table, {})
    old = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, source)),
        sql.Identifier(source_schema, table),
    )
    new = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(sql.Identifier(mapping.get(c, c)) for c in source),
        sql.Identifier(TARGET[table], table),
    )
    q = sql.SQL(
        "SELECT (SELECT count(*) FROM ({new} EXCEPT {old}) a) AS extra, "
        "(SELECT count(*) FROM ({old} EXCEPT {new}) b) AS lost, "
        "(SELECT count(*) FROM ({new}) c) AS n_new, (SELECT count(*) FROM ({old}) d) AS n_old"
    ).format(new=new, old=old)
    r = conn.execute(q).fetchone()
    assert r is not None
    return r["extra"], r["lost"], r["n_new"], r["n_old"]


def half_done(conn: Conn) -> dict[str, list[str]]:
    """Invalid indexes and unvalidated foreign keys anywhere in the schemas involved."""
    bad_indexes = conn.execute(
        "SELECT i.indexrelid::regclass::text AS name FROM pg_index i JOIN pg_class c "
        "ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE NOT i.indisvalid AND n.nspname = ANY(%s)",
        (ALL_SCHEMAS,),
    ).fetchall()
    bad_fks = conn.execute(
        "SELECT conrelid::regclass::text || '.' || conname AS name FROM pg_constraint k "
        "JOIN pg_namespace n ON n.oid = k.connamespace "
        "WHERE k.contype = 'f' AND NOT k.convalidated AND n.nspname = ANY(%s)",
        (ALL_SCHEMAS,),
    ).fetchall()
    return {
        "invalid_indexes": [r["name"] for r in bad_indexes],
        "unvalidated_fks": [r["name"] for r in bad_fks],
    }


def leftovers(conn: Conn) -> list[str]:
    """Relations of ours other than the control tables (logs, retired tables)."""
    rows = conn.execute(
        "SELECT n.nspname || '.' || c.relname AS name, c.relname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY(%s) "
        "AND c.relkind IN ('r', 'v', 'S', 'p')",
        (OUR_SCHEMAS,),
    ).fetchall()
    return sorted(
        r["name"]
        for r in rows
        if not (r["name"].startswith("_orchestrator.") and r["relname"] in CONTROL_TABLES)
    )


def throttle(dsn: str, table: str, batch_size: int, sleep_ms: int) -> None:
    """What `orchestrator set PLAN batch_size|sleep_ms N --table T` records (in-process)."""
    from orchestrator.db import connect as orch_connect
    from orchestrator.state.migrations import ensure_schema
    from orchestrator.state.store import Store

    with orch_connect(dsn, autocommit=True, application="stress-operator") as conn:
        ensure_schema(conn, "_orchestrator")
        with conn.transaction():
            store = Store(conn, "_orchestrator", PLAN_NAME)
            store.put_setting("batch_size", batch_size, table)
            store.put_setting("sleep_ms", sleep_ms, table)


def wait_until(
    what: str, check: Callable[[], Any], proc: Proc | None = None, timeout: float = 120
) -> Any:
    """Poll until check() is true; None if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and not proc.running():
            return None
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def holding(dsn: str, statement: sql.Composable, application: str) -> Iterator[Conn]:
    """A session that runs `statement` in an open transaction until the block ends."""
    conn = psycopg.connect(dsn, application_name=application)
    try:
        conn.execute(statement)
        yield conn
    finally:
        conn.rollback()
        conn.close()


def read_lock(schema: str, table: str) -> sql.Composed:
    """An application report: reads the table and keeps its transaction open."""
    return sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))


def share_lock(schema: str, table: str) -> sql.Composed:
    return sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(schema, table))


# --- the uninterrupted run each end state is compared with ---------------------------------------


@dataclass
class Reference:
    catalog: dict[str, Any]
    statuses: dict[str, str]
    seconds: float


_references: dict[tuple[tuple[str, ...], str], Reference] = {}


def forward_commands(tables: tuple[str, ...], goal: str) -> list[list[str]]:
    cmds = [["apply", PLAN, *table_args(tables), "--until", "cutover", "--yes"]]
    if goal == "finalize":
        # The load writes through the old names by design: finalize is forced past its
        # compatibility-view traffic gate (tested on its own in test_hooks_and_gates.py).
        cmds.append(["finalize", PLAN, *table_args(tables), "--yes", "--force"])
    return cmds


def reference(server_dsn: str, tables: tuple[str, ...], goal: str) -> Reference:
    """The end state of the same move run start to finish, without kills or load (cached)."""
    key = (tables, goal)
    if key not in _references:
        from conftest import COGITO_TEMPLATE, _fresh_db

        for dsn in _fresh_db(server_dsn, COGITO_TEMPLATE):
            t0 = time.monotonic()
            for cmd in forward_commands(tables, goal):
                ok(dsn, *cmd)
            seconds = time.monotonic() - t0
            with connect(dsn) as conn:
                _references[key] = Reference(catalog(conn, ALL_SCHEMAS), statuses(conn), seconds)
    return _references[key]


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Record:
    """What one run did and found: a JSON line of the stress log."""

    seed: int
    kind: str
    tables: list[str]
    goal: str
    describe: str
    kills: int = 0
    kill_points: list[str] = field(default_factory=list)
    missed: int = 0  # the orchestrator ended before the chosen point
    refusals: int = 0
    reruns: int = 0
    app_ops: int = 0
    app_ops_while_dead: int = 0
    app_key_changes: int = 0
    transient: dict[str, int] = field(default_factory=dict)
    rows_checked: int = 0
    known_bugs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = False
    error: str | None = None


class StressRun:
    def __init__(self, server_dsn: str, dsn: str, sc: Scenario) -> None:
        self.server_dsn = server_dsn
        self.dsn = dsn
        self.sc = sc
        self.rng = random.Random(sc.seed * 7919 + 1)
        self.db = connect(dsn)
        self.rec = Record(sc.seed, sc.kind, list(sc.tables), sc.goal, sc.describe())
        self.procs: list[Proc] = []
        self.copy_total = 0

    # -- steps

    def start(self, *args: str) -> Proc:
        p = Proc(self.dsn, *args)
        self.procs.append(p)
        return p

    def pause(self, ms: int) -> None:
        time.sleep(ms / 1000)

    def kill(self, p: Proc, where: str) -> None:
        if p.kill():
            self.rec.kills += 1
            self.rec.kill_points.append(where)
        else:
            self.rec.missed += 1
            code, output = p.finish()
            if code != 0 and not self.known_bug(output):
                raise AssertionError(f"the orchestrator failed before the kill: {output}")

    def known_bug(self, output: str) -> bool:
        """Whether a refusal is a known engine bug; if so, count it and follow the hint the
        orchestrator printed (unless ORCHESTRATOR_STRESS_STRICT is set)."""
        bug = next((name for name, text in KNOWN_BUGS.items() if text in output), None)
        if bug is None or os.environ.get("ORCHESTRATOR_STRESS_STRICT"):
            return False
        self.rec.known_bugs.append(bug)
        ok(self.dsn, "apply", PLAN, *table_args(self.sc.tables), "--until", "verify")
        return True

    def forward(self) -> list[str]:
        jobs = int(self.sc.params.get("jobs", 1))
        return ["apply", PLAN, *table_args(self.sc.tables), "--until", "cutover", "--yes",
                *(["--jobs", str(jobs)] if jobs > 1 else [])]

    def cutover_cmd(self, lock_timeout_ms: int | None = None) -> list[str]:
        # The kills aim at tries that give way to a reader, so the swap must try: the stall
        # forecast would otherwise wait for the reader without trying.
        cmd = ["cutover", PLAN, *table_args(self.sc.tables), "--yes", "--ignore-forecast"]
        if lock_timeout_ms:
            cmd += ["--lock-timeout", str(lock_timeout_ms)]
        return cmd

    def target(self, table: str) -> tuple[str, str]:
        return TARGET[table], table

    def firsts(self) -> list[str]:
        """The first table of each unit of the set (events name a unit by its tables)."""
        return [t for t in ORDER if t in self.sc.tables and t in COPY_TABLES]

    def members(self) -> list[str]:
        """Every table that moves by copy, unit members included, in graph order."""
        return [
            m for t in ORDER if t in self.sc.tables for m in UNIT.get(t, (t,)) if m in COPY_TABLES
        ]

    # -- the kill, by kind

    def kill_phase(self) -> list[str]:
        """Run the killed command up to its point, kill it; return the command to rerun."""
        sc, p = self.sc, self.sc.params
        db, t = self.db, self.sc.table
        if sc.prefix:
            ok(self.dsn, "apply", PLAN, *table_args(sc.tables), "--until", sc.prefix, "--yes")
        if sc.kind == "copy":
            total = count(db, "public", t)
            self.copy_total = total
            batch = max(1, total // p["batches"])
            throttle(self.dsn, t, batch, p["sleep_ms"])
            at = max(1, min(int(total * p["at"]), total - batch - 1))
            cmd = self.forward()
            proc = self.start(*cmd)
            hit = wait_until(
                "the copy to pass its point",
                lambda: (s := stage(db, t, "copy"))["status"] == "running" and s["rows_done"] >= at,
                proc,
            )
            if hit:
                self.pause(p["extra_ms"])
            self.kill(
                proc, f"copy of {t} past {at}/{total} rows (batches of {batch}) +{p['extra_ms']} ms"
            )
            s = stage(db, t, "copy")
            if hit and s["status"] == "running":
                assert s["rows_done"] > 0, s
                # Each batch commits with its checkpoint: the new table holds exactly those.
                assert count(db, *self.target(t)) == s["rows_done"], s
            if p["lift_throttle"]:
                throttle(self.dsn, t, 5000, 0)
            return cmd
        if sc.kind in ("verify", "reverify"):
            full = sc.kind == "verify" or p.get("full", True)
            cmd = self.forward() if sc.kind == "verify" else self.cutover_cmd()
            if sc.kind == "reverify" and full:
                cmd.append("--full-verify")
            with holding(self.dsn, share_lock(*self.target(t)), "stress-holder"):
                proc = self.start(*cmd)
                # A full pass marks verify running; the re-check replays first, and waits.
                hit = wait_until(
                    "verify to run and wait",
                    lambda: (not full or stage(db, t, "verify")["status"] == "running")
                    and waits_for_lock(db),
                    proc,
                )
                if hit:
                    self.pause(p["extra_ms"])
                self.kill(proc, f"{sc.kind} ({'full' if full else 're-check'}) of {t} "
                          f"+{p['extra_ms']} ms")
            if hit and full:
                assert stage(db, t, "verify")["status"] == "running"
                assert stage(db, t, "cutover")["status"] in (None, "pending")
            return cmd
        if sc.kind in ("cutover_retry", "cutover_wait"):
            before = catalog(db, ALL_SCHEMAS)
            cmd = self.cutover_cmd(p["lock_timeout_ms"])
            with holding(self.dsn, read_lock("public", t), "app-report"):
                proc = self.start(*cmd)
                # The reader holds up the first unit whose swap locks public.<table>: the
                # table's own, or an earlier one that re-points a foreign key of it.
                if sc.kind == "cutover_retry":
                    tries = p["tries"]
                    hit = wait_until(
                        f"{tries} tries of the cutover to give way",
                        lambda: (
                            sum(events(db, m, "cutover", "lock_timeout") for m in self.firsts())
                            >= tries
                        ),
                        proc,
                    )
                    where = f"cutover held up by a reader of {t}, after {tries} tries gave way"
                else:
                    hit = wait_until(
                        "the swap to wait for its lock",
                        lambda: (
                            any(
                                stage(db, m, "cutover")["status"] == "running"
                                for m in self.firsts()
                            )
                            and waits_for_lock(db)
                        ),
                        proc,
                    )
                    where = f"cutover held up by a reader of {t}, waiting for its lock"
                if hit:
                    self.pause(p["extra_ms"])
                self.kill(proc, f"{where} +{p['extra_ms']} ms")
            if (
                hit
                and events(db, t, "cutover", "ok") == 0
                and len(self.members()) == len(UNIT.get(t, (t,)))
            ):
                # Nothing of a swap that did not commit is there.
                assert catalog(db, ALL_SCHEMAS) == before, "a half-applied cutover"
            return cmd
        if sc.kind == "rollback":
            return self.rollback_kill()
        if sc.kind == "finalize":
            cmd = [
                "finalize",
                PLAN,
                *table_args(sc.tables),
                "--yes",
                "--force",
                "--lock-timeout",
                str(p["lock_timeout_ms"]),
            ]
            with holding(self.dsn, read_lock("_orchestrator_retired", t), "app-report"):
                proc = self.start(*cmd)
                tries = p["tries"]
                hit = wait_until(
                    f"{tries} tries of finalize to give way",
                    lambda: events(db, t, "finalize", "lock_timeout") >= tries,
                    proc,
                )
                if hit:
                    self.pause(p["extra_ms"])
                self.kill(proc, f"finalize of {t} after {tries} tries gave way +{p['extra_ms']} ms")
            return cmd
        # random
        cmd = self.forward()
        proc = self.start(*cmd)
        self.at_random(proc, p["after_s"], f"forward move {p['after_s']} s after connecting")
        return cmd

    def connected(self) -> bool:
        """Whether an orchestrator's work session is open in this database."""
        row = self.db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'orchestrator'"
        ).fetchone()
        return bool(row and row["n"])

    def at_random(self, proc: Proc, after_s: float, where: str) -> None:
        """Kill `after_s` seconds after the process connected (its start-up is not work)."""
        if wait_until("the orchestrator to connect", self.connected, proc):
            time.sleep(after_s)
        self.kill(proc, where)

    def rollback_kill(self) -> list[str]:
        """Kill a full rollback of the set (latest table first); return what is left to run."""
        sc, p, db = self.sc, self.sc.params, self.db
        order = [t for t in reversed(ORDER) if t in sc.tables]
        t = sc.table
        # Tables rolled back before the aimed one go uninterrupted.
        for other in order[: order.index(t)]:
            ok(self.dsn, "rollback", PLAN, "--table", other, "--yes")
        cmd = ["rollback", PLAN, "--table", t, "--yes", "--ignore-forecast"]
        if p["mode"] == "random":
            proc = self.start(*cmd)
            self.at_random(
                proc,
                p["after_s"],
                f"rollback of {t} from {sc.prefix} {p['after_s']} s after connecting",
            )
        else:
            cmd += ["--lock-timeout", str(p["lock_timeout_ms"])]
            # The first step of the rollback to touch a table an application reader holds.
            if sc.prefix == "dual_write":
                held = ("public", t)
            elif sc.prefix == "cutover":
                held = self.target(t)
            else:
                held = self.target(t)
            tries = p["tries"]
            with holding(self.dsn, read_lock(*held), "app-report"):
                proc = self.start(*cmd)
                hit = wait_until(
                    f"{tries} tries of the rollback to give way",
                    lambda: events(db, t, "rollback_%", "lock_timeout") >= tries,
                    proc,
                )
                if hit:
                    self.pause(p["extra_ms"])
                self.kill(
                    proc,
                    f"rollback of {t} from {sc.prefix} after {tries} tries gave "
                    f"way on {'.'.join(held)} +{p['extra_ms']} ms",
                )
        return cmd

    @contextmanager
    def chase_watchdog(self) -> Iterator[None]:
        """While a throttled copy reruns: if it has copied far more rows than its table held
        (it chases the application's inserts, see CHASE), count the hit and end its session,
        so the run fails rather than waits. ORCHESTRATOR_STRESS_LENIENT lifts the throttle
        instead, as an operator would, to see whether the rest of the run holds."""
        if self.sc.kind != "copy":
            yield
            return
        t, limit = self.sc.table, 3 * self.copy_total + 20
        stop = threading.Event()

        def watch() -> None:
            with connect(self.dsn, "stress-watchdog") as conn:
                while not stop.wait(0.2):
                    if stage(conn, t, "copy")["rows_done"] <= limit:
                        continue
                    self.rec.known_bugs.append(CHASE)
                    if os.environ.get("ORCHESTRATOR_STRESS_LENIENT"):
                        throttle(self.dsn, t, 5000, 0)
                    else:
                        conn.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                            "datname = current_database() AND application_name = 'orchestrator'"
                        )
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join(timeout=30)

    def finish(self, cmd: list[str]) -> None:
        """The operator reruns the killed command (maybe killed once more), then the rest."""
        with self.chase_watchdog():
            self.finish_commands(cmd)

    def finish_commands(self, cmd: list[str]) -> None:
        sc = self.sc
        # The application goes on writing while the orchestrator is dead.
        mark = len(self.app.ledger.ops)
        time.sleep(self.rng.uniform(0.1, 0.5))
        self.rec.app_ops_while_dead = len(self.app.ledger.ops) - mark
        if sc.second_kill:
            after = round(self.rng.uniform(0.0, 0.4), 3)
            # Wait out the dead session's locks first, so the second kill lands in real work.
            wait_until("the dead session to go", lambda: not self.orchestrator_sessions())
            proc = self.start(*cmd)
            self.at_random(proc, after, f"the rerun {after} s after connecting")
        self.rerun(cmd)
        if sc.kind == "rollback":
            order = [t for t in reversed(ORDER) if t in sc.tables]
            for other in order[order.index(sc.table) + 1 :]:
                ok(self.dsn, "rollback", PLAN, "--table", other, "--yes")
        if sc.then_rollback:
            for t in [t for t in reversed(ORDER) if t in sc.tables]:
                ok(self.dsn, "rollback", PLAN, "--table", t, "--yes")

    def rerun(self, cmd: list[str]) -> None:
        """Rerun the command to completion. Where a known engine bug refuses the rerun, follow
        the hint the orchestrator prints (and count it), unless ORCHESTRATOR_STRESS_STRICT is set.
        """
        self.rec.reruns += 1
        try:
            self.rec.refusals += rerun(self.dsn, *cmd)
            return
        except AssertionError as exc:
            if not self.known_bug(str(exc)):
                raise
        self.rec.refusals += rerun(self.dsn, *cmd)

    def orchestrator_sessions(self) -> int:
        row = self.db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'orchestrator%%'"
        ).fetchone()
        return int(row["n"]) if row else 0

    # -- the checks

    def check(self, before: dict[str, Any]) -> None:
        sc, db = self.sc, self.db
        from test_concurrency import (
            SELECT_TURNS_BEFORE,
            SELECT_USERS_BEFORE,
            diff,
        )

        ledger = self.app.ledger
        assert not ledger.unexpected, ledger.unexpected[:10]
        assert not ledger.anomalies, ledger.anomalies[:10]
        # Every row the application wrote, by the names it uses, holds what it wrote.
        live = {
            "turns": {r["id"]: r for r in db.execute(SELECT_TURNS_BEFORE).fetchall()},
            "users": {r["id"]: r for r in db.execute(SELECT_USERS_BEFORE).fetchall()},
            "block_turns": {
                (r["block_id"], r["turn_id"]): r
                for r in db.execute("SELECT * FROM public.block_turns").fetchall()
            },
        }
        for table, rows in live.items():
            problems = diff(ledger.expected(table), rows)
            assert problems == [], f"{table}: {problems[:10]}"
            self.rec.rows_checked += len(rows)
        self.rec.app_ops = len(ledger.ops)
        self.rec.app_key_changes = sum(
            1 for o in ledger.ops if o.ok and o.kind in ("key_update", "delete")
        )
        self.rec.transient = dict(ledger.transient)
        assert half_done(db) == {"invalid_indexes": [], "unvalidated_fks": []}, half_done(db)

        if sc.goal == "rollback":
            assert catalog(db, DATA_SCHEMAS) == before, "the rollback did not restore the schema"
            assert leftovers(db) == [], leftovers(db)
            left = {k: v for k, v in statuses(db).items() if v not in ("pending", "rolled_back")}
            assert left == {}, left
            return
        ref = reference(self.server_dsn, sc.tables, sc.goal)
        assert statuses(db) == ref.statuses
        assert catalog(db, ALL_SCHEMAS) == ref.catalog, "the end state differs from a clean run"
        for t in self.members():
            if sc.goal == "cutover":
                extra, lost, n_new, n_old = except_both_ways(db, t)
                assert (extra, lost) == (0, 0), f"{t}: {extra} invented, {lost} lost"
                assert n_new == n_old
                self.rec.rows_checked += n_new
            # The rerun resumed the copy from its checkpoint: started once, finished once.
            assert events(db, t, "copy", "started") == 1, f"{t}: the copy started again"
            assert events(db, t, "copy", "ok") == 1

    # -- the whole run

    def run(self) -> Record:
        from test_concurrency import Application

        t0 = time.monotonic()
        before = catalog(self.db, DATA_SCHEMAS)
        self.app = Application(self.dsn, self.db)
        try:
            with self.app.running():
                wait_until(
                    "the application to warm up",
                    lambda: all(w.n > 5 for w in self.app.workers),
                )
                cmd = self.kill_phase()
                self.finish(cmd)
            # The application has stopped: replay what it wrote last, then compare.
            if self.sc.goal == "cutover":
                ok(self.dsn, *self.forward())
            self.check(before)
            self.rec.ok = True
        finally:
            for p in self.procs:
                p.close()
            self.db.close()
            self.rec.seconds = round(time.monotonic() - t0, 2)
        return self.rec


def log_record(rec: Record) -> None:
    path = os.environ.get("ORCHESTRATOR_STRESS_LOG")
    if not path:
        return
    line = json.dumps(asdict(rec), default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_seed(server_dsn: str, seed: int) -> Record:
    """One randomized run in a fresh Cogito database; raises with the replay line on failure."""
    from conftest import COGITO_TEMPLATE, _fresh_db

    sc = scenario(seed)
    rec = Record(seed, sc.kind, list(sc.tables), sc.goal, sc.describe())
    try:
        for dsn in _fresh_db(server_dsn, COGITO_TEMPLATE):
            run = StressRun(server_dsn, dsn, sc)
            try:
                rec = run.run()
            finally:
                rec = run.rec
    except BaseException as exc:
        rec.error = "".join(traceback.format_exception_only(exc)).strip()[:2000]
        log_record(rec)
        print(
            f"\nSTRESS FAILURE {sc.describe()}\n  replay: ORCHESTRATOR_SEED={seed} make stress",
            file=sys.stderr,
        )
        raise AssertionError(
            f"{sc.describe()}\nkilled at: {rec.kill_points}\n"
            f"replay: ORCHESTRATOR_SEED={seed} make stress\n{rec.error}"
        ) from exc
    log_record(rec)
    return rec


def seeds(default: list[int]) -> list[int]:
    """ORCHESTRATOR_SEED (comma-separated) replays; ORCHESTRATOR_STRESS_RUNS=N runs N seeds
    from ORCHESTRATOR_STRESS_BASE; otherwise the fixed subset."""
    if os.environ.get("ORCHESTRATOR_SEED"):
        return [int(s) for s in os.environ["ORCHESTRATOR_SEED"].split(",") if s.strip()]
    runs = int(os.environ.get("ORCHESTRATOR_STRESS_RUNS") or 0)
    if runs:
        base = int(os.environ.get("ORCHESTRATOR_STRESS_BASE") or 1)
        return list(range(base, base + runs))
    return default


# --- the summary of a stress log ------------------------------------------------------------------


def summarize(path: Path) -> dict[str, Any]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kinds: Counter[str] = Counter(r["kind"] for r in recs)
    goals: Counter[str] = Counter(r["goal"] for r in recs)
    sets: Counter[str] = Counter("+".join(r["tables"]) for r in recs)
    transient: Counter[str] = Counter()
    for r in recs:
        transient.update(r.get("transient") or {})
    failed = [r for r in recs if not r["ok"]]
    return {
        "runs": len(recs),
        "passed": len(recs) - len(failed),
        "failed": [
            {"seed": r["seed"], "describe": r["describe"], "error": r["error"]} for r in failed
        ],
        "kills": sum(r["kills"] for r in recs),
        "runs_with_two_kills": sum(1 for r in recs if r["kills"] >= 2),
        "known_engine_bug_hits": dict(Counter(b for r in recs for b in r.get("known_bugs") or [])),
        "kills_missed": sum(r["missed"] for r in recs),
        "runs_without_a_kill": sum(1 for r in recs if not r["kills"]),
        "kills_by_kind": dict(
            sorted(
                Counter({k: sum(r["kills"] for r in recs if r["kind"] == k) for k in kinds}).items()
            )
        ),
        "by_kind": dict(sorted(kinds.items())),
        "by_table_set": dict(sorted(sets.items())),
        "by_end_state": dict(sorted(goals.items())),
        "reruns_retried_refused_or_gave_up_on_locks": sum(r["refusals"] for r in recs),
        "application_statements": sum(r["app_ops"] for r in recs),
        "application_key_updates_and_deletes": sum(r["app_key_changes"] for r in recs),
        "application_statements_while_dead": sum(r["app_ops_while_dead"] for r in recs),
        "application_retried_errors": dict(sorted(transient.items())),
        "rows_compared": sum(r["rows_checked"] for r in recs),
        "seconds_per_run": {
            "mean": round(sum(r["seconds"] for r in recs) / max(len(recs), 1), 1),
            "max": max((r["seconds"] for r in recs), default=0),
        },
        "seeds": sorted(r["seed"] for r in recs),
    }


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "summary":
        summary = summarize(Path(argv[1]))
        text = json.dumps(summary, indent=2)
        print(text)
        if len(argv) >= 3:
            Path(argv[2]).parent.mkdir(parents=True, exist_ok=True)
            Path(argv[2]).write_text(text + "\n")
        for f in summary["failed"]:
            print(f"FAILED: {f['describe']}\n  replay: ORCHESTRATOR_SEED={f['seed']} make stress")
        return 0 if not summary["failed"] and summary["runs"] else 1
    print("usage: python tests/stress.py summary STRESS_LOG [OUT_JSON]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

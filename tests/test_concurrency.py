"""Invariant 1, nothing lost and nothing invented, told as an operator's afternoon.

The application keeps writing to turns, users and block_turns by their names in `public` from
before prepare until after cutover. It inserts, updates, moves rows to new primary keys and
deletes them. Meanwhile the operator:

1. throttles the copy of turns (small batches, a pause after each) and applies prepare,
   dual-write and copy to turns and users;
2. verifies them while a session on the new table keeps verify busy for a while (the
   application is not touched by that lock: only the orchestrator writes the new table);
3. cuts users over, then turns, while an application report holds a read lock on public.turns,
   so the cutover of turns retries under a 200 ms lock_timeout until the report ends;
4. lets the application keep writing through the compatibility views.

The application keeps its own ledger (what every key must finally hold, from the rows its
statements returned). At the end the moved tables equal that ledger row by row, and the
application's timestamps, set against the event log, show that primary-key updates and deletes
happened inside the copy, verify and cutover windows, not only before or after them.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]
Row = dict[str, Any]
PLAN = str(COGITO_PLAN)
LOCK_TIMEOUT_MS = 200
BOTH = ("--table", "turns", "--table", "users")  # the tables this story moves

# Errors an application retries: waits given up, conflicts lost, a parent gone meanwhile.
TRANSIENT: tuple[type[psycopg.Error], ...] = (
    errors.LockNotAvailable,
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.ForeignKeyViolation,
    errors.UniqueViolation,
)

# The application's statements. Each returns the row it left, for the ledger; "timestamp" is
# the application's name for what the new table calls sent_at.
INSERT_TURN = (
    "INSERT INTO public.turns (participant_id, reply_to_turn_id, content, metadata, llm_config_id) "
    "VALUES (%s, %s, %s, %s, %s) RETURNING id, participant_id, reply_to_turn_id, content, "
    '"timestamp", metadata, llm_config_id, updated_at'
)
UPDATE_TURN = (
    "UPDATE public.turns SET content = %s, metadata = %s WHERE id = %s RETURNING id, "
    'participant_id, reply_to_turn_id, content, "timestamp", metadata, llm_config_id, updated_at'
)
REKEY_TURN = (
    "UPDATE public.turns SET id = %s WHERE id = %s RETURNING id, participant_id, "
    'reply_to_turn_id, content, "timestamp", metadata, llm_config_id, updated_at'
)
DELETE_TURN = "DELETE FROM public.turns WHERE id = %s RETURNING id"
INSERT_USER = (
    "INSERT INTO public.users (email, auth_info, client_id) VALUES (%s, %s, %s) "
    "RETURNING id, email, auth_info, created_at, client_id, default_participant_id"
)
UPDATE_USER = (
    "UPDATE public.users SET auth_info = %s WHERE id = %s "
    "RETURNING id, email, auth_info, created_at, client_id, default_participant_id"
)
REKEY_USER = (
    "UPDATE public.users SET id = %s WHERE id = %s "
    "RETURNING id, email, auth_info, created_at, client_id, default_participant_id"
)
DELETE_USER = "DELETE FROM public.users WHERE id = %s RETURNING id"
INSERT_LINK = (
    "INSERT INTO public.block_turns (block_id, turn_id, sequence_order) VALUES (%s, %s, %s) "
    "RETURNING *"
)
UPDATE_LINK = (
    "UPDATE public.block_turns SET sequence_order = %s WHERE block_id = %s AND turn_id = %s "
    "RETURNING *"
)
REKEY_LINK = (
    "UPDATE public.block_turns SET block_id = %s WHERE block_id = %s AND turn_id = %s RETURNING *"
)
DELETE_LINK = "DELETE FROM public.block_turns WHERE block_id = %s AND turn_id = %s RETURNING *"

SELECT_TURNS_BEFORE = (
    'SELECT id, participant_id, reply_to_turn_id, content, "timestamp", metadata, '
    "llm_config_id, updated_at FROM public.turns"
)
SELECT_TURNS_AFTER = (
    'SELECT id, participant_id, reply_to_turn_id, content, sent_at AS "timestamp", metadata, '
    "llm_config_id, updated_at FROM conversation.turns"
)
SELECT_USERS_BEFORE = (
    "SELECT id, email, auth_info, created_at, client_id, default_participant_id FROM public.users"
)
SELECT_USERS_AFTER = (
    "SELECT id, email, auth_info, created_at, client_id, default_participant_id "
    "FROM client_mgmt.users"
)


def orchestrator(dsn: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the CLI as the operator does, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


_started: list[subprocess.Popen[str]] = []


def start_orchestrator(dsn: str, *args: str) -> subprocess.Popen[str]:
    """Start the CLI in the background (a failed test ends it; a passing one waits for it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--dsn", dsn, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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


def now() -> datetime:
    return datetime.now(UTC)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# --- the application ----------------------------------------------------------------------------


@dataclass
class Op:
    """One statement the application sent: what, on which table, when, and how it ended."""

    worker: str
    table: str
    kind: str  # insert | update | key_update | delete
    start: datetime
    end: datetime
    ok: bool


@dataclass
class Ledger:
    """What every key must hold at the end: the initial rows, then each committed write."""

    rows: dict[str, dict[Any, Row | None]]
    ops: list[Op] = field(default_factory=list)
    transient: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)

    def expected(self, table: str) -> dict[Any, Row]:
        return {k: v for k, v in self.rows[table].items() if v is not None}


class Worker(threading.Thread):
    """One application connection (autocommit: every statement commits on its own)."""

    # One disjoint range of never-used keys per worker, for primary-key updates.
    KEY_BASE = 1_000_000_000

    def __init__(self, name: str, index: int, dsn: str, ledger: Ledger, app: Application) -> None:
        super().__init__(name=name, daemon=True)
        self.index = index
        self.dsn = dsn
        self.ledger = ledger
        self.app = app
        self.rng = random.Random(index)
        self.next_key = self.KEY_BASE + index * 10_000_000
        self.n = 0

    def fresh_key(self) -> int:
        self.next_key += 1
        return self.next_key

    def run(self) -> None:
        with psycopg.connect(
            self.dsn, autocommit=True, row_factory=dict_row, application_name=f"app-{self.name}"
        ) as conn:
            while not self.app.stop.is_set():
                self.n += 1
                self.step(conn)
                time.sleep(self.rng.uniform(0.002, 0.006))

    def step(self, conn: Conn) -> None:
        raise NotImplementedError

    def write(
        self, conn: Conn, table: str, kind: str, query: str, params: tuple[Any, ...]
    ) -> Row | bool | None:
        """Send one statement; return its RETURNING row (None if it matched nothing), or False
        when it failed with an error the application retries (counted)."""
        start = now()
        try:
            row = conn.execute(query, params).fetchone()
        except TRANSIENT as exc:
            self.ledger.transient[type(exc).__name__] += 1
            self.ledger.note(Op(self.name, table, kind, start, now(), False))
            return False
        except psycopg.Error as exc:
            self.ledger.unexpected.append(f"{self.name} {kind} {table}: {exc!r}")
            self.ledger.note(Op(self.name, table, kind, start, now(), False))
            return False
        self.ledger.note(Op(self.name, table, kind, start, now(), True))
        return row


class TurnsWriter(Worker):
    """Writes turns. It owns the turns it inserts and the existing turns with id % 2 == index.

    Non-key updates go to any of them; new keys and deletes only to turns no other turn replies
    to (a block may still hold one: the foreign key then refuses, and the application goes on).
    A new key is an id freed by one of its own deletes (so inside the copy's key range, ahead of
    or behind the copy's cursor), an id below every other, or one above every other.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ours = sorted(k for k in self.ledger.rows["turns"] if k % 2 == self.index)
        replied_to = set(ours[:50])
        # Existing turns it never deletes or re-keys: replied to, or holding blocks at the start.
        self.fixed = [k for k in ours if k in replied_to or k not in self.app.childless]
        self.replied_to = sorted(replied_to)
        # The turns it may re-key or delete.
        self.mine = [k for k in ours if k not in self.fixed]
        self.holes: list[int] = []
        self.reused = 0  # rows moved to a key deleted earlier
        self.app.new_turns[self.index] = self.mine

    def fresh_key(self) -> int:
        r = self.rng.random()
        if self.holes and r < 0.4:
            return self.holes.pop(self.rng.randrange(len(self.holes)))
        key = super().fresh_key()
        return -key if r < 0.7 else key

    def step(self, conn: Conn) -> None:
        ledger = self.ledger.rows["turns"]
        r = self.rng.random()
        if not self.mine or r < 0.3:
            row = self.write(
                conn,
                "turns",
                "insert",
                INSERT_TURN,
                (
                    self.rng.choice(self.app.participants),
                    self.rng.choice([None, *self.replied_to]),
                    f"{self.name} turn {self.n}",
                    Jsonb({"by": self.name, "n": self.n}),
                    self.rng.choice([None, *self.app.llm_configs]),
                ),
            )
            if isinstance(row, dict):
                ledger[row["id"]] = row
                self.mine.append(row["id"])
            return
        if r < 0.55:
            key = self.rng.choice(self.mine if self.rng.random() < 0.5 else self.fixed)
            row = self.write(
                conn,
                "turns",
                "update",
                UPDATE_TURN,
                (f"{self.name} edit {self.n}", Jsonb({"edit": self.n}), key),
            )
            if isinstance(row, dict):
                ledger[key] = row
        elif r < 0.8:
            key = self.rng.choice(self.mine)
            new = self.fresh_key()
            row = self.write(conn, "turns", "key_update", REKEY_TURN, (new, key))
            if isinstance(row, dict):
                self.reused += ledger.get(new, 0) is None
                ledger[key] = None
                ledger[new] = row
                self.mine[self.mine.index(key)] = new
                self.holes.append(key)
            elif new > 0 and new < Worker.KEY_BASE:
                self.holes.append(new)  # still free
        else:
            key = self.rng.choice(self.mine)
            row = self.write(conn, "turns", "delete", DELETE_TURN, (key,))
            if isinstance(row, dict):
                ledger[key] = None
                self.mine.remove(key)
                self.holes.append(key)
        if row is None:
            self.ledger.anomalies.append(f"turns {key}: the application's row vanished")


class UsersWriter(Worker):
    """Writes users: new accounts (any change) and non-key updates of existing accounts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.originals = list(self.ledger.rows["users"])
        self.mine: list[int] = []

    def step(self, conn: Conn) -> None:
        ledger = self.ledger.rows["users"]
        r = self.rng.random()
        if not self.mine or r < 0.3:
            row = self.write(
                conn,
                "users",
                "insert",
                INSERT_USER,
                (
                    f"app-{self.n}@example.test",
                    Jsonb({"n": self.n}),
                    self.rng.choice(self.app.clients),
                ),
            )
            if isinstance(row, dict):
                ledger[row["id"]] = row
                self.mine.append(row["id"])
            return
        if r < 0.55:
            key = self.rng.choice(self.mine if self.rng.random() < 0.5 else self.originals)
            row = self.write(
                conn,
                "users",
                "update",
                UPDATE_USER,
                (Jsonb({"seen": self.n}), key),
            )
        elif r < 0.8:
            key = self.rng.choice(self.mine)
            new = self.fresh_key()
            row = self.write(
                conn,
                "users",
                "key_update",
                REKEY_USER,
                (new, key),
            )
            if isinstance(row, dict):
                ledger[key] = None
                ledger[new] = row
                self.mine[self.mine.index(key)] = new
                return
        else:
            key = self.rng.choice(self.mine)
            row = self.write(
                conn,
                "users",
                "delete",
                DELETE_USER,
                (key,),
            )
            if isinstance(row, dict):
                ledger[key] = None
                self.mine.remove(key)
                return
        if isinstance(row, dict):
            ledger[key] = row
        elif row is None:
            self.ledger.anomalies.append(f"users {key}: the application's row vanished")


class BlockTurnsWriter(Worker):
    """Owns every block_turns row (composite key): links blocks to old and new turns (a new
    turn may be gone meanwhile: a foreign-key error, retried), moves links to another block
    (a composite primary-key update), reorders and deletes them."""

    def step(self, conn: Conn) -> None:
        ledger = self.ledger.rows["block_turns"]
        live = [k for k, v in ledger.items() if v is not None]
        r = self.rng.random()
        if not live or r < 0.35:
            new_turns = [t for lst in self.app.new_turns.values() for t in lst[-20:]]
            turn = (
                self.rng.choice(new_turns)
                if new_turns and self.rng.random() < 0.6
                else self.rng.choice(self.app.original_turns)
            )
            row = self.write(
                conn,
                "block_turns",
                "insert",
                INSERT_LINK,
                (self.rng.choice(self.app.blocks), turn, self.n),
            )
            if isinstance(row, dict):
                ledger[(row["block_id"], row["turn_id"])] = row
            return
        key = self.rng.choice(live)
        if r < 0.6:
            row = self.write(
                conn,
                "block_turns",
                "update",
                UPDATE_LINK,
                (self.n, *key),
            )
            if isinstance(row, dict):
                ledger[key] = row
        elif r < 0.8:
            block = self.rng.choice(self.app.blocks)
            row = self.write(
                conn,
                "block_turns",
                "key_update",
                REKEY_LINK,
                (block, *key),
            )
            if isinstance(row, dict):
                ledger[key] = None
                ledger[(row["block_id"], row["turn_id"])] = row
        else:
            row = self.write(
                conn,
                "block_turns",
                "delete",
                DELETE_LINK,
                key,
            )
            if isinstance(row, dict):
                ledger[key] = None
        if row is None:
            self.ledger.anomalies.append(f"block_turns {key}: the application's row vanished")


class Application:
    """The application: four connections writing by the public names, and its ledger."""

    def __init__(self, dsn: str, conn: Conn) -> None:
        self.stop = threading.Event()
        self.ledger = Ledger(
            rows={
                "turns": {r["id"]: r for r in conn.execute(SELECT_TURNS_BEFORE).fetchall()},
                "users": {r["id"]: r for r in conn.execute(SELECT_USERS_BEFORE).fetchall()},
                "block_turns": {
                    (r["block_id"], r["turn_id"]): r
                    for r in conn.execute("SELECT * FROM public.block_turns").fetchall()
                },
            }
        )
        ids = lambda q: [r["id"] for r in conn.execute(q).fetchall()]  # noqa: E731
        self.participants = ids("SELECT id FROM public.participants")
        self.llm_configs = ids("SELECT id FROM public.llm_configs")
        self.clients = ids("SELECT id FROM public.clients")
        self.blocks = ids("SELECT id FROM public.blocks")
        self.original_turns = sorted(self.ledger.rows["turns"])
        self.childless = set(
            ids(
                "SELECT id FROM public.turns t WHERE NOT EXISTS (SELECT 1 FROM public.block_turns "
                "b WHERE b.turn_id = t.id) AND NOT EXISTS (SELECT 1 FROM public.turns r "
                "WHERE r.reply_to_turn_id = t.id)"
            )
        )
        self.new_turns: dict[int, list[int]] = {}
        self.workers: list[Worker] = [
            TurnsWriter("turns-0", 0, dsn, self.ledger, self),
            TurnsWriter("turns-1", 1, dsn, self.ledger, self),
            UsersWriter("users", 2, dsn, self.ledger, self),
            BlockTurnsWriter("block_turns", 3, dsn, self.ledger, self),
        ]

    @contextmanager
    def running(self) -> Iterator[Application]:
        for w in self.workers:
            w.start()
        try:
            yield self
        finally:
            self.stop.set()
            for w in self.workers:
                w.join(timeout=30)

    def done(self, table: str, kind: str) -> list[Op]:
        with self.ledger.lock:
            return [o for o in self.ledger.ops if o.ok and o.table == table and o.kind == kind]


# --- what the orchestrator recorded --------------------------------------------------------------


def event_at(conn: Conn, table: str, action: str, outcome: str, which: int = 0) -> datetime:
    rows = conn.execute(
        "SELECT at FROM _orchestrator.events WHERE plan = 'cogito' AND table_name = %s "
        "AND action = %s AND outcome = %s ORDER BY id",
        (table, action, outcome),
    ).fetchall()
    assert rows, f"no {action} {outcome} event for {table}"
    return rows[which]["at"]


def stage_row(conn: Conn, table: str, stage: str) -> Row:
    row = conn.execute(
        "SELECT * FROM _orchestrator.stages WHERE plan = 'cogito' AND table_name = %s "
        "AND stage = %s",
        (table, stage),
    ).fetchone()
    assert row is not None
    return row


def cutover_waits(conn: Conn) -> list[Row]:
    """The tries of the cutover of turns that gave way to a lock, oldest first."""
    return conn.execute(
        "SELECT * FROM _orchestrator.events WHERE table_name = 'turns' AND action = 'cutover' "
        "AND outcome = 'lock_timeout' ORDER BY id"
    ).fetchall()


def inside(ops: list[Op], lo: datetime, hi: datetime) -> list[Op]:
    """The statements that started and committed within [lo, hi]."""
    return [o for o in ops if lo <= o.start and o.end <= hi]


def diff(expected: dict[Any, Row], actual: dict[Any, Row]) -> list[str]:
    out = [f"lost {k}: {expected[k]}" for k in sorted(expected.keys() - actual.keys())]
    out += [f"invented {k}: {actual[k]}" for k in sorted(actual.keys() - expected.keys())]
    out += [
        f"changed {k}: expected {expected[k]}, found {actual[k]}"
        for k in sorted(expected.keys() & actual.keys())
        if expected[k] != actual[k]
    ]
    return out


# --- the story -----------------------------------------------------------------------------------


def test_concurrent_writes_through_the_whole_move_lose_and_invent_nothing(
    cogito_dsn: str, cogito_conn: Conn
) -> None:
    db = cogito_conn
    app = Application(cogito_dsn, db)
    with app.running():
        # The application is busy before the operator starts.
        wait_for("the application to warm up", lambda: all(w.n > 20 for w in app.workers))
        started = now()

        # 1. A throttled copy: 100-row batches of turns, 120 ms apart (about 2.5 s).
        for key, value in (("batch_size", "100"), ("sleep_ms", "120")):
            r = orchestrator(cogito_dsn, "set", PLAN, key, value, "--table", "turns")
            assert r.returncode == 0, r.stdout + r.stderr
        r = orchestrator(cogito_dsn, "apply", PLAN, *BOTH, "--until", "copy")
        assert r.returncode == 0, r.stdout + r.stderr

        # 2. Verify while a session holds SHARE on the new table for 1.5 s: verify's replay
        # into it waits, so verify runs long enough to be seen. The application's writes go
        # to public.turns and the capture log, which that lock does not touch.
        with psycopg.connect(cogito_dsn) as holder:
            holder.execute("LOCK TABLE conversation.turns IN SHARE MODE")
            proc = start_orchestrator(cogito_dsn, "apply", PLAN, *BOTH)
            wait_for(
                "verify of turns to start",
                lambda: stage_row(db, "turns", "verify")["status"] == "running",
            )
            time.sleep(1.5)
            holder.commit()
        code, output = finish(proc)
        assert code == 0, output
        verify = stage_row(db, "turns", "verify")
        assert verify["status"] == "done"
        verify_started = verify["started_at"]

        # 3. Cutover: users first, then turns while a report reads public.turns in a long
        # transaction; the cutover gives way every 200 ms and retries until the report ends.
        r = orchestrator(cogito_dsn, "cutover", PLAN, "--table", "users", "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        with psycopg.connect(cogito_dsn, application_name="app-report") as report:
            report.execute("SELECT count(*) FROM public.turns").fetchone()
            proc = start_orchestrator(cogito_dsn, *cutover_turns(PLAN, LOCK_TIMEOUT_MS))
            wait_for(
                "the cutover of turns to give way to the report twice",
                lambda: len(cutover_waits(db)) >= 2,
            )
            report.commit()
        code, output = finish(proc)
        assert code == 0, output

        # 4. The application goes on through the compatibility views.
        after_cutover = now()
        mark = len(app.ledger.ops)
        wait_for("writes through the views", lambda: len(app.ledger.ops) > mark + 100)
        time.sleep(0.5)
    ended = now()

    ledger = app.ledger
    assert not ledger.unexpected, ledger.unexpected[:10]
    assert not ledger.anomalies, ledger.anomalies[:10]
    assert all(not w.is_alive() for w in app.workers)

    # Nothing lost, nothing invented: the new tables hold exactly the application's ledger.
    turns = {r["id"]: r for r in db.execute(SELECT_TURNS_AFTER).fetchall()}
    users = {r["id"]: r for r in db.execute(SELECT_USERS_AFTER).fetchall()}
    links = {
        (r["block_id"], r["turn_id"]): r
        for r in db.execute("SELECT * FROM public.block_turns").fetchall()
    }
    assert diff(ledger.expected("turns"), turns) == []
    assert diff(ledger.expected("users"), users) == []
    assert diff(ledger.expected("block_turns"), links) == []
    # The application's names now read the new tables.
    kind = db.execute(
        "SELECT relkind::text AS k FROM pg_class WHERE oid = 'public.turns'::regclass"
    )
    assert kind.fetchone() == {"k": "v"}
    # block_turns still references only turns that exist, through the re-pointed key.
    orphans = db.execute(
        "SELECT count(*) AS n FROM public.block_turns b WHERE NOT EXISTS "
        "(SELECT 1 FROM conversation.turns t WHERE t.id = b.turn_id)"
    )
    assert orphans.fetchone() == {"n": 0}

    # The ledger is not trivially the initial data: every kind of write committed, many times.
    for table in ("turns", "users", "block_turns"):
        for kind in ("insert", "update", "key_update", "delete"):
            assert len(app.done(table, kind)) >= 5, (table, kind)
    # Rows now live under keys above, below and inside the original range (reused keys).
    assert any(k >= Worker.KEY_BASE for k in turns) and any(k < 0 for k in turns)
    assert sum(w.reused for w in app.workers if isinstance(w, TurnsWriter)) > 10

    # The windows, from the event log (and the stage record for where verify began).
    copy_lo = event_at(db, "turns", "copy", "started")
    copy_hi = event_at(db, "turns", "copy", "ok")
    verify_hi = event_at(db, "turns", "verify", "ok", 0)
    cutover_hi = event_at(db, "turns", "cutover", "ok")
    cutover_lo = stage_row(db, "turns", "cutover")["started_at"]
    retries = cutover_waits(db)
    assert started < copy_lo < copy_hi <= verify_started < verify_hi < cutover_lo
    assert cutover_lo < retries[0]["at"] and retries[-1]["at"] < cutover_hi < after_cutover
    assert after_cutover < ended
    assert (copy_hi - copy_lo).total_seconds() > 1.0, "the copy was not throttled"

    windows = {
        "copy": (copy_lo, copy_hi),
        "verify": (verify_started, verify_hi),
        "cutover": (cutover_lo, cutover_hi),
    }
    seen = {}
    for name, (lo, hi) in windows.items():
        for kind in ("key_update", "delete"):
            during = inside(app.done("turns", kind), lo, hi)
            seen[(name, kind)] = len(during)
    assert all(n >= 1 for n in seen.values()), seen
    # And the application kept writing both before the move and after it.
    assert inside(app.done("turns", "key_update"), after_cutover, ended)
    assert [o for o in app.done("turns", "delete") if o.end < copy_lo]

"""Two PostgreSQL servers for the moves to another server: of the suite's version (two
embedded PostgreSQL 18 servers, or two Debian PostgreSQL 15 servers under `make test-pg15`),
each in a directory of its own from mktemp, with wal_level = logical, listening on a Unix
socket only. Stopped by the same script or process that started them."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from conftest import dsn_for
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator.demo import sample
from orchestrator.demo.two_servers import LOGICAL

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
PG15_SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "pg15.sh"
SETTINGS = LOGICAL  # the demo's: a subscription each way per table, a worker and slot each
TARGET_ENV = "ORCH_TEST_CONVERSATION_DSN"


def suite_is_pg15() -> bool:
    with psycopg.connect(os.environ["ORCHESTRATOR_TEST_DSN"]) as conn:
        version = conn.info.server_version
    return version < 160000 and (PG15_BIN / "postgres").exists()


def _pg15(cmd: str, directory: str) -> str:
    env = {**os.environ, "PG15_BIN": str(PG15_BIN), "PG15_PORT": "54316"}
    r = subprocess.run(["bash", str(PG15_SCRIPT), cmd, directory], capture_output=True,
                       text=True, env=env, check=True)
    return r.stdout.strip()


def _start(directory: str, pg15: bool) -> str:
    from orchestrator.db import start_embedded, stop_embedded

    dsn = _pg15("start", directory) if pg15 else start_embedded(Path(directory))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, value in SETTINGS.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name),
                                                                    sql.Literal(value)))
    if pg15:  # the settings take effect at a restart
        _pg15("stop", directory)
        return _pg15("start", directory)
    stop_embedded(Path(directory))
    return start_embedded(Path(directory))


def _stop(directory: str, pg15: bool) -> None:
    from orchestrator.db import stop_embedded

    if pg15:
        _pg15("stop", directory)
    else:
        stop_embedded(Path(directory))


@contextmanager
def logical_servers(prefix: str) -> Iterator[tuple[str, str]]:
    """A source and a target server; their base DSNs (database `postgres`)."""
    pg15 = suite_is_pg15()
    dirs = [tempfile.mkdtemp(prefix=f"{prefix}{side}-", dir="/tmp") for side in ("src", "tgt")]
    started: list[str] = []
    dsns: list[str] = []
    try:
        for d in dirs:
            started.append(d)
            dsns.append(_start(d, pg15))
        yield dsns[0], dsns[1]
    finally:
        for d in started:
            _stop(d, pg15)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class Pair:
    """One test's databases: the Cogito sample on the source, an empty one on the target."""

    source: str
    target: str

    def conn(self, side: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.source if side == "source" else self.target,
                               autocommit=True, row_factory=dict_row)


@contextmanager
def databases(servers: tuple[str, str], turns: int = 2000) -> Iterator[Pair]:
    """Fresh databases on both servers, dropped afterwards with whatever of ours a failed
    test left (subscriptions first, in the order that always works, then slots)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers[0], autocommit=True) as a:
        a.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(servers[1], autocommit=True) as a:
        a.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    pair = Pair(dsn_for(servers[0], name), dsn_for(servers[1], name))
    with psycopg.connect(pair.source) as conn:
        sample.load_schema(conn)
        sample.generate_data(conn, turns=turns, seed=1)
        conn.execute("ANALYZE")
        conn.commit()
    try:
        yield pair
    finally:
        for side, base in (("source", servers[0]), ("target", servers[1])):
            _clear(pair, side)
            with psycopg.connect(base, autocommit=True) as a:
                a.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))


def _clear(pair: Pair, side: str) -> None:
    with pair.conn(side) as conn:
        for r in conn.execute("SELECT subname FROM pg_subscription s JOIN pg_database d ON "
                              "d.oid = s.subdbid WHERE d.datname = current_database()"
                              ).fetchall():
            n = sql.Identifier(r["subname"])
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(n))
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(n))
            conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(n))
        for _ in range(100):  # a walsender takes a moment to exit once terminated
            rows = conn.execute("SELECT slot_name, active_pid FROM pg_replication_slots "
                                "WHERE database = current_database()").fetchall()
            if not rows:
                return
            for r in rows:
                if r["active_pid"]:
                    conn.execute("SELECT pg_terminate_backend(%s)", (r["active_pid"],))
                else:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (r["slot_name"],))
            time.sleep(0.1)


def ours(pair: Pair) -> dict[str, list[str]]:
    """Every replication slot, publication and subscription on either server, and every
    trigger and replication origin: what finalize or a full rollback must leave none of."""
    found: dict[str, list[str]] = {}
    for side in ("source", "target"):
        with pair.conn(side) as conn:
            rows = conn.execute(
                "SELECT 'slot ' || slot_name AS o FROM pg_replication_slots "
                "UNION ALL SELECT 'publication ' || pubname FROM pg_publication "
                "UNION ALL SELECT 'subscription ' || subname FROM pg_subscription "
                "UNION ALL SELECT 'origin ' || roname FROM pg_replication_origin "
                "UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE "
                "'\\_orch%' AND NOT tgisinternal").fetchall()
        found[side] = sorted(r["o"] for r in rows)
    return found

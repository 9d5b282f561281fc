"""A move to another server (issue 17): two embedded PostgreSQL 18 servers on this machine
(Unix sockets, `wal_level = logical`), the copy benchmark's table of 1,000,000 rows on the
source, a one-table plan whose target schema lives on the second server.

- sync: `apply --until sync` (prepare: the target table, publication, slot, subscription;
  sync: the subscription's initial copy, then the two secondary indexes), against
  `pg_dump -t public.big | psql` of the same table between the same servers (indexes
  included). Interleaved, two rounds; a full rollback (untimed) between the orchestrator's.
- write overhead: pgbench on the source (2 clients, single-row UPDATE + INSERT, 15 s) with no
  publication, slot or subscription, and with the table subscribed and streaming.
  Interleaved, two rounds each.
- cutover: with pgbench writing and a probe session updating one random row every 5 ms
  through the old name, `cutover`; the application's worst stall is the probe's longest
  statement during the cutover call. Then point reads through the old name (now over
  postgres_fdw) against the same reads before cutover, and finalize, after which the
  replication slots, publications and subscriptions on both servers are counted.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

from bench.common import (
    BackgroundPgbench,
    Server,
    create_table,
    embedded_server,
    machine,
    median,
    pgbench_cmd,
    say,
    wait_quiet,
    workdir,
    write_script,
)

PLAN = "remotebench"
TARGET_SYNC = 1.0  # sync <= 1.0x pg_dump | psql
TARGET_WRITES = 0.90  # source write throughput while subscribed >= 0.90x without
TARGET_STALL_MS = 100.0
WRITE_SCRIPT = """\\set id random(1, :maxid)
UPDATE public.big SET account_id = account_id + 1, status = 'touched' WHERE id = :id;
INSERT INTO public.big (email, account_id, payload)
  VALUES (md5(random()::text || clock_timestamp()::text) || '@w.example', :id, repeat('w', 250));
"""


def _logical(srv: Server) -> None:
    """wal_level = logical and the workers for it: a restart of the embedded server."""
    from orchestrator.db import embedded_pid, start_embedded, stop_embedded
    from orchestrator.demo.two_servers import LOGICAL

    with srv.admin() as conn:
        for k, v in LOGICAL.items():  # the demo's: a subscription each way per table
            conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                psycopg.sql.Identifier(k), psycopg.sql.Literal(v)))
    stop_embedded(srv.directory)
    srv.dsn = start_embedded(srv.directory)
    srv.pid = embedded_pid(srv.directory) or 0


def _plan(tmp: Path, target: str) -> Path:
    doc = {"version": 1, "name": PLAN, "source_schema": "public",
           "defaults": {"strategy": "copy"},
           "schemas": {"moved": {"usage": [], "grants": [], "server": "home"}},
           "tables": [{"name": "big", "schema": "moved"}],
           "servers": {"home": {"dsn": target}}}
    path = tmp / "remote.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _dump_restore(a: Server, b: Server, src: str, tgt: str) -> float:
    """pg_dump -t public.big | psql into the target database, timed; dropped after."""
    dump = [a.tool("pg_dump"), "-h", a.host, "-p", str(a.port), "-U", "postgres", "-t",
            "public.big", "-d", _dbname(src)]
    load = [b.tool("psql"), "-h", b.host, "-p", str(b.port), "-U", "postgres", "-q",
            "-v", "ON_ERROR_STOP=1", "-d", _dbname(tgt)]
    t0 = time.monotonic()
    p1 = subprocess.Popen(dump, stdout=subprocess.PIPE)
    p2 = subprocess.run(load, stdin=p1.stdout, capture_output=True, text=True, check=False)
    p1.wait()
    elapsed = time.monotonic() - t0
    if p1.returncode or p2.returncode:
        raise RuntimeError(f"pg_dump | psql failed: {p2.stderr[-500:]}")
    with psycopg.connect(tgt, autocommit=True) as conn:
        conn.execute("DROP TABLE public.big")
    return elapsed


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def _sync(src: str, loaded: Any) -> float:
    from orchestrator.run.session import session

    with session(src, loaded) as eng:
        t0 = time.monotonic()
        eng.apply(None, "sync")
        return time.monotonic() - t0


def _roll_back(src: str, loaded: Any) -> None:
    from orchestrator.run.session import session

    with session(src, loaded) as eng:
        eng.rollback("big")


def _tps(a: Server, db: str, script: Path, maxid: int, seconds: int) -> float:
    from bench.common import run_pgbench

    res = run_pgbench(a, db, script, clients=2, seconds=seconds, defines={"maxid": maxid})
    return float(res.tps or 0.0)


class Probe(threading.Thread):
    """The application's view: one single-row UPDATE through the old name every 5 ms, each
    statement's start and duration recorded."""

    def __init__(self, dsn: str, maxid: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.maxid = dsn, maxid
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []  # (monotonic start, ms)
        self.wall: list[tuple[float, float]] = []  # (epoch start, ms)
        self.errors: list[str] = []

    def run(self) -> None:
        rng = random.Random(5)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                t0, wall = time.monotonic(), time.time()
                try:
                    conn.execute("UPDATE public.big SET status = 'probe' WHERE id = %s",
                                 (rng.randint(1, self.maxid),))
                except psycopg.Error as exc:
                    self.errors.append(str(exc).strip().splitlines()[0])
                ms = (time.monotonic() - t0) * 1000
                self.samples.append((t0, ms))
                self.wall.append((wall, ms))
                time.sleep(0.005)


def _point_reads(dsn: str, maxid: int, n: int = 2000) -> float:
    """Mean milliseconds of a point read by key through public.big."""
    rng = random.Random(9)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1 FROM public.big WHERE id = 1")  # warm the connection
        t0 = time.monotonic()
        for _ in range(n):
            conn.execute("SELECT * FROM public.big WHERE id = %s",
                         (rng.randint(1, maxid),)).fetchone()
        return (time.monotonic() - t0) * 1000 / n


def run(quick: bool = False) -> dict[str, Any]:
    from orchestrator.demo.two_servers import leftovers
    from orchestrator.model.context import Controls
    from orchestrator.plan import load_plan
    from orchestrator.run.session import session

    rows = 100_000 if quick else 1_000_000
    seconds = 8 if quick else 15
    out: dict[str, Any] = {"benchmark": "remote", "machine": machine(), "rows": rows}
    with embedded_server() as a, embedded_server() as b, workdir("remote") as tmp:
        for srv in (a, b):
            _logical(srv)
        src, tgt = a.create_db("rb"), b.create_db("rb")
        with psycopg.connect(src, autocommit=True) as conn:
            out["table"] = create_table(conn, "big", rows)
            maxid = rows
        loaded = load_plan(_plan(tmp, tgt))
        os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
        script = write_script(tmp, "write", WRITE_SCRIPT)
        dump_s: list[float] = []
        sync_s: list[float] = []
        for i in range(2):
            out.setdefault("load", []).append(wait_quiet(f"sync round {i + 1}"))
            dump_s.append(_dump_restore(a, b, src, tgt))
            say(f"pg_dump | psql: {dump_s[-1]:.2f} s")
            sync_s.append(_sync(src, loaded))
            say(f"apply --until sync: {sync_s[-1]:.2f} s")
            _roll_back(src, loaded)
        out["sync"] = {"dump_restore_s": dump_s, "orchestrator_s": sync_s,
                       "ratio": round(median(sync_s) / median(dump_s), 3)}
        alone: list[float] = []
        subscribed: list[float] = []
        db = _dbname(src)
        for i in range(2):
            out["load"].append(wait_quiet(f"writes round {i + 1}"))
            alone.append(_tps(a, str(db), script, maxid, seconds))
            _sync(src, loaded)
            subscribed.append(_tps(a, str(db), script, maxid, seconds))
            say(f"pgbench TPS alone {alone[-1]:.0f}, subscribed {subscribed[-1]:.0f}")
            if i == 0:
                _roll_back(src, loaded)
        out["writes"] = {"alone_tps": alone, "subscribed_tps": subscribed,
                         "ratio": round(median(subscribed) / median(alone), 3)}
        with session(src, loaded) as eng:
            eng.apply(None, "verify")
        local_ms = _point_reads(src, maxid)
        out["load"].append(wait_quiet("cutover"))
        probe = Probe(src, maxid)
        cmd = pgbench_cmd(a, str(db), script, clients=2, seconds=60, defines={"maxid": maxid})
        with BackgroundPgbench(cmd) as bg:
            probe.start()
            time.sleep(10.0)  # the probe's own worst under this load, before any cutover
            t0 = time.monotonic()
            with session(src, loaded) as eng:
                eng.cutover(None)
            t1 = time.monotonic()
            time.sleep(2.0)
            probe.stop.set()
            probe.join(timeout=10)
            bg.stop()
        during = [ms for at, ms in probe.samples if t0 <= at <= t1]
        worst = max(((at, ms) for at, ms in probe.samples if t0 <= at <= t1),
                    key=lambda x: x[1], default=(t0, 0.0))
        out["worst_stall_at_s"] = round(worst[0] - t0, 3)
        before = [ms for at, ms in probe.samples if at < t0]
        with psycopg.connect(src, autocommit=True) as conn:
            rows_ = conn.execute("SELECT action, outcome, duration_ms, detail, "
                                 "extract(epoch FROM at)::float AS at FROM "
                                 "_orchestrator.events WHERE plan = %s AND stage = 'cutover' "
                                 "ORDER BY id", (PLAN,)).fetchall()
            parts = conn.execute("SELECT value FROM _orchestrator.saved WHERE plan = %s AND "
                                 "key = 'remote_swap_ms'", (PLAN,)).fetchone()
        out["cutover_events"] = [
            {"action": r[0], "outcome": r[1], "ms": r[2],
             "error": (r[3] or {}).get("error"), "lock_wait_ms": (r[3] or {}).get("lock_wait_ms")}
            for r in rows_]
        out["cutover_parts_ms"] = parts[0] if parts else None
        # The stall the swap caused: the probe's longest statement that overlapped a try's
        # transaction (the window each cutover event's duration ends at).
        tries = [(r[4] - (r[2] or 0) / 1000, r[4]) for r in rows_
                 if r[0] == "cutover" and r[1] in ("ok", "lock_timeout")]
        in_tries = [ms for at, ms in probe.wall for a, b in tries
                    if at <= b and at + ms / 1000 >= a]
        out["cutover"] = {"worst_stall_ms": round(max(in_tries, default=0.0), 1),
                          "worst_during_call_ms": round(max(during, default=0.0), 1),
                          "probe_worst_before_ms": round(max(before, default=0.0), 1),
                          "tries": len(tries),
                          "cutover_call_s": round(t1 - t0, 2),
                          "probe_median_before_ms": round(median(before), 2) if before else None,
                          "probe_errors": probe.errors[:5]}
        out["point_read_ms"] = {"local": round(local_ms, 3),
                                "through_fdw": round(_point_reads(src, maxid), 3)}
        with session(src, loaded, controls=Controls(force=True)) as eng:
            eng.finalize(None)
        out["leftovers_after_finalize"] = leftovers(src) + leftovers(tgt)
    out["targets"] = targets(out)
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    sync = result["sync"]["ratio"]
    writes = result["writes"]["ratio"]
    stall = result["cutover"]["worst_stall_ms"]
    return {
        "sync_vs_dump_restore": {"target": f"<= {TARGET_SYNC}x", "value": sync,
                                 "met": sync <= TARGET_SYNC},
        "source_writes_subscribed": {"target": f">= {TARGET_WRITES}x", "value": writes,
                                     "met": writes >= TARGET_WRITES},
        "cutover_stall_ms": {"target": f"< {TARGET_STALL_MS:.0f} ms", "value": stall,
                             "met": stall < TARGET_STALL_MS},
    }

"""The Cogito demo on two servers: the conversation domain moves to a second embedded server
(plans/cogito-two-servers.yaml) while the application writes through the source's public
names; cutover, a rollback after cutover and a cutover again, a comparison of every table on
both servers, then finalize and a count of what replication objects are left (none).

Each server is an embedded PostgreSQL 18 in a directory of its own under the demo's
directory, set to wal_level = logical (a restart the first time).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
from psycopg import sql

from orchestrator.db import connect, default_embedded_dir, start_embedded, stop_embedded
from orchestrator.demo.demo import Say, Summary, compare, fresh_database, load_legacy, move
from orchestrator.demo.workload import Workload
from orchestrator.model.context import Controls, build_context
from orchestrator.plan import LoadedPlan, load_plan
from orchestrator.run.events import Progress
from orchestrator.run.session import session
from orchestrator.stages.base import Phase
from orchestrator.stages.registry import REMOTE_STRATEGY

TARGET_DB = "conversation_home"
ENV = "CONVERSATION_DSN"  # what plans/cogito-two-servers.yaml reads
# wal_level = logical, and a slot, WAL sender and worker per moved table each way (the
# benchmark and the tests start their servers with these too).
LOGICAL = {"wal_level": "logical", "max_logical_replication_workers": "16",
           "max_worker_processes": "32", "max_replication_slots": "24",
           "max_wal_senders": "24"}


def server_dirs(directory: Path | None) -> tuple[Path, Path]:
    base = (directory or default_embedded_dir()) / "two-servers"
    return base / "source", base / "target"


def logical_server(directory: Path) -> str:
    """An embedded server in `directory` set for logical replication both ways."""
    dsn = start_embedded(directory)
    with psycopg.connect(dsn, autocommit=True) as conn:
        r = conn.execute("SELECT current_setting('wal_level')").fetchone()
        if r is not None and r[0] == "logical":
            return dsn
        for name, value in LOGICAL.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name),
                                                                    sql.Literal(value)))
    stop_embedded(directory)  # wal_level takes effect at a restart
    return start_embedded(directory)


def stop_servers(directory: Path | None) -> list[int]:
    return [pid for d in server_dirs(directory) if (pid := stop_embedded(d))]


def plan_path() -> Path:
    here = Path(__file__).resolve().parent.parent.parent / "plans" / "cogito-two-servers.yaml"
    return here if here.exists() else Path("plans/cogito-two-servers.yaml")


def compare_remote(source: str, target: str, loaded: LoadedPlan) -> dict[str, dict[str, int]]:
    """Each moved table on the new server against its retired source (kept equal by the
    reverse replication): rows, and keys whose row differs or is on one side only."""
    out: dict[str, dict[str, int]] = {}
    with connect(source, autocommit=True) as s, connect(target, autocommit=True) as t:
        for conn in (s, t):
            conn.execute("SET TimeZone = 'UTC'")
        ctx = build_context(s, loaded)
        for m in ctx.moves.values():
            if m.strategy != REMOTE_STRATEGY.name:
                continue
            keys = sql.SQL(", ").join(sql.Identifier("x", k) for k in m.key_source)
            q = sql.SQL("SELECT row({}) ::text AS k, md5(x::text) AS h FROM {} x")
            here = {r["k"]: r["h"] for r in s.execute(q.format(keys, m.retired))}
            there = {r["k"]: r["h"] for r in t.execute(q.format(keys, m.target))}
            diff = sum(1 for k in here.keys() | there.keys() if here.get(k) != there.get(k))
            out[m.label] = {"rows": len(there), "mismatches": diff}
    return out


def leftovers(dsn: str) -> int:
    """Replication slots, publications and subscriptions on a server (ours are all gone after
    finalize)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        r = conn.execute("SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) "
                         "FROM pg_publication) + (SELECT count(*) FROM pg_subscription)"
                         ).fetchone()
    return int(r[0]) if r else 0


def run(say: Say, progress: Progress, *, rows: int = 200_000,
        directory: Path | None = None, threads: int = 2) -> Summary:
    """The two-server demo; returns the figures for the closing summary."""
    src_dir, tgt_dir = server_dirs(directory)
    source_server, target_server = logical_server(src_dir), logical_server(tgt_dir)
    say(f"two servers ready (wal_level = logical): {source_server} and {target_server}")
    db = fresh_database(source_server)
    target = fresh_database(target_server, TARGET_DB)
    os.environ[ENV] = target
    counts = load_legacy(say, db, rows, " on the source")
    loaded = load_plan(plan_path())
    summary = Summary(dsn=db, rows=counts, target_dsn=target)
    with Workload(db, threads=threads) as app:
        say(f"the application is writing to the source ({threads} sessions on public.turns, "
            "public.users, ...); conversation moves to the second server")
        with session(db, loaded, progress) as eng:
            move(say, eng, summary, tuple(s.name for s in REMOTE_STRATEGY.in_phase(Phase.apply)),
                 "cutover: the old names now reach the second server through postgres_fdw; it "
                 "replicates back to the retired tables")
        app.stop()
        with session(db, loaded, progress) as eng:
            eng.replay_once()  # the copy strategy's reverse capture (users stays on the source)
    per_table = compare(db, loaded)
    deadline = time.monotonic() + 30  # the reverse streams catch up
    while True:
        remote = compare_remote(db, target, loaded)
        if all(t["mismatches"] == 0 for t in remote.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    per_table.update(remote)
    # The application used the old names a moment ago: finalize anyway (--force), it is a demo.
    with session(db, loaded, progress, Controls(force=True)) as eng:
        say("finalize: subscriptions, publications, slots and retired tables dropped on "
            "both servers")
        summary.timed("finalize", lambda: eng.finalize(None))
    summary.close(per_table, app)
    summary.leftovers = leftovers(db) + leftovers(target)
    return summary

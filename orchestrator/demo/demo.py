"""The Cogito demo: the whole plan, stage by stage, under a simulated application.

Starts (or reuses) the embedded server, loads the legacy schema with generated data, runs
plans/cogito.yaml through cutover while the application writes, rolls one stage back and
forward again, and ends with a comparison of every moved table against its retired source.
The core never prints: progress goes to the caller's callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.db import connect, start_embedded
from orchestrator.demo import sample
from orchestrator.demo.workload import Workload
from orchestrator.model.context import build_context
from orchestrator.plan import LoadedPlan, load_plan
from orchestrator.run.engine import Engine
from orchestrator.run.events import Progress
from orchestrator.run.session import session
from orchestrator.stages.base import Phase
from orchestrator.stages.registry import COPY_STRATEGY

DEMO_DB = "cogito_demo"
Say = Callable[[str], None]


@dataclass
class Summary:
    dsn: str
    rows: dict[str, int]
    compared: int = 0
    mismatches: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    app_writes: int = 0
    app_reads: int = 0
    app_errors: int = 0
    app_retried: int = 0
    longest_wait_ms: float = 0.0
    per_table: dict[str, dict[str, int]] = field(default_factory=dict)
    # The two-server demo: the new server's database, and the replication slots,
    # publications and subscriptions left on both servers after finalize.
    target_dsn: str | None = None
    leftovers: int | None = None

    def timed(self, name: str, fn: Callable[[], object]) -> None:
        """Run one step, adding its time to the step's total."""
        start = time.monotonic()
        fn()
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + (
            time.monotonic() - start)

    def close(self, per_table: dict[str, dict[str, int]], app: Workload) -> None:
        """The comparison's and the application's figures."""
        self.per_table = per_table
        self.compared = sum(t["rows"] for t in per_table.values())
        self.mismatches = sum(t["mismatches"] for t in per_table.values())
        s = app.stats
        self.app_writes, self.app_reads = s.writes, s.reads
        self.app_errors, self.app_retried = s.errors, s.retried
        self.longest_wait_ms = s.max_wait_ms


def default_plan_path() -> Path:
    here = Path(__file__).resolve().parent.parent / "plans" / "cogito.yaml"
    return here if here.exists() else Path("plans/cogito.yaml")


def _db_dsn(server: str, name: str) -> str:
    params = conninfo_to_dict(server)
    params["dbname"] = name
    return make_conninfo(**params)  # type: ignore[arg-type]


def fresh_database(server: str, name: str = DEMO_DB) -> str:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _db_dsn(server, name)


def compare(dsn: str, loaded: LoadedPlan) -> dict[str, dict[str, int]]:
    """Rows of each moved copy-strategy table, and rows differing from its retired source."""
    out: dict[str, dict[str, int]] = {}
    conn = connect(dsn, autocommit=True)
    conn.execute("SET search_path = ''")
    try:
        ctx = build_context(conn, loaded)
        for m in ctx.moves.values():
            retired = ctx.catalog.table(m.retired_schema, m.source_name)
            if m.strategy != COPY_STRATEGY.name or retired is None:
                continue
            tgt = sql.SQL(", ").join(sql.Identifier(c.target) for c in m.copied)
            src = sql.SQL(", ").join(sql.Identifier(c.source) for c in m.copied)
            r = conn.execute(sql.SQL(
                "SELECT (SELECT count(*) FROM {t}) AS n, "
                "(SELECT count(*) FROM (SELECT {tc} FROM {t} EXCEPT ALL SELECT {sc} FROM {r}) a) "
                "+ (SELECT count(*) FROM (SELECT {sc} FROM {r} EXCEPT ALL SELECT {tc} FROM {t}) b)"
                " AS diff").format(t=m.target, r=m.retired, tc=tgt, sc=src)).fetchone()
            assert r is not None
            out[m.label] = {"rows": int(r["n"]), "mismatches": int(r["diff"])}
    finally:
        conn.close()
    return out


def load_legacy(say: Say, db: str, rows: int, where: str = "") -> dict[str, int]:
    """The legacy Cogito schema and its generated rows in `db`."""
    t0 = time.monotonic()
    with psycopg.connect(db) as conn:
        sample.load_schema(conn)
        counts = sample.generate_data(conn, turns=rows)
    say(f"loaded the legacy Cogito schema in public{where}: {sum(counts.values()):,} rows "
        f"({counts['turns']:,} turns) in {time.monotonic() - t0:.1f} s")
    return counts


def move(say: Say, eng: Engine, summary: Summary, stages: tuple[str, ...], swap: str) -> None:
    """Each stage before cutover, cutover, a rollback of turns' cutover and a cutover again
    (the application writing all along), each step timed."""
    for stage in stages:
        say(f"apply --until {stage}")

        def step(until: str = stage) -> None:
            eng.apply(None, until)

        summary.timed(stage, step)
    say(swap)
    summary.timed("cutover", lambda: eng.cutover(None))
    say("roll back the cutover of turns (every row written since comes back), then cut over "
        "again")
    summary.timed("rollback", lambda: eng.rollback("turns", to="verify"))
    summary.timed("cutover", lambda: eng.cutover(["turns"]))
    time.sleep(1.0)  # let the application write through the old names for a moment


def run(say: Say, progress: Progress, *, rows: int = 200_000,
        directory: Path | None = None, dsn: str | None = None,
        plan_path: Path | None = None, threads: int = 2) -> Summary:
    """The whole demo; returns the figures for the closing summary."""
    server = dsn or start_embedded(directory)
    say(f"server ready: {server}")
    db = fresh_database(server)
    counts = load_legacy(say, db, rows)
    loaded = load_plan(plan_path or default_plan_path())
    summary = Summary(dsn=db, rows=counts)
    with Workload(db, threads=threads) as app:
        say(f"the application is writing ({threads} sessions: inserts, updates, deletes, "
            "reads on public.turns, public.users, ...)")
        with session(db, loaded, progress) as eng:
            move(say, eng, summary, tuple(s.name for s in COPY_STRATEGY.in_phase(Phase.apply)),
                 "cutover: one short locked transaction per unit")
        app.stop()
        with session(db, loaded, progress) as eng:
            eng.replay_once()  # reverse capture: the retired tables catch up
    summary.close(compare(db, loaded), app)
    return summary

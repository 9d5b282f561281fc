"""Soak: the Cogito sample moved, cut over, rolled back and forward again and again under load.

    python tests/soak.py --minutes 10 [--turns 100000] [--threads 4] [--dsn DSN] [--out FILE]

On an embedded server of its own (a mktemp directory under /tmp, stopped and deleted at the
end) unless --dsn names a server (a database of its own is created there and dropped). The
application is orchestrator.demo.workload.Workload (inserts, updates and deletes of turns, updates
of users, reads), several threads of it, measuring its own latency. Every operator step is the
CLI in its own process, as an operator types it. Cycles run until the time is up:

1. `apply` every table up to verify (prepare, dual-write, copy, verify);
2. `apply --until cutover` (copy tables swap, rename tables move, the plan's views appear);
3. odd cycles: drop the plan's views and roll back only the cutover of the copy tables
   (`rollback --to verify`); even cycles: roll every table back entirely.
Cycles start until the time is up; the last one ends with the move cut over, then finalized.

After each cutover, each rollback and each fresh copy the load pauses for a moment (its threads
stop; a new set starts after) while the same command runs once more to replay what the
application wrote last, and the checks run:
every copy-strategy table equals the table following it (target and retired source after a
cutover, source and target before it), EXCEPT both ways, column for column; after a full
rollback the catalog of public, client_mgmt and conversation equals the one taken before the
first move, and nothing of ours is left but the control tables.

Reported: application errors (target 0; lock waits given up, deadlocks, serialization failures
and foreign-key races are counted apart as retried), the worst application wait and per phase,
mismatching rows (target 0), catalog restorations, orchestrator failures (a step that had to be
rerun), how long each step took, and how long the load paused. The summary is printed and
written as JSON (--out, default bench/results/soak.json). Exit 0 only when every target is met.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors, sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stress

from orchestrator.db import start_embedded, stop_embedded
from orchestrator.demo import sample, workload
from orchestrator.demo.workload import Workload

ROOT = Path(__file__).resolve().parent.parent
PLAN = str(ROOT / "plans" / "cogito.yaml")
COPY_UNITS = ("turns", "blocks", "users")  # rollback order: children first
COPY_TABLES = ("users", "participants", "blocks", "turns")
PLAN_VIEWS = ("participant_users", "project_blocks")

# The application retries these (a wait given up, a lost race); anything else is an error.
# (The demo also forgives UndefinedTable, QueryCanceled and ObjectInUse: the soak does not.)
workload._TRANSIENT = (  # type: ignore[attr-defined]
    errors.LockNotAvailable,
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.ForeignKeyViolation,
)


@dataclass
class Phase:
    name: str
    cycle: int
    seconds: float
    writes: int
    reads: int
    errors: int
    retried: int
    max_wait_ms: float
    last_error: str


@dataclass
class Results:
    started: str
    minutes: float
    turns: int
    threads: int
    server: str
    cycles: int = 0
    cutovers: int = 0
    rollbacks_of_cutover: int = 0
    full_rollbacks: int = 0
    finalized: bool = False
    checks: int = 0
    rows_compared: int = 0
    mismatches: int = 0
    mismatch_detail: list[str] = field(default_factory=list)
    catalog_restored: int = 0
    catalog_checks: int = 0
    orchestrator_failures: list[str] = field(default_factory=list)
    app_writes: int = 0
    app_reads: int = 0
    app_errors: int = 0
    app_error_samples: list[str] = field(default_factory=list)
    app_retried: int = 0
    worst_wait_ms: float = 0.0
    worst_wait_by_step: dict[str, float] = field(default_factory=dict)
    paused_seconds: float = 0.0
    loaded_seconds: float = 0.0
    pauses: int = 0
    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = False


class Soak:
    def __init__(self, dsn: str, args: argparse.Namespace, res: Results) -> None:
        self.dsn = dsn
        self.args = args
        self.res = res
        self.load: Workload | None = None
        self.load_started = 0.0
        self.seed = 100

    # -- the application

    def start_load(self) -> None:
        self.seed += 10
        self.load = Workload(self.dsn, threads=self.args.threads, pause_s=0.005, seed=self.seed)
        self.load.start()
        self.load_started = time.monotonic()

    def stop_load(self, step: str, cycle: int) -> None:
        """Stop the threads and book their figures under the step they ran through."""
        assert self.load is not None
        self.load.stop()
        s = self.load.stats
        r = self.res
        r.app_writes += s.writes
        r.app_reads += s.reads
        r.app_errors += s.errors
        r.app_retried += s.retried
        if s.errors and len(r.app_error_samples) < 20:
            r.app_error_samples.append(f"{step}: {s.last_error}")
        r.worst_wait_ms = max(r.worst_wait_ms, s.max_wait_ms)
        r.loaded_seconds += time.monotonic() - self.load_started
        r.worst_wait_by_step[step] = max(r.worst_wait_by_step.get(step, 0.0), s.max_wait_ms)
        r.phases.append(
            Phase(
                step,
                cycle,
                round(time.monotonic() - self.load_started, 2),
                s.writes,
                s.reads,
                s.errors,
                s.retried,
                round(s.max_wait_ms, 1),
                s.last_error,
            )
        )
        self.load = None

    # -- the operator

    def run(self, step: str, *args: str) -> None:
        """One CLI command; a failure is recorded and the command rerun (at most twice)."""
        t0 = time.monotonic()
        for attempt in range(3):
            r = stress.cli(self.dsn, *args, timeout=1800)
            output = r.stdout + r.stderr
            if r.returncode == 0 and "Traceback" not in output:
                break
            self.res.orchestrator_failures.append(
                f"{step} (try {attempt + 1}): {' '.join(args[:1])}: {output.strip()[-600:]}"
            )
            time.sleep(1.0)
        else:
            raise RuntimeError(f"{step}: `orchestrator {' '.join(args)}` failed three times")
        self.res.step_seconds.setdefault(step, []).append(round(time.monotonic() - t0, 2))

    def step(self, step: str, cycle: int, *args: str, replay: tuple[str, ...] = ()) -> None:
        """Run a step under load, then pause the load, replay and check."""
        self.start_load()
        try:
            self.run(step, *args)
        finally:
            self.stop_load(step, cycle)
        t0 = time.monotonic()
        if replay:
            self.run(f"{step} (replay)", *replay)
        self.check(step)
        self.res.pauses += 1
        self.res.paused_seconds += time.monotonic() - t0

    # -- the checks

    def check(self, step: str) -> None:
        with stress.connect(self.dsn) as db:
            for table in COPY_TABLES:
                pair = self.follower(db, table)
                if pair is None:
                    continue
                extra, lost, n_new, n_old = stress.except_both_ways(db, table, pair)
                self.res.checks += 1
                self.res.rows_compared += n_new
                if extra or lost or n_new != n_old:
                    self.res.mismatches += extra + lost
                    self.res.mismatch_detail.append(
                        f"{step}: {table}: {extra} rows only in the new table, {lost} only in "
                        f"{pair}.{table} ({n_new} vs {n_old} rows)"
                    )

    def follower(self, db: psycopg.Connection[Any], table: str) -> str | None:
        """Where the other copy of a table lives now: the schema to compare the new one with."""
        retired = (
            stress.columns(db, "_orchestrator_retired", table)
            if self.exists(db, "_orchestrator_retired", table)
            else None
        )
        if retired:
            return "_orchestrator_retired"
        copied = stress.stage(db, table, "copy")["status"] == "done"
        if copied and self.exists(db, stress.TARGET[table], table):
            return "public"
        return None

    @staticmethod
    def exists(db: psycopg.Connection[Any], schema: str, table: str) -> bool:
        row = db.execute(
            "SELECT to_regclass(%s) IS NOT NULL AS e",
            (sql.Identifier(schema, table).as_string(db),),
        ).fetchone()
        return bool(row and row["e"])

    def catalog_check(self, original: dict[str, Any]) -> None:
        with stress.connect(self.dsn) as db:
            now = stress.catalog(db, stress.DATA_SCHEMAS)
            left = stress.leftovers(db)
        self.res.catalog_checks += 1
        if now == original and not left:
            self.res.catalog_restored += 1
        else:
            self.res.mismatch_detail.append(f"full rollback: catalog differs; leftovers {left}")

    # -- the cycles

    def soak(self) -> None:
        a = self.args
        deadline = time.monotonic() + a.minutes * 60
        with stress.connect(self.dsn) as db:
            original = stress.catalog(db, stress.DATA_SCHEMAS)
        verify = ("apply", PLAN, "--until", "verify")
        cutover = ("apply", PLAN, "--until", "cutover", "--yes")
        fresh = True  # the next forward step copies every copy-strategy table afresh
        while True:
            cycle = self.res.cycles + 1
            if fresh:
                self.step("forward to verify", cycle, *verify, replay=verify)
            else:  # only the cutovers were rolled back: verify is done, nothing to copy
                self.start_load()
                try:
                    self.run("forward to verify", *verify)
                finally:
                    self.stop_load("forward to verify", cycle)
            self.step("cutover", cycle, *cutover, replay=cutover)
            self.res.cutovers += 1
            self.res.cycles = cycle
            if time.monotonic() > deadline:
                break
            with stress.connect(self.dsn) as db:
                for v in PLAN_VIEWS:  # the operator drops the plan's views to roll back
                    db.execute(
                        sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier("public", v))
                    )
            if cycle % 2 == 1:
                self.start_load()
                try:
                    for t in COPY_UNITS:
                        self.run(
                            "rollback of cutover",
                            "rollback",
                            PLAN,
                            "--table",
                            t,
                            "--to",
                            "verify",
                            "--yes",
                        )
                finally:
                    self.stop_load("rollback of cutover", cycle)
                t1 = time.monotonic()
                self.run("rollback of cutover (replay)", *verify)
                self.check("rollback of cutover")
                self.res.pauses += 1
                self.res.paused_seconds += time.monotonic() - t1
                self.res.rollbacks_of_cutover += 1
                fresh = False
            else:
                self.start_load()
                try:
                    for t in self.all_tables_children_first():
                        self.run("full rollback", "rollback", PLAN, "--table", t, "--yes")
                finally:
                    self.stop_load("full rollback", cycle)
                t1 = time.monotonic()
                self.catalog_check(original)
                self.res.pauses += 1
                self.res.paused_seconds += time.monotonic() - t1
                self.res.full_rollbacks += 1
                fresh = True
        # The end of the soak: the move stays, and is finalized under load.
        # The soak's application uses the old names by design: past finalize's traffic gate.
        self.step("finalize", self.res.cycles, "finalize", PLAN, "--yes", "--force")
        self.res.finalized = True

    @staticmethod
    def all_tables_children_first() -> list[str]:
        from orchestrator.plan import load_plan

        names = [t.name for t in load_plan(Path(PLAN)).plan.tables]
        first = [
            t for t in ("block_lens_version", "block_turns", "patterns", "turns") if t in names
        ]
        return first + [t for t in reversed(names) if t not in first]


def prepare_database(dsn: str, turns: int) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        sample.load_schema(conn)
        counts = sample.generate_data(conn, turns=turns, seed=1)
        conn.execute("ANALYZE")
        conn.commit()
    return counts


def summary_lines(r: Results) -> list[str]:
    def ms(v: float) -> str:
        return f"{v:,.1f} ms"

    lines = [
        f"soak: {r.minutes:g} min asked, {r.seconds / 60:.1f} min run, Cogito sample with "
        f"{r.turns:,} turns, {r.threads} application threads",
        f"  cycles: {r.cycles} (cutovers {r.cutovers}, rollbacks of cutover "
        f"{r.rollbacks_of_cutover}, full rollbacks {r.full_rollbacks}, finalized {r.finalized})",
        f"  application: {r.app_writes:,} writes, {r.app_reads:,} reads, errors {r.app_errors}, "
        f"retried {r.app_retried:,}",
        f"  worst application wait: {ms(r.worst_wait_ms)}",
    ]
    for step, v in sorted(r.worst_wait_by_step.items()):
        lines.append(f"    during {step}: {ms(v)}")
    lines += [
        f"  mismatching rows: {r.mismatches} in {r.checks} comparisons of {r.rows_compared:,} rows",
        f"  catalog restored by full rollbacks: {r.catalog_restored}/{r.catalog_checks}",
        f"  orchestrator steps rerun after a failure: {len(r.orchestrator_failures)}",
        f"  load ran {r.loaded_seconds:.0f} s; paused {r.pauses} times for "
        f"{r.paused_seconds:.1f} s in all (a replay and the checks)",
    ]
    for step, secs in r.step_seconds.items():
        lines.append(
            f"    {step}: {len(secs)}x, median {sorted(secs)[len(secs) // 2]:.1f} s, "
            f"max {max(secs):.1f} s"
        )
    lines.append(f"  verdict: {'OK' if r.ok else 'FAILED'}")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--turns", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--dsn", default=None, help="a server to use (default: an embedded one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = p.parse_args(argv)

    res = Results(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        minutes=args.minutes,
        turns=args.turns,
        threads=args.threads,
        server="embedded (own)" if not args.dsn else "given by --dsn",
    )
    t0 = time.monotonic()
    tmp: Path | None = None
    server = args.dsn
    dbname = "orch_soak_" + uuid.uuid4().hex[:8]
    try:
        if server is None:
            tmp = Path(tempfile.mkdtemp(prefix="orch-soak-pg-", dir="/tmp"))
            server = start_embedded(tmp)
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        from conftest import dsn_for

        dsn = dsn_for(server, dbname)
        prepare_database(dsn, args.turns)
        soak = Soak(dsn, args, res)
        try:
            soak.soak()
        finally:
            if soak.load is not None:
                soak.stop_load("interrupted", res.cycles)
    except Exception as exc:
        res.orchestrator_failures.append(f"soak stopped: {exc!r}"[:2000])
    finally:
        res.seconds = round(time.monotonic() - t0, 1)
        if server is not None and tmp is None:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )
        if tmp is not None:
            stop_embedded(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    stopped = any(f.startswith("soak stopped") for f in res.orchestrator_failures)
    res.ok = (
        not stopped
        and res.app_errors == 0
        and res.mismatches == 0
        and res.catalog_restored == res.catalog_checks
        and res.finalized
    )
    res.worst_wait_ms = round(res.worst_wait_ms, 1)
    res.worst_wait_by_step = {k: round(v, 1) for k, v in res.worst_wait_by_step.items()}
    res.paused_seconds = round(res.paused_seconds, 1)
    res.loaded_seconds = round(res.loaded_seconds, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(res), indent=2, default=str) + "\n")
    print("\n".join(summary_lines(res)))
    for line in res.mismatch_detail[:20] + res.app_error_samples[:10] + res.orchestrator_failures:
        print("  ! " + line)
    print(f"  written: {out}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

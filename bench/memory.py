"""Memory: the orchestrator process's peak RSS while it copies 1M and 10M rows.

The copy runs as the operator runs it, `python -m orchestrator apply --until copy` in a child
process (heap order, the default workers), and its peak resident set size is the kernel's
accounting of that child, read by a fresh interpreter that runs it. The rows never pass
through the orchestrator: each batch is one INSERT ... SELECT in the server, so the peak should
be flat in rows.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.common import create_table, embedded_server, machine, plan_text, say, workdir

TARGET_MB = 150.0


# A fresh interpreter runs the command and reports its child's peak: a child forked straight
# from this process would start its count with this process's own resident pages (a fork
# shares them, and the kernel's maximum is kept across the exec), which after the planning
# benchmark are over a gigabyte.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def measured(cmd: list[str]) -> tuple[int, float, float]:
    """Run a command; its exit code, peak RSS in MB and seconds."""
    import tempfile

    t0 = time.monotonic()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as out:
        code = subprocess.run([sys.executable, "-c", _WRAPPER, out.name, *cmd]).returncode
        kb = float(out.read() or 0)
    return code, kb / 1024, time.monotonic() - t0


def one(dsn: str, rows: int, tmp: Any) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("DROP SCHEMA IF EXISTS moved CASCADE")
        conn.execute("DROP TABLE IF EXISTS public.big")
        conn.execute("DROP SCHEMA IF EXISTS _orchestrator CASCADE")
        conn.execute("DROP SCHEMA IF EXISTS _orchestrator_retired CASCADE")
        say(f"memory: generating {rows:,} rows")
        size = create_table(conn, "big", rows)
    plan = tmp / f"mem{rows}.yaml"
    plan.write_text(plan_text("membench", ["big"]), encoding="utf-8")
    base = [sys.executable, "-m", "orchestrator", "--dsn", dsn]
    code, _, _ = measured([*base, "apply", str(plan), "--until", "dual_write"])
    assert code == 0
    code, rss, secs = measured([*base, "--log-format", "json", "apply", str(plan),
                                "--until", "copy"])
    if code != 0:
        raise RuntimeError(f"the copy of {rows} rows failed ({code})")
    _, idle_rss, _ = measured([*base, "status", str(plan), "--format", "json"])
    say(f"memory: {rows:,} rows copied in {secs:.1f} s, peak RSS {rss:.1f} MB")
    return {"rows": rows, "heap_mb": size.get("heap_mb"), "copy_seconds": round(secs, 2),
            "peak_rss_mb": round(rss, 1), "status_command_peak_rss_mb": round(idle_rss, 1)}


def run(quick: bool = False) -> dict[str, Any]:
    sizes = (100_000, 300_000) if quick else (1_000_000, 10_000_000)
    result: dict[str, Any] = {"benchmark": "memory", "machine": machine(), "quick": quick}
    with embedded_server() as srv, workdir("memory") as tmp:
        srv.configure(max_wal_size="8GB", checkpoint_timeout="30min", autovacuum="off")
        result["server"] = srv.describe()
        dsn = srv.create_db("membench")
        result["runs"] = [one(dsn, n, tmp) for n in sizes]
    peaks = [r["peak_rss_mb"] for r in result["runs"]]
    result["targets"] = {"peak_rss": {"target": f"< {TARGET_MB:g} MB at every size",
                                      "value": peaks, "met": max(peaks) < TARGET_MB}}
    return result

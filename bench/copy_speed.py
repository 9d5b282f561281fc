"""Copy: the copy stage against the physical limit and pg_repack, on one server, interleaved.

A table of 1,000,000 rows (~340 MB heap), bigint identity key, a UNIQUE email and an index on
account_id. One-table plan, copy strategy; prepare and dual_write run first (untimed), then each
round times, in rotating order:

- orchestrator: `apply --until copy` (Engine.apply(..., "copy")): batches, then the
  REPEATABLE READ drain and the two index builds, in three variants: heap order with two
  workers (the default on this machine), heap order with one, and keyset order. The stage's
  time is `copy started` → `copy ok` from the event log; the whole apply call is reported
  beside it. The copy is rolled back (`rollback --to dual_write`) after each round, untimed.
- limit: INSERT INTO a key-only table SELECT * FROM the source, then the same two index builds
  (the unique one attached as a UNIQUE constraint, as the engine does).
- pg_repack --table on an identical table (PostgreSQL 15 only, where Debian packages it).

A CHECKPOINT precedes every timed variant. Then the copy runs again under a pgbench write
workload on the source (2 clients, single-row UPDATE + INSERT), twice: with the plan's
`throttle.adaptive` off (flat out), then on (the copy yields to the application,
stages/pace.py); each time the workload's throughput during the copy is compared with the same
pgbench run's throughput in 8 s before and after it, and the adaptive copy's time with the
flat-out one's (the slowdown the application's share costs). A full run (1,000,000 rows, both
servers) takes about 5 minutes on 2 cores.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bench.common import (
    PG15_BIN,
    BackgroundPgbench,
    Server,
    checkpoint,
    create_table,
    embedded_server,
    events,
    machine,
    median,
    pg15_available,
    pg15_server,
    pgbench_cmd,
    plan_text,
    say,
    wait_quiet,
    workdir,
    write_script,
)

PLAN = "copybench"
TARGET_LIMIT = 1.0
TARGET_REPACK = 1.0
TARGET_UNDER_LOAD = 0.80  # issue 14: the application's TPS during the copy, adaptive on
# The orchestrator's variants: the plan options each runs with.
VARIANTS: dict[str, dict[str, Any]] = {
    "orchestrator": {"copy_workers": 2},
    "orchestrator_1w": {"copy_workers": 1},
    "orchestrator_key": {"copy_order": "key"},
}

WRITE_SCRIPT = """\\set id random(1, :maxid)
UPDATE public.big SET account_id = account_id + 1, status = 'touched' WHERE id = :id;
INSERT INTO public.big (email, account_id, payload)
  VALUES (md5(random()::text || clock_timestamp()::text) || '@w.example', :id, repeat('w', 250));
"""


def _limit(conn: psycopg.Connection[Any]) -> dict[str, float]:
    lim = sql.Identifier("public", "lim")
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(lim))
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE public.big INCLUDING DEFAULTS)").format(lim))
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(lim))
    checkpoint(conn)
    t0 = time.monotonic()
    conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM public.big").format(lim))
    t1 = time.monotonic()
    conn.execute(sql.SQL("CREATE UNIQUE INDEX lim_email_key ON {} (email)").format(lim))
    conn.execute(
        sql.SQL(
            "ALTER TABLE {} ADD CONSTRAINT lim_email_key UNIQUE USING INDEX lim_email_key"
        ).format(lim)
    )
    conn.execute(sql.SQL("CREATE INDEX lim_account_idx ON {} (account_id)").format(lim))
    t2 = time.monotonic()
    conn.execute(sql.SQL("DROP TABLE {}").format(lim))
    return {"seconds": t2 - t0, "insert_s": t1 - t0, "indexes_s": t2 - t1}


def _prepared(eng: Any) -> None:
    """Untimed: the table rolled back entirely and brought to dual_write again under this
    session's plan. What prepare builds depends on the plan's options (the target's key
    comes after the copy in heap order, with prepare in keyset order), so each variant starts
    from its own prepare, not from the last variant's."""
    eng.rollback("big")
    eng.apply(["big"], "dual_write")


def _orchestrator(conn: psycopg.Connection[Any], eng: Any) -> dict[str, float]:
    _prepared(eng)
    checkpoint(conn)
    t0 = time.monotonic()
    eng.apply(["big"], "copy")
    wall = time.monotonic() - t0
    every = events(conn, PLAN)
    ev = [e for e in every if e["action"] == "copy"]
    started = next(e for e in reversed(ev) if e["outcome"] == "started")
    ok = next(e for e in reversed(ev) if e["outcome"] == "ok")
    stage = (ok["at"] - started["at"]).total_seconds()
    finish = float(ok["duration_ms"] or 0) / 1000
    detail = ok["detail"] or {}
    # In heap order the target's key is built after the batches, in a transaction of its own
    # (its event: build_key), before the finish: part of batches_s, reported beside it.
    key = [e for e in every if e["action"] == "build_key" and e["id"] > started["id"]]
    key_s = float(key[-1]["duration_ms"] or 0) / 1000 if key else 0.0
    r = conn.execute(
        "SELECT (SELECT count(*) FROM public.big) AS src, (SELECT count(*) FROM moved.big) AS tgt"
    ).fetchone()
    assert r is not None
    if r["src"] != r["tgt"]:
        raise RuntimeError(f"copy left {r['tgt']} rows in the target for {r['src']} in the source")
    # Verify, as `apply` runs it after the copy: its full pass's time from its event.
    checkpoint(conn)
    eng.apply(["big"], "verify")
    verified = [e for e in events(conn, PLAN) if e["action"] == "verify" and e["outcome"] == "ok"]
    verify_s = float(verified[-1]["duration_ms"] or 0) / 1000
    eng.rollback("big", to="dual_write")
    return {
        "verify_s": verify_s,
        "verify_over_copy": verify_s / stage,
        "seconds": stage,
        "apply_s": wall,
        "batches_s": stage - finish,
        "key_s": key_s,
        "finish_s": finish,
        "drained": float(detail.get("drained", 0)),
    }


def _repack(srv: Server, conn: psycopg.Connection[Any], db: str) -> dict[str, float]:
    checkpoint(conn)
    cmd = [
        str(PG15_BIN / "pg_repack"),
        "-h",
        srv.host,
        "-p",
        str(srv.port),
        "-U",
        "postgres",
        "-d",
        db,
        "--table",
        "public.big_r",
    ]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"pg_repack failed ({p.returncode}): {p.stderr.strip()}")
    # pg_repack leaves fresh, unfrozen tuples: freeze them (untimed) so the next round reads
    # the same kind of table as the first.
    conn.execute("VACUUM (FREEZE, ANALYZE) public.big_r")
    return {"seconds": elapsed}


def _under_load(
    srv: Server, conn: psycopg.Connection[Any], eng: Any, db: str, rows: int, tmp: Path
) -> dict[str, Any]:
    """The copy (`apply --until copy`) under pgbench's writes: the workload's TPS during the
    copy against 8 s before and after it, in the same pgbench run."""
    script = write_script(tmp, "copy_writes", WRITE_SCRIPT)
    cmd = pgbench_cmd(
        srv, db, script, clients=2, seconds=3600, threads=2, defines={"maxid": rows}
    )
    with BackgroundPgbench(cmd) as bg:
        time.sleep(1.5)
        before0 = time.time()
        time.sleep(8.0)
        before1 = time.time()
        c0 = time.time()
        t0 = time.monotonic()
        eng.apply(["big"], "copy")
        wall = time.monotonic() - t0
        c1 = time.time()
        time.sleep(8.0)
        after1 = time.time()
        rc = bg.stop()
        problems = bg.aborted()
    ev = [e for e in events(conn, PLAN) if e["action"] == "copy"]
    started = next(e for e in reversed(ev) if e["outcome"] == "started")
    ok = next(e for e in reversed(ev) if e["outcome"] == "ok")
    finish_s = float(ok["duration_ms"] or 0) / 1000
    # The finish: the last drain and the index builds in one transaction, which ends with
    # the `copy ok` event (its time is the server's clock_timestamp()).
    finish1 = ok["at"].timestamp()
    finish0 = finish1 - finish_s
    tps_before = bg.tps_between(before0, before1)
    tps_during = bg.tps_between(c0, c1)
    tps_after = bg.tps_between(c1, after1)
    base = statistics.mean([x for x in (tps_before, tps_after) if x is not None] or [0.0])
    tps_batches = bg.tps_between(started["at"].timestamp(), finish0)
    tps_finish = bg.tps_between(finish0, finish1)
    eng.rollback("big", to="dual_write")
    return {
        "clients": 2,
        "script": WRITE_SCRIPT,
        "adaptive": bool(eng.plan.defaults.throttle.adaptive),
        "copy_seconds": (ok["at"] - started["at"]).total_seconds(),
        "apply_s": wall,
        "finish_s": finish_s,
        "drained_in_finish": (ok["detail"] or {}).get("drained"),
        "tps_before": tps_before,
        "tps_during": tps_during,
        "tps_after": tps_after,
        "tps_during_batches": tps_batches,
        "tps_during_finish": tps_finish,
        "tps_during_over_without": (tps_during / base) if tps_during and base else None,
        "tps_batches_over_without": (tps_batches / base) if tps_batches and base else None,
        "tps_finish_over_without": (tps_finish / base) if tps_finish and base else None,
        "pgbench_rc": rc,
        "pgbench_problems": problems[:5],
    }


def batch_check(conn: psycopg.Connection[Any], eng: Any, rows: int) -> dict[str, Any]:
    """One of the engine's copy batches (stages.copy.batch_sql, 10,000 rows from the middle of
    the table) under EXPLAIN (ANALYZE, BUFFERS), rolled back: where a batch's time goes."""
    from orchestrator.stages import copy as copy_stage

    m = eng.context().moves["big"]
    stmt = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}").format(
        copy_stage.batch_sql(m, first=False)
    )
    params = {
        "limit": 10_000, "lo0": str(rows // 2), "hi0": str(rows),
        **copy_stage.fresh_params(None),
    }
    conn.execute("BEGIN")
    try:
        doc = conn.execute(stmt, params).fetchone()
    finally:
        conn.execute("ROLLBACK")
    assert doc is not None
    top = next(iter(doc.values()))[0]
    nodes: list[dict[str, Any]] = []

    def walk(n: dict[str, Any]) -> None:
        nodes.append(n)
        for c in n.get("Plans", []):
            walk(c)

    walk(top["Plan"])
    scans = [
        round(float(n["Actual Total Time"]), 2)
        for n in nodes
        if n["Node Type"] == "CTE Scan" and n.get("Parent Relationship") != "Member"
    ]
    insert = next((n for n in nodes if n["Node Type"] == "ModifyTable"), None)
    wm = conn.execute("SHOW work_mem").fetchone()
    return {
        "execution_ms": round(float(top["Execution Time"]), 2),
        "insert_ms": round(float(insert["Actual Total Time"]), 2) if insert else None,
        "cte_scan_ms": scans,
        "temp_blocks_written": int(top["Plan"].get("Temp Written Blocks", 0)),
        "temp_blocks_read": int(top["Plan"].get("Temp Read Blocks", 0)),
        "work_mem": next(iter(wm.values())) if wm else None,
    }


def run_on(srv: Server, rows: int, rounds: int, repack: bool, load: bool) -> dict[str, Any]:
    srv.configure(max_wal_size="8GB", checkpoint_timeout="30min", autovacuum="off")
    db = "copybench"
    dsn = srv.create_db(db)
    from orchestrator.plan import parse_plan
    from orchestrator.run.session import session

    out: dict[str, Any] = {"server": srv.describe(), "rows": rows, "rounds": rounds}
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn, workdir(
        "copy"
    ) as tmp:
        say(f"copy ({srv.version}): generating {rows:,} rows")
        out["table"] = create_table(conn, "big", rows)
        out["table"]["rows"] = rows
        if repack:
            create_table(conn, "big_r", rows)
            conn.execute("CREATE EXTENSION pg_repack")
            v = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'pg_repack'"
            ).fetchone()
            out["pg_repack_version"] = v["extversion"] if v else None
        loaded = parse_plan(plan_text(PLAN, ["big"]), "bench:copy.yaml")
        plans = {v: parse_plan(plan_text(PLAN, ["big"], **opts), f"bench:copy-{v}.yaml")
                 for v, opts in VARIANTS.items()}
        # dual_write once; each variant then runs in a session of its own (one plan name:
        # its advisory lock admits one session at a time).
        with session(dsn, loaded) as eng:
            eng.apply(["big"], "dual_write")
        names = ["limit", *VARIANTS] + (["pg_repack"] if repack else [])
        times: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        out["load"] = [wait_quiet(f"copy {srv.kind}")]
        loads = []
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                loads.append(round(_load1(), 2))
                if name == "limit":
                    res = _limit(conn)
                elif name in VARIANTS:
                    with session(dsn, plans[name]) as variant:
                        res = _orchestrator(conn, variant)
                else:
                    res = _repack(srv, conn, db)
                times[name].append(res)
                say(f"copy ({srv.kind}) round {r + 1}: {name} {res['seconds']:.2f} s")
        out["load_1m_per_run"] = loads
        out["runs"] = times
        med = {n: median([x["seconds"] for x in times[n]]) for n in names}
        out["variants"] = VARIANTS
        out["verify_median_s"] = {v: median([x["verify_s"] for x in times[v]])
                                  for v in VARIANTS}
        out["verify_over_copy"] = {v: out["verify_median_s"][v] / med[v] for v in VARIANTS}
        out["median_s"] = med
        out["orchestrator_breakdown_median_s"] = {
            k: median([x[k] for x in times["orchestrator"]])
            for k in ("batches_s", "key_s", "finish_s", "apply_s")
        }
        out["limit_breakdown_median_s"] = {
            k: median([x[k] for x in times["limit"]]) for k in ("insert_s", "indexes_s")
        }
        out["ratio_to_limit"] = med["orchestrator"] / med["limit"]
        out["ratio_to_limit_per_round"] = [
            o["seconds"] / x["seconds"]
            for o, x in zip(times["orchestrator"], times["limit"], strict=True)
        ]
        if repack:
            out["ratio_to_pg_repack"] = med["orchestrator"] / med["pg_repack"]
            out["pg_repack_over_limit"] = med["pg_repack"] / med["limit"]
            out["ratio_to_pg_repack_per_round"] = [
                o["seconds"] / x["seconds"]
                for o, x in zip(times["orchestrator"], times["pg_repack"], strict=True)
            ]
        with session(dsn, plans["orchestrator_key"]) as keyed:
            _prepared(keyed)
            out["batch_statement"] = batch_check(conn, keyed, rows)
        if load:
            # The default copy (two workers, heap order) with the adaptive policy off, then
            # on (`throttle.adaptive` in the plan): each against its own pgbench baseline.
            paced = parse_plan(
                plan_text(PLAN, ["big"], **VARIANTS["orchestrator"], throttle={"adaptive": True}),
                "bench:copy-adaptive.yaml",
            )
            for key, plan, label in (("under_load", plans["orchestrator"], "adaptive off"),
                                     ("under_load_adaptive", paced, "adaptive on")):
                out["load"].append(wait_quiet(f"copy under load {srv.kind}, {label}"))
                with session(dsn, plan) as variant:
                    _prepared(variant)
                    out[key] = _under_load(srv, conn, variant, db, rows, tmp)
                u = out[key]
                say(
                    f"copy under load, {label}: {u['copy_seconds']:.2f} s; pgbench tps before "
                    f"{u['tps_before']}, during {u['tps_during']}, after {u['tps_after']}"
                )
            off, on = out["under_load"], out["under_load_adaptive"]
            out["under_load_slowdown"] = on["copy_seconds"] / off["copy_seconds"]
    return out


def _load1() -> float:
    from bench.common import loadavg

    return loadavg()


def run(rows: int = 1_000_000, quick: bool = False) -> dict[str, Any]:
    if quick:
        rows = min(rows, 100_000)
    rounds = 3
    result: dict[str, Any] = {
        "benchmark": "copy",
        "machine": machine(),
        "quick": quick,
        "targets_defined": {"ratio_to_limit": TARGET_LIMIT, "ratio_to_pg_repack": TARGET_REPACK},
    }
    with embedded_server() as srv:
        result["embedded"] = run_on(srv, rows, rounds, repack=False, load=True)
    why = pg15_available()
    repack_bin = PG15_BIN / "pg_repack"
    if why is None and not repack_bin.exists():
        why = (
            f"{repack_bin} not found: install Debian's postgresql-15-repack "
            "(apt-get install -y postgresql-15-repack)"
        )
    if why is None and shutil.which("runuser") is None:
        why = "runuser not found (needed to start PostgreSQL 15 as the postgres user)"
    if why is None:
        with pg15_server() as srv:
            result["pg15"] = run_on(srv, rows, rounds, repack=True, load=False)
    else:
        result["pg15"] = None
        result["pg_repack_unavailable"] = why
        say(f"copy: pg_repack unavailable: {why}")
    e = result["embedded"]
    p = result["pg15"]
    targets: dict[str, Any] = {
        "ratio_to_limit_pg18": {
            "target": f"<= {TARGET_LIMIT}",
            "value": e["ratio_to_limit"],
            "met": e["ratio_to_limit"] <= TARGET_LIMIT,
        }
    }
    if p is not None:
        targets["ratio_to_limit_pg15"] = {
            "target": f"<= {TARGET_LIMIT}",
            "value": p["ratio_to_limit"],
            "met": p["ratio_to_limit"] <= TARGET_LIMIT,
        }
        targets["ratio_to_pg_repack_pg15"] = {
            "target": f"<= {TARGET_REPACK}",
            "value": p["ratio_to_pg_repack"],
            "met": p["ratio_to_pg_repack"] <= TARGET_REPACK,
        }
    else:
        targets["ratio_to_pg_repack_pg15"] = {
            "target": f"<= {TARGET_REPACK}",
            "value": None,
            "met": None,
            "note": result["pg_repack_unavailable"],
        }
    targets["verify_over_copy_pg18"] = {
        "target": "<= 0.2", "value": e["verify_over_copy"]["orchestrator"],
        "met": e["verify_over_copy"]["orchestrator"] <= 0.2,
    }
    on = e.get("under_load_adaptive")
    if on is not None:
        ratio = on["tps_during_over_without"]
        targets["copy_under_load_adaptive"] = {
            "target": f">= {TARGET_UNDER_LOAD:.2f} of the workload's TPS outside the copy, "
            "with throttle.adaptive on, the copy completing",
            "value": ratio,
            "met": ratio is not None and ratio >= TARGET_UNDER_LOAD,
        }
        targets["copy_under_load_slowdown"] = {
            "target": "informational: the copy's time under load, adaptive on / off",
            "value": e["under_load_slowdown"],
            "met": None,
        }
    result["targets"] = targets
    return result

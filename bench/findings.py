"""The missed targets, stated plainly, with what limits each.

Everything numeric here comes from the results of the run. Two paragraphs also cite
diagnostic experiments that are not part of `make bench` (they patch the engine in memory, which
the benchmark never does); they are marked as such, with how to repeat them.
"""

from __future__ import annotations

from typing import Any

TARGET_REPLAY = 0.80  # issue 14: the application's share with the yielding replayer


def _copy(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = r["targets"]
    for key, label in (("embedded", "PostgreSQL 18"), ("pg15", "PostgreSQL 15")):
        s = r.get(key)
        if not s:
            continue
        tk = "ratio_to_limit_pg18" if key == "embedded" else "ratio_to_limit_pg15"
        ob, lb = s["orchestrator_breakdown_median_s"], s["limit_breakdown_median_s"]
        if t.get(tk, {}).get("met") is False:
            key = (f" (the key built after them included, {ob['key_s']:.2f} s)"
                   if ob.get("key_s") else "")
            out.append(
                f"- **Copy, {label}: {s['ratio_to_limit']:.2f}x the limit (target 1.00x).** "
                f"In heap order with two workers the batches take {ob['batches_s']:.2f} s{key} "
                f"against the limit's INSERT ... SELECT {lb['insert_s']:.2f} s, and the drain "
                f"and index builds {ob['finish_s']:.2f} s against its {lb['indexes_s']:.2f} s: "
                "each part is at the limit's own, the two workers sharing the machine's two "
                "cores with the server's WAL writer and checkpointer. Per-round ratios: "
                + ", ".join(f"{x:.2f}" for x in s["ratio_to_limit_per_round"]) + "."
            )
    p = r.get("pg15")
    if p and t.get("ratio_to_pg_repack_pg15", {}).get("met") is False:
        out.append(
            f"- **Copy vs pg_repack: {p['ratio_to_pg_repack']:.2f}x (target 1.00x).** pg_repack "
            f"took {p['median_s']['pg_repack']:.2f} s ({p['pg_repack_over_limit']:.2f}x the "
            "limit) for its whole run; the orchestrator's copy stage "
            f"{p['median_s']['orchestrator']:.2f} s. pg_repack beats the limit itself: it "
            "builds every index, the key included, after its copy, where the limit's table "
            "has its key during the load"
            + (
                f"; our heap-order copy builds the target's key after its batches too "
                f"({p['orchestrator_breakdown_median_s']['key_s']:.2f} s), then drains the log "
                "and builds the other indexes in its finish."
                if p["orchestrator_breakdown_median_s"].get("key_s")
                else ", as our target had in this run. Building the target's key after the "
                "copy needs the finish to build it before the drain (replay looks keys up) and "
                "a crash-safe record of that step; not built in the engine this run measured."
            )
        )
    for key, label in (("embedded", "PostgreSQL 18"), ("pg15", "PostgreSQL 15")):
        s = r.get(key)
        vt = t.get("verify_over_copy_pg18", {}) if key == "embedded" else {}
        if s and vt.get("met") is False:
            v = s["verify_median_s"]
            out.append(
                f"- **Verify, {label}: {s['verify_over_copy']['orchestrator']:.2f}x the copy "
                f"(target 0.20x).** {v['orchestrator']:.2f} s with the target side on a second "
                f"session under the same snapshot, {v['orchestrator_1w']:.2f} s on one: a full "
                "verify reads both tables and hashes every row, each side on one core, where "
                "the copy reads one table and writes one."
            )
    out += _under_load(r)
    if r.get("pg_repack_unavailable"):
        out.append(f"- **pg_repack unavailable:** {r['pg_repack_unavailable']}; not compared.")
    return out


def _under_load(r: dict[str, Any]) -> list[str]:
    """The copy under a write workload: flat out, and with the adaptive policy (issue 14's
    target: the application keeps 0.80 of its TPS while the copy still completes)."""
    e = r.get("embedded") or {}
    off, on = e.get("under_load"), e.get("under_load_adaptive")
    if not off or off.get("tps_during_over_without") is None:
        return []
    if on is None:  # a run before the adaptive policy
        return [
            f"- **Copy under load: the application kept {off['tps_during_over_without']:.2f}x "
            "of its TPS (target 0.80x with an adaptive policy).** Two copy workers take both "
            "cores; this run predates the adaptive policy (`throttle.adaptive`)."
        ]
    t = r["targets"].get("copy_under_load_adaptive", {})
    if t.get("met") is not False:
        return []
    ratio = on.get("tps_during_over_without")
    parts = [
        f"- **Copy under load with the adaptive policy: the application kept {_n(ratio)}x of "
        f"its TPS (target 0.80x); {_n(off['tps_during_over_without'])}x with the policy "
        f"off.** The copy took {on['copy_seconds']:.1f} s against {off['copy_seconds']:.1f} s "
        f"flat out ({e['under_load_slowdown']:.2f}x) and completed."
    ]
    batches, finish = on.get("tps_batches_over_without"), on.get("tps_finish_over_without")
    if batches is not None:
        parts.append(
            f" Before the finish (the batches, paced) the application kept {_n(batches)}x"
            + (f", during the finish ({on['finish_s']:.1f} s: the last drain of "
               f"{on['drained_in_finish'] or 0:,} log entries and the index builds, one "
               f"transaction, not paced) {_n(finish)}x." if finish is not None else
               f"; the finish ({on['finish_s']:.1f} s, not paced) was too short for "
               "pgbench's 1 s progress reports.")
        )
    parts.append(
        " The pace aims at `yield_goal` (0.85) of the write rate the application shows while "
        "the workers rest, in 2 s windows: a window's shortfall is seen only after it, and "
        "the duty then halves (down to 0.05) or grows by 0.1 a window."
    )
    return ["".join(parts)]


def _n(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def _dualwrite(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = r["targets"]
    s, m = r["single"], r["multi"]
    bare = s["ratio_to_none"].get("bare_log")
    cap = s["ratio_to_none"]["capture"]
    rep = s["ratio_to_none"]["capture_replay"]
    # Issue 14 asks 0.85 of the capture alone; runs before it were held to 0.80.
    goal = "0.85" if "0.85" in t["single_row_capture"]["target"] else "0.80"
    if t["single_row_capture"]["met"] is False:
        out.append(
            f"- **Dual-write, single-row mix: {cap:.2f} of the no-trigger TPS (target {goal}, "
            "the capture alone).** "
            "Per round: "
            + ", ".join(f"{x:.2f}" for x in s["ratio_to_none_per_round"]["capture"])
            + ". "
            + (
                f"A bare PL/pgSQL key-log trigger (an unindexed log table, no identity column, "
                f"no SECURITY DEFINER) gives {bare:.2f} on the same runs (per round "
                + ", ".join(f"{x:.2f}" for x in s["ratio_to_none_per_round"]["bare_log"])
                + f"): the row trigger itself (a PL/pgSQL call and a log row per row written) "
                f"costs {1 - bare:.2f} of the no-trigger TPS, and what the engine's capture "
                f"adds on top of that floor (see `capture.install_sql`) {bare - cap:.2f}. "
                if bare is not None
                else ""
            )
            + "On 2 cores shared with pgbench and other work, that CPU comes straight out of "
            "the application's; with commits flushed to disk (synchronous_commit on, about "
            "2,200 TPS here) the same trigger costs far less in relative terms."
        )
    if t["multi_row_capture"]["met"] is False:
        out.append(
            f"- **Dual-write, multi-row mix: {m['ratio_to_none']['capture']:.2f} of the "
            f"no-trigger TPS (target {goal}, the capture alone).** A statement touching 110 "
            "rows fires the row "
            "trigger 110 times, each a PL/pgSQL call and a single-row INSERT into the log "
            "(an unindexed table), while the statement itself is set-based and cheap per "
            "row: the "
            "per-row trigger cost is a larger share. What would change it: a statement-level "
            "AFTER trigger with transition tables (one INSERT ... SELECT into the log per "
            "statement) for multi-row statements; docs/design.md records the statement-level "
            "variant at 0.73 on single-row writes, so it is a trade, not a free win."
        )
    ta = t.get("single_row_capture_with_replay_adaptive")
    if ta is None:  # a run before issue 14: the replayer flat out was the only one
        if t["single_row_capture_with_replay"]["met"] is False:
            out.append(
                f"- **Dual-write with the replayer beside the clients: {rep:.2f}** "
                "(informational target 0.80; docs/design.md records 0.77 for this design). "
                "Replaying re-reads every logged key from the source and rewrites the target "
                "row: on a busy server it costs about what a synchronous mirror costs, as "
                "docs/design.md records. This run predates the paced replayer (issue 14)."
            )
        return out
    if ta["met"] is False:
        out.append(_adaptive_replayer(r))
    fixed = s["ratio_to_none"].get("capture_replay_fixed")
    if rep < 0.80 or (fixed is not None and fixed < 0.80):
        shares = _shares(s)
        out.append(
            f"- **Informational: the replayer flat out {rep:.2f} of the no-trigger TPS** "
            f"(replaying {shares.get('capture_replay', '-')} of the log during the run)"
            + (f", **at a fixed {r['replay_rate_fixed']:,} keys/s {fixed:.2f}** (replaying "
               f"{shares.get('capture_replay_fixed', '-')}, its backlog growing)"
               if fixed is not None else "")
            + ". Replaying re-reads every logged key from the source and rewrites the target "
            "row: flat out on a busy server it costs about what a synchronous mirror costs "
            "(docs/design.md); the paced replayer trades the backlog for the application's "
            "throughput."
        )
    return out


def _shares(s: dict[str, Any]) -> dict[str, str]:
    """Per replayer variant, the median share of the logged entries replayed during a run."""
    from bench.common import median

    out = {}
    for v, runs in s["runs"].items():
        vals = [x["replayed_share"] for x in runs if x.get("replayed_share") is not None]
        if vals and v != "capture":
            out[v] = f"{median(vals):.2f}"
    return out


def _adaptive_replayer(r: dict[str, Any]) -> str:
    """Why the yielding replayer leaves the application less than the target."""
    s = r["single"]
    cap = s["ratio_to_none"]["capture"]
    ad = s["ratio_to_none"]["capture_replay_adaptive"]
    goal = float((r.get("pace") or {}).get("yield_goal") or 0.85)
    runs = s["runs"]["capture_replay_adaptive"]
    share = _shares(s).get("capture_replay_adaptive", "-")
    backlog = ", ".join(f"{x['log_backlog_after']:,}" for x in runs)
    return (
        f"- **Dual-write with the yielding replayer: {ad:.2f} of the no-trigger TPS (target "
        f"0.80).** Per round: "
        + ", ".join(f"{x:.2f}" for x in s["ratio_to_none_per_round"]["capture_replay_adaptive"])
        + f"; it replayed {share} of the log during the run (backlog at the end "
        f"{backlog}). Against the capture alone ({cap:.2f}) the application kept "
        f"{ad / cap:.2f}. "
        + (
            f"The capture alone already leaves less than 0.80 ({cap:.2f}): no pace of the "
            "replayer can give back what the trigger takes. "
            if cap < TARGET_REPLAY else ""
        )
        + f"The pace yields only while the application's write rate is under `yield_goal` "
        f"({goal:.2f}) of its rate in the pace's quiet windows, and those carry the capture's "
        f"cost: it accepts down to about {goal:.2f} x {cap:.2f} = {goal * cap:.2f} of the "
        "no-trigger rate"
        + (
            f"; holding 0.80 needs a yield_goal of {TARGET_REPLAY / cap:.2f} "
            "(`orchestrator set PLAN yield_goal ...`), with a larger backlog in exchange."
            if goal * cap < TARGET_REPLAY <= cap else "."
        )
    )


def _cutover(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = r["targets"]
    if t["hold_under_100ms"]["met"] is False or t["hold_flat"]["met"] is False:
        out.append(
            f"- **Cutover hold:** worst {t['hold_under_100ms']['value']:.1f} ms; medians by "
            "size " + ", ".join(f"{x:.1f}" for x in t["hold_flat"]["value"]) + " ms."
        )
    dc = next((s.get("in_lock_drain_check") for s in r["sizes"].values()
               if s.get("in_lock_drain_check")), None)
    planned_well = dc is not None and (
        dc["stale_log_statistics"]["ms"] <= 3 * dc["after_analyze_of_the_log"]["ms"] + 20
    )
    if dc and planned_well:
        stale, fresh = dc["stale_log_statistics"], dc["after_analyze_of_the_log"]
        out.append(
            "- **The in-lock drain no longer depends on the log's statistics:** the engine "
            "sets `enable_hashjoin`, `enable_mergejoin` and `enable_seqscan` off for its replay "
            "transactions, so each logged key is looked up by index. Measured in this run on "
            f"the largest table, a {dc['tail_keys']}-key tail: {stale['ms']:.0f} ms with the "
            f"log's earlier statistics ({'; '.join(stale['scans'])}), {fresh['ms']:.0f} ms "
            "after ANALYZE of the log. (The run before this fix measured 557 ms and 3 ms.)"
        )
        if t["hold_under_100ms"]["met"] is False or t["hold_flat"]["met"] is False:
            rounds = {
                size: [round(x["cutover"]["hold_ms_event"] or 0) for x in s["rounds"]]
                for size, s in r["sizes"].items()
            }
            worst = max(
                (x["cutover"] for s in r["sizes"].values() for x in s["rounds"]),
                key=lambda c: c["hold_ms_event"] or 0,
            )
            slow = worst.get("slowest_ms")
            out.append(
                "- **Where the hold went.** Holds per round (ms, event, from the grant): "
                + "; ".join(f"{k} rows {v}" for k, v in rounds.items())
                + ". "
                + (
                    "The worst round's slowest statements inside the lock: "
                    + "; ".join(f"{ms} ms `{text[:60]}…`" for ms, text in slow)
                    + "."
                    if slow
                    else "This run's events do not name the slowest statements (older engine)."
                )
            )
    elif dc and (t["hold_under_100ms"]["met"] is False or t["hold_flat"]["met"] is False):
        stale, fresh = dc["stale_log_statistics"], dc["after_analyze_of_the_log"]
        out.append(
            "- **Why the hold grows with the table (engine bug):** inside the lock, the "
            "cutover drains the log's last entries with `capture.replay_all_sql` (a delete of "
            "the target's rows for the logged keys, then an insert of the source's current rows "
            "for them, both joined to the log). Entries leave the log by deletion, so its "
            "statistics still describe an "
            "earlier, larger fill (autovacuum analyzes it while a busy verify lets it grow), "
            "and the planner joins by scanning the whole table. Measured in this run on the "
            f"largest table, a {dc['tail_keys']}-key tail: {stale['ms']:.0f} ms with the "
            f"log's earlier statistics ({'; '.join(stale['scans'])}), {fresh['ms']:.0f} ms "
            f"after ANALYZE of the log ({'; '.join(fresh['scans'])}). Fix: ANALYZE the log "
            "(cheap: it is small) just before the locked transaction, or write the drain so "
            "the plan cannot depend on the log's statistics (collect the distinct keys first "
            "and join on `= ANY(...)`, or force a nested loop with SET LOCAL inside the "
            "transaction). The same statements drain the reverse log in the rollback and the "
            "forward log in the copy's last transaction; `replay_batch_sql` has the same "
            "exposure on the replayer's path."
        )
    # The rollback has no target of its own in the issue, but docs/design.md (invariant 3)
    # holds it to the same lock discipline: state what the run shows.
    worst_retries = max(
        (s["rollback_max"]["lock_timeout_retries"] or 0) for s in r["sizes"].values()
    )
    worst_hold = max((s["rollback_max"]["hold_ms_event"] or 0) for s in r["sizes"].values())
    worst_app = max(
        (s["rollback_max"]["worst_latency_ms_during_call"] or 0) for s in r["sizes"].values()
    )
    under = [x["rollback"]["succeeded_under_load"] for s in r["sizes"].values()
             for x in s["rounds"]]
    if worst_retries or worst_hold >= 100:
        out.append(
            f"- **Rollback of the cutover under load (no target in the issue; docs/design.md's "
            f"invariant 3 applies): up to {worst_retries} lock_timeout retries, a committed "
            f"hold of up to {worst_hold:.0f} ms, application statements stalled up to "
            f"{worst_app:.0f} ms; it committed while the load still ran in {sum(under)} of "
            f"{len(under)} rounds.** "
            + _rollback_retries(r)
        )
    if t["no_application_errors"]["met"] is False:
        out.append(
            f"- **Application errors during cutover or rollback: "
            f"{t['no_application_errors']['value']}** (see the cutover section)."
        )
    return out


def _rollback_retries(r: dict[str, Any]) -> str:
    """What held up each rollback that retried: who each failed try found holding its
    relations, and any autovacuum the orchestrator cancelled (from the events)."""
    parts = []
    for size, s in r["sizes"].items():
        for i, x in enumerate(s["rounds"], 1):
            b = x["rollback"]
            if not b["lock_timeout_retries"]:
                continue
            who = "; ".join(", ".join(t) or "nobody left" for t in b.get("lock_timeout_blockers")
                            or [])
            parts.append(
                f"{int(size):,} rows round {i}: {b['lock_timeout_retries']} retries "
                f"(blockers per try: {who or 'not recorded'}), "
                f"{b.get('autovacuum_cancelled') or 0} autovacuum cancelled"
            )
    return (
        "Each failed try gives way after lock_timeout and the application resumes; the "
        "application statement stalled longest is the one queued behind a waiting try. "
        + ("; ".join(parts) + "." if parts else "")
        + " (Earlier runs found the reverse swap locking the table before its view, a "
        "deadlock with every statement through the view, and no drain between retries: both "
        "fixed before these runs.)"
    )


def _planning(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = r["targets"]
    big = r["runs"][str(r["sizes"][-1])]
    small = r["runs"][str(r["sizes"][0])]
    if t["total_under_target"]["met"] is False:
        sec = big["seconds"]
        out.append(
            f"- **Planning at {big['tables']:,} tables: {sec['total']:.1f} s (target 10 s)** - "
            f"validate {sec['validate']:.1f} s, graph {sec['graph']:.1f} s, dry-run "
            f"{sec['dry_run']:.1f} s; at {small['tables']:,} tables "
            f"{small['seconds']['total']:.1f} s: the time grows with the tables, about "
            f"{sec['total'] / max(small['seconds']['total'], 1e-9):.1f}x for "
            f"{big['tables'] / small['tables']:.0f}x, with a constant number of statements. "
            "The profile of the dry-run (below) shows where: waiting on the server's answers "
            "to the catalog reads, turning their rows into dicts, composing and rendering each "
            "table's statements, and rich's text for the report. Each is linear in the "
            "tables; under 10 s needs all of them cheaper (a catalog read of what validate "
            "already read, statements rendered only when shown)."
        )
    if t["constant_statements"]["met"] is False or t["constant_server_statements"]["met"] is False:
        out.append(
            "- **Statement count not constant:** sites that differ: "
            + str(r.get("statement_sites_that_differ"))
        )
    return out


def _remote(r: dict[str, Any]) -> list[str]:
    t = r.get("targets") or {}
    out: list[str] = []
    sync = t.get("sync_vs_dump_restore")
    if sync and not sync.get("met"):
        out.append(
            f"- **The initial sync to another server: {sync['value']:.2f}x `pg_dump -t | psql`** "
            "(target 1.00x; by hand before the code, a plain subscription's sync plus the two "
            "index builds came to 1.12x). What limits it: the target table has its primary key "
            "during the subscription's COPY (the subscriber needs a key to apply the "
            "catch-up's UPDATEs and DELETEs, and the tablesync worker goes from COPY to "
            "catch-up with no step between; pg_dump builds the key after its COPY), and the "
            "fixed costs of a slot, a subscription and the launcher's start (about 0.3 s; "
            "at 100,000 rows they make the ratio 1.3x). The secondary indexes are built "
            "after the sync, as pg_dump's restore does.")
    writes = t.get("source_writes_subscribed")
    if writes and not writes.get("met"):
        out.append(
            f"- **The source's write throughput while subscribed: {writes['value']:.2f}x** of "
            "no subscription (target 0.90x). What limits it here: both servers run on this "
            "one 2-core machine, so the walsender decoding every write on the source and the "
            "target's apply worker (committing synchronously, which the cutover's short "
            "drain needs) take cores from pgbench; on a target of its own the source pays "
            "only the decoding and sending. Not measured apart here: no second machine.")
    stall = t.get("cutover_stall_ms")
    if stall and not stall.get("met"):
        parts = r.get("cutover_parts_ms") or {}
        out.append(
            f"- **The application's worst statement during a cross-server cutover: "
            f"{stall['value']:.0f} ms** (target under 100 ms), under a pgbench that saturates "
            "both cores. The swap's last try spent "
            f"{parts.get('drain', '?')} ms draining, {parts.get('target', '?')} ms on the "
            f"target's part and {parts.get('source', '?')} ms on the source's under the lock "
            "(cutover_parts_ms); the rest of the worst statement's wait is the lock's own "
            "queue behind the application's transactions and the tries that gave way.")
    return out


def missed(r: dict[str, dict[str, Any] | None]) -> list[str]:
    out = ["## Missed targets and what limits them", ""]
    items: list[str] = []
    for name, fn in (
        ("copy", _copy),
        ("dualwrite", _dualwrite),
        ("cutover", _cutover),
        ("planning", _planning),
        ("remote", _remote),
    ):
        res = r.get(name)
        if res:
            items += fn(res)
    out += items or ["None: every target was met."]
    out.append("")
    return out

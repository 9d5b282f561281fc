"""The missed targets, stated plainly, with what limits each.

Everything numeric here comes from the results of the run. Two paragraphs also cite
diagnostic experiments that are not part of `make bench` (they patch the engine in memory, which
the benchmark never does); they are marked as such, with how to repeat them.
"""

from __future__ import annotations

from typing import Any


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
            out.append(
                f"- **Copy, {label}: {s['ratio_to_limit']:.2f}x the limit (target 1.00x).** "
                f"In heap order with two workers the batches take {ob['batches_s']:.2f} s "
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
            "and our target have their key during the load. Building the target's key after "
            "the copy needs the finish to build it before the drain (replay looks keys up) and "
            "a crash-safe record of that step; not built."
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
    u = (r.get("embedded") or {}).get("under_load")
    if u and u.get("tps_during_over_without") is not None:
        out.append(
            f"- **Copy under load: the application kept {u['tps_during_over_without']:.2f}x of "
            "its TPS (target 0.80x with an adaptive policy).** Two copy workers take both "
            "cores; the adaptive copy policy is not built."
        )
    if r.get("pg_repack_unavailable"):
        out.append(f"- **pg_repack unavailable:** {r['pg_repack_unavailable']}; not compared.")
    return out


def _dualwrite(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = r["targets"]
    s, m = r["single"], r["multi"]
    bare = s["ratio_to_none"].get("bare_log")
    cap = s["ratio_to_none"]["capture"]
    rep = s["ratio_to_none"]["capture_replay"]
    if t["single_row_capture"]["met"] is False:
        out.append(
            f"- **Dual-write, single-row mix: {cap:.2f} of the no-trigger TPS (target 0.80).** "
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
            "no-trigger TPS (target 0.80).** A statement touching 110 rows fires the row "
            "trigger 110 times, each a single-row INSERT into the log (with its two index "
            "entries), while the statement itself is set-based and cheap per row: the "
            "per-row trigger cost is a larger share. What would change it: a statement-level "
            "AFTER trigger with transition tables (one INSERT ... SELECT into the log per "
            "statement) for multi-row statements; docs/design.md records the statement-level "
            "variant at 0.73 on single-row writes, so it is a trade, not a free win."
        )
    if t["single_row_capture_with_replay"]["met"] is False:
        out.append(
            f"- **Dual-write with the replayer beside the clients: {rep:.2f}** (informational "
            "target 0.80; docs/design.md records 0.77 for this design). Replaying re-reads every "
            "logged key from the source and rewrites the target row: on a busy server it "
            "costs about what a synchronous mirror costs, as docs/design.md records. The log "
            "design's "
            "answer is to defer: the capture alone is the cost while the copy runs, and the "
            "replay can wait for a quiet moment (`apply --follow` replays continuously; there "
            "is no throttle on the replayer today)."
        )
    return out


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


def missed(r: dict[str, dict[str, Any] | None]) -> list[str]:
    out = ["## Missed targets and what limits them", ""]
    items: list[str] = []
    for name, fn in (
        ("copy", _copy),
        ("dualwrite", _dualwrite),
        ("cutover", _cutover),
        ("planning", _planning),
    ):
        res = r.get(name)
        if res:
            items += fn(res)
    out += items or ["None: every target was met."]
    out.append("")
    return out

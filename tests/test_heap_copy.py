"""The copy in heap order with two workers (issue 14): each worker commits its own block
range's checkpoint; under the application's writes, after a SIGKILL, and when the source is
rewritten under it, nothing is lost and nothing is invented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import stress

Conn = Any
WORKERS_PLAN = "  batch_size: 5000\n  copy_workers: 2\n"


def checkpoint(db: Conn) -> dict[str, Any]:
    row = db.execute("SELECT checkpoint FROM _orchestrator.stages WHERE table_name = 'turns' "
                     "AND stage = 'copy'").fetchone()
    return dict(row["checkpoint"])


@pytest.fixture
def plan(tmp_path: Path) -> str:
    """The Cogito plan, copying with two workers whatever this machine's CPUs."""
    text = Path(stress.PLAN).read_text(encoding="utf-8").replace(
        "  batch_size: 5000\n", WORKERS_PLAN)
    assert "copy_workers: 2" in text
    path = tmp_path / "cogito.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_two_workers_copy_their_own_ranges_under_writes(
    cogito_dsn: str, plan: str, writer: stress.Writer,
) -> None:
    stress.throttle(cogito_dsn, "turns", 200, 20)  # many batches, interleaved with writes
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "copy")
    db = stress.connect(cogito_dsn)
    cp = checkpoint(db)
    assert cp["mode"] == "heap" and len(cp["ranges"]) == 2
    assert all(r["next"] == r["hi"] for r in cp["ranges"])
    assert stress.events(db, "turns", "copy", "started") == 1
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "verify")
    writer.stop.set()
    writer.join(timeout=10)
    assert writer.writes > 30
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "verify")
    extra, lost, n_new, n_old = stress.except_both_ways(db, "turns", source_schema="public")
    assert (extra, lost) == (0, 0) and n_new == n_old
    db.close()


def test_a_sigkill_mid_copy_resumes_each_range_to_equality(
    cogito_dsn: str, plan: str, writer: stress.Writer,
) -> None:
    stress.throttle(cogito_dsn, "turns", 100, 100)
    db = stress.connect(cogito_dsn)
    proc = stress.Proc(cogito_dsn, "apply", plan, "--table", "turns", "--until", "copy")
    stress.wait_until("a few batches of both workers",
                      lambda: stress.stage(db, "turns", "copy")["rows_done"] >= 300)
    assert proc.kill()
    proc.close()
    cp = stress.stage(db, "turns", "copy")
    assert cp["status"] == "running"
    # What the target holds is exactly what the committed checkpoints count.
    assert stress.count(db, "conversation", "turns") == cp["rows_done"]
    stress.throttle(cogito_dsn, "turns", 5000, 0)
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "copy")
    assert stress.events(db, "turns", "copy", "started") == 1  # resumed, not restarted
    writer.stop.set()
    writer.join(timeout=10)
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "verify")
    extra, lost, n_new, n_old = stress.except_both_ways(db, "turns", source_schema="public")
    assert (extra, lost) == (0, 0) and n_new == n_old
    db.close()


def test_a_rewrite_of_the_source_mid_copy_stops_it_and_a_recopy_is_exact(
    cogito_dsn: str, plan: str,
) -> None:
    stress.throttle(cogito_dsn, "turns", 100, 200)
    db = stress.connect(cogito_dsn)
    proc = stress.Proc(cogito_dsn, "apply", plan, "--table", "turns", "--until", "copy")
    stress.wait_until("a batch", lambda: stress.stage(db, "turns", "copy")["rows_done"] > 0)
    db.execute("VACUUM FULL public.turns")  # every row moves
    code, output = proc.finish(timeout=120)
    assert code == 1
    said = " ".join(output.split())
    assert "the source was rewritten during the copy" in said, said
    assert "rollback" in said and "--to dual_write" in said
    stress.ok(cogito_dsn, "rollback", plan, "--table", "turns", "--to", "dual_write", "--yes")
    stress.throttle(cogito_dsn, "turns", 5000, 0)
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "verify")
    extra, lost, n_new, n_old = stress.except_both_ways(db, "turns", source_schema="public")
    assert (extra, lost) == (0, 0) and n_new == n_old
    db.close()


def test_a_table_prepared_for_heap_order_and_copied_by_key_gets_its_key(
    cogito_dsn: str, plan: str, tmp_path: Path,
) -> None:
    """Prepare leaves the key out for a heap-order copy; if the plan then says copy_order:
    key, the keyset copy's finish builds it before its drain, which looks rows up by key."""
    db = stress.connect(cogito_dsn)
    stress.ok(cogito_dsn, "apply", plan, "--table", "turns", "--until", "dual_write")
    assert not has_key(db)
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(Path(plan).read_text(encoding="utf-8").replace(
        WORKERS_PLAN, "  batch_size: 500\n  copy_order: key\n"), encoding="utf-8")
    db.execute("UPDATE public.turns SET content = content || '!' WHERE id % 7 = 0")
    stress.ok(cogito_dsn, "apply", str(keyed), "--table", "turns", "--until", "verify")
    assert has_key(db)
    extra, lost, n_new, n_old = stress.except_both_ways(db, "turns", source_schema="public")
    assert (extra, lost) == (0, 0) and n_new == n_old
    db.close()


def has_key(db: Conn) -> bool:
    row = db.execute("SELECT EXISTS (SELECT FROM pg_constraint WHERE contype = 'p' AND "
                     "conrelid = 'conversation.turns'::regclass) AS ok").fetchone()
    return bool(row["ok"])

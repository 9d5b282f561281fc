"""The Prometheus endpoint (issue 16): scraped during a move, its values are the status
model's, as `status --format json` reports them."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row
from test_cutover_control import cli, start, wait_for

Conn = psycopg.Connection[Any]
PLAN = """version: 1
name: ctl
defaults: {batch_size: 100}
tables:
  - name: orders
    schema: dom
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    key = (name, tuple(sorted({"plan": "ctl", **labels}.items())))
    return samples.get(key)


@pytest.fixture
def shop(empty_dsn: str, tmp_path: Path) -> Iterator[tuple[str, str, Conn, int]]:
    db = psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row)
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total int)")
    db.execute("INSERT INTO orders SELECT g, g FROM generate_series(1, 3000) g")
    db.execute("ANALYZE orders")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    port = free_port()
    server = start(empty_dsn, "metrics", str(plan), "--listen", f"127.0.0.1:{port}")
    wait_for("the endpoint", lambda: _answers(port))
    try:
        yield empty_dsn, str(plan), db, port
    finally:
        server.terminate()
        server.communicate(timeout=10)
        db.close()


def _answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_the_metrics_follow_a_move_and_match_the_status(
    shop: tuple[str, str, Conn, int],
) -> None:
    dsn, plan, db, port = shop
    before = scrape(port)
    assert value(before, "orchestrator_up") == 1.0
    assert value(before, "orchestrator_stage", table="orders", stage="copy",
                 status="pending") == 1.0

    # During the copy (slowed down by the operator's throttle), the rows climb.
    assert cli(dsn, "set", plan, "sleep_ms", "50").returncode == 0
    apply = start(dsn, "apply", plan)
    copying = wait_for("the copy to be under way", lambda: (
        (s := scrape(port)) and 0 < (value(s, "orchestrator_rows_copied_total",
                                           table="orders") or 0) < 3000 and s))
    assert value(copying, "orchestrator_current_stage", table="orders", stage="copy",
                 status="running") == 1.0
    assert (value(copying, "orchestrator_rows_per_second", table="orders", stage="copy")
            or 0) > 0
    assert apply.wait(timeout=120) == 0

    # Between stages: the application wrote three rows, waiting in the capture log.
    db.execute("UPDATE public.orders SET total = 0 WHERE id IN (1, 2, 3)")
    status = json.loads(cli(dsn, "status", plan, "--format", "json").stdout)
    samples = scrape(port)
    orders = status["tables"][0]
    assert value(samples, "orchestrator_rows_copied_total", table="orders") == \
        orders["stages"]["copy"]["rows_done"] == 3000
    assert value(samples, "orchestrator_capture_log_depth", table="orders") == \
        orders["log_depth"] == 3
    assert value(samples, "orchestrator_current_stage", table="orders",
                 stage=orders["stage"], status=orders["state"]) == 1.0
    for stage, s in orders["stages"].items():
        assert value(samples, "orchestrator_stage", table="orders", stage=stage,
                     status=s["status"]) == 1.0
    assert value(samples, "orchestrator_lock_waits_total", table="orders") == \
        orders["lock_waits"]
    age = value(samples, "orchestrator_seconds_since_verified", table="orders")
    assert age is not None and abs(age - orders["verified_age_s"]) < 5

    # The cutover's hold lands in the histogram.
    assert cli(dsn, "cutover", plan, "--yes").returncode == 0
    after = scrape(port)
    assert value(after, "orchestrator_cutover_hold_milliseconds_count") == 1.0
    assert (value(after, "orchestrator_cutover_hold_milliseconds_sum") or 0) > 0


def test_a_scrape_without_the_database_says_up_0(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN, encoding="utf-8")
    port = free_port()
    proc = start("host=127.0.0.1 port=1 dbname=none connect_timeout=1", "metrics", str(plan),
                 "--listen", f"127.0.0.1:{port}")
    try:
        samples = wait_for("the endpoint", lambda: _answers(port) and scrape(port))
        assert value(samples, "orchestrator_up") == 0.0
    finally:
        proc.terminate()
        proc.communicate(timeout=10)

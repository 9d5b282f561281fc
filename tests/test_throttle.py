"""Throttling that follows the server: the copy pauses while a load check is over its limit,
and resumes when the operator raises the limit while it runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import yaml
from conftest import COGITO_PLAN

from orchestrator.db import connect
from orchestrator.plan import parse_plan
from orchestrator.run.events import Event, Paused
from orchestrator.run.session import session
from orchestrator.state.store import Store


def _plan(tmp_path: Path, throttle: dict[str, Any]) -> Any:
    data = yaml.safe_load(COGITO_PLAN.read_text(encoding="utf-8"))
    data["defaults"]["batch_size"] = 200
    # One worker, many batches: the WAL meter needs two looks between batches to measure.
    data["defaults"]["copy_workers"] = 1
    data["defaults"]["throttle"] = {"check_every_s": 0.1, **throttle}
    path = tmp_path / "throttled.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return parse_plan(path.read_text(encoding="utf-8"), str(path))


PAUSED = threading.Event()


def _raise_later(dsn: str, key: str, value: float, after_s: float) -> threading.Thread:
    """The operator raises the limit `after_s` after the copy first paused (a machine under
    load may take longer than that to reach its first measured batch)."""
    PAUSED.clear()

    def work() -> None:
        PAUSED.wait(timeout=60)
        time.sleep(after_s)
        with connect(dsn, autocommit=True) as conn, conn.transaction():
            Store(conn, "_orchestrator", "cogito").put_setting(key, value)

    t = threading.Thread(target=work)
    t.start()
    return t


def _copy_with_events(dsn: str, loaded: Any) -> list[Event]:
    events: list[Event] = []

    def seen(e: Event) -> None:
        events.append(e)
        if isinstance(e, Paused):
            PAUSED.set()

    with session(dsn, loaded, seen) as eng:
        eng.apply(["turns"], "copy")
        assert eng.done("turns", "copy")
    return events


def test_a_load_probe_over_its_limit_pauses_the_copy_until_raised(
    cogito_dsn: str, tmp_path: Path
) -> None:
    loaded = _plan(tmp_path, {"probe_sql": "SELECT 5", "probe_max": 1})
    releaser = _raise_later(cogito_dsn, "probe_max", 10, after_s=1.0)
    started = time.monotonic()
    events = _copy_with_events(cogito_dsn, loaded)
    releaser.join()
    paused = [e for e in events if isinstance(e, Paused)]
    assert paused and "load probe 5.0 > 1" in paused[0].reason
    assert time.monotonic() - started >= 1.0


def test_a_wal_rate_over_its_limit_pauses_the_copy_until_raised(
    cogito_dsn: str, tmp_path: Path
) -> None:
    # Small batches a little apart, so the meter sees the copy's own WAL between batches.
    loaded = _plan(tmp_path, {"max_wal_bytes_per_s": 1, "sleep_ms": 60})
    releaser = _raise_later(cogito_dsn, "max_wal_bytes_per_s", 10**12, after_s=1.0)
    events = _copy_with_events(cogito_dsn, loaded)
    releaser.join()
    assert any(isinstance(e, Paused) and "WAL rate" in e.reason for e in events)

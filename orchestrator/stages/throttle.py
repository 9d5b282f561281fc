"""What slows the copy down for the server's sake: the operator's pause and sleep between
batches, replication lag, the WAL rate and the plan's load probe, read again before every
batch (keyset or heap order, every worker) with the operator's `set` values over the plan's."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from orchestrator.db import Conn
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.run.events import Paused
from orchestrator.stages.pace import Policy


@dataclass
class Throttle:
    """Pauses between batches and while the server is loaded; re-read every batch."""

    sleep_ms: int
    max_lag_bytes: int | None
    max_wal_rate: int | None
    probe_sql: str | None
    probe_max: float | None
    check_every_s: float
    adaptive: bool
    yield_goal: float

    @property
    def policy(self) -> Policy:
        """How the copy paces itself between batches (stages/pace.py)."""
        return Policy(adaptive=self.adaptive, goal=self.yield_goal)


@dataclass
class WalMeter:
    """The server's WAL write rate between two looks (bytes per second)."""

    at: float = 0.0
    lsn: int = 0

    def rate(self, conn: Conn) -> float | None:
        r = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint AS lsn").fetchone()
        now, lsn = time.monotonic(), int(r["lsn"]) if r else 0
        if self.at == 0.0:
            self.at, self.lsn = now, lsn
            return None
        if now - self.at < 0.05:
            return None  # too short a window to measure: keep the older sample
        rate = (lsn - self.lsn) / (now - self.at)
        self.at, self.lsn = now, lsn
        return rate


def _throttle(ctx: Ctx, m: TableMove, cfg: dict[str, Any]) -> Throttle:
    """The throttle from the plan, with the operator's `set` values (`cfg`) over it."""
    t = ctx.plan.defaults.throttle
    return Throttle(
        sleep_ms=int(cfg.get("sleep_ms", t.sleep_ms)),
        max_lag_bytes=cfg.get("max_replication_lag_bytes", t.max_replication_lag_bytes),
        max_wal_rate=cfg.get("max_wal_bytes_per_s", t.max_wal_bytes_per_s),
        probe_sql=t.probe_sql,
        probe_max=cfg.get("probe_max", t.probe_max),
        check_every_s=t.check_every_s,
        adaptive=bool(cfg.get("adaptive", t.adaptive)),
        yield_goal=float(cfg.get("yield_goal", t.yield_goal)),
    )


def server_busy(conn: Conn, t: Throttle, wal: WalMeter | None = None) -> str | None:
    """Why the copy should pause now, or None."""
    if t.max_wal_rate is not None and wal is not None:
        rate = wal.rate(conn)
        if rate is not None and rate > t.max_wal_rate:
            return f"WAL rate {rate:,.0f} bytes/s > {t.max_wal_rate:,}"
    if t.max_lag_bytes is not None:
        r = conn.execute(
            "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint AS lag "
            "FROM pg_stat_replication"
        ).fetchone()
        if r and r["lag"] is not None and r["lag"] > t.max_lag_bytes:
            return f"replication lag {r['lag']} bytes > {t.max_lag_bytes}"
    if t.probe_sql is not None and t.probe_max is not None:
        # The probe is the plan author's own monitoring query, run read-only.
        r = conn.execute(sql.SQL(t.probe_sql)).fetchone()
        value = float(next(iter(r.values()))) if r else 0.0
        if value > t.probe_max:
            return f"load probe {value} > {t.probe_max}"
    return None


def wait_for_server(ctx: Ctx, m: TableMove, wal: WalMeter) -> tuple[dict[str, Any], Throttle]:
    """The operator's current settings, once the server is not too busy for a batch."""
    while True:
        cfg = ctx.store.settings(m.label)
        t = _throttle(ctx, m, cfg)
        reason = ("paused by the operator (`orchestrator set PLAN paused false` resumes)"
                  if cfg.get("paused") is True else server_busy(ctx.conn, t, wal))
        if reason is None:
            return cfg, t
        ctx.progress(Paused(m.label, "copy", reason))
        time.sleep(t.check_every_s)

"""Prometheus metrics: the status model (observe/status.py) in the text exposition format,
served with the official client library.

A collector reads the model afresh at every scrape through a function the caller gives
(which opens its own connection), so the endpoint shows what `status --format json` would
show at that moment, and a scrape that cannot reach the database answers `orchestrator_up 0`
instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from orchestrator.errors import OrchestratorError
from orchestrator.observe.status import PlanStatus, TableStatus

# Buckets of the cutover hold histogram, in milliseconds (the goal is < 100 ms).
HOLD_BUCKETS_MS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0)

Read = Callable[[], PlanStatus]


class StatusCollector(Collector):
    """Turns one status read into the plan's metric families."""

    def __init__(self, read: Read, plan: str) -> None:
        self.read = read
        self.plan = plan

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("orchestrator_up", "1 if the control schema could be read.",
                               labels=["plan"])
        try:
            ps = self.read()
        except Exception:  # a scrape reports the failure as up 0
            up.add_metric([self.plan], 0.0)
            yield up
            return
        up.add_metric([ps.plan], 1.0)
        yield up
        yield from families(ps)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["plan", *labels])


def families(ps: PlanStatus) -> list[Metric]:
    """Every metric family of one status read."""
    p = ps.plan
    stage = _gauge("orchestrator_stage", "1 for each stage of each table, labelled with its "
                   "status.", ["table", "stage", "status"])
    current = _gauge("orchestrator_current_stage", "1 for the stage each table is at (\"\" "
                     "once final), labelled with its status.", ["table", "stage", "status"])
    copied = CounterMetricFamily("orchestrator_rows_copied", "Rows the copy stage has copied "
                                 "(reset by a rollback of the copy).", labels=["plan", "table"])
    per_table: dict[str, tuple[GaugeMetricFamily, Callable[[TableStatus], float | None]]] = {
        "log": (_gauge("orchestrator_capture_log_depth", "Captured changes waiting to be "
                       "replayed.", ["table"]), lambda t: t.log_depth),
        "catch_up": (_gauge("orchestrator_log_catch_up_seconds", "Seconds until the "
                            "replayer (apply --follow) empties the capture log at its last "
                            "measured rates (absent while it does not catch up).", ["table"]),
                     lambda t: t.replay.catch_up_s if t.replay else None),
        "verified": (_gauge("orchestrator_seconds_since_verified", "Seconds since every chunk "
                            "was last proven equal.", ["table"]), lambda t: t.verified_age_s),
        "paused": (_gauge("orchestrator_paused", "1 while the operator holds the copy.",
                          ["table"]), lambda t: float(t.paused)),
        "error": (_gauge("orchestrator_failed", "1 while the table's current stage failed.",
                         ["table"]), lambda t: float(t.state == "failed")),
        "waiting": (_gauge("orchestrator_waiting", "1 while a gate or the stall forecast "
                           "holds the table's swap.", ["table"]), lambda t: float(bool(t.waiting))),
    }
    # Of the loop stage at work (copy, then verify), labelled with it.
    loop: dict[str, tuple[GaugeMetricFamily, Callable[[TableStatus], float | None]]] = {
        "estimated": (_gauge("orchestrator_rows_estimated", "Rows the loop stage expects.",
                             ["table", "stage"]), lambda t: t.rows_estimated),
        "rate": (_gauge("orchestrator_rows_per_second", "Rows per second of the running loop "
                        "stage.", ["table", "stage"]), lambda t: t.rate),
        "eta": (_gauge("orchestrator_eta_seconds", "Seconds left in the running loop stage.",
                       ["table", "stage"]), lambda t: t.eta_s),
    }
    waits = CounterMetricFamily("orchestrator_lock_waits", "Tries that gave way on their "
                                "locks after lock_timeout.", labels=["plan", "table"])
    retries = CounterMetricFamily("orchestrator_retries", "Stage attempts beyond the first.",
                                  labels=["plan", "table"])
    for t in ps.tables:
        for name, s in t.stages.items():
            stage.add_metric([p, t.name, name, s.status], 1.0)
        current.add_metric([p, t.name, t.stage, t.state], 1.0)
        if "copy" in t.stages:
            copied.add_metric([p, t.name], float(t.stages["copy"].rows_done))
        for family, value in per_table.values():
            v = value(t)
            if v is not None:
                family.add_metric([p, t.name], float(v))
        for family, value in loop.values():
            v = value(t)
            if v is not None and t.progress_stage:
                family.add_metric([p, t.name, t.progress_stage], float(v))
        waits.add_metric([p, t.name], float(t.lock_waits))
        retries.add_metric([p, t.name], float(t.retries))
    plan_eta = _gauge("orchestrator_plan_eta_seconds", "Seconds left in the plan's running "
                      "loop stages.", [])
    if ps.eta_s is not None:
        plan_eta.add_metric([p], ps.eta_s)
    return [stage, current, copied, *(f for f, _ in per_table.values()),
            *(f for f, _ in loop.values()), waits, retries, plan_eta, hold_histogram(ps)]


def hold_histogram(ps: PlanStatus) -> HistogramMetricFamily:
    """Every swap's lock hold (its transaction's time after the lock was granted), a
    unit's swap once."""
    holds = list(ps.holds_ms)
    buckets: list[tuple[str, float]] = [
        (str(le), float(sum(h <= le for h in holds))) for le in HOLD_BUCKETS_MS]
    buckets.append(("+Inf", float(len(holds))))
    fam = HistogramMetricFamily("orchestrator_cutover_hold_milliseconds",
                                "Time each cutover held its locks, in milliseconds.",
                                labels=["plan"])
    fam.add_metric([ps.plan], buckets, sum_value=sum(holds))
    return fam


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        """'127.0.0.1:9187' (or ':9187', loopback)."""
        host, _, port = text.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise OrchestratorError(f"--listen {text!r}: not HOST:PORT",
                                    hint="write it as 127.0.0.1:9187")
        return cls(host or "127.0.0.1", int(port))


def serve(read: Read, plan: str, listen: Listen) -> Any:
    """Serve /metrics in a background thread; returns the server (its `shutdown()` stops
    it)."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(read, plan))
    try:
        server, _thread = start_http_server(listen.port, listen.host, registry=registry)
    except OSError as exc:
        raise OrchestratorError(
            f"--listen {listen.host}:{listen.port}: cannot listen there: {exc.strerror}",
            hint="pick a free port (another orchestrator metrics may be running)") from None
    return server

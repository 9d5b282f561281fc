"""Hooks: the operator's commands run on phase changes (gh-ost's habit), and the
before-cutover gate.

The dispatcher sits between the engine and the reporter: it sees every typed progress event
(run/events.py), runs the hooks named for it, and passes the event on. Each command gets the
event as one JSON document on stdin and as ORCHESTRATOR_* environment variables, runs with a
timeout, and never stops the move by failing, except a `before-cutover` hook: the cutover
gates (run/gates.py) ask it before every swap, and a non-zero exit (or a timeout) holds the
swap, asked again every `recheck_s`, until it exits 0. Hooks run synchronously, outside our
transactions (progress events are emitted after a commit), so a slow hook delays the move
but never holds a lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator import log
from orchestrator.errors import OrchestratorError
from orchestrator.plan import HOOK_EVENTS, Hook, Plan
from orchestrator.run.events import (
    Event,
    Paused,
    Progress,
    Rows,
    StageChanged,
    StageFailed,
    StageStarted,
)
from orchestrator.stages.base import Phase
from orchestrator.stages.registry import STRATEGIES

GATE = "before-cutover"
_SWAPS = {s.swap.name for s in STRATEGIES.values()}
_PHASE = {st.name: st.phase for s in STRATEGIES.values() for st in s.stages}


def parse(texts: Iterable[str]) -> tuple[Hook, ...]:
    """`--hook EVENT=COMMAND` (repeatable) as hooks."""
    hooks = []
    for text in texts:
        event, sep, command = text.partition("=")
        if not sep or not command.strip() or event not in HOOK_EVENTS:
            raise OrchestratorError(
                f"--hook {text!r}: not EVENT=COMMAND with a known event",
                hint=f"events: {', '.join(HOOK_EVENTS)}; e.g. --hook 'after-copy=./notify.sh'")
        hooks.append(Hook(events=[event], run=command))
    return tuple(hooks)


@dataclass(frozen=True)
class Ran:
    """What one hook command did."""

    command: str
    code: int | None  # None: killed at its timeout
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        how = "timed out" if self.code is None else f"exited {self.code}"
        tail = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
        return f"{self.command!r} {how}" + (f": {tail[0][:200]}" if tail else "")


def run_hook(hook: Hook, payload: dict[str, Any]) -> Ran:
    """Run one hook with the event on stdin and in its environment."""
    env = dict(os.environ)
    env.update({
        "ORCHESTRATOR_EVENT": str(payload["event"]),
        "ORCHESTRATOR_PLAN": str(payload["plan"]),
        "ORCHESTRATOR_TABLE": str(payload.get("table") or ""),
        "ORCHESTRATOR_STAGE": str(payload.get("stage") or ""),
        "ORCHESTRATOR_STATUS": str(payload.get("status") or ""),
        "ORCHESTRATOR_JSON": json.dumps(payload, default=str),
    })
    try:
        # The command is the operator's own, from their plan or command line.
        done = subprocess.run(
            ["/bin/sh", "-c", hook.run], input=json.dumps(payload, default=str) + "\n",
            capture_output=True, text=True, env=env, timeout=hook.timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Ran(hook.run, None, err)
    return Ran(hook.run, done.returncode, done.stderr)


@dataclass
class Hooks:
    """The dispatcher: a Progress that runs the hooks of each event, then passes it on."""

    plan: str
    hooks: tuple[Hook, ...]
    downstream: Progress
    _progress_seen: dict[tuple[int, str], int] = field(default_factory=dict)
    _gate_result: tuple[float, str | None] | None = None
    failure_fired: bool = False

    @classmethod
    def of(cls, plan: Plan, extra: Iterable[Hook], downstream: Progress) -> Hooks:
        return cls(plan.name, (*plan.hooks, *extra), downstream)

    def __call__(self, event: Event) -> None:
        for name, payload in self._events(event):
            self.fire(name, payload)
        self.downstream(event)

    def _events(self, event: Event) -> list[tuple[str, dict[str, Any]]]:
        base: dict[str, Any] = {"table": getattr(event, "table", None),
                                "stage": getattr(event, "stage", None)}
        if isinstance(event, StageStarted):
            if event.reverse:
                return [("before-rollback", base)]
            # A swap's before-cutover is the gate, asked before the swap's wait.
            return [] if event.stage in _SWAPS else [(f"before-{event.stage}", base)]
        if isinstance(event, StageChanged):
            status = {**base, "status": event.status}
            if event.status == "rolled_back":
                return [("rollback", status)]
            if event.status != "done":
                return []
            after = [(f"after-{event.stage}", status)]
            return after + ([("cutover-done", status)] if event.stage in _SWAPS else [])
        if isinstance(event, StageFailed):
            self.failure_fired = True
            return [("failure", {**base, "status": "failed", "error": event.error})]
        if isinstance(event, Paused) and _PHASE.get(event.stage) == Phase.swap:
            return [("cutover-postponed", {**base, "reason": event.reason})]
        if isinstance(event, Rows) and event.stage == "copy":
            return self._progress(event, base)
        return []

    def _progress(self, event: Rows, base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if not event.rows_estimated:
            return []
        pct = min(100.0, 100.0 * event.rows_done / event.rows_estimated)
        fired = []
        for i, hook in enumerate(self.hooks):
            if "copy-progress" not in hook.events and "*" not in hook.events:
                continue
            step = int(pct // hook.every_pct)
            key = (i, event.table)
            if step > self._progress_seen.get(key, 0):
                self._progress_seen[key] = step
                fired.append(i)
        if not fired:
            return []
        return [("copy-progress", {**base, "rows_done": event.rows_done,
                                   "rows_estimated": event.rows_estimated,
                                   "percent": round(pct, 1), "_only": fired})]

    def _payload(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {"event": name, "plan": self.plan, "at": datetime.now(UTC).isoformat(),
                **{k: v for k, v in payload.items() if not k.startswith("_")}}

    def fire(self, name: str, payload: dict[str, Any]) -> list[Ran]:
        """Run the hooks of one event; their failures are logged, never raised."""
        only = payload.get("_only")
        body = self._payload(name, payload)
        ran = []
        for i, hook in enumerate(self.hooks):
            if (name in hook.events or "*" in hook.events) and (only is None or i in only):
                r = run_hook(hook, body)
                ran.append(r)
                if not r.ok:
                    log.get().warning("hook failed", hook_event=name, result=r.describe())
        return ran

    def failed(self, error: str) -> None:
        """A command stopped on an error no stage recorded (a failure hook fires once)."""
        if not self.failure_fired:
            self.failure_fired = True
            self.fire("failure", {"status": "failed", "error": error})

    def gate(self, tables: list[str], stage: str) -> str | None:
        """Ask the before-cutover hooks: None to go, else why the swap waits. While they
        hold it, the answer is kept for `recheck_s` (the gates look every second)."""
        hooks = [h for h in self.hooks if GATE in h.events or "*" in h.events]
        if not hooks:
            return None
        now = time.monotonic()
        if self._gate_result is not None and self._gate_result[1] is not None and \
                now - self._gate_result[0] < min(h.recheck_s for h in hooks):
            return self._gate_result[1]
        body = self._payload(GATE, {"table": ",".join(tables), "stage": stage,
                                    "tables": tables})
        failed = [r for r in (run_hook(h, body) for h in hooks) if not r.ok]
        why = None if not failed else "; ".join(
            f"before-cutover hook {r.describe()}" for r in failed)
        self._gate_result = (now, why)
        return why

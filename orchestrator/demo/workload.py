"""A simulated application: threads writing to the Cogito tables by their public names.

Used by the demo (and by soak runs) to show the move under live traffic. It measures its own
latency, so "the longest application wait" is the application's view, not ours.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import errors

# Statements the application sends, unchanged before and after the move.
_OPS: dict[str, str] = {
    "insert_turn": "INSERT INTO public.turns (participant_id, content, metadata) "
                   "SELECT id, %(text)s, '{}'::jsonb FROM public.participants "
                   "ORDER BY id LIMIT 1 OFFSET %(off)s RETURNING id",
    "update_turn": "UPDATE public.turns SET content = %(text)s WHERE id = %(id)s",
    "delete_turn": "DELETE FROM public.turns t WHERE id = %(id)s AND NOT EXISTS ("
                   "SELECT 1 FROM public.block_turns b WHERE b.turn_id = t.id) AND NOT EXISTS ("
                   "SELECT 1 FROM public.turns r WHERE r.reply_to_turn_id = t.id)",
    "update_user": "UPDATE public.users SET auth_info = jsonb_build_object('seen', %(text)s::text) "
                   "WHERE id = %(uid)s",
    "read_turns": "SELECT count(*) FROM public.turns WHERE participant_id = %(pid)s",
}
_TRANSIENT = (errors.LockNotAvailable, errors.SerializationFailure, errors.DeadlockDetected,
              errors.ForeignKeyViolation, errors.UndefinedTable, errors.QueryCanceled,
              errors.ObjectInUse)


@dataclass
class Stats:
    writes: int = 0
    reads: int = 0
    errors: int = 0
    retried: int = 0
    max_wait_ms: float = 0.0
    last_error: str = ""
    by_op: dict[str, int] = field(default_factory=dict)


class Workload:
    """Threads that keep writing until stopped."""

    def __init__(self, dsn: str, threads: int = 2, pause_s: float = 0.005, seed: int = 7) -> None:
        self.dsn = dsn
        self.n = threads
        self.pause_s = pause_s
        self.seed = seed
        self.stats = Stats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self.n):
            t = threading.Thread(target=self._run, args=(self.seed + i,), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(self.dsn, autocommit=True, application_name="demo-app") as conn:
            bounds = conn.execute("SELECT min(id), max(id) FROM public.turns").fetchone()
            lo, hi = (bounds[0] or 1, bounds[1] or 1) if bounds else (1, 1)
            users = conn.execute("SELECT count(*) FROM public.users").fetchone()
            nusers = int(users[0]) if users else 1
            parts = conn.execute("SELECT count(*) FROM public.participants").fetchone()
            nparts = max(int(parts[0]) if parts else 1, 1)
            while not self._stop.is_set():
                op = rng.choices(list(_OPS), weights=[4, 4, 1, 1, 2])[0]
                params = {"text": f"demo {rng.random():.6f}", "off": rng.randrange(nparts),
                          "id": rng.randint(lo, hi), "uid": rng.randint(1, max(nusers, 1)),
                          "pid": rng.randint(1, nparts)}
                t0 = time.monotonic()
                try:
                    conn.execute(_OPS[op], params)
                    ok = True
                except _TRANSIENT as exc:
                    ok = False
                    with self._lock:
                        self.stats.retried += 1
                        self.stats.last_error = str(exc).strip().splitlines()[0]
                except psycopg.Error as exc:
                    ok = False
                    with self._lock:
                        self.stats.errors += 1
                        self.stats.last_error = str(exc).strip().splitlines()[0]
                waited = (time.monotonic() - t0) * 1000
                with self._lock:
                    self.stats.max_wait_ms = max(self.stats.max_wait_ms, waited)
                    if ok:
                        if op == "read_turns":
                            self.stats.reads += 1
                        else:
                            self.stats.writes += 1
                        self.stats.by_op[op] = self.stats.by_op.get(op, 0) + 1
                time.sleep(self.pause_s)

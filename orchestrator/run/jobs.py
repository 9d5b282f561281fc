"""`apply --jobs N`: the units of one wave move side by side, each on its own session.

Units of one wave do not depend on each other (the graph puts a table after every table it
references), so their stages up to the swap can run at once; waves still run one after the
other. Each job is an engine of its own on a sibling session (its own transactions, its own
catalog reads); the operator's advisory locks stay on the session that took them. Swaps stay
one at a time, in graph order, after their wave's stages: each is a short lock the
application waits behind, and two at once would add their waits up.

A crash or SIGKILL leaves each unit where its last committed stage left it, as one job
would: a rerun resumes every unit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from orchestrator.db import Conn, sibling
from orchestrator.model.graph import Unit


class _Session(Protocol):
    @property
    def conn(self) -> Conn: ...


E = TypeVar("E", bound=_Session)  # the engine; `fork` makes one on another session


def by_wave(units: Sequence[Unit]) -> list[list[Unit]]:
    """The units in their waves, in order."""
    waves: dict[int, list[Unit]] = {}
    for u in units:
        waves.setdefault(u.wave, []).append(u)
    return [waves[w] for w in sorted(waves)]


def run_wave(eng: E, wave: Sequence[Unit], work: Callable[[E, Unit], None], jobs: int,
             then: Callable[[Unit], None], fork: Callable[[Conn], E]) -> None:
    """`work` for every unit of the wave, at most `jobs` at once, each job an engine on its
    own session, then `then` for each unit in order on ours (one job: work and then per unit,
    as before jobs existed). The first failure stops new units from starting; the running
    ones finish their stage, then it is raised."""
    if jobs <= 1 or len(wave) <= 1:
        for unit in wave:
            work(eng, unit)
            then(unit)
        return
    _side_by_side(eng, wave, work, jobs, fork)
    for unit in wave:
        then(unit)


def _side_by_side(eng: E, wave: Sequence[Unit], work: Callable[[E, Unit], None], jobs: int,
                  fork: Callable[[Conn], E]) -> None:
    todo = list(wave)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def job() -> None:
        conn = None
        try:
            conn = sibling(eng.conn)
            mine = fork(conn)
            while True:
                with lock:
                    if errors or not todo:
                        return
                    unit = todo.pop(0)
                work(mine, unit)
        except BaseException as exc:  # handed to the caller, which raises the first
            with lock:
                errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    # Daemon threads: on Ctrl-C the command ends at once; each job's open transaction is
    # rolled back with its session, and every stage resumes from its last commit.
    threads = [threading.Thread(target=job, name=f"apply-job-{i}", daemon=True)
               for i in range(min(jobs, len(wave)))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    if errors:
        raise errors[0]

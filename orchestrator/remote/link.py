"""The other server of a cross-server move: how to reach it, and the names of our objects on
both servers. Names derive from the plan and the table alone, so a rerun after a crash finds
what the killed run made (a replication slot is not transactional: it survives a rollback)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orchestrator.db import Conn, connect
from orchestrator.errors import ConnectionConfigError, StageError
from orchestrator.model.context import Ctx
from orchestrator.model.move import TableMove
from orchestrator.model.servers import conninfo, source_conninfo
from orchestrator.plan import Plan

APP = "orchestrator-remote"


def _slot_name(kind: str, plan: str, table: str) -> str:
    """A replication slot's name: [a-z0-9_], at most 63 bytes (PostgreSQL truncates beyond,
    silently), unique per plan and table by a hash of both."""
    base = re.sub(r"[^a-z0-9_]", "_", f"orch_{kind}_{plan}_{table}".lower())
    digest = hashlib.sha256(f"{plan}\0{table}".encode()).hexdigest()[:8]
    return f"{base[:48]}_{digest}"


@dataclass(frozen=True)
class Names:
    """Our objects for one table. The forward direction (source → target) and the reverse one
    (target → source, after cutover) each have a slot, a publication and a subscription of
    one name."""

    forward: str
    reverse: str
    server: str  # the postgres_fdw server on the source
    # The name the table has on both servers while the reverse direction runs (logical
    # replication matches tables by qualified name): the plan's retired schema.
    transit_schema: str

    def transit(self, m: TableMove) -> sql.Identifier:
        return sql.Identifier(self.transit_schema, m.source_name)


def names(plan: Plan, m: TableMove) -> Names:
    server = plan.remote_schemas()[m.target_schema]
    forward, reverse = slot_names(plan, m.source_name)
    return Names(forward, reverse, f"orch_{plan.name}_{server}"[:63], plan.retired_schema)


def slot_names(plan: Plan, table: str) -> tuple[str, str]:
    """The forward and the reverse slot (and publication, and subscription) of a table."""
    return _slot_name("f", plan.name, table), _slot_name("r", plan.name, table)


def server_of(plan: Plan, m: TableMove) -> str:
    return plan.remote_schemas()[m.target_schema]


def target_conninfo(plan: Plan, m: TableMove) -> str:
    name = server_of(plan, m)
    info = conninfo(name, plan.servers[name], os.environ)
    if not isinstance(info, str):
        raise ConnectionConfigError(f"server {name}: {info.message}", hint=info.hint)
    return info


def source_for_target(ctx: Ctx, m: TableMove) -> str:
    """The connection string the target's subscription uses to reach the source (without an
    application_name: the walsender then carries the subscription's name)."""
    info = source_conninfo(ctx.plan.servers[server_of(ctx.plan, m)], ctx.conn, os.environ)
    params = psycopg.conninfo.conninfo_to_dict(info)
    params.pop("application_name", None)
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


@contextmanager
def target(ctx: Ctx, m: TableMove, *, wrap: bool = True) -> Iterator[Conn]:
    """An autocommit session on the table's target server, closed after use. A database error
    in the block (on either server) becomes a StageError naming the table, unless `wrap` is
    off (inside a runner's transaction, which reports it itself)."""
    conn = connect(target_conninfo(ctx.plan, m), autocommit=True, application=APP)
    try:
        yield conn
    except psycopg.Error as exc:
        if not wrap:
            raise
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(
            f"{m.label}: the move to server {server_of(ctx.plan, m)} failed: {error}",
            hint="fix the cause and rerun the same command: each step finds what an earlier "
            f"run made; `orchestrator status {ctx.loaded.path}` shows where the table stands",
        ) from exc
    finally:
        conn.close()


_WARM: dict[str, Conn] = {}


def warm(ctx: Ctx, m: TableMove) -> Conn:
    """The swap's session on the target, kept open by this process: opened before the swap's
    lock (connecting takes tens of milliseconds), reused inside it and by its retries."""
    info = target_conninfo(ctx.plan, m)
    conn = _WARM.get(info)
    if conn is None or conn.closed or conn.broken:
        conn = connect(info, autocommit=True, application=APP)
        _WARM[info] = conn
    return conn


def open_quietly(plan: Plan, server: str) -> Conn | None:
    """A session on a plan's server for reading its state, or None if it cannot be reached
    (status shows what it can)."""
    info = conninfo(server, plan.servers[server], os.environ)
    if not isinstance(info, str):
        return None
    try:
        return connect(info, autocommit=True, application=APP)
    except ConnectionConfigError:
        return None


def fdw_options(info: str) -> tuple[dict[str, str], dict[str, str]]:
    """A connection string split into postgres_fdw's server options and user mapping options
    (user and password go to the mapping)."""
    params = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(info).items()
              if v is not None}
    user: dict[str, str] = {k: params.pop(k) for k in ("user", "password") if k in params}
    params.pop("connect_timeout", None)
    return params, user

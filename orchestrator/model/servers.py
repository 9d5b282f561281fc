"""Live checks of a plan that moves schemas to other servers: both servers ready
for logical replication, every moved table replicable, every reference across the servers
named. Read-only on both servers: the one probe that creates something (a subscription, to
prove the target reaches the source) runs in a transaction that is rolled back.

The move's stages are stages/remote_sync.py and stages/remote_swap.py; what they do not do
(column mappings, partitioned tables, database views over a moved table) is refused here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator.db import Conn
from orchestrator.model.catalog import Catalog
from orchestrator.model.graph import Problem
from orchestrator.plan import Plan, Server

OLDEST = 150000  # PostgreSQL 15: the oldest supported on either side
RESTART = "(it takes effect only at a restart of that server)"

# Our own slots and WAL senders (a move under way) are not counted as in use: the move's
# needs already include them.
_FACTS = r"""SELECT current_setting('server_version_num')::int AS version,
       current_setting('wal_level') AS wal_level,
       current_setting('max_replication_slots')::int AS max_slots,
       current_setting('max_wal_senders')::int AS max_senders,
       current_setting('max_logical_replication_workers')::int AS max_workers,
       (SELECT count(*) FROM pg_replication_slots
        WHERE slot_name NOT LIKE 'orch\_%%' AND slot_name NOT LIKE 'pg\_%%\_sync\_%%')::int
         AS slots,
       (SELECT count(*) FROM pg_stat_replication WHERE pid NOT IN (
          SELECT active_pid FROM pg_replication_slots WHERE active_pid IS NOT NULL
          AND (slot_name LIKE 'orch\_%%' OR slot_name LIKE 'pg\_%%\_sync\_%%')))::int
         AS senders,
       ARRAY(SELECT name FROM pg_available_extensions ORDER BY name) AS extensions"""

# The extensions that own the types of the given tables' columns (arrays by their element).
_EXTENSIONS = """SELECT DISTINCT e.extname AS name
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_depend d ON d.classid = 'pg_type'::regclass
     AND d.objid = coalesce(nullif(t.typelem, 0), t.oid) AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid
WHERE a.attrelid = ANY(%s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped"""


@dataclass(frozen=True)
class Facts:
    """What one server says about itself, in one statement."""

    version: int
    wal_level: str
    max_slots: int
    max_senders: int
    max_workers: int
    slots: int
    senders: int
    extensions: frozenset[str]


def facts(conn: Conn) -> Facts:
    r = conn.execute(_FACTS).fetchone()
    assert r is not None
    return Facts(int(r["version"]), str(r["wal_level"]), int(r["max_slots"]),
                 int(r["max_senders"]), int(r["max_workers"]), int(r["slots"]),
                 int(r["senders"]), frozenset(r["extensions"] or ()))


def conninfo(name: str, server: Server, env: Mapping[str, str]) -> str | Problem:
    """The server's connection string, or why there is none."""
    if server.dsn is not None:
        return server.dsn
    value = env.get(server.dsn_env or "")
    if not value:
        return Problem(f"server {name}", f"the environment variable {server.dsn_env} that "
                       "holds its connection string is not set",
                       f"export {server.dsn_env}='host=... dbname=... user=...' before "
                       "running the orchestrator")
    return value


_PORTABLE = frozenset({"host", "hostaddr", "port", "dbname", "user", "passfile", "sslmode",
                       "sslrootcert", "sslcert", "sslkey", "connect_timeout"})


def source_conninfo(server: Server, conn: Conn, env: Mapping[str, str]) -> str:
    """How the target reaches the source: the plan's, else the orchestrator's own."""
    if server.source_dsn is not None:
        return server.source_dsn
    if server.source_dsn_env and env.get(server.source_dsn_env):
        return env[server.source_dsn_env]
    # Only what an older server's libpq understands too (the client's lists options such as
    # sslcertmode that PostgreSQL 15's walreceiver refuses).
    params = {k: v for k, v in psycopg.conninfo.conninfo_to_dict(conn.info.dsn).items()
              if k in _PORTABLE}
    password = conn.pgconn.password
    if password:
        params["password"] = password.decode()
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def check(conn: Conn, plan: Plan, cat: Catalog, env: Mapping[str, str] | None = None,
          ) -> tuple[list[Problem], list[Problem]]:
    """Every problem (and warning) of moving the plan's remote schemas, on both servers."""
    remote = plan.remote_schemas()
    if not remote:
        return [], []
    env = os.environ if env is None else env
    problems: list[Problem] = []
    warnings: list[Problem] = []
    where = {t.name: remote.get(t.schema_) for t in plan.tables}  # None: stays on the source
    by_server: dict[str, list[str]] = {}
    for table, server in where.items():
        if server is not None:
            by_server.setdefault(server, []).append(table)
    src = facts(conn)
    moving = sum(len(v) for v in by_server.values())
    problems += _replication_ready("the source server", src, moving, extra=1)
    if "postgres_fdw" not in src.extensions:
        problems.append(Problem("the source server", "postgres_fdw is not available: the "
                                "old names keep answering through it after cutover",
                                "install PostgreSQL's contrib package on the source server"))
    _identities(plan, cat, where, problems, warnings)
    _references(plan, cat, where, problems, warnings)
    for server, tables in sorted(by_server.items()):
        problems += _target(conn, plan, cat, server, tables, src, env)
    _unsupported(plan, cat, where, problems)
    return problems, warnings


def _replication_ready(subject: str, f: Facts, tables: int, extra: int) -> list[Problem]:
    """wal_level, and free slots and WAL senders for `tables` subscriptions (plus `extra`,
    the initial sync's own slot)."""
    out = []
    if f.wal_level != "logical":
        out.append(Problem(subject, f"wal_level is {f.wal_level}; a move to another server "
                           "replicates logically (and, after cutover, back)",
                           f"ALTER SYSTEM SET wal_level = logical, then restart {subject} "
                           + RESTART))
    need = tables + extra
    if f.max_slots - f.slots < need:
        out.append(Problem(subject, f"{f.max_slots - f.slots} replication slot(s) free "
                           f"(max_replication_slots = {f.max_slots}, {f.slots} in use); the "
                           f"move needs {need}",
                           f"raise max_replication_slots {RESTART}, or drop unused slots "
                           "(pg_replication_slots)"))
    if f.max_senders - f.senders < need:
        out.append(Problem(subject, f"{f.max_senders - f.senders} WAL sender(s) free "
                           f"(max_wal_senders = {f.max_senders}, {f.senders} in use); the "
                           f"move needs {need}", f"raise max_wal_senders {RESTART}"))
    return out


def _identities(plan: Plan, cat: Catalog, where: Mapping[str, str | None],
                problems: list[Problem], warnings: list[Problem]) -> None:
    """A published table must identify its rows, or the application's UPDATE and DELETE on
    it fail once the publication exists."""
    for table, server in where.items():
        rel = cat.table(plan.source_schema, table)
        if server is None or rel is None or rel.kind not in ("r", "p"):
            continue  # after its cutover the old name is a view
        ident = rel.replica_identity
        if ident == "n" or (ident == "d" and rel.primary_key is None):
            problems.append(Problem(
                f"{plan.source_schema}.{table}", "it has no replica identity (no primary key, "
                "REPLICA IDENTITY NOTHING or DEFAULT): once published, the application's "
                "UPDATE and DELETE on it would fail",
                f"add a primary key, or ALTER TABLE {plan.source_schema}.{table} REPLICA "
                "IDENTITY USING INDEX <a unique index on NOT NULL columns>"))
        elif ident == "f":
            warnings.append(Problem(
                f"{plan.source_schema}.{table}", "REPLICA IDENTITY FULL: every replicated "
                "UPDATE and DELETE carries the whole old row and is matched on it",
                "a primary key or REPLICA IDENTITY USING INDEX replicates faster"))


def _references(plan: Plan, cat: Catalog, where: Mapping[str, str | None],
                problems: list[Problem], warnings: list[Problem]) -> None:
    """Foreign keys and views that would join tables on two servers."""
    src = plan.source_schema

    def home(schema: str, table: str) -> str | None:
        # A plan table goes where its schema goes; anything else stays on the source.
        return where.get(table) if schema == src and table in where else None

    def choice(table: str, ref: str) -> str | None:
        schemas = {plan.table(t).schema_ for t in (table, ref) if t in plan.table_names}
        return next((plan.schemas[s].cross_server_keys for s in schemas
                     if s in plan.schemas and plan.schemas[s].server), None)

    seen: set[str] = set()
    for fk in cat.foreign_keys:
        a, b = home(fk.schema, fk.table), home(fk.ref_schema, fk.ref_table)
        if a == b or fk.name in seen:
            continue
        seen.add(fk.name)
        crossing = (f"{fk.schema}.{fk.table} → {fk.ref_schema}.{fk.ref_table} would cross from "
                    f"server {a or 'source'} to server {b or 'source'}")
        if choice(fk.table, fk.ref_table) == "drop":
            warnings.append(Problem(f"foreign key {fk.name}", f"{crossing}: the plan drops it "
                                    "(the target never has it; finalize drops it on the source)",
                                    "`orchestrator audit` reports orphans later"))
            continue
        problems.append(Problem(
            f"foreign key {fk.name}", f"{crossing}: no server enforces a key across servers",
            "move both tables to one server, or say `cross_server_keys: drop` in the remote "
            "schema's entry (`orchestrator audit` reports orphans later)"))
    for d in cat.dependents:
        if home(d.on_schema, d.on_table):
            problems.append(Problem(
                f"view {d.schema}.{d.name}", f"it reads {d.on_schema}.{d.on_table}, which moves "
                f"to server {home(d.on_schema, d.on_table)}; the swap would leave it reading "
                "the retired table", f"drop it before the move and create it again after "
                f"cutover over {d.on_schema}.{d.on_table} (the compatibility view), or list it "
                "under the plan's views"))
    for v in plan.views:
        servers = {home(src, t) for t in v.depends_on} - {None}
        if servers:
            warnings.append(Problem(
                f"view {v.schema_}.{v.name}", f"it reads tables moving to server "
                f"{', '.join(sorted(str(x) for x in servers))}: it is created on the source, "
                "where it reads them through postgres_fdw foreign tables under their new names",
                "a join across servers is slower than a local one; move the view's tables to "
                "one server to keep it local"))


def _unsupported(plan: Plan, cat: Catalog, where: Mapping[str, str | None],
                 problems: list[Problem]) -> None:
    """What a move to another server does not do: column mappings (a subscription matches
    columns by name) and partitioned tables."""
    for table, server in where.items():
        if server is None:
            continue
        spec = plan.table(table)
        if spec.columns:
            problems.append(Problem(
                f"{plan.source_schema}.{table}", f"it moves to server {server} with column "
                "mappings; logical replication matches columns by name, so a move to another "
                "server keeps every column as it is", "remove its `columns:` entry and rename "
                "or retype the columns after the move"))
        rel = cat.table(plan.source_schema, table)
        if rel is not None and rel.kind == "p":
            problems.append(Problem(
                f"{plan.source_schema}.{table}", f"a partitioned table; a move to server "
                f"{server} does not move partitioned tables (not built)",
                "keep it on the source server, or move it within this server"))


def _target(conn: Conn, plan: Plan, cat: Catalog, name: str, tables: list[str], src: Facts,
            env: Mapping[str, str]) -> list[Problem]:
    server = plan.servers[name]
    subject = f"server {name}"
    info = conninfo(name, server, env)
    if isinstance(info, Problem):
        return [info]
    try:
        target = psycopg.connect(info, autocommit=True, row_factory=dict_row,
                                 connect_timeout=10, application_name="orchestrator")
    except psycopg.Error as exc:
        return [Problem(subject, f"cannot connect: {str(exc).strip()}",
                        f"check its connection string ({server.dsn_env or 'dsn'}) and that "
                        "the server runs")]
    with target:
        out: list[Problem] = []
        f = facts(target)
        if min(f.version, src.version) < OLDEST:
            out.append(Problem(subject, f"PostgreSQL {f.version // 10000} and "
                               f"{src.version // 10000} on the source: both must be 15 or "
                               "newer", "upgrade the older server"))
        elif f.version // 10000 < src.version // 10000:
            out.append(Problem(subject, f"PostgreSQL {f.version // 10000} is older than the "
                               f"source's {src.version // 10000}",
                               "move to a server of the same major version or a newer one"))
        # After cutover the way back replicates from the target: the same needs there.
        out += _replication_ready(subject, f, len(tables), extra=0)
        if f.max_workers < len(tables) + 1:
            out.append(Problem(subject, f"max_logical_replication_workers = {f.max_workers}; "
                               f"the move needs {len(tables) + 1} (one per table and one "
                               "for the initial sync)",
                               f"raise max_logical_replication_workers {RESTART}"))
        oids = [r.oid for t in tables if (r := cat.table(plan.source_schema, t)) is not None]
        needed = {str(r["name"]) for r in conn.execute(_EXTENSIONS, (oids,)).fetchall()}
        for ext in sorted(needed - f.extensions):
            out.append(Problem(subject, f"extension {ext} is not available; the moved tables' "
                               "columns use its types", f"install {ext} on server {name}"))
        out += _reaches_source(target, subject, source_conninfo(server, conn, env))
        return out


def _reaches_source(target: psycopg.Connection[dict[str, object]], subject: str,
                    source: str) -> list[Problem]:
    """The target connects to the source as its subscription will: a subscription that
    connects (to fetch its publication's tables) and is rolled back, leaving nothing."""
    try:
        with target.transaction(force_rollback=True):
            target.execute(sql.SQL(
                "CREATE SUBSCRIPTION _orch_probe CONNECTION {} PUBLICATION _orch_probe WITH "
                "(connect = true, create_slot = false, enabled = false, slot_name = NONE, "
                "copy_data = true)").format(sql.Literal(source)))
    except psycopg.Error as exc:
        return [Problem(subject, "it cannot subscribe to the source: "
                        f"{str(exc).strip().splitlines()[0]}",
                        "give servers.<name>.source_dsn_env a connection string this server "
                        "can use to reach the source (and allow it in the source's "
                        "pg_hba.conf); the role needs the right to create subscriptions")]
    return []

"""Change capture and replay: a trigger logs changed keys; the orchestrator replays them.

The trigger on the live table appends only (key, operation) to a log table, the cheapest
capture measured (docs/design.md, § Capture). Replay re-reads each logged key's current row
from the live table and makes the copy match: rows gone from the live table are deleted, the
others upserted.
Because replay always copies the *current* row, the order of log entries does not matter and
replaying a key twice is harmless.

The same machinery runs both ways: forward (source → target) from dual-write to cutover, and
reverse (target → retired source) from cutover to finalize, so a rollback loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import errors, sql

from orchestrator.db import Conn, snapshot_txn
from orchestrator.model.move import TableMove
from orchestrator.sql.compose import Body, catalog_sql, ident, idents, row

TRIGGER = "_orch_capture"
TRUNCATE_TRIGGER = "_orch_capture_truncate"


@dataclass(frozen=True)
class Direction:
    """Which table is live (`live`) and which one follows it (`copy`)."""

    name: str  # forward | reverse
    live: sql.Identifier
    copy: sql.Identifier
    live_key: tuple[str, ...]
    copy_key: tuple[str, ...]
    key_types: tuple[str, ...]
    copy_columns: tuple[str, ...]
    values: tuple[sql.Composable, ...]  # per copy column, an expression over alias "s"
    log: sql.Identifier
    function: sql.Identifier
    truncate_function: sql.Identifier
    overriding: sql.Composable
    # A partitioned table's partitions, (live, copy) pairs: a TRUNCATE of one partition
    # truncates its counterpart (row triggers on the parent reach every partition by
    # themselves; statement triggers do not).
    partitions: tuple[tuple[sql.Identifier, sql.Identifier], ...] = ()
    partition_truncate_function: sql.Identifier | None = None
    # Forward only: the keys replay has applied to the copy since verify last proved their
    # chunks (stages/proof.py re-checks just those chunks).
    touched: sql.Identifier | None = None


def forward(m: TableMove) -> Direction:
    """Source to target. Always the whole table, also from a per-partition view of the move:
    the log holds keys of every partition, and replaying them into one would lose the rest."""
    return Direction(
        name="forward",
        live=sql.Identifier(m.source_schema, m.source_name),
        copy=sql.Identifier(m.target_schema, m.target_name),
        live_key=m.key_source,
        copy_key=m.key_target,
        key_types=m.key_types,
        copy_columns=tuple(c.target for c in m.copied),
        values=tuple(c.up_sql("s") for c in m.copied),
        log=m.obj("log"),
        function=m.obj("cap"),
        truncate_function=m.obj("trunc"),
        overriding=m.overriding,
        partitions=tuple(
            (sql.Identifier(m.source_schema, p.name), sql.Identifier(m.target_schema, p.name))
            for p in m.partitions if p.leaf
        ),
        partition_truncate_function=m.obj("ptrunc") if m.partitions else None,
        touched=m.obj("touched"),
    )


def reverse(m: TableMove) -> Direction:
    types = dict(zip((c.source for c in m.columns), m.source_types, strict=True))
    return Direction(
        name="reverse",
        live=sql.Identifier(m.target_schema, m.target_name),
        copy=sql.Identifier(m.retired_schema, m.source_name),
        live_key=m.key_target,
        copy_key=m.key_source,
        key_types=m.key_types,
        copy_columns=tuple(c.source for c in m.copied),
        values=tuple(c.down_sql("s", types[c.source]) for c in m.copied),
        log=m.obj("rlog"),
        function=m.obj("rcap"),
        truncate_function=m.obj("rtrunc"),
        overriding=sql.SQL(" OVERRIDING SYSTEM VALUE")
        if any(c.identity == "a" for c in m.copied)
        else sql.SQL(""),
        partitions=tuple(
            (sql.Identifier(m.target_schema, p.name),
             sql.Identifier(m.retired_schema, p.name))
            for p in m.partitions if p.leaf
        ),
        partition_truncate_function=m.obj("rptrunc") if m.partitions else None,
    )


def _key_eq(
    left: str, left_cols: tuple[str, ...], right: str, right_cols: tuple[str, ...]
) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, a), sql.Identifier(right, b))
        for a, b in zip(left_cols, right_cols, strict=True)
    )


def _eq(a: sql.Composable, b: sql.Composable) -> sql.Composed:
    """`a = b` with the operator named by schema: the capture function runs with the
    writer's search_path, so nothing in it may resolve through that path."""
    return sql.SQL("{} OPERATOR(pg_catalog.=) {}").format(a, b)


def install_sql(d: Direction) -> list[sql.Composed]:
    """The log table, its capture functions and the triggers on the live table.

    Measured on this machine (docs/design.md, docs/benchmarks.md), every per-row cost counts: the
    log has no index and no sequence (replay claims rows by ctid, in any order, because it
    re-reads each key's current row), and the row function has no SET clause (a per-call GUC
    save and restore). It stays SECURITY DEFINER, so writers need no privilege on our log;
    with every relation and operator schema-qualified, the writer's search_path cannot
    redirect it.
    """
    cols = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(k), catalog_sql(t))
        for k, t in zip(d.live_key, d.key_types, strict=True)
    )
    new = sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(k)) for k in d.live_key)
    old = sql.SQL(", ").join(sql.SQL("OLD.{}").format(sql.Identifier(k)) for k in d.live_key)
    # Key columns are NOT NULL (a primary key or a declared unique NOT NULL key).
    same_key = sql.SQL(" AND ").join(
        _eq(sql.SQL("OLD.{}").format(sql.Identifier(k)), sql.SQL("NEW.{}").format(
            sql.Identifier(k))) for k in d.live_key)
    keys = idents(d.live_key)
    ins = sql.SQL("INSERT INTO {} (_orch_op, {}) VALUES").format(d.log, keys)
    op = sql.SQL("TG_OP")
    body = sql.SQL("""BEGIN
  IF {is_insert} THEN {ins} ('I', {new});
  ELSIF {is_delete} THEN {ins} ('D', {old});
  ELSE
    {ins} ('U', {new});
    IF NOT ({same_key}) THEN {ins} ('K', {old}); END IF;
  END IF;
  RETURN NULL;
END""").format(ins=ins, new=new, old=old, same_key=same_key,
               is_insert=_eq(op, sql.Literal("INSERT")),
               is_delete=_eq(op, sql.Literal("DELETE")))
    tbody = sql.SQL("BEGIN TRUNCATE {copy}; TRUNCATE {log}; RETURN NULL; END").format(
        copy=d.copy, log=d.log
    )
    functions = [
        sql.SQL('CREATE TABLE {} (_orch_op "char" NOT NULL, {})').format(d.log, cols),
        *([sql.SQL("CREATE TABLE {} ({})").format(d.touched, cols)] if d.touched else []),
        sql.SQL(
            "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS {}"
        ).format(d.function, Body(body)),
        sql.SQL(
            "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog AS {}"
        ).format(d.truncate_function, Body(tbody)),
    ]
    if d.partition_truncate_function is not None:
        # The counterpart comes as the trigger's argument, a quoted qualified name we wrote.
        functions.append(sql.SQL(
            "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog AS {}"
        ).format(d.partition_truncate_function, Body(sql.SQL(
            "BEGIN EXECUTE 'TRUNCATE ' || TG_ARGV[0]; RETURN NULL; END"))))
    return [*functions, *create_triggers_sql(d)]


def create_triggers_sql(d: Direction) -> list[sql.Composed]:
    return [
        sql.SQL(
            "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} "
            "FOR EACH ROW EXECUTE FUNCTION {}()"
        ).format(sql.Identifier(TRIGGER), d.live, d.function),
        sql.SQL(
            "CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()"
        ).format(sql.Identifier(TRUNCATE_TRIGGER), d.live, d.truncate_function),
        *[
            sql.SQL(
                "CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}({})"
            ).format(sql.Identifier(TRUNCATE_TRIGGER), live, d.partition_truncate_function,
                     QuotedName(copy))
            for live, copy in d.partitions
        ],
    ]


def drop_triggers_sql(d: Direction) -> list[sql.Composed]:
    return [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER), d.live),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRUNCATE_TRIGGER), d.live),
        *[
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(TRUNCATE_TRIGGER), live)
            for live, _ in d.partitions
        ],
    ]


def uninstall_sql(d: Direction, triggers: bool = True) -> list[sql.Composed]:
    """Drop the triggers (unless the live table is gone), the functions and the log."""
    functions = [d.function, d.truncate_function]
    if d.partition_truncate_function is not None:
        functions.append(d.partition_truncate_function)
    return [
        *(drop_triggers_sql(d) if triggers else []),
        *[sql.SQL("DROP FUNCTION IF EXISTS {}()").format(f) for f in functions],
        sql.SQL("DROP TABLE IF EXISTS {}").format(d.log),
        *([sql.SQL("DROP TABLE IF EXISTS {}").format(d.touched)] if d.touched else []),
    ]


class QuotedName(sql.Composable):
    """A relation's quoted, qualified name as a string literal (a trigger argument)."""

    def __init__(self, name: sql.Identifier) -> None:
        super().__init__(name)
        self._name = name

    def as_bytes(self, context: object = None) -> bytes:
        return sql.Literal(self._name.as_string(context)).as_bytes(context)  # type: ignore[arg-type]


def _select_values(d: Direction) -> sql.Composed:
    return sql.SQL(", ").join(d.values)


def _upsert_tail(d: Direction) -> sql.Composed:
    rest = [c for c in d.copy_columns if c not in d.copy_key]
    if not rest:
        return sql.SQL("ON CONFLICT ({}) DO NOTHING").format(idents(d.copy_key))
    return sql.SQL("ON CONFLICT ({}) DO UPDATE SET {}").format(
        idents(d.copy_key),
        sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in rest),
    )


def replay_batch_sql(d: Direction) -> sql.Composed:
    """One statement: claim up to %(n)s log entries, delete vanished rows, upsert the rest.

    Vanished and present keys are disjoint at the statement's snapshot, so the two writes
    never touch the same key. SKIP LOCKED leaves entries of uncommitted transactions alone
    (they are not visible anyway) and lets a second replayer run beside us without waiting.
    """
    lk = idents(d.live_key)
    return sql.SQL("""WITH d AS (
  DELETE FROM {log} WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM {log} LIMIT %(n)s FOR UPDATE SKIP LOCKED))
  RETURNING {lk}),
keys AS (SELECT DISTINCT {lk} FROM d),{touch}
gone AS (
  DELETE FROM {copy} c USING keys k WHERE {ck_eq}
    AND NOT EXISTS (SELECT 1 FROM {live} s WHERE {sk_eq})
  RETURNING 1),
up AS (
  INSERT INTO {copy} AS c ({cols}){overriding}
  SELECT {vals} FROM {live} s JOIN keys k ON {sk_eq}
  {upsert}
  RETURNING 1)
SELECT (SELECT count(*) FROM d) AS entries, (SELECT count(*) FROM gone) AS deleted,
       (SELECT count(*) FROM up) AS upserted""").format(
        log=d.log,
        lk=lk,
        copy=d.copy,
        live=d.live,
        ck_eq=_key_eq("c", d.copy_key, "k", d.live_key),
        sk_eq=_key_eq("s", d.live_key, "k", d.live_key),
        cols=idents(d.copy_columns),
        overriding=d.overriding,
        vals=_select_values(d),
        upsert=_upsert_tail(d),
        touch=sql.SQL("\ntouch AS (INSERT INTO {} SELECT * FROM keys),").format(d.touched)
        if d.touched else sql.SQL(""),
    )


# The replay statements join the log to the live table and to its copy by key. The log has no
# statistics worth the name (entries leave it by deletion, and autovacuum may have analyzed it
# while it was large), so the planner may choose to scan the whole table: docs/benchmarks.md
# measured 557 ms for a 200-key tail inside the cutover lock at 1M rows, 3 ms with index
# lookups. For the rest of the transaction, joins go by nested loops over the key index.
_INDEX_JOINS = sql.SQL(
    "SELECT set_config('enable_hashjoin', 'off', true), "
    "set_config('enable_mergejoin', 'off', true), set_config('enable_seqscan', 'off', true)"
)


def replay_all_sql(d: Direction) -> list[sql.Composed | sql.SQL]:
    """Drain every visible entry at one snapshot (run inside REPEATABLE READ).

    Deleting all logged keys before re-inserting them avoids the spurious unique violations a
    row-at-a-time upsert can hit when two rows swap a unique value.
    """
    lk = idents(d.live_key)
    return [
        _INDEX_JOINS,
        sql.SQL("DELETE FROM {copy} c USING (SELECT DISTINCT {lk} FROM {log}) k WHERE {eq}").format(
            copy=d.copy, lk=lk, log=d.log, eq=_key_eq("c", d.copy_key, "k", d.live_key)
        ),
        sql.SQL(
            "INSERT INTO {copy} ({cols}){overriding} SELECT {vals} FROM {live} s "
            "WHERE EXISTS (SELECT 1 FROM {log} k WHERE {eq})"
        ).format(
            copy=d.copy,
            cols=idents(d.copy_columns),
            overriding=d.overriding,
            vals=_select_values(d),
            live=d.live,
            log=d.log,
            eq=_key_eq("s", d.live_key, "k", d.live_key),
        ),
        *([sql.SQL("INSERT INTO {} SELECT DISTINCT {} FROM {}").format(d.touched, lk, d.log)]
          if d.touched else []),
        sql.SQL("DELETE FROM {}").format(d.log),
    ]


def backlog(conn: Conn, d: Direction) -> int:
    """Entries waiting in a log (an estimate is enough to decide when to stop draining)."""
    r = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(d.log)).fetchone()
    return int(r["n"]) if r else 0


def replay_batch(conn: Conn, d: Direction, n: int) -> int:
    """Replay up to n entries in one statement; on a unique clash, drain everything at once.

    Runs inside the caller's transaction; returns the entries consumed.
    """
    try:
        with conn.transaction():
            conn.execute(_INDEX_JOINS)
            r = conn.execute(replay_batch_sql(d), {"n": n}).fetchone()
        return int(r["entries"]) if r else 0
    except errors.UniqueViolation:
        return replay_all(conn, d)


def replay_all(conn: Conn, d: Direction) -> int:
    """Drain every visible entry at one snapshot. The caller's transaction must be
    REPEATABLE READ, or no transaction at all (then one is opened here)."""
    if conn.info.transaction_status == 0:  # idle: take our own snapshot
        with snapshot_txn(conn):
            return replay_all(conn, d)
    n = backlog(conn, d)
    for stmt in replay_all_sql(d):
        conn.execute(stmt)
    return n


def key_row(cols: tuple[str, ...]) -> sql.Composed:
    return row(cols)


__all__ = ["Direction", "forward", "ident", "reverse"]


def drain(conn: Conn, d: Direction, batch: int = 10_000) -> int:
    """Replay committed batches until one comes back short; the entries replayed."""
    total = 0
    while (n := replay_batch(conn, d, batch)) > 0:
        total += n
        if n < batch:
            break
    return total

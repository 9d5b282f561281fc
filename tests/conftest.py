"""The test server: ORCHESTRATOR_TEST_DSN, else testcontainers when Docker answers, else embedded.

The server is chosen once by the controlling pytest process, which exports its DSN to the xdist
workers; every test gets a fresh database cloned from a template (fast), never a mock.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.demo import sample

EMPTY_TEMPLATE = "orch_tpl_empty"
COGITO_TEMPLATE = "orch_tpl_cogito"
COGITO_TEST_TURNS = 2000

_state: dict[str, Any] = {}


def _docker_answers() -> bool:
    path = "/var/run/docker.sock"
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
        return b"OK" in s.recv(256)
    except OSError:
        return False
    finally:
        s.close()


def dsn_for(base: str, dbname: str) -> str:
    params = conninfo_to_dict(base)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


@contextmanager
def own_cogito_server(
    prefix: str, setup: Callable[[Path, str], str] | None = None
) -> Iterator[tuple[Path, str]]:
    """An embedded server of a test's own, for what must not touch the shared one (a restart,
    a server setting, a reset xid epoch), with the Cogito sample in database `cogito`.
    `setup(directory, dsn)` runs first and returns the server's DSN (it may restart it)."""
    from orchestrator.db import start_embedded, stop_embedded

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        base = start_embedded(tmp)
        if setup is not None:
            base = setup(tmp, base)
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute("CREATE DATABASE cogito")
        dsn = dsn_for(base, "cogito")
        with psycopg.connect(dsn) as conn:
            sample.load_schema(conn)
            sample.generate_data(conn, turns=COGITO_TEST_TURNS, seed=1)
            conn.execute("ANALYZE")
            conn.commit()
        yield tmp, dsn
    finally:
        stop_embedded(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _admin(base: str) -> psycopg.Connection[Any]:
    return psycopg.connect(base, autocommit=True)


def _build_templates(base: str) -> None:
    with _admin(base) as conn:
        for name in (EMPTY_TEMPLATE, COGITO_TEMPLATE):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
    with psycopg.connect(dsn_for(base, COGITO_TEMPLATE)) as conn:
        sample.load_schema(conn)
        sample.generate_data(conn, turns=COGITO_TEST_TURNS, seed=1)
        conn.execute("ANALYZE")
        conn.commit()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller chose the server
        return
    dsn = os.environ.get("ORCHESTRATOR_TEST_DSN")
    if not dsn and _docker_answers():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:18", driver=None)
        container.start()
        _state["container"] = container
        dsn = container.get_connection_url()
    if not dsn:
        from orchestrator.db import start_embedded

        # The embedded server, as root, opens traverse permission on the data dir's parents:
        # keep it under /tmp, never under /root.
        tmp = tempfile.mkdtemp(prefix="orch-test-pg-", dir="/tmp")
        _state["embedded_dir"] = tmp
        dsn = start_embedded(Path(tmp))
    os.environ["ORCHESTRATOR_TEST_DSN"] = dsn
    os.environ["ORCHESTRATOR_TEST_TEMPLATES"] = "1"
    _build_templates(dsn)


def pytest_unconfigure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    if "container" in _state:
        _state["container"].stop()
    if "embedded_dir" in _state:
        from orchestrator.db import stop_embedded

        stop_embedded(Path(_state["embedded_dir"]))
        shutil.rmtree(_state["embedded_dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def server_dsn() -> str:
    return os.environ["ORCHESTRATOR_TEST_DSN"]


def _fresh_db(base: str, template: str) -> Iterator[str]:
    name = "orch_t_" + uuid.uuid4().hex[:16]
    with _admin(base) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    try:
        yield dsn_for(base, name)
    finally:
        with _admin(base) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def empty_dsn(server_dsn: str) -> Iterator[str]:
    """A fresh, empty database of this test's own."""
    yield from _fresh_db(server_dsn, EMPTY_TEMPLATE)


@pytest.fixture
def cogito_dsn(server_dsn: str) -> Iterator[str]:
    """A fresh database holding the Cogito legacy schema with a little data."""
    yield from _fresh_db(server_dsn, COGITO_TEMPLATE)


@pytest.fixture
def writer(cogito_dsn: str) -> Iterator[Any]:
    """The application writing to public.turns (tests/stress.py's Writer) while a test
    runs; stopped at its end."""
    import stress

    w = stress.Writer(cogito_dsn)
    w.start()
    yield w
    w.stop.set()
    w.join(timeout=10)


@pytest.fixture
def cogito_conn(cogito_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    from psycopg.rows import dict_row

    with psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def empty_conn(empty_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    from psycopg.rows import dict_row

    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


ROOT = Path(__file__).resolve().parent.parent
COGITO_PLAN = ROOT / "plans" / "cogito.yaml"

"""`orchestrator scan-code` (application SQL parsed with pglast) and `compat-usage`."""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import COGITO_PLAN
from psycopg.rows import dict_row
from shop_schema import load_shop
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import load_plan
from orchestrator.run.session import session
from orchestrator.tools.scan import compat_usage, scan_code, statements_using

QUERIES_SQL = """\
-- Reports the application runs (psql script).
\\set ON_ERROR_STOP on
SELECT u.email, c.name
FROM users u
JOIN client_mgmt.clients c ON c.id = u.client_id;
INSERT INTO turns (participant_id, content) VALUES (1, 'x');
UPDATE public.blocks SET name = 'b' WHERE id = 1;
WITH participants AS (SELECT 1 AS id) SELECT * FROM participants;
this is not sql at all;
DELETE FROM patterns
WHERE id IN (SELECT id FROM lens_prototypes);
CREATE FUNCTION count_turns() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM turns $$;
CREATE FUNCTION touch() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  UPDATE projects SET name = name;
  IF EXISTS (SELECT 1 FROM prompts) THEN
    PERFORM 1;
  END IF;
END $$;
SELECT * FROM audit_log;
SELECT 'users' AS label FROM conversation.turns;
"""

REPO_PY = '''\
"""Data access. Select users from the table."""
import psycopg

GREETING = "Select a file from the list, then update it."
NOT_SQL = "hello world"
QUALIFIED = "SELECT * FROM client_mgmt.users"


def find_user(conn, email):
    return conn.execute("SELECT * FROM users WHERE email = %s", (email,)).fetchone()


def recent(conn):
    return conn.execute(
        """
        SELECT t.id, t.content
        FROM turns t
        JOIN conversation.participants p ON p.id = t.participant_id
        WHERE t.timestamp > %(since)s AND t.content LIKE 'a%%'
        """,
        {"since": 0},
    )


BY_ID = "SELECT * FROM blocks WHERE id = :block_id AND name::text <> ''"
'''


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    root = tmp_path / "app"
    (root / "sql").mkdir(parents=True)
    (root / "sql" / "queries.sql").write_text(QUERIES_SQL)
    (root / "repo.py").write_text(REPO_PY)
    (root / "broken.py").write_text("def (:\n")
    # Never scanned: virtualenvs and caches.
    (root / ".venv").mkdir()
    (root / ".venv" / "vendored.sql").write_text("SELECT * FROM users;")
    return root


def test_scan_code_on_cogito_sources(app_dir: Path) -> None:
    report = scan_code([app_dir], load_plan(COGITO_PLAN))
    found = [(Path(f.path).name, f.line, f.found, f.use, f.source) for f in report.findings]
    assert found == [
        ("repo.py", 10, "users", "client_mgmt.users", "python"),
        ("repo.py", 17, "turns", "conversation.turns", "python"),
        ("repo.py", 25, "blocks", "conversation.blocks", "python"),
        ("queries.sql", 4, "users", "client_mgmt.users", "sql"),
        ("queries.sql", 6, "turns", "conversation.turns", "sql"),
        ("queries.sql", 7, "public.blocks", "conversation.blocks", "sql"),
        ("queries.sql", 10, "patterns", "conversation.patterns", "sql"),
        ("queries.sql", 11, "lens_prototypes", "conversation.lens_prototypes", "sql"),
        ("queries.sql", 12, "turns", "conversation.turns", "function"),
        ("queries.sql", 15, "projects", "client_mgmt.projects", "function"),
        ("queries.sql", 16, "prompts", "client_mgmt.prompts", "function"),
    ]
    # Not reported: the schema-qualified names (client_mgmt.clients, conversation.participants,
    # conversation.turns), the CTE named participants, audit_log (not moved), the string
    # 'users', the prose strings, the file that is not Python, and anything under .venv.
    assert report.files == 3
    assert report.skipped >= 2  # "this is not sql at all", the prose strings
    assert any("broken.py" in u for u in report.unreadable)


def test_scan_code_cli(app_dir: Path) -> None:
    result = _cli("scan-code", str(app_dir), "--plan", str(COGITO_PLAN))
    assert result.exit_code == 1  # something to fix, like a linter
    assert f"{app_dir / 'sql' / 'queries.sql'}:4: users → use client_mgmt.users" in result.stdout
    assert "11 reference(s) to moved tables" in result.stdout
    data = json.loads(
        _cli(
            "scan-code", str(app_dir / "repo.py"), "--plan", str(COGITO_PLAN), "--format", "json"
        ).stdout
    )
    assert [(f["line"], f["use"]) for f in data["findings"]] == [
        (10, "client_mgmt.users"),
        (17, "conversation.turns"),
        (25, "conversation.blocks"),
    ]
    clean = app_dir / "clean.sql"
    clean.write_text("SELECT * FROM client_mgmt.users;\n")
    ok = _cli("scan-code", str(clean), "--plan", str(COGITO_PLAN))
    assert ok.exit_code == 0
    assert "0 reference(s)" in ok.stdout
    missing = _cli("scan-code", str(app_dir / "nope.sql"), "--plan", str(COGITO_PLAN))
    assert missing.exit_code == 1
    assert "no such file or directory" in missing.output


SHOP_PLAN = """
version: 1
name: shop
schemas:
  sales: {}
tables:
  - name: orders
    schema: sales
    rename_to: purchase_orders
  - name: order_lines
    schema: sales
  - name: Invoices
    schema: sales
"""

SHOP_SQL = """\
SELECT * FROM "Invoices";
SELECT * FROM Invoices;
INSERT INTO order_lines (order_id, line_no, product_sku) VALUES (1, 3, 'A-1');
SELECT o.id, sum(l.qty)
  FROM orders o JOIN order_lines l ON l.order_id = o.id
 GROUP BY o.id;
SELECT * FROM sales.purchase_orders;
"""


def test_scan_code_on_shop_sources(tmp_path: Path) -> None:
    plan = tmp_path / "shop.yaml"
    plan.write_text(SHOP_PLAN)
    src = tmp_path / "shop.sql"
    src.write_text(SHOP_SQL)
    report = scan_code([src], load_plan(plan))
    found = [(f.line, f.found, f.use) for f in report.findings]
    # Invoices unquoted folds to invoices, which is not the moved table "Invoices".
    assert found == [
        (1, '"Invoices"', 'sales."Invoices"'),
        (3, "order_lines", "sales.order_lines"),
        (5, "order_lines", "sales.order_lines"),
        (5, "orders", "sales.purchase_orders"),
    ]


def test_statements_using_parses_recorded_queries(tmp_path: Path) -> None:
    rows = [
        {"query": "SELECT * FROM users WHERE id = $1", "calls": 5},
        {"query": "SELECT * FROM client_mgmt.users WHERE id = $1", "calls": 9},
        {"query": "INSERT INTO public.turns (content) VALUES ($1)", "calls": 2},
        {"query": "WITH users AS (SELECT $1) SELECT * FROM users", "calls": 7},
        {"query": "SELECT $1", "calls": 100},
        {"query": "COPY turns FROM STDIN", "calls": 1},
    ]
    used = statements_using(rows, load_plan(COGITO_PLAN).plan, {"users", "turns"})
    assert used == {
        "users": [(5, "SELECT * FROM users WHERE id = $1")],
        "turns": [
            (2, "INSERT INTO public.turns (content) VALUES ($1)"),
            (1, "COPY turns FROM STDIN"),
        ],
    }
    plan = tmp_path / "shop.yaml"
    plan.write_text(SHOP_PLAN)
    shop = statements_using(
        [
            {"query": 'SELECT * FROM "Invoices" WHERE id = $1', "calls": 3},
            {"query": "SELECT * FROM invoices", "calls": 4},
        ],
        load_plan(plan).plan,
        {"Invoices"},
    )
    assert shop == {"Invoices": [(3, 'SELECT * FROM "Invoices" WHERE id = $1')]}


def _pgss_state(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return compat_usage(conn, load_plan(COGITO_PLAN)).pg_stat_statements


def test_compat_usage_on_cogito(cogito_dsn: str) -> None:
    dsn = cogito_dsn
    loaded = load_plan(COGITO_PLAN)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        before = compat_usage(conn, loaded)
        available = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
        ).fetchone()
    assert not any(v.exists for v in before.views)
    if before.pg_stat_statements != "available":
        assert before.advice and "pg_stat_user_tables" in " ".join(before.advice)
        assert all(v.calls is None for v in before.views)
        result = _cli("--dsn", dsn, "compat-usage", str(COGITO_PLAN))
        assert result.exit_code == 3  # nothing seen, but nothing could be
        assert f"pg_stat_statements: {before.pg_stat_statements}" in result.stdout
    if before.pg_stat_statements == "not installed" and available:
        # Installed but not preloaded: the view cannot be read, and we say so.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        assert _pgss_state(dsn) in ("not loaded", "available")

    with session(dsn, loaded) as eng:
        eng.apply(["users"], "cutover")
    # The application still reads public.users (the compatibility view) in an open
    # transaction: its lock shows it to a sample.
    app_conn = psycopg.connect(dsn, application_name="legacy-app")
    try:
        app_conn.execute("SELECT count(*) FROM public.users").fetchone()
        result = _cli(
            "--dsn", dsn, "compat-usage", str(COGITO_PLAN), "--sample", "0.3", "--format", "json"
        )
        assert result.exit_code == 1
        data = json.loads(result.stdout)
        views = {v["table"]: v for v in data["views"]}
        assert views["users"]["exists"] is True
        assert any("legacy-app" in s for s in views["users"]["live"])
        assert views["participants"]["exists"] is True
        assert views["participants"]["live"] == []
        assert views["turns"]["exists"] is False  # not moved yet
    finally:
        app_conn.close()


def test_compat_usage_sample_sees_a_concurrent_reader(empty_dsn: str, tmp_path: Path) -> None:
    load_shop(empty_dsn)
    plan = tmp_path / "shop.yaml"
    plan.write_text(SHOP_PLAN)
    with session(empty_dsn, load_plan(plan)) as eng:
        eng.apply(None, "cutover")
    started = threading.Event()
    done = threading.Event()

    def reader() -> None:
        with psycopg.connect(empty_dsn, application_name="report") as conn:
            conn.execute('SELECT * FROM public."Invoices"').fetchall()
            started.set()
            done.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert started.wait(10)
        with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
            usage = compat_usage(conn, load_plan(plan), sample_s=0.2)
    finally:
        done.set()
        t.join()
    views = {v.table: v for v in usage.views}
    assert views["Invoices"].view == 'public."Invoices"'
    assert views["Invoices"].exists
    assert any("report" in s for s in views["Invoices"].live)
    assert views["orders"].live == ()


def test_placeholders_keep_offsets() -> None:
    from orchestrator.tools.scan import _placeholders

    text = "a = %s AND b = %(name)s AND c = :c_1 AND d::int AND e LIKE 'x%%'"
    out = _placeholders(text)
    assert len(out) == len(text)
    assert out == "a = $1 AND b = $1       AND c = $1   AND d::int AND e LIKE 'x% '"
    assert textwrap.dedent(out) == out

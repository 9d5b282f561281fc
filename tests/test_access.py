"""Privilege boundaries per schema and `orchestrator verify-access`.

Roles are cluster-wide: every test makes its own, with a unique suffix, and drops them. The
proof that matters: a role the plan scopes to client_mgmt reads no conversation data after the
move, neither through the conversation tables nor through the compatibility views in public,
even when someone grants it the view by mistake; and verify-access reports exactly the
privileges that differ from the plan (extra and missing), agreeing with what the role can do.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import dict_row
from shop_schema import load_shop
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.model.context import build_context
from orchestrator.plan import load_plan
from orchestrator.run.session import session
from orchestrator.stages import rename
from orchestrator.tools.access import AccessReport, verify_access


class Roles:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.suffix = uuid.uuid4().hex[:10]
        self.made: list[str] = []

    def make(self, prefix: str) -> str:
        name = f"{prefix}_{self.suffix}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
        self.made.append(name)
        return name

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name in self.made:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def cogito_roles(cogito_dsn: str) -> Iterator[Roles]:
    roles = Roles(cogito_dsn)
    yield roles
    roles.drop()


@pytest.fixture
def shop_roles(empty_dsn: str) -> Iterator[Roles]:
    roles = Roles(empty_dsn)
    yield roles
    roles.drop()


def _admin(dsn: str, *statements: sql.Composable) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)


def _as(dsn: str, role: str, query: sql.Composable) -> list[tuple[Any, ...]]:
    """Run a query as `role` (SET ROLE in a superuser session)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        return list(conn.execute(query).fetchall())


def _refused(dsn: str, role: str, query: sql.Composable) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        _as(dsn, role, query)


def _report(dsn: str, plan: Path, *roles: str) -> AccessReport:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return verify_access(conn, load_plan(plan), list(roles))


def _find(report: AccessReport, role: str, schema: str, name: str) -> Any:
    return next(r for r in report.relations if (r.role, r.schema, r.name) == (role, schema, name))


def _schema(report: AccessReport, role: str, schema: str) -> Any:
    return next(s for s in report.schemas if (s.role, s.schema) == (role, schema))


COGITO_ACCESS_PLAN = """
version: 1
name: access_{suffix}
source_schema: public
schemas:
  client_mgmt:
    usage: [{billing}]
    grants:
      - role: {billing}
        privileges: [SELECT]
  conversation:
    usage: [{chat}]
    grants:
      - role: {chat}
        privileges: [SELECT, INSERT]
views:
  - name: personas
    depends_on: [users, participants]
    sql: >-
      SELECT u.email, p.name FROM client_mgmt.users u
      JOIN conversation.participants p ON p.user_id = u.id
  - name: personas_as_owner
    security_invoker: false
    depends_on: [users, participants]
    sql: >-
      SELECT u.email, p.name FROM client_mgmt.users u
      JOIN conversation.participants p ON p.user_id = u.id
tables:
  - name: users
    schema: client_mgmt
  - name: participants
    schema: conversation
"""


def test_a_role_scoped_to_client_mgmt_reads_no_conversation_data(
    cogito_dsn: str, cogito_roles: Roles, tmp_path: Path
) -> None:
    dsn = cogito_dsn
    billing = cogito_roles.make("billing")
    chat = cogito_roles.make("chat")
    outsider = cogito_roles.make("outsider")
    legacy = cogito_roles.make("legacy")  # not in the plan: read participants before the move
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        COGITO_ACCESS_PLAN.format(suffix=cogito_roles.suffix, billing=billing, chat=chat)
    )
    # Before the move billing reads users (a grant of its own) and not participants.
    _admin(
        dsn,
        sql.SQL("GRANT SELECT ON public.users TO {}").format(sql.Identifier(billing)),
        sql.SQL("GRANT SELECT ON public.participants TO {}").format(sql.Identifier(legacy)),
    )
    _refused(dsn, billing, sql.SQL("SELECT * FROM public.participants"))
    before = _report(dsn, plan)
    assert set(before.pending) == {"users", "participants"}
    assert before.relations == ()

    # users and participants form one unit (a foreign-key cycle): both cut over.
    with session(dsn, load_plan(plan)) as eng:
        eng.apply(["users"], "cutover")

    users = _as(dsn, billing, sql.SQL("SELECT count(*) FROM client_mgmt.users"))[0][0]
    assert users > 0
    # The compatibility view keeps billing's own grant; it reads the moved table as billing.
    assert _as(dsn, billing, sql.SQL("SELECT count(*) FROM public.users"))[0][0] == users
    # No conversation data: not through the new tables, not through the compatibility view.
    _refused(dsn, billing, sql.SQL("SELECT * FROM conversation.participants"))
    _refused(dsn, billing, sql.SQL("SELECT * FROM public.participants"))
    # Even a grant on the view by mistake does not open it: the view checks billing's own
    # rights on conversation.participants (security_invoker), and billing has none.
    _admin(
        dsn, sql.SQL("GRANT SELECT ON public.participants TO {}").format(sql.Identifier(billing))
    )
    _refused(dsn, billing, sql.SQL("SELECT * FROM public.participants"))
    _refused(dsn, outsider, sql.SQL("SELECT * FROM client_mgmt.users"))
    _refused(dsn, outsider, sql.SQL("SELECT * FROM public.users"))
    # chat, scoped to conversation, reads and writes participants, and reads no users.
    assert _as(dsn, chat, sql.SQL("SELECT count(*) FROM conversation.participants"))[0][0] > 0
    _refused(dsn, chat, sql.SQL("SELECT * FROM client_mgmt.users"))
    _refused(dsn, chat, sql.SQL("SELECT * FROM public.users"))

    report = _report(dsn, plan, outsider)
    assert report.ok, report.as_dict()
    assert report.pending == ()
    assert _schema(report, billing, "client_mgmt").status == "ok"
    assert not _schema(report, billing, "conversation").usage
    assert _find(report, billing, "client_mgmt", "users").effective == ("SELECT",)
    assert _find(report, billing, "conversation", "participants").effective == ()
    assert _find(report, billing, "public", "users").effective == ("SELECT",)  # the view
    assert _find(report, billing, "public", "participants").effective == ()
    assert _find(report, chat, "conversation", "participants").effective == ("SELECT", "INSERT")
    assert all(not r.effective for r in report.relations if r.role == outsider)
    # legacy's grant followed the data (it could read it before, it can after): through the
    # view, which needs no USAGE on conversation. verify-access calls both undeclared.
    assert _as(dsn, legacy, sql.SQL("SELECT count(*) FROM public.participants"))[0][0] > 0
    _refused(dsn, legacy, sql.SQL("SELECT * FROM conversation.participants"))
    carried = _report(dsn, plan, legacy)
    assert not carried.ok
    moved = _find(carried, legacy, "conversation", "participants")
    assert moved.extra == ("SELECT",) and "no USAGE on schema conversation" in moved.note
    assert _find(carried, legacy, "public", "participants").extra == ("SELECT",)
    # The CLI agrees, in text and json.
    runner = CliRunner()
    text = runner.invoke(app, ["--dsn", dsn, "verify-access", str(plan)])
    assert text.exit_code == 0, text.output
    assert "matches the plan" in text.stdout

    # The plan's cross-schema views: granting one to billing opens conversation data only
    # when the view runs with its owner's rights; verify-access says which one leaks.
    for view in ("personas", "personas_as_owner"):
        _admin(
            dsn,
            sql.SQL("GRANT SELECT ON {} TO {}").format(
                sql.Identifier("public", view), sql.Identifier(billing)
            ),
        )
    _refused(dsn, billing, sql.SQL("SELECT * FROM public.personas"))
    assert _as(dsn, billing, sql.SQL("SELECT count(*) FROM public.personas_as_owner"))[0][0] > 0
    views = _report(dsn, plan)
    assert not views.ok
    assert _find(views, billing, "public", "personas").extra == ()
    owner_view = _find(views, billing, "public", "personas_as_owner")
    assert owner_view.kind == "plan view" and owner_view.extra == ("SELECT",)
    assert "not security_invoker" in owner_view.note
    _admin(
        dsn,
        sql.SQL("REVOKE SELECT ON public.personas_as_owner FROM {}").format(
            sql.Identifier(billing)
        ),
    )
    assert _report(dsn, plan).ok

    # A leak: someone gives billing USAGE on conversation and SELECT on participants. Now
    # billing can read them, and verify-access names every extra privilege, the view too.
    _admin(
        dsn,
        sql.SQL("GRANT USAGE ON SCHEMA conversation TO {}").format(sql.Identifier(billing)),
        sql.SQL("GRANT SELECT ON conversation.participants TO {}").format(sql.Identifier(billing)),
        sql.SQL("REVOKE SELECT ON client_mgmt.users FROM {}").format(sql.Identifier(billing)),
    )
    assert _as(dsn, billing, sql.SQL("SELECT count(*) FROM public.participants"))[0][0] > 0
    leak = _report(dsn, plan)
    assert not leak.ok
    assert _schema(leak, billing, "conversation").status == "extra"
    assert _find(leak, billing, "conversation", "participants").extra == ("SELECT",)
    assert _find(leak, billing, "public", "participants").extra == ("SELECT",)
    assert _find(leak, billing, "client_mgmt", "users").missing == ("SELECT",)
    result = runner.invoke(app, ["--dsn", dsn, "verify-access", str(plan), "--format", "json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    extra = {
        (r["schema"], r["name"]) for r in data["relations"] if r["role"] == billing and r["extra"]
    }
    assert extra == {("conversation", "participants"), ("public", "participants")}


def test_verify_access_names_missing_roles(cogito_dsn: str, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        COGITO_ACCESS_PLAN.format(
            suffix="x",
            billing="nobody_" + uuid.uuid4().hex[:8],
            chat="nobody_" + uuid.uuid4().hex[:8],
        )
    )
    report = _report(cogito_dsn, plan)
    assert not report.ok
    assert len(report.problems) == 2
    assert all("does not exist" in p for p in report.problems)
    result = CliRunner().invoke(app, ["--dsn", cogito_dsn, "verify-access", str(plan)])
    assert result.exit_code == 1
    assert "does not exist" in result.stdout


def test_the_rename_strategy_applies_plan_grants_and_revokes_them_on_rollback(
    cogito_dsn: str, cogito_roles: Roles, tmp_path: Path
) -> None:
    billing = cogito_roles.make("billing")
    chat = cogito_roles.make("chat")
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(
        COGITO_ACCESS_PLAN.format(suffix="r", billing=billing, chat=chat)
        + "  - name: clients\n    schema: client_mgmt\n    options: {strategy: rename}\n"
    )
    loaded = load_plan(plan_path)
    with psycopg.connect(cogito_dsn, autocommit=True, row_factory=dict_row) as conn:
        # An existing grant the move must keep: billing already may UPDATE clients.
        conn.execute(
            sql.SQL("GRANT UPDATE ON public.clients TO {}").format(sql.Identifier(billing))
        )
        acl_before = conn.execute(
            "SELECT relacl::text AS acl FROM pg_class WHERE oid = 'public.clients'::regclass"
        ).fetchone()
        ctx = build_context(conn, loaded)
        m = ctx.moves["clients"]
        rel = ctx.catalog.table("public", "clients")
        assert rel is not None
        granted = rename.plan_grants(m, rel, loaded.plan)
        assert granted == [(billing, ("SELECT",))]
        with conn.transaction():
            for step in rename.forward_steps(m, rel, loaded.plan):
                conn.execute(step.sql)
        clients = _find(verify_access(conn, loaded), billing, "client_mgmt", "clients")
        assert clients.effective == ("SELECT", "UPDATE")
        assert clients.missing == () and clients.extra == ("UPDATE",)  # its own, kept
        with conn.transaction():
            for step in rename.rollback_steps(m, granted):
                conn.execute(step.sql)
        acl_after = conn.execute(
            "SELECT relacl::text AS acl FROM pg_class WHERE oid = 'public.clients'::regclass"
        ).fetchone()
    assert acl_after == acl_before


SHOP_ACCESS_PLAN = """
version: 1
name: shop_access
source_schema: public
schemas:
  sales:
    usage: [{sales}]
    grants:
      - role: {sales}
        privileges: [SELECT, INSERT, UPDATE]
  catalog:
    usage: [{sales}, {buyer}]
    grants:
      - role: {buyer}
        privileges: [SELECT, UPDATE]
tables:
  - name: orders
    schema: sales
  - name: order_lines
    schema: sales
  - name: products
    schema: catalog
  - name: warehouses
    schema: catalog
    key: [code]
"""


def test_shop_boundaries_with_composite_keys_and_column_grants(
    empty_dsn: str, shop_roles: Roles, tmp_path: Path
) -> None:
    dsn = empty_dsn
    load_shop(dsn)
    sales = shop_roles.make("sales")
    buyer = shop_roles.make("buyer")
    plan = tmp_path / "plan.yaml"
    plan.write_text(SHOP_ACCESS_PLAN.format(sales=sales, buyer=buyer))
    with session(dsn, load_plan(plan)) as eng:
        eng.apply(None, "cutover")
    # sales reads its own schema (composite key order_lines included), not the buyer's data.
    assert _as(dsn, sales, sql.SQL("SELECT count(*) FROM sales.order_lines"))[0][0] == 3
    _refused(dsn, sales, sql.SQL("SELECT * FROM catalog.products"))
    _refused(dsn, sales, sql.SQL("SELECT * FROM public.products"))
    _refused(dsn, buyer, sql.SQL("SELECT * FROM sales.orders"))
    _refused(dsn, buyer, sql.SQL("SELECT * FROM public.order_lines"))
    # The keyless table moved with its declared key; buyer reads it.
    assert _as(dsn, buyer, sql.SQL("SELECT count(*) FROM catalog.warehouses"))[0][0] == 2
    report = _report(dsn, plan)
    assert report.ok, report.as_dict()
    # sales has USAGE on catalog (declared) but no table there: nothing to read.
    assert _schema(report, sales, "catalog").status == "ok"
    assert _find(report, sales, "catalog", "products").effective == ()

    # A column-level grant is a privilege too: verify-access reports it, and it is real.
    _admin(
        dsn, sql.SQL("GRANT SELECT (title) ON catalog.products TO {}").format(sql.Identifier(sales))
    )
    assert _as(dsn, sales, sql.SQL("SELECT title FROM catalog.products ORDER BY 1")) == [
        ("anvil",),
        ("bolt",),
    ]
    _refused(dsn, sales, sql.SQL("SELECT sku FROM catalog.products"))
    report = _report(dsn, plan)
    products = _find(report, sales, "catalog", "products")
    assert products.columns_only == ("SELECT",) and products.extra == ("SELECT",)
    assert not report.ok

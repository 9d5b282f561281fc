"""Many table shapes: every generated table moves, verifies and rolls back with its data intact.

Hypothesis draws column types (text, numeric, timestamptz, jsonb, arrays, enums, domains,
bytea, booleans, NULLs everywhere), keys (bigint identity, uuid, text, composite), and names
that need quoting (mixed case, spaces, quotes, non-ASCII). Each example gets a database of its
own, moves its table through cutover with the copy strategy, writes through the compatibility
view, and rolls everything back: the catalog snapshot and the rows must come back exactly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import yaml
from conftest import EMPTY_TEMPLATE, dsn_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from orchestrator.db import connect
from orchestrator.model.catalog import snapshot
from orchestrator.plan import parse_plan
from orchestrator.run.session import session

TABLE_NAMES = ["plain", "Mixed Case", "naïve ünïcode", 'quo"te', "semi;colon", "x" * 63]
SCHEMA_NAMES = ["dest", "Dest Schema", "ziel_ß"]

# PostgreSQL text cannot hold NUL, and surrogates are not UTF-8.
TEXT = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))

# (SQL type, a strategy of Python values psycopg adapts to it)
COLUMN_TYPES: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "text": ("text", st.text(TEXT, max_size=20)),
    "numeric": ("numeric(12,3)", st.decimals(min_value=-10**8, max_value=10**8, places=3,
                                               allow_nan=False, allow_infinity=False)),
    "timestamptz": ("timestamptz", st.datetimes(timezones=st.just(__import__("datetime").UTC))),
    "jsonb": ("jsonb", st.dictionaries(st.text(TEXT, max_size=5), st.integers(-5, 5),
                                       max_size=3)
              .map(psycopg.types.json.Jsonb)),
    "int_array": ("int[]", st.lists(st.integers(-1000, 1000), max_size=4)),
    "text_array": ("text[]", st.lists(st.text(TEXT, max_size=5), max_size=3)),
    "bytea": ("bytea", st.binary(max_size=16)),
    "boolean": ("boolean", st.booleans()),
    "enum": ("mood", st.sampled_from(["sad", "ok", "happy"])),
    "domain": ("positive", st.integers(1, 10**6)),
}
KEYS = ["identity", "uuid", "text", "composite"]


@st.composite
def shapes(draw: st.DrawFn) -> dict[str, Any]:
    columns = draw(st.lists(st.sampled_from(sorted(COLUMN_TYPES)), min_size=1, max_size=5,
                            unique=True))
    key = draw(st.sampled_from(KEYS))
    n = draw(st.integers(0, 30))
    rows = []
    for i in range(n):
        values = {c: draw(st.none() | COLUMN_TYPES[c][1]) for c in columns}
        rows.append((i, values))
    return {"table": draw(st.sampled_from(TABLE_NAMES)),
            "schema": draw(st.sampled_from(SCHEMA_NAMES)), "columns": columns, "key": key,
            "rows": rows, "rename": draw(st.booleans())}


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    name = "orch_shape_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(EMPTY_TEMPLATE)))
    try:
        yield dsn_for(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def _create(conn: psycopg.Connection[Any], shape: dict[str, Any]) -> list[str]:
    """Create the table in public and fill it; return the key column names."""
    conn.execute("CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy')")
    conn.execute("CREATE DOMAIN public.positive AS int CHECK (VALUE > 0)")
    key_defs = {
        "identity": (["Id"], sql.SQL('"Id" bigint GENERATED ALWAYS AS IDENTITY')),
        "uuid": (["id"], sql.SQL("id uuid DEFAULT gen_random_uuid()")),
        "text": (["code"], sql.SQL("code text")),
        "composite": (["part", "Seq ü"], sql.SQL('part int, "Seq ü" text')),
    }
    keys, key_sql = key_defs[shape["key"]]
    cols = [sql.SQL("{} {}").format(sql.Identifier(f"c {c}"),
                                    sql.SQL("public." + COLUMN_TYPES[c][0])  # type: ignore[arg-type]
                                    if c in ("enum", "domain")
                                    else sql.SQL(COLUMN_TYPES[c][0]))  # type: ignore[arg-type]
            for c in shape["columns"]]
    table = sql.Identifier("public", shape["table"])
    conn.execute(sql.SQL("CREATE TABLE {} ({}, {}, PRIMARY KEY ({}))").format(
        table, key_sql, sql.SQL(", ").join(cols), sql.SQL(", ").join(map(sql.Identifier, keys))))
    for i, values in shape["rows"]:
        names = [f"c {c}" for c in shape["columns"]]
        params = [values[c] for c in shape["columns"]]
        if shape["key"] == "uuid":
            names.append("id")
            params.append(uuid.UUID(int=i + 1))
        elif shape["key"] == "text":
            names.append("code")
            params.append(f"k-{i:04d}-ü")
        elif shape["key"] == "composite":
            names += ["part", "Seq ü"]
            params += [i % 3, f"s{i}"]
        conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            table, sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(sql.Placeholder() * len(names))), params)
    return keys


def _rows(conn: psycopg.Connection[Any], schema: str, table: str,
          cols: list[str]) -> list[tuple[Any, ...]]:
    q = sql.SQL("SELECT {} FROM {} ORDER BY 1, 2").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)), sql.Identifier(schema, table))
    return [tuple(r) for r in conn.execute(q).fetchall()]


@settings(max_examples=int(os.environ.get("ORCHESTRATOR_SHAPES", "10")), deadline=None,
          derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shape=shapes())
def test_any_table_shape_moves_and_rolls_back_intact(server_dsn: str, shape: dict[str, Any],
                                                     tmp_path_factory: Any) -> None:
    with fresh_database(server_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        keys = _create(conn, shape)
        cols = keys + [f"c {c}" for c in shape["columns"]]
        snap_conn = connect(dsn, autocommit=True)
        snap_conn.execute("SET search_path = ''")
        schemas = ["public", shape["schema"]]
        before_catalog = snapshot(snap_conn, schemas)
        before_rows = _rows(conn, "public", shape["table"], cols)

        plan: dict[str, Any] = {
            "version": 1, "name": "shape",
            "tables": [{"name": shape["table"], "schema": shape["schema"]}],
        }
        if shape["rename"]:
            plan["tables"][0]["columns"] = {cols[-1]: {"rename": "renamed " + cols[-1][:40]}}
        path = Path(tmp_path_factory.mktemp("plan")) / "plan.yaml"
        path.write_text(yaml.safe_dump(plan, allow_unicode=True), encoding="utf-8")
        loaded = parse_plan(path.read_text(encoding="utf-8"), str(path))

        with session(dsn, loaded) as eng:
            eng.apply(None, "verify")
            eng.cutover(None)
        # The application keeps using the old name: a row written through the view.
        target_cols = cols if not shape["rename"] else [*cols[:-1], "renamed " + cols[-1][:40]]
        moved = _rows(conn, shape["schema"], shape["table"], target_cols)
        assert moved == before_rows
        assert _rows(conn, "public", shape["table"], cols) == before_rows
        if shape["key"] == "identity":
            conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(
                sql.Identifier("public", shape["table"])))
            before_rows = _rows(conn, "public", shape["table"], cols)

        with session(dsn, loaded) as eng:
            eng.rollback(shape["table"])
        assert snapshot(snap_conn, schemas) == before_catalog
        assert _rows(conn, "public", shape["table"], cols) == before_rows
        snap_conn.close()

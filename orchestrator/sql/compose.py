"""SQL composition helpers and pglast rewrites of catalog-produced definitions.

Identifiers always go through `sql.Identifier`. Two kinds of SQL text are embedded as-is, and
only through `catalog_sql`/`expression`: text PostgreSQL itself produced (format_type,
pg_get_expr, pg_get_indexdef, pg_get_triggerdef), and plan expressions that pglast has parsed
as exactly one scalar expression and deparsed again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError, scan
from pglast.stream import RawStream
from pglast.visitors import Visitor
from psycopg import sql

from orchestrator.errors import PlanError


def ident(*parts: str) -> sql.Identifier:
    return sql.Identifier(*parts)


def idents(names: Iterable[str], prefix: str | None = None) -> sql.Composed:
    """A comma-separated list of (optionally alias-qualified) identifiers."""
    if prefix is None:
        return sql.SQL(", ").join(sql.Identifier(n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names)


def catalog_sql(text: str) -> sql.SQL:
    """SQL text that PostgreSQL produced from its own catalog (a type name, a default...)."""
    return sql.SQL(text)


def row(names: Iterable[str], prefix: str | None = None) -> sql.Composed:
    """`(a, b)` or `(p.a, p.b)`: a row constructor for keyset comparisons."""
    return sql.SQL("({})").format(idents(names, prefix))


def expression(text: str, where: str = "expression") -> sql.SQL:
    """Parse a plan's SQL expression with pglast; refuse anything but one scalar expression."""
    try:
        stmts = parse_sql("SELECT (" + text + ")")
    except ParseError as exc:
        raise PlanError(
            f"{where}: {text!r} is not a valid SQL expression ({exc})",
            hint="fix the expression in the plan",
        ) from exc
    if len(stmts) != 1:
        raise PlanError(
            f"{where}: {text!r} must be a single expression",
            hint="remove the semicolon and what follows it",
        )
    stmt = stmts[0].stmt
    if (
        not isinstance(stmt, ast.SelectStmt)
        or stmt.fromClause
        or stmt.whereClause
        or not stmt.targetList
        or len(stmt.targetList) != 1
    ):
        raise PlanError(
            f"{where}: {text!r} must be a single expression",
            hint="write an expression over the row's columns, e.g. lower(email)",
        )
    deparsed = RawStream()(stmt.targetList[0].val)
    return sql.SQL("(" + deparsed + ")")


class _Rewriter(Visitor):
    """Point a statement at another relation and rename the columns it names."""

    def __init__(self, schema: str | None, table: str | None, columns: Mapping[str, str]) -> None:
        super().__init__()
        self.schema = schema
        self.table = table
        self.columns = columns

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> Any:
        if self.table is None:
            return None
        return ast.RangeVar(
            schemaname=self.schema,
            relname=self.table,
            inh=node.inh,
            relpersistence=node.relpersistence,
        )

    def visit_ColumnRef(self, ancestors: Any, node: ast.ColumnRef) -> Any:
        fields = list(node.fields or ())
        last = fields[-1]
        if isinstance(last, ast.String) and str(last.sval) in self.columns:
            fields[-1] = ast.String(sval=self.columns[str(last.sval)])
            return ast.ColumnRef(fields=tuple(fields))
        return None

    def visit_IndexElem(self, ancestors: Any, node: ast.IndexElem) -> Any:
        if node.name is not None and node.name in self.columns:  # plain column, no expression
            node.name = self.columns[node.name]
        return None


def _rename_strings(node: Any, columns: Mapping[str, str]) -> None:
    """Rename plain column-name lists (a trigger's UPDATE OF, a constraint's keys)."""
    for attr in ("columns", "keys", "including"):
        seq = getattr(node, attr, None)
        if seq:
            setattr(
                node,
                attr,
                tuple(
                    ast.String(sval=columns.get(str(s.sval), str(s.sval)))
                    if isinstance(s, ast.String)
                    else s
                    for s in seq
                ),
            )


def rewrite_definition(
    definition: str,
    schema: str | None,
    table: str | None,
    columns: Mapping[str, str] | None = None,
    *,
    new_name: str | None = None,
) -> sql.SQL:
    """Rewrite a CREATE INDEX / CREATE TRIGGER definition for another table (and columns).

    Without column renames or a new name, only the table's name is replaced in the catalog's
    own text, so the definition comes back exactly as PostgreSQL printed it (a deparse would
    turn SQL-standard syntax such as NORMALIZE(x, NFKC) into its function-call form)."""
    stmts = parse_sql(definition)
    assert len(stmts) == 1
    stmt = stmts[0].stmt
    assert stmt is not None
    relation = getattr(stmt, "relation", None)
    if isinstance(stmt, ast.IndexStmt) and relation is not None and not relation.inh:
        # A partitioned table's index prints as ON ONLY: rebuilt on a new partitioned table,
        # it must recurse to the partitions as CREATE INDEX on the parent does.
        definition = _drop_only(definition, relation.location)
        return rewrite_definition(definition, schema, table, columns, new_name=new_name)
    if not columns and new_name is None and table is not None and relation is not None:
        return sql.SQL(_replace_relation(definition, relation.location, (schema, table)))
    _Rewriter(schema, table, columns or {})(stmt)
    if columns:
        _rename_strings(stmt, columns)
    if new_name is not None:
        if isinstance(stmt, ast.IndexStmt):
            stmt.idxname = new_name
        elif isinstance(stmt, ast.CreateTrigStmt):
            stmt.trigname = new_name
    return sql.SQL(RawStream()(stmt))


def rewrite_statistics(definition: str, schema: str, table: str) -> sql.SQL:
    """A CREATE STATISTICS definition for the same columns of another table: the statistics
    object goes to `schema` under its name, and reads `table` (the catalog's text otherwise)."""
    stmt = parse_sql(definition)[0].stmt
    assert isinstance(stmt, ast.CreateStatsStmt) and stmt.defnames and stmt.relations
    stat_name = str(stmt.defnames[-1].sval)
    text = _replace_relation(definition, stmt.relations[0].location, (schema, table))
    # The statistics' own name is the third token: CREATE STATISTICS <name>.
    return sql.SQL(_replace_relation(text, scan(text)[2].start, (schema, stat_name)))


def retarget_relation(
    definition: str, old: tuple[str, str], new: tuple[str, str]
) -> str:
    """A view's query (printed with every name qualified) reading `new` wherever it read
    `old`; the rest of the catalog's text unchanged."""
    stmt = parse_sql(definition)[0].stmt
    found: list[int] = []

    class _Find(Visitor):
        def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
            if (node.schemaname, node.relname) == old and node.location is not None:
                found.append(node.location)

    assert stmt is not None
    _Find()(stmt)
    for location in sorted(found, reverse=True):
        definition = _replace_relation(definition, location, new)
    return definition


def rename_index(definition: str, schema: str, table: str, name: str) -> sql.SQL:
    """A pg_get_indexdef text for another table and under another name, otherwise exact."""
    stmt = parse_sql(definition)[0].stmt
    assert isinstance(stmt, ast.IndexStmt) and stmt.relation is not None
    assert stmt.relation.location is not None
    text = _replace_relation(definition, stmt.relation.location, (schema, table))
    tokens = scan(text)
    at = next(i for i, t in enumerate(tokens) if t.name == "INDEX") + 1
    return sql.SQL(_replace_relation(text, tokens[at].start, (name,)))


def _drop_only(text: str, location: int) -> str:
    """The text without the ONLY keyword just before the relation at `location`."""
    tokens = scan(text)
    i = next(n for n, t in enumerate(tokens) if t.start == location)
    assert i > 0 and tokens[i - 1].name == "ONLY"
    return text[: tokens[i - 1].start] + text[location:]


def _replace_relation(text: str, location: int, name: tuple[str | None, ...]) -> str:
    """Replace the (possibly qualified) relation name starting at `location` of `text` by
    `name`, quoted; everything else stays character for character."""
    tokens = scan(text)
    i = next(n for n, t in enumerate(tokens) if t.start == location)
    end = tokens[i].end
    # name ( '.' name )*: pglast gives character offsets, both ends inclusive.
    while i + 2 < len(tokens) and tokens[i + 1].name == "ASCII_46":
        i += 2
        end = tokens[i].end
    new = _quoted(tuple(p for p in name if p is not None))
    return text[:location] + new + text[end + 1 :]


def rename_in_expression(text: str, columns: Mapping[str, str]) -> sql.SQL:
    """Rename column references inside a catalog expression (a CHECK, a policy, a default)."""
    if not columns:
        return catalog_sql(text)
    stmt = parse_sql("SELECT " + text)[0].stmt
    assert isinstance(stmt, ast.SelectStmt) and stmt.targetList
    _Rewriter(None, None, columns)(stmt)
    return sql.SQL(RawStream()(stmt.targetList[0].val))


def render(conn: Any, statement: sql.Composable) -> str:
    """The exact text a statement sends (for dry-runs and the event log).

    The same text as `statement.as_string(conn)`, several times faster on the dry-run of a
    large plan (~100k statements): psycopg looks up the connection's encoding and escapes
    every identifier anew at every node, and the plan repeats the same few thousand names.
    Anything but the four plain node types is left to psycopg (tests/test_dryrun.py compares
    both renderings over a whole plan).
    """
    if getattr(conn, "closed", False):
        conn = None  # rendered after the session ended: psycopg's own escaping, no server's
    out: list[str] = []
    _render_into(conn, statement, out)
    return "".join(out)


def _render_into(conn: Any, obj: sql.Composable, out: list[str]) -> None:
    kind = type(obj)
    if kind is sql.Composed:
        for part in obj:  # type: ignore[attr-defined]
            _render_into(conn, part, out)
    elif kind is sql.SQL or kind is sql.Placeholder:
        out.append(obj.as_string(conn))  # no escaping involved: the text itself
    elif kind is sql.Identifier and isinstance(names := getattr(obj, "_obj", None), tuple):
        out.append(_quoted(names))
    else:
        out.append(obj.as_string(conn))


@functools.lru_cache(maxsize=65536)
def _quoted(names: tuple[str, ...]) -> str:
    # libpq's PQescapeIdentifier: double quotes around, embedded double quotes doubled.
    return ".".join('"' + n.replace('"', '""') + '"' for n in names)


class Body(sql.Composable):
    """A function body: composed SQL rendered, then passed as one string literal."""

    def __init__(self, body: sql.Composable) -> None:
        super().__init__(body)
        self._body = body

    def as_bytes(self, context: object = None) -> bytes:
        text = render(context, self._body)
        return sql.Literal(text).as_bytes(context)  # type: ignore[arg-type]

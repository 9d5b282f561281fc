"""Application SQL and the move: which queries name moved tables without their new schema, and
whether the compatibility views are still used.

scan-code finds SQL in `.sql` files and in the string literals of `.py` files (Python's `ast`),
parses every candidate with pglast (PostgreSQL's own parser) and walks the parse tree: a
`RangeVar` (a table reference in FROM, JOIN, INSERT INTO, UPDATE, DELETE, COPY, LOCK...) that
names a moved table without a schema, or with the source schema, is reported with the
qualified name to use. Strings that do not parse are not SQL (or not SQL pglast reads) and are
skipped; nothing is matched with regular expressions.

compat-usage asks pg_stat_statements, when it is installed and loaded, which recorded
statements still name the compatibility views (parsed the same way), and can sample pg_locks
for live sessions that hold a lock on a view. Without pg_stat_statements it says so.
"""

from __future__ import annotations

import ast as pyast
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from pglast import ast, parse_plpgsql, parse_sql
from pglast.enums import OnConflictAction, TransactionStmtKind
from pglast.parser import ParseError, split
from pglast.visitors import Visitor

from orchestrator.db import Conn
from orchestrator.errors import OrchestratorError
from orchestrator.plan import LoadedPlan, Plan
from orchestrator.tools.audit import qualified, quote

# Directories never worth scanning (virtualenvs, VCS, caches, vendored packages).
SKIP_DIRS = {
    ".git",
    ".hg",
    ".svn",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".tox",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "site-packages",
}

# A string must contain one of these words to be worth parsing (a cheap pre-filter only:
# every finding comes from the parse tree).
_SQL_WORDS = (
    "select",
    "insert",
    "update",
    "delete",
    "from",
    "join",
    "into",
    "table",
    "copy",
    "lock",
    "truncate",
    "merge",
    "view",
    "alter",
)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    table: str  # the plan table
    found: str  # as the statement names it
    use: str  # the qualified name to use
    source: str  # "sql" (a .sql file), "python" (a string literal), "function" (a body)
    statement: str  # the statement's kind (SelectStmt, InsertStmt...)
    # A statement that cannot work once its table lives on another server (the rest of the
    # fields then name it; `use` is empty).
    problem: str = ""


@dataclass
class ScanReport:
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    statements: int = 0  # statements parsed
    skipped: int = 0  # candidate strings or statements that did not parse
    unreadable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _targets(plan: Plan) -> dict[str, str]:
    """Source table name -> the qualified name to use after the move."""
    return {t.name: qualified(t.schema_, t.target_name) for t in plan.tables}


class _Refs(Visitor):
    """RangeVars and CTE names of one statement, the relations it writes, and its
    INSERTs with ON CONFLICT."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[ast.RangeVar] = []
        self.ctes: set[str] = set()
        self.bodies: list[ast.CreateFunctionStmt] = []
        self.writes: list[tuple[str | None, str]] = []  # (schema, name) of each written
        self.upserts: list[tuple[str | None, str]] = []  # ON CONFLICT with a target/DO UPDATE

    def _wrote(self, r: ast.RangeVar | None) -> None:
        if r is not None and r.relname:
            self.writes.append((r.schemaname, r.relname))

    def visit_InsertStmt(self, ancestors: Any, node: ast.InsertStmt) -> None:
        self._wrote(node.relation)
        c, r = node.onConflictClause, node.relation
        if c is not None and r is not None and r.relname and (
                c.infer is not None or c.action == OnConflictAction.ONCONFLICT_UPDATE):
            self.upserts.append((r.schemaname, r.relname))

    def visit_UpdateStmt(self, ancestors: Any, node: ast.UpdateStmt) -> None:
        self._wrote(node.relation)

    def visit_DeleteStmt(self, ancestors: Any, node: ast.DeleteStmt) -> None:
        self._wrote(node.relation)

    def visit_MergeStmt(self, ancestors: Any, node: ast.MergeStmt) -> None:
        self._wrote(node.relation)

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
        self.refs.append(node)

    def visit_CommonTableExpr(self, ancestors: Any, node: ast.CommonTableExpr) -> None:
        if node.ctename:
            self.ctes.add(node.ctename)

    def visit_CreateFunctionStmt(self, ancestors: Any, node: ast.CreateFunctionStmt) -> None:
        self.bodies.append(node)


@dataclass(frozen=True)
class _Ref:
    offset: int  # character offset in the text given to `references`
    table: str
    found: str
    statement: str
    problem: str = ""


UPSERT = ("INSERT ... ON CONFLICT with a conflict target (or DO UPDATE) fails once {t} lives on "
          "server {s}: postgres_fdw knows no unique index of it (do the upsert on server {s})")
TWO_SERVERS = ("this {what} writes {t} (on server {s} after the move) and {o} (on the "
               "source): two servers, no two-phase commit, so it is not atomic any more")


class _Servers:
    """Where each table a statement names lives after the move, and the writes of the open
    transaction block, to flag a transaction that would write two servers."""

    def __init__(self, plan: Plan) -> None:
        remote = plan.remote_schemas()
        self.plan = plan
        self.home: dict[tuple[str | None, str], str] = {}
        for t in plan.tables:
            server = remote.get(t.schema_)
            if server is not None:
                for key in ((None, t.name), (plan.source_schema, t.name),
                            (t.schema_, t.target_name)):
                    self.home[key] = server
        self.block: dict[str, str] | None = None  # server -> a table it writes
        self.block_start = 0

    def where(self, rel: tuple[str | None, str]) -> tuple[str, str]:
        """The server a relation lives on after the move, and its name as written."""
        name = qualified(rel[0], rel[1]) if rel[0] else quote(rel[1])
        return self.home.get(rel, "source"), name

    def statement(self, stmt: ast.RawStmt, v: _Refs, at: int) -> list[_Ref]:
        """Findings of one statement (and, at the end of a transaction block, of the block)."""
        if not self.home:
            return []
        out: list[_Ref] = []
        kind = type(stmt.stmt).__name__
        for rel in v.upserts:
            server, name = self.where(rel)
            if server != "source":
                out.append(_Ref(at, rel[1], name, kind, UPSERT.format(t=name, s=server)))
        if isinstance(stmt.stmt, ast.TransactionStmt):
            k = stmt.stmt.kind
            if k in (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START):
                self.block, self.block_start = {}, at
            elif self.block is not None and k in (TransactionStmtKind.TRANS_STMT_COMMIT,
                                                  TransactionStmtKind.TRANS_STMT_ROLLBACK,
                                                  TransactionStmtKind.TRANS_STMT_PREPARE):
                out += self._two(self.block, self.block_start, "transaction")
                self.block = None
            return out
        written: dict[str, str] = {}
        for rel in v.writes:
            server, name = self.where(rel)
            written.setdefault(server, name)
        if self.block is not None:
            for server, name in written.items():
                self.block.setdefault(server, name)
        else:
            out += self._two(written, at, kind)
        return out

    def _two(self, written: dict[str, str], at: int, kind: str) -> list[_Ref]:
        remote = [(s, n) for s, n in written.items() if s != "source"]
        if not remote or len(written) < 2:
            return []
        s, name = remote[0]
        other = next(n for x, n in written.items() if x != s)
        what = "transaction" if kind == "transaction" else "statement"
        return [_Ref(at, name, name, kind, TWO_SERVERS.format(what=what, t=name, s=s, o=other))]


def _blank_meta(text: str) -> str:
    """psql meta-commands (`\\connect`, `\\i`) blanked out, keeping every offset."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("\\"):
            out.append("".join(c if c in "\r\n" else " " for c in line))
        else:
            out.append(line)
    return "".join(out)


def _statements(text: str) -> Iterator[tuple[int, int, ast.RawStmt | None, str]]:
    """(base, start, statement, its text) for every statement of `text`.

    pglast locations count from the start of the text that was parsed: `base` is where that
    text starts in `text`; `start` is where the statement starts (both in characters)."""
    try:
        stmts = parse_sql(text)
    except ParseError:
        stmts = None
    if stmts is not None:
        for s in stmts:
            start = s.stmt_location or 0
            end = start + s.stmt_len if s.stmt_len else len(text)
            yield 0, start, s, text[start:end]
        return
    # Some statement does not parse: split with the scanner, parse each piece alone.
    try:
        slices = split(text, with_parser=False, only_slices=True)
    except (ParseError, ValueError):
        yield 0, 0, None, text
        return
    for sl in slices:
        piece = text[sl]
        try:
            parsed = parse_sql(piece)
        except ParseError:
            yield sl.start, sl.start, None, piece
            continue
        for s in parsed:
            start = s.stmt_location or 0
            end = start + s.stmt_len if s.stmt_len else len(piece)
            yield sl.start, sl.start + start, s, piece[start:end]


def _as_statement(q: str) -> tuple[str, int]:
    """A PL/pgSQL expression as a statement pglast parses, and how far its text moved.

    `x := (SELECT ...)` keeps its right-hand side; a condition becomes `SELECT condition`."""
    try:
        parse_sql(q)
        return q, 0
    except ParseError:
        pass
    cut = 0
    if ":=" in q:
        cut = q.index(":=") + 2
    elif "=" in q and q.split("=", 1)[0].strip().isidentifier():
        cut = q.index("=") + 1
    return "SELECT " + q[cut:], len("SELECT ") - cut


def _function_queries(stmt_text: str, node: ast.CreateFunctionStmt) -> list[tuple[int, str]]:
    """(offset in stmt_text, query) for each query of a SQL or PL/pgSQL function body.

    The offset is where the query's text starts; a PL/pgSQL expression comes back as a
    statement (see `_as_statement`) with the offset moved by as much as its text moved."""
    language, body = None, None
    for opt in node.options or ():
        if opt.defname == "language":
            language = getattr(opt.arg, "sval", None)
        elif opt.defname == "as" and opt.arg:
            first = opt.arg[0] if isinstance(opt.arg, tuple) else opt.arg
            body = getattr(first, "sval", None)
    if body is None:
        return []
    at = max(stmt_text.find(body), 0)
    if language == "sql":
        return [(at, body)]
    if language != "plpgsql":
        return []
    try:
        tree = parse_plpgsql(stmt_text)
    except (ParseError, Exception):  # pglast raises plain Exceptions for PL/pgSQL errors
        return []
    out: list[tuple[int, str]] = []
    for lineno, q in _plpgsql_queries(tree, 1):
        # lineno counts the body's lines; PERFORM's query reads "SELECT ..." in the tree.
        line_start = 0
        for _ in range(max(lineno - 1, 0)):
            nxt = body.find("\n", line_start)
            if nxt == -1:
                break
            line_start = nxt + 1
        pos = body.find(q, line_start)
        if pos == -1 and q.startswith("SELECT "):
            pos = body.find(q[len("SELECT ") :], line_start)
        text, shift = _as_statement(q)
        out.append((at + (pos if pos != -1 else line_start) - shift, text))
    return out


def _plpgsql_queries(node: Any, lineno: int) -> Iterator[tuple[int, str]]:
    """(line in the body, query) of every SQL expression of a PL/pgSQL parse tree."""
    if isinstance(node, dict):
        if isinstance(node.get("lineno"), int):
            lineno = node["lineno"]
        q = node.get("query")
        if isinstance(q, str):
            yield lineno, q
        for v in node.values():
            yield from _plpgsql_queries(v, lineno)
    elif isinstance(node, list):
        for v in node:
            yield from _plpgsql_queries(v, lineno)


def references(text: str, plan: Plan, depth: int = 0) -> tuple[list[_Ref], int, int]:
    """References to moved tables in SQL text: (refs, statements parsed, pieces skipped)."""
    targets = _targets(plan)
    refs: list[_Ref] = []
    parsed = skipped = 0
    servers = _Servers(plan)
    for base, start, stmt, stmt_text in _statements(text):
        if stmt is None:
            if stmt_text.strip():
                skipped += 1
            continue
        parsed += 1
        v = _Refs()
        v(stmt)
        kind = type(stmt.stmt).__name__
        refs += servers.statement(stmt, v, start)
        for r in v.refs:
            name = r.relname
            if name not in targets:
                continue
            if r.schemaname is None:
                if r.catalogname is None and name in v.ctes:
                    continue  # a CTE of the same name, not the table
                found = quote(name)
            elif r.schemaname == plan.source_schema and r.catalogname is None:
                found = qualified(r.schemaname, name)
            else:
                continue
            loc = r.location if r.location is not None and r.location >= 0 else 0
            refs.append(_Ref(base + loc, name, found, kind))
        if depth == 0:
            for fn in v.bodies:
                for at, query in _function_queries(stmt_text, fn):
                    inner, p, s = references(query, plan, depth + 1)
                    parsed += p
                    skipped += s
                    refs += [
                        _Ref(start + at + x.offset, x.table, x.found, "function body")
                        for x in inner
                    ]
    return refs, parsed, skipped


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def scan_sql_text(
    text: str, plan: Plan, path: str, report: ScanReport, first_line: int = 1, source: str = "sql"
) -> None:
    targets = _targets(plan)
    refs, parsed, skipped = references(text, plan)
    report.statements += parsed
    report.skipped += skipped
    for r in refs:
        report.findings.append(
            Finding(
                path=path,
                line=first_line + _line_of(text, max(r.offset, 0)) - 1,
                table=r.table,
                found=r.found,
                use="" if r.problem else targets.get(r.table, ""),
                source="function" if r.statement == "function body" else source,
                statement=r.statement,
                problem=r.problem,
            )
        )


def _placeholders(text: str) -> str:
    """Driver placeholders (`%s`, `%(name)s`, `:name`) as `$1`, same length (offsets hold)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%" and i + 1 < n:
            if text[i + 1] == "s":
                out.append("$1")
                i += 2
                continue
            if text[i + 1] == "%":
                out.append("% ")
                i += 2
                continue
            if text[i + 1] == "(":
                end = text.find(")", i)
                if end != -1 and end + 1 < n and text[end + 1] in "sbt":
                    width = end + 2 - i
                    out.append("$1" + " " * (width - 2))
                    i = end + 2
                    continue
        if (
            c == ":"
            and i + 1 < n
            and (text[i + 1].isalpha() or text[i + 1] == "_")
            and (i == 0 or text[i - 1] != ":")
        ):
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            width = j - i
            out.append("$1" + " " * (width - 2) if width >= 2 else "$")
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _looks_like_sql(s: str) -> bool:
    low = s.lower()
    return any(w in low for w in _SQL_WORDS)


def scan_python(text: str, plan: Plan, path: str, report: ScanReport) -> None:
    try:
        tree = pyast.parse(text, filename=path)
    except (SyntaxError, ValueError):
        report.unreadable.append(f"{path}: not valid Python")
        return
    for node in pyast.walk(tree):
        if not (isinstance(node, pyast.Constant) and isinstance(node.value, str)):
            continue
        value = node.value
        if not _looks_like_sql(value):
            continue
        candidate = _placeholders(value)
        try:
            parse_sql(candidate)
        except ParseError:
            report.skipped += 1
            continue
        before = len(report.findings)
        scan_sql_text(candidate, plan, path, report, first_line=node.lineno, source="python")
        # A string's lines are exact for triple-quoted literals; never past the literal's end.
        end = getattr(node, "end_lineno", None) or node.lineno
        for i in range(before, len(report.findings)):
            f = report.findings[i]
            if f.line > end:
                report.findings[i] = Finding(
                    f.path, end, f.table, f.found, f.use, f.source, f.statement
                )


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                parts = set(child.relative_to(p).parts[:-1])
                if parts & SKIP_DIRS:
                    continue
                if child.is_file() and child.suffix in (".sql", ".py"):
                    yield child
        elif p.is_file():
            yield p


def scan_code(paths: Iterable[str | Path], loaded: LoadedPlan) -> ScanReport:
    """Scan files and directories for application SQL that names moved tables unqualified."""
    plan = loaded.plan
    given = [Path(x) for x in paths]
    missing = [str(x) for x in given if not x.exists()]
    if missing:
        raise OrchestratorError(
            f"no such file or directory: {', '.join(missing)}",
            hint="give scan-code the application's source files or directories",
        )
    report = ScanReport()
    for p in _files(given):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.unreadable.append(f"{p}: {exc}")
            continue
        report.files += 1
        if p.suffix == ".py":
            scan_python(text, plan, str(p), report)
        else:
            scan_sql_text(_blank_meta(text), plan, str(p), report)
    report.findings.sort(key=lambda f: (f.path, f.line, f.table))
    return report


# --- compat-usage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewUse:
    view: str  # schema.name of the compatibility view
    table: str  # the plan table
    exists: bool
    calls: int | None  # pg_stat_statements calls of statements naming it (None: unknown)
    statements: tuple[str, ...]  # up to five such statements, most called first
    live: tuple[str, ...]  # sessions seen holding a lock on it while sampling


@dataclass(frozen=True)
class CompatUsage:
    plan: str
    pg_stat_statements: str  # "available", "not installed", "not loaded" or "no permission"
    stats_since: str | None
    sampled_s: float
    views: tuple[ViewUse, ...]
    advice: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ADVICE_NO_PGSS = (
    "pg_stat_statements is how this command counts statements: add it to "
    "shared_preload_libraries (a restart), then CREATE EXTENSION pg_stat_statements, let the "
    "application run through a full cycle (a day, a month-end), and run compat-usage again.",
    "PostgreSQL keeps no scan counters for views: a read through a compatibility view counts "
    "in pg_stat_user_tables as a scan of the moved table, the same as a direct read, so those "
    "counters cannot tell the two apart.",
    "Without it: log the statements for a while (log_statement = 'all', or "
    "log_min_duration_statement = 0) and look for the old names in the log; run "
    "`orchestrator scan-code` over the application; or sample live sessions with "
    "`--sample SECONDS` (it sees only sessions that use a view while it watches).",
)


def recorded_problems(conn: Conn, plan: Plan) -> tuple[str, list[str]]:
    """The statements pg_stat_statements recorded that cannot work once their table lives on
    another server (each with why), and whether it could tell."""
    state, rows, _ = _stat_rows(conn)
    out: list[str] = []
    for r in rows:
        query = str(r["query"])
        refs, _, _ = references(_placeholders(query), plan)
        out += [f"{' '.join(query.split())[:160]} ({r['calls']} calls): {x.problem}"
                for x in refs if x.problem]
    return state, out


def _stat_rows(conn: Conn) -> tuple[str, list[dict[str, Any]], str | None]:
    ext = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_stat_statements'"
    ).fetchone()
    if ext is None:
        return "not installed", [], None
    from psycopg import sql

    schema = str(ext["nspname"])
    try:
        with conn.transaction():
            rows = conn.execute(
                sql.SQL(
                    "SELECT query, sum(calls)::bigint AS calls FROM {} "
                    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    " GROUP BY query"
                ).format(sql.Identifier(schema, "pg_stat_statements"))
            ).fetchall()
    except psycopg.errors.ObjectNotInPrerequisiteState:
        return "not loaded", [], None
    except psycopg.errors.InsufficientPrivilege:
        return "no permission", [], None
    since = None
    try:
        with conn.transaction():
            info = conn.execute(
                sql.SQL("SELECT stats_reset::text AS since FROM {}").format(
                    sql.Identifier(schema, "pg_stat_statements_info")
                )
            ).fetchone()
            since = None if info is None else info["since"]
    except psycopg.Error:
        since = None
    return "available", list(rows), since


def statement_counts(conn: Conn, plan: Plan, tables: set[str]
                     ) -> dict[str, list[tuple[int, str]]] | None:
    """pg_stat_statements' calls of each recorded statement naming a table's old name
    (None: pg_stat_statements is not available)."""
    state, rows, _ = _stat_rows(conn)
    return statements_using(rows, plan, tables) if state == "available" else None


def _ours(query: str, plan: Plan) -> bool:
    """A statement the orchestrator ran, not the application: it names the control or the
    retired schema (logs, proofs, the retired table), or a moved table's new name beside
    its old one (the copy, verify and replay read one and write the other). A heuristic on
    the text: an application statement naming both names would be left out too."""
    flat = query.replace('"', "").lower()
    if f"{plan.control_schema}.".lower() in flat or f"{plan.retired_schema}.".lower() in flat:
        return True
    return any(
        f"{t.schema_}.{t.target_name}".lower() in flat
        and f"{plan.source_schema}.{t.name}".lower() in flat
        for t in plan.tables)


def statements_using(
    rows: Iterable[dict[str, Any]], plan: Plan, tables: set[str]
) -> dict[str, list[tuple[int, str]]]:
    """Plan table -> [(calls, query)] of recorded statements that name its old name, leaving
    out the orchestrator's own (see `_ours`)."""
    out: dict[str, list[tuple[int, str]]] = {}
    names = [t.lower() for t in tables]
    for r in rows:
        query = str(r["query"])
        low = query.lower()
        # Parsing is the cost (thousands of recorded statements): only texts naming a table.
        if not any(n in low for n in names) or not _looks_like_sql(query) or _ours(query, plan):
            continue
        try:
            refs, _, _ = references(query, plan)
        except Exception:  # noqa: S112 - a text pglast cannot read is not ours to judge
            continue
        for name in {x.table for x in refs} & tables:
            out.setdefault(name, []).append((int(r["calls"] or 0), query))
    return out


def compat_views(conn: Conn, plan: Plan) -> dict[str, int]:
    """The plan tables whose old name is a view now (its oid): the compatibility views."""
    rows = conn.execute(
        "SELECT c.oid::bigint AS oid, c.relname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'v' AND c.relname = ANY(%s)",
        (plan.source_schema, [t.name for t in plan.tables]),
    ).fetchall()
    return {str(r["relname"]): int(r["oid"]) for r in rows}


def live_users(conn: Conn, views: dict[str, int], seconds: float) -> dict[str, set[str]]:
    """The sessions seen holding a lock on each view (name -> oid) while watching for
    `seconds` (none when 0; one look when shorter than a tenth of a second)."""
    oids = {oid: name for name, oid in views.items()}
    seen: dict[str, set[str]] = {}
    if seconds <= 0 or not oids:
        return seen
    deadline = time.monotonic() + seconds
    while True:
        for r in conn.execute(
            "SELECT l.relation::bigint AS oid, a.pid, a.usename, a.application_name "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.relation = ANY(%s::oid[]) AND l.pid <> pg_backend_pid()",
            (sorted(oids),),
        ).fetchall():
            who = f"pid {r['pid']} ({r['usename']}, {r['application_name'] or 'no application'})"
            seen.setdefault(oids[int(r["oid"])], set()).add(who)
        if time.monotonic() >= deadline:
            return seen
        time.sleep(0.1)


def compat_usage(conn: Conn, loaded: LoadedPlan, sample_s: float = 0.0) -> CompatUsage:
    """Whether the compatibility views of a plan are still used (read-only)."""
    plan = loaded.plan
    src = plan.source_schema
    views = compat_views(conn, plan)
    state, stat_rows, since = _stat_rows(conn)
    used = statements_using(stat_rows, plan, set(views)) if state == "available" else {}
    live = live_users(conn, views, sample_s)
    out = []
    for t in plan.tables:
        if not plan.options_for(t).compat_view:
            continue
        hits = sorted(used.get(t.name, []), key=lambda x: (-x[0], x[1]))
        out.append(
            ViewUse(
                view=qualified(src, t.name),
                table=t.name,
                exists=t.name in views,
                calls=sum(c for c, _ in hits) if state == "available" else None,
                statements=tuple(q for _, q in hits[:5]),
                live=tuple(sorted(live.get(t.name, set()))),
            )
        )
    advice: list[str] = []
    if state != "available":
        advice += ADVICE_NO_PGSS
    else:
        advice.append(
            "Counts cover statements recorded since pg_stat_statements was last reset"
            + (f" ({since})" if since else "")
            + "; a statement naming the old name unqualified may resolve elsewhere through "
            "search_path, and statements inside functions count only with "
            "pg_stat_statements.track = 'all'."
        )
    return CompatUsage(
        plan=plan.name,
        pg_stat_statements=state,
        stats_since=since,
        sampled_s=sample_s,
        views=tuple(out),
        advice=tuple(advice),
    )

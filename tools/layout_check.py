"""Layout checks of a Python package, read from its source alone (AST and tokens; nothing of the
package is imported, so the checks work on a tree that is half-way through a move).

    python -m tools.layout_check [--format text|json] [--root orchestrator] [--top 10]

Reports the largest classes and functions in lines of code, the import cycles between the
package's modules, and the modules that write the control schema's tables. Exits 1 when a class
has over MAX_CLASS_LINES code lines, a function over MAX_FUNCTION_LINES, an import cycle exists,
a module outside the state package writes a control table, or a file cannot be parsed; else 0.

Code lines: the lines from the `def`/`class` line to the last line of the definition (decorators
excluded) that hold at least one token other than a comment, a bare string statement (docstrings)
or a multi-line string literal (SQL text and sample data are data). Lines that hold code next to
such a literal (`q = \"\"\"`, `\"\"\")`) count. A class counts all its lines, methods included.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import sys
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import networkx as nx

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80
CONTROL_TABLES = ("meta", "plans", "stages", "settings", "saved", "events")
STATE_PACKAGE = "state"  # under the root package: the only one allowed to write control tables
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "orchestrator"


@dataclass(frozen=True)
class Module:
    name: str  # dotted: orchestrator.run.engine (a package: orchestrator.stages)
    path: Path
    relpath: str  # relative to the root package directory: run/engine.py, stages/__init__.py
    reexport_only: bool  # a package __init__ with only a docstring, imports, dunder assignments

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


@dataclass(frozen=True)
class Size:
    kind: Literal["class", "function"]
    module: str
    qualname: str  # as Python spells it: Engine.run, build.<locals>.step
    first: int  # the def/class line
    last: int
    code_lines: int

    @property
    def where(self) -> str:
        return f"{self.module}:{self.qualname}"


@dataclass(frozen=True, order=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or, for unresolved imports, the missing name)
    line: int


@dataclass(frozen=True)
class ControlWrite:
    module: str
    line: int
    verb: str  # INSERT INTO, UPDATE, DELETE FROM, TRUNCATE
    table: str
    statement: str  # the matched head of the statement, e.g. "UPDATE {s}.stages"


@dataclass(frozen=True)
class ParseError:
    module: str
    message: str


@dataclass(frozen=True)
class Report:
    classes: tuple[Size, ...]  # the largest, biggest first
    functions: tuple[Size, ...]
    cycles: tuple[tuple[str, ...], ...]
    cycle_edges: tuple[Import, ...]  # the imports inside the cycles
    writers: tuple[ControlWrite, ...]
    unresolved: tuple[Import, ...]  # imports of package modules or names that do not exist
    parse_errors: tuple[ParseError, ...]
    problems: tuple[str, ...]  # what makes the exit status 1


@dataclass(frozen=True)
class _Source:
    module: Module
    text: str
    tree: ast.Module


# --- reading the tree ------------------------------------------------------------------------


def _walk_files(root: Path) -> Iterator[tuple[Path, str, str]]:
    """(path, dotted name, relative path) of every .py file under the root package."""
    root = root.resolve()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        parts = [root.name, *rel.parts[:-1]]
        if rel.name != "__init__.py":
            parts.append(rel.stem)
        yield path, ".".join(parts), rel.as_posix()


def _reexport_only(tree: ast.Module) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom) or _is_bare_string(stmt):
            continue
        targets = (
            stmt.targets
            if isinstance(stmt, ast.Assign)
            else [stmt.target]
            if isinstance(stmt, ast.AnnAssign)
            else None
        )
        if targets and all(
            isinstance(t, ast.Name) and t.id.startswith("__") and t.id.endswith("__")
            for t in targets
        ):
            continue
        return False
    return True


def _load(root: Path) -> tuple[list[_Source], list[ParseError]]:
    sources: list[_Source] = []
    errors: list[ParseError] = []
    for path, name, rel in _walk_files(root):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text, filename=str(path))
        except FileNotFoundError:  # moved away while we looked
            continue
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as exc:
            errors.append(ParseError(name, f"{rel}: {exc}"))
            continue
        is_init = path.name == "__init__.py"
        module = Module(name, path, rel, is_init and _reexport_only(tree))
        sources.append(_Source(module, text, tree))
    return sources, errors


def modules(root: Path = DEFAULT_ROOT) -> list[Module]:
    """Every parsable module of the package, sorted by relative path."""
    return [s.module for s in _load(root)[0]]


def parse_errors(root: Path = DEFAULT_ROOT) -> list[ParseError]:
    return _load(root)[1]


# --- sizes -----------------------------------------------------------------------------------


def _is_bare_string(stmt: ast.AST) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
    tokenize.ENCODING,
}
_END = 1 << 30


def _code_lines(text: str, tree: ast.Module) -> set[int]:
    """The lines holding a token that is not a comment, a bare string or a multi-line literal."""
    lines = re.split(r"\r\n|\r|\n", text)

    def column(row: int, byte_offset: int) -> int:  # ast offsets are UTF-8 bytes
        line = lines[row - 1] if row <= len(lines) else ""
        return len(line.encode()[:byte_offset].decode(errors="ignore"))

    masks: dict[int, list[tuple[int, int]]] = {}
    for node in ast.walk(tree):
        literal = isinstance(node, ast.JoinedStr) or (
            isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)
        )
        if not isinstance(node, ast.expr | ast.stmt) or not (
            _is_bare_string(node) or (literal and node.lineno != node.end_lineno)
        ):
            continue
        first, last = node.lineno, node.end_lineno or node.lineno
        start, end = column(first, node.col_offset), column(last, node.end_col_offset or 0)
        if first == last:
            masks.setdefault(first, []).append((start, end))
            continue
        masks.setdefault(first, []).append((start, _END))
        for row in range(first + 1, last):
            masks.setdefault(row, []).append((0, _END))
        masks.setdefault(last, []).append((0, end))

    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        row, col = tok.start
        if tok.type in _NOT_CODE or any(a <= col < b for a, b in masks.get(row, ())):
            continue
        code.add(row)
    return code


_Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _definitions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, _Def]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _Def):
            qualname = prefix + child.name
            yield qualname, child
            inner = "." if isinstance(child, ast.ClassDef) else ".<locals>."
            yield from _definitions(child, qualname + inner)
        else:
            yield from _definitions(child, prefix)


def sizes(root: Path = DEFAULT_ROOT) -> list[Size]:
    """Every class and function (methods and nested functions too), biggest first."""
    found: list[Size] = []
    for src in _load(root)[0]:
        code = _code_lines(src.text, src.tree)
        for qualname, node in _definitions(src.tree):
            last = node.end_lineno or node.lineno
            count = sum(1 for row in range(node.lineno, last + 1) if row in code)
            kind: Literal["class", "function"] = (
                "class" if isinstance(node, ast.ClassDef) else "function"
            )
            found.append(Size(kind, src.module.name, qualname, node.lineno, last, count))
    return sorted(found, key=lambda s: (-s.code_lines, s.where))


# --- imports ---------------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (its else branch is kept)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _bound_names(tree: ast.Module) -> set[str] | None:
    """Top-level names a module defines; None when it cannot tell (star import, __getattr__)."""
    names: set[str] = set()
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        stmt = stack.pop()
        if isinstance(stmt, _Def):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            for alias in stmt.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        for field in ("body", "orelse", "finalbody", "handlers"):
            if not isinstance(stmt, _Def):
                stack.extend(s for s in getattr(stmt, field, ()) if isinstance(s, ast.stmt))
        if isinstance(stmt, ast.Try):
            for handler in stmt.handlers:
                stack.extend(handler.body)
    return None if "__getattr__" in names else names


def _contains(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def _ancestors(name: str) -> Iterator[str]:
    while "." in name:
        name = name.rpartition(".")[0]
        yield name


def _imports(
    src: _Source, known: dict[str, _Source], namespaces: set[str], package: str
) -> Iterator[Import]:
    """The runtime imports of one module: edges to package modules, and unresolved names
    (yielded with a target that is neither in `known` nor a namespace package)."""
    me = src.module

    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    def reach(target: str, line: int, explicit: bool = True) -> Iterator[Import]:
        """Importing `target` runs its __init__ and those of its packages, except the packages
        holding the importer (they are running already)."""
        if explicit:
            yield Import(me.name, target, line)
        for parent in _ancestors(target):
            if parent in known and not _contains(parent, me.name):
                yield Import(me.name, parent, line)

    for node in _runtime_nodes(src.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if inside(alias.name):
                    yield from reach(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.name if me.is_package else me.name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not inside(base):
                continue
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            only_modules = len(submodules) == len(node.names)
            # `from . import sibling` needs no more of the running package than its path
            yield from reach(base, node.lineno, not (only_modules and _contains(base, me.name)))
            for sub in submodules:
                yield Import(me.name, sub, node.lineno)
            if base in known:
                bound = _bound_names(known[base].tree)
                for alias in node.names:
                    name = f"{base}.{alias.name}"
                    missing = name not in known and name not in namespaces
                    if missing and bound is not None and alias.name not in {"*", *bound}:
                        yield Import(me.name, name, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and inside(node.args[0].value)
        ):
            yield from reach(node.args[0].value, node.lineno)


def _all_imports(root: Path) -> tuple[list[Import], list[Import]]:
    sources = _load(root)[0]
    known = {s.module.name: s for s in sources}
    namespaces = {parent for name in known for parent in _ancestors(name)} - set(known)
    package = root.resolve().name
    edges: set[Import] = set()
    unresolved: set[Import] = set()
    for src in sources:
        for imp in _imports(src, known, namespaces, package):
            if imp.target in namespaces:  # a directory without __init__.py: no code runs
                continue
            if imp.target not in known:
                unresolved.add(imp)
            elif imp.target != imp.source:
                edges.add(imp)
    return sorted(edges), sorted(unresolved)


def import_edges(root: Path = DEFAULT_ROOT) -> list[Import]:
    """Runtime imports between the package's modules (one per importing line)."""
    return _all_imports(root)[0]


def unresolved_imports(root: Path = DEFAULT_ROOT) -> list[Import]:
    """Imports of package modules, or of names from package modules, that do not exist."""
    return _all_imports(root)[1]


def import_cycles(root: Path = DEFAULT_ROOT) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted."""
    graph: Any = nx.DiGraph()
    graph.add_edges_from((e.source, e.target) for e in import_edges(root))
    components = [sorted(str(n) for n in c) for c in nx.strongly_connected_components(graph)]
    return sorted(c for c in components if len(c) > 1)


# --- control-table writes --------------------------------------------------------------------

_TABLE = "|".join(CONTROL_TABLES)
_WRITE = re.compile(
    r"\b(?P<verb>INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE)"
    r"(?:\s+TABLE)?(?:\s+ONLY)?"
    r"(?:\s+[^\s,;]+\s*,)*"  # TRUNCATE's list: a control table may come after others
    r"\s+(?P<schema>\{[^{}]*\}|\"[^\"]+\"|[A-Za-z_][\w$]*)\s*\.\s*\"?"
    rf"(?P<table>{_TABLE})\b",
    re.IGNORECASE,
)


def _flatten(node: ast.AST) -> str:
    """A string expression's text, each computed part as `{}`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_flatten(v) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _flatten(node.left) + _flatten(node.right)
    return "{}"


def _texts(tree: ast.Module) -> Iterator[tuple[ast.expr, str]]:
    """Every string constant, f-string and `+` concatenation, docstrings excepted."""
    skip = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and _is_bare_string(n)}
    skip |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)) or isinstance(
            node, ast.JoinedStr | ast.BinOp
        ):
            assert isinstance(node, ast.expr)
            yield node, _flatten(node)


def control_writers(root: Path = DEFAULT_ROOT) -> list[ControlWrite]:
    """Every string in the package that writes a control table, wherever its module lives."""
    found: set[ControlWrite] = set()
    for src in _load(root)[0]:
        for node, text in _texts(src.tree):
            for m in _WRITE.finditer(text):
                line = min(node.lineno + text.count("\n", 0, m.start()), node.end_lineno or 0)
                verb = " ".join(m["verb"].upper().split())
                head = f"{verb} {m['schema']}.{m['table']}"
                found.add(ControlWrite(src.module.name, line, verb, m["table"].lower(), head))
    return sorted(found, key=lambda w: (w.module, w.line, w.table))


def in_state_package(module: str, root: Path = DEFAULT_ROOT) -> bool:
    state = f"{root.resolve().name}.{STATE_PACKAGE}"
    return module == state or module.startswith(state + ".")


# --- the report ------------------------------------------------------------------------------


def check(root: Path = DEFAULT_ROOT, top: int = 10) -> Report:
    all_sizes = sizes(root)
    classes = [s for s in all_sizes if s.kind == "class"]
    functions = [s for s in all_sizes if s.kind == "function"]
    cycles = import_cycles(root)
    edges, unresolved = _all_imports(root)
    members = [set(c) for c in cycles]
    cycle_edges = [e for e in edges if any({e.source, e.target} <= m for m in members)]
    writers = control_writers(root)
    errors = parse_errors(root)

    problems = [
        f"class {s.where} has {s.code_lines} code lines (limit {MAX_CLASS_LINES})"
        for s in classes
        if s.code_lines > MAX_CLASS_LINES
    ]
    problems += [
        f"function {s.where} has {s.code_lines} code lines (limit {MAX_FUNCTION_LINES})"
        for s in functions
        if s.code_lines > MAX_FUNCTION_LINES
    ]
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles]
    problems += [
        f"{w.module}:{w.line} writes control table {w.table} outside "
        f"{root.resolve().name}.{STATE_PACKAGE} ({w.statement})"
        for w in writers
        if not in_state_package(w.module, root)
    ]
    problems += [f"cannot parse {e.message}" for e in errors]
    return Report(
        tuple(classes[:top]),
        tuple(functions[:top]),
        tuple(tuple(c) for c in cycles),
        tuple(cycle_edges),
        tuple(writers),
        tuple(unresolved),
        tuple(errors),
        tuple(problems),
    )


def _as_json(report: Report) -> str:
    def size(s: Size) -> dict[str, Any]:
        return {"where": s.where, **asdict(s)}

    data = {
        "limits": {"class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES},
        "classes": [size(s) for s in report.classes],
        "functions": [size(s) for s in report.functions],
        "cycles": [list(c) for c in report.cycles],
        "cycle_edges": [asdict(e) for e in report.cycle_edges],
        "control_writers": [asdict(w) for w in report.writers],
        "unresolved_imports": [asdict(i) for i in report.unresolved],
        "parse_errors": [asdict(e) for e in report.parse_errors],
        "problems": list(report.problems),
        "ok": not report.problems,
    }
    return json.dumps(data, indent=2)


def _as_text(report: Report, root: Path) -> str:
    out: list[str] = []

    def table(title: str, rows: Sequence[Size], limit: int) -> None:
        out.append(f"{title} (code lines; limit {limit})")
        for s in rows:
            flag = "!" if s.code_lines > limit else " "
            out.append(f" {flag}{s.code_lines:5}  {s.where}  (lines {s.first}-{s.last})")
        out.append("")

    table("Largest classes", report.classes, MAX_CLASS_LINES)
    table("Largest functions", report.functions, MAX_FUNCTION_LINES)
    out.append(f"Import cycles: {len(report.cycles) or 'none'}")
    for cycle in report.cycles:
        out.append("  " + " <-> ".join(cycle))
        for e in report.cycle_edges:
            if e.source in cycle:
                out.append(f"      {e.source} -> {e.target}  (line {e.line})")
    out.append("")
    out.append(f"Control-table writes (allowed only under {root.resolve().name}/{STATE_PACKAGE}/)")
    for w in report.writers:
        flag = " " if in_state_package(w.module, root) else "!"
        out.append(f" {flag} {w.module}:{w.line}  {w.statement}")
    if report.unresolved:
        out.append("")
        out.append("Unresolved imports (not counted as problems)")
        out.extend(f"    {i.source}:{i.line}  {i.target}" for i in report.unresolved)
    out.append("")
    if report.problems:
        out.append(f"{len(report.problems)} problem(s):")
        out.extend(f"  - {p}" for p in report.problems)
    else:
        out.append("OK: no problems")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.layout_check", description=__doc__)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the package directory")
    parser.add_argument("--top", type=int, default=10, help="how many classes and functions")
    args = parser.parse_args(argv)
    root: Path = args.root
    if not root.is_dir():
        parser.error(f"{root} is not a directory")
    report = check(root, args.top)
    print(_as_json(report) if args.format == "json" else _as_text(report, root))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Renderers of the tools around a move: the audit, access, code-scan and compat-view reports.

Each takes the Console to print on, so tests can record what an operator sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console

    from orchestrator.tools.access import AccessReport
    from orchestrator.tools.audit import Audit
    from orchestrator.tools.scan import CompatUsage, ScanReport


def _names(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names)


def print_audit(console: Console, a: Audit) -> None:
    console.print(
        Text.assemble(
            ("audit of schema ", "bold"),
            (a.schema, "bold cyan"),
            f": {len(a.tables)} tables, {len(a.foreign_keys)} foreign keys",
        )
    )
    _print_foreign_keys(console, a)
    console.print()
    _print_missing(console, a)
    _print_keyless(console, a)
    _print_cycles(console, a)
    _print_domains(console, a)
    console.print(Text("next: orchestrator init --output plan.yaml", style="dim"))


def _print_foreign_keys(console: Console, a: Audit) -> None:
    t = Table(title="foreign keys", title_justify="left", show_lines=False)
    for col in ("table", "columns", "references", "on update", "on delete", "indexed"):
        t.add_column(col)
    for f in a.foreign_keys:
        label = f.table if f.schema == a.schema else f"{f.schema}.{f.table}"
        ref = f.ref_table if f.ref_schema == a.schema else f"{f.ref_schema}.{f.ref_table}"
        t.add_row(
            label,
            _names(f.columns),
            f"{ref} ({_names(f.ref_columns)})" + ("" if f.validated else " NOT VALID"),
            f.on_update,
            f.on_delete,
            Text("yes", style="green") if f.columns_indexed else Text("no", style="yellow"),
        )
    console.print(t)
    if a.unindexed:
        console.print(
            Text(
                f"{len(a.unindexed)} foreign key(s) without an index on the referencing columns "
                "(deletes and updates of the parent scan the child; validation is slow):",
                style="yellow",
            )
        )
        for f in a.unindexed:
            console.print(Text(f"  {f.suggestion}"), highlight=False)


def _print_missing(console: Console, a: Audit) -> None:
    if not a.missing:
        console.print(
            Text("every *_id column that names a table's key has its constraint", style="green")
        )
        return
    console.print(Text("references without a constraint", style="bold"))
    for m in a.missing:
        orphans = (
            "orphans not counted"
            if m.orphan_rows is None
            else (
                f"{m.orphan_rows} orphan rows, {m.orphan_values} values"
                + (f" (e.g. {', '.join(m.examples)})" if m.examples else "")
                if m.orphan_rows
                else "no orphans"
            )
        )
        console.print(
            Text.assemble(
                "  ",
                (f"{m.table}.{m.column}", "bold"),
                f" ({m.type}) → ",
                (f"{m.ref_table}.{m.ref_column}", "bold"),
                f" ({m.ref_type}): ",
                (orphans, "red" if m.orphan_rows else "green"),
            )
        )
        console.print(Text(f"    {m.suggestion}", style="dim"), highlight=False)


def _print_keyless(console: Console, a: Audit) -> None:
    if not a.keyless:
        return
    console.print(Text("tables without a primary key", style="bold"))
    for k in a.keyless:
        how = (
            f"declare key: [{', '.join(k.candidate_key)}] in the plan"
            if k.candidate_key
            else "no unique NOT NULL key: add a primary key before moving it"
        )
        console.print(
            Text.assemble("  ", (k.table, "bold"), f" (~{k.row_estimate} rows): ", how)
        )


def _print_cycles(console: Console, a: Audit) -> None:
    if not a.cycles:
        return
    console.print(Text("foreign-key cycles (each moves as one unit)", style="bold"))
    for c in a.cycles:
        path = " → ".join([*c.tables, c.tables[0]])
        broken = f"; nullable/deferrable: {', '.join(c.breakable_by)}" if c.breakable_by else ""
        console.print(Text(f"  {path}{broken}"), highlight=False)
    if a.cycles_truncated:
        console.print(Text("  (more cycles not listed)", style="dim"))


def _print_domains(console: Console, a: Audit) -> None:
    console.print(Text("suggested domains (communities of the foreign-key graph)", style="bold"))
    for d in a.domains:
        head = f"  {d.name}"
        if d.hub:
            head += f" (around {d.hub}; {d.internal_fks} inside, {d.crossing_fks} crossing)"
        console.print(Text(head, style="cyan"), highlight=False)
        console.print(Text(f"    {_names(d.tables)}"), highlight=False)


def print_access(console: Console, r: AccessReport) -> None:
    status = (
        Text("matches the plan", style="green")
        if r.ok
        else Text("differs from the plan", style="bold red")
    )
    console.print(Text.assemble((f"access for plan {r.plan}: ", "bold"), status))
    for p in r.problems:
        console.print(Text(f"problem: {p}", style="red"))
    for role in r.roles:
        if not role.exists:
            continue
        console.print(
            Text.assemble(
                ("role ", "bold"),
                (role.name, "bold cyan"),
                (" (superuser: it can do everything)" if role.superuser else "", "yellow"),
            )
        )
        for s in r.schemas:
            if s.role != role.name:
                continue
            style = {"ok": "green", "missing": "red", "extra": "bold red"}[s.status]
            console.print(
                Text.assemble(
                    f"  USAGE on schema {s.schema}: ",
                    ("yes" if s.usage else "no", "bold"),
                    f" (declared: {'yes' if s.declared else 'no'}) ",
                    (s.status, style),
                ),
                highlight=False,
            )
        t = Table(show_header=True, box=None, padding=(0, 1))
        for col in ("relation", "kind", "declared", "effective", "missing", "extra", "note"):
            t.add_column(col)
        for a in r.relations:
            if a.role != role.name:
                continue
            eff = " ".join(
                filter(
                    None,
                    [
                        _names(a.effective),
                        f"(columns only: {_names(a.columns_only)})" if a.columns_only else "",
                    ],
                )
            )
            t.add_row(
                f"{a.schema}.{a.name}",
                a.kind,
                _names(a.declared) or "-",
                eff or "-",
                Text(_names(a.missing), style="red"),
                Text(_names(a.extra), style="bold red"),
                Text(a.note, style="dim"),
            )
        console.print(t)
    if r.pending:
        console.print(
            Text(f"not moved yet (checked after their move): {_names(r.pending)}", style="dim")
        )


def print_scan(console: Console, r: ScanReport) -> None:
    for f in r.findings:
        if f.problem:  # cannot work once the table lives on another server
            console.print(Text.assemble((f"{f.path}:{f.line}", "bold"), ": ",
                                        (f.found, "red"), f": {f.problem}",
                                        (f"  ({f.statement}, {f.source})", "dim")),
                          highlight=False, soft_wrap=True)
            continue
        console.print(
            Text.assemble(
                (f"{f.path}:{f.line}", "bold"),
                ": ",
                (f.found, "yellow"),
                " → use ",
                (f.use, "green"),
                (f"  ({f.statement}, {f.source})", "dim"),
            ),
            highlight=False,
            soft_wrap=True,  # one finding per line, whole, for editors and grep
        )
    for u in r.unreadable:
        console.print(Text(f"skipped: {u}", style="yellow"), highlight=False, soft_wrap=True)
    problems = sum(1 for f in r.findings if f.problem)
    if problems:
        console.print(Text(f"{problems} statement(s) that cannot work once their table lives "
                           "on another server (docs/cross-server.md, \"What changes for the "
                           "application\")", style="bold red"))
    console.print(
        Text(
            f"{len(r.findings) - problems} reference(s) to moved tables without their new "
            "schema in "
            f"{r.files} file(s); {r.statements} statement(s) parsed, {r.skipped} string(s) or "
            "statement(s) skipped (not SQL pglast reads)",
            style="bold" if r.findings else "green",
        )
    )


def print_compat(console: Console, u: CompatUsage) -> None:
    console.print(
        Text.assemble(
            (f"compatibility views of plan {u.plan}", "bold"),
            f"; pg_stat_statements: {u.pg_stat_statements}",
            (f" (since {u.stats_since})" if u.stats_since else ""),
        ),
        highlight=False,
    )
    t = Table(box=None, padding=(0, 1))
    for col in ("view", "exists", "calls", "live sessions", "statements"):
        t.add_column(col)
    for v in u.views:
        t.add_row(
            v.view,
            "yes" if v.exists else "no",
            "?" if v.calls is None else str(v.calls),
            "\n".join(v.live) or ("-" if u.sampled_s else "not sampled"),
            "\n".join(s if len(s) < 100 else s[:97] + "..." for s in v.statements) or "-",
        )
    console.print(t)
    for line in u.advice:
        console.print(Text(f"note: {line}", style="dim"), highlight=False)

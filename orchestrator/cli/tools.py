"""Commands for the steps around a move (audit, init, verify-access, scan-code, compat-usage).

`register(app)` adds them to the main CLI; like cli.py, this layer only calls the core and
renders what it returns.
"""

# No `from __future__ import annotations`: typer reads the commands' annotations at runtime,
# and they name types local to register().
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console

    from orchestrator.tools.access import AccessReport
    from orchestrator.tools.audit import Audit
    from orchestrator.tools.scan import CompatUsage, ScanReport


class GroupBy(StrEnum):
    community = "community"
    prefix = "prefix"


class StrategyOpt(StrEnum):
    copy = "copy"
    rename = "rename"


SchemaOpt = Annotated[
    str, typer.Option("--schema", help="The schema the application's tables live in now.")
]
DomainsOpt = Annotated[
    int | None,
    typer.Option("--domains", min=1, help="Ask the community split for this many domains."),
]


def register(app: typer.Typer) -> None:
    """Add the audit and scaffolding commands to the CLI."""
    from orchestrator.cli import Fmt

    FmtOpt = Annotated[Fmt, typer.Option("--format", help="text for people, json for scripts.")]
    PlanArg = Annotated[Path, typer.Argument(help="The plan YAML file.")]

    @app.command("audit")
    def audit_cmd(
        schema: SchemaOpt = "public",
        domains: DomainsOpt = None,
        orphans: Annotated[
            bool,
            typer.Option(
                "--orphans/--no-orphans",
                help="Count orphan values of unconstrained references (reads those tables).",
            ),
        ] = True,
        fmt: FmtOpt = Fmt.text,
    ) -> None:
        """Foreign keys, references without a constraint (with orphans), keys, cycles, domains."""
        from orchestrator.cli import _connect, _emit_json, _guard, out
        from orchestrator.tools.audit import run_audit

        with _guard(fmt), _connect() as conn:
            a = run_audit(conn, schema, count_orphans=orphans, domains=domains)
        if fmt == Fmt.json:
            _emit_json(a.as_dict())
        else:
            print_audit(out, a)

    @app.command("init")
    def init_cmd(
        schema: SchemaOpt = "public",
        group_by: Annotated[
            GroupBy,
            typer.Option("--group-by", help="community (foreign-key graph) or prefix (names)."),
        ] = GroupBy.community,
        to: Annotated[
            list[str] | None,
            typer.Option(
                "--to",
                help="NAME=table,table: move these tables to schema NAME (repeatable); "
                "NAME equal to --schema keeps them where they are.",
            ),
        ] = None,
        name: Annotated[
            str | None, typer.Option("--name", help="The plan's name (default: move_SCHEMA).")
        ] = None,
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="Write the plan here (default: stdout)."),
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite --output.")] = False,
        domains: DomainsOpt = None,
        strategy: Annotated[
            StrategyOpt, typer.Option("--strategy", help="The plan's default strategy.")
        ] = StrategyOpt.copy,
    ) -> None:
        """Write a starting plan from the audit; `validate` accepts it as written."""
        from orchestrator.cli import _connect, _guard, err
        from orchestrator.errors import OrchestratorError
        from orchestrator.tools.scaffold import build_plan, parse_overrides

        with _guard():
            if output is not None and output.exists() and not force:
                raise OrchestratorError(
                    f"{output} exists", hint="choose another --output, or pass --force"
                )
            overrides = parse_overrides(to or [])
            with _connect() as conn:
                sc = build_plan(
                    conn,
                    schema,
                    group_by=group_by.value,
                    overrides=overrides,
                    name=name,
                    domains=domains,
                    strategy=strategy.value,
                )
            if output is None:
                sys.stdout.write(sc.text)
            else:
                try:
                    output.write_text(sc.text, encoding="utf-8")
                except OSError as exc:
                    raise OrchestratorError(
                        f"{output}: cannot write ({exc.strerror})", hint="check the path"
                    ) from exc
        moved = sum(len(v) for v in sc.schemas.values())
        err.print(
            f"plan: {moved} tables into {len(sc.schemas)} schemas"
            + (f" ({', '.join(sc.schemas)})" if sc.schemas else "")
            + (
                f"; {len(sc.left_out)} left out (see the comments at its end)"
                if sc.left_out
                else ""
            )
            + (f"; written to {output}" if output else ""),
            highlight=False,
        )
        if output is not None:
            err.print(f"next: orchestrator validate {output}", highlight=False)

    @app.command("verify-access")
    def verify_access_cmd(
        plan: PlanArg,
        role: Annotated[
            list[str] | None,
            typer.Option(
                "--role",
                help="Also check this role (repeatable); it is declared "
                "nothing, so every privilege it holds is extra.",
            ),
        ] = None,
        fmt: FmtOpt = Fmt.text,
    ) -> None:
        """Each role of the plan: effective privileges on moved tables and views vs the plan."""
        from orchestrator.cli import _connect, _emit_json, _guard, out
        from orchestrator.plan import load_plan
        from orchestrator.tools.access import verify_access

        with _guard(fmt):
            loaded = load_plan(plan)
            with _connect() as conn:
                report = verify_access(conn, loaded, role or [])
        if fmt == Fmt.json:
            _emit_json(report.as_dict())
        else:
            print_access(out, report)
        raise typer.Exit(0 if report.ok else 1)

    @app.command("scan-code")
    def scan_code_cmd(
        paths: Annotated[list[Path], typer.Argument(help="Files or directories to scan.")],
        plan: Annotated[Path, typer.Option("--plan", help="The plan YAML file.")],
        fmt: FmtOpt = Fmt.text,
    ) -> None:
        """Find application SQL (.sql, .py strings) naming moved tables without their schema.

        Exit 1 when something is found (like a linter)."""
        from orchestrator.cli import _emit_json, _guard, out
        from orchestrator.plan import load_plan
        from orchestrator.tools.scan import scan_code

        with _guard(fmt):
            loaded = load_plan(plan)
            report = scan_code(paths, loaded)
        if fmt == Fmt.json:
            _emit_json(report.as_dict())
        else:
            print_scan(out, report)
        raise typer.Exit(1 if report.findings else 0)

    @app.command("compat-usage")
    def compat_usage_cmd(
        plan: PlanArg,
        sample: Annotated[
            float,
            typer.Option(
                "--sample",
                min=0,
                help="Also watch pg_locks this many seconds for sessions using the views.",
            ),
        ] = 0.0,
        fmt: FmtOpt = Fmt.text,
    ) -> None:
        """Are the compatibility views still used? (pg_stat_statements, or a sample of locks)

        Exit 0: no use seen and pg_stat_statements was available; 1: a view is in use;
        3: no use seen, but without pg_stat_statements that proves little."""
        from orchestrator.cli import _connect, _emit_json, _guard, out
        from orchestrator.plan import load_plan
        from orchestrator.tools.scan import compat_usage

        with _guard(fmt):
            loaded = load_plan(plan)
            with _connect() as conn:
                usage = compat_usage(conn, loaded, sample)
        if fmt == Fmt.json:
            _emit_json(usage.as_dict())
        else:
            print_compat(out, usage)
        in_use = any((v.calls or 0) > 0 or v.live for v in usage.views)
        raise typer.Exit(1 if in_use else (0 if usage.pg_stat_statements == "available" else 3))


# --- renderers ---------------------------------------------------------------------------------


def _names(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names)


def print_audit(console: "Console", a: "Audit") -> None:
    console.print(
        Text.assemble(
            ("audit of schema ", "bold"),
            (a.schema, "bold cyan"),
            f": {len(a.tables)} tables, {len(a.foreign_keys)} foreign keys",
        )
    )
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
    console.print()
    if a.missing:
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
    else:
        console.print(
            Text("every *_id column that names a table's key has its constraint", style="green")
        )
    if a.keyless:
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
    if a.cycles:
        console.print(Text("foreign-key cycles (each moves as one unit)", style="bold"))
        for c in a.cycles:
            path = " → ".join([*c.tables, c.tables[0]])
            broken = f"; nullable/deferrable: {', '.join(c.breakable_by)}" if c.breakable_by else ""
            console.print(Text(f"  {path}{broken}"), highlight=False)
        if a.cycles_truncated:
            console.print(Text("  (more cycles not listed)", style="dim"))
    console.print(Text("suggested domains (communities of the foreign-key graph)", style="bold"))
    for d in a.domains:
        head = f"  {d.name}"
        if d.hub:
            head += f" (around {d.hub}; {d.internal_fks} inside, {d.crossing_fks} crossing)"
        console.print(Text(head, style="cyan"), highlight=False)
        console.print(Text(f"    {_names(d.tables)}"), highlight=False)
    console.print(Text("next: orchestrator init --output plan.yaml", style="dim"))


def print_access(console: "Console", r: "AccessReport") -> None:
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


def print_scan(console: "Console", r: "ScanReport") -> None:
    for f in r.findings:
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
    console.print(
        Text(
            f"{len(r.findings)} reference(s) to moved tables without their new schema in "
            f"{r.files} file(s); {r.statements} statement(s) parsed, {r.skipped} string(s) or "
            "statement(s) skipped (not SQL pglast reads)",
            style="bold" if r.findings else "green",
        )
    )


def print_compat(console: "Console", u: "CompatUsage") -> None:
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

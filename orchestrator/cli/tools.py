"""Commands for the steps around a move: audit, init, verify-access, scan-code, compat-usage."""

# No `from __future__ import annotations`: typer reads the commands' annotations at runtime.
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import (
    Fmt,
    FmtOpt,
    PlanArg,
    app,
    connect_db,
    emit_json,
    err,
    guard,
    out,
)
from orchestrator.errors import OrchestratorError
from orchestrator.plan import load_plan
from orchestrator.tui.tools import print_access, print_audit, print_compat, print_scan


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
    from orchestrator.tools.audit import run_audit

    with guard(fmt), connect_db() as conn:
        a = run_audit(conn, schema, count_orphans=orphans, domains=domains)
    if fmt == Fmt.json:
        emit_json(a.as_dict())
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
    from orchestrator.tools.scaffold import build_plan, parse_overrides

    with guard():
        if output is not None and output.exists() and not force:
            raise OrchestratorError(
                f"{output} exists", hint="choose another --output, or pass --force"
            )
        overrides = parse_overrides(to or [])
        with connect_db() as conn:
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
    from orchestrator.tools.access import verify_access

    with guard(fmt):
        loaded = load_plan(plan)
        with connect_db() as conn:
            report = verify_access(conn, loaded, role or [])
    if fmt == Fmt.json:
        emit_json(report.as_dict())
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
    from orchestrator.tools.scan import scan_code

    with guard(fmt):
        loaded = load_plan(plan)
        report = scan_code(paths, loaded)
    if fmt == Fmt.json:
        emit_json(report.as_dict())
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
    from orchestrator.tools.scan import compat_usage

    with guard(fmt):
        loaded = load_plan(plan)
        with connect_db() as conn:
            usage = compat_usage(conn, loaded, sample)
    if fmt == Fmt.json:
        emit_json(usage.as_dict())
    else:
        print_compat(out, usage)
    in_use = any((v.calls or 0) > 0 or v.live for v in usage.views)
    raise typer.Exit(1 if in_use else (0 if usage.pg_stat_statements == "available" else 3))

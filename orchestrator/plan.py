"""The migration plan: YAML validated by pydantic models, with errors that name file and line."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import PlanError

# PostgreSQL truncates identifiers at NAMEDATALEN-1 bytes; a longer name would silently
# collide with another after truncation, so we refuse it.
MAX_IDENT_BYTES = 63


def _check_ident(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    if len(value.encode()) > MAX_IDENT_BYTES:
        raise ValueError(
            f"is {len(value.encode())} bytes; PostgreSQL identifiers are at most {MAX_IDENT_BYTES}"
        )
    return value


# Every identifier of a plan (tables, schemas, columns, roles, views) gets the same checks.
Ident = Annotated[
    str,
    Field(min_length=1, description="A PostgreSQL identifier, as written (no quoting)."),
    AfterValidator(_check_ident),
]


class Strategy(StrEnum):
    """How a table moves: a batched copy behind triggers, an instant ALTER TABLE SET SCHEMA,
    or (to a schema on another server, never written in a plan) logical replication."""

    copy = "copy"
    rename = "rename"
    remote = "remote"


class CopyOrder(StrEnum):
    heap = "heap"
    key = "key"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Throttle(_Model):
    """Pauses the copy between batches and while the server is busy."""

    sleep_ms: int = Field(0, ge=0, description="Pause after every batch, in milliseconds.")
    max_replication_lag_bytes: int | None = Field(
        None,
        ge=0,
        description="Pause while any standby in pg_stat_replication lags more than this.",
    )
    max_wal_bytes_per_s: int | None = Field(
        None,
        ge=1,
        description="Pause while the server writes WAL faster than this (ours included).",
    )
    probe_sql: str | None = Field(
        None,
        description="A query returning one number; the copy pauses while it exceeds probe_max.",
    )
    probe_max: float | None = Field(None, description="The limit for probe_sql.")
    check_every_s: float = Field(
        1.0, gt=0, description="How often the load check runs while paused."
    )
    adaptive: bool = Field(
        False, description="The copy yields to the application: it works a shrinking share "
        "of the time while the application's write rate (transactions per second) falls "
        "below yield_goal of its rate while the copy rests, and flat out while the "
        "application is idle. The copy takes longer in exchange.",
    )
    yield_goal: float = Field(
        0.85, gt=0, lt=1, description="The share of its own write rate the application keeps "
        "while the copy (when adaptive) or the replayer (apply --follow) yields to it.",
    )
    replay_rate: int | None = Field(
        None, ge=1, description="apply --follow replays at most this many logged keys per "
        "second; unset: it yields to the application as `adaptive` does for the copy.",
    )

    @model_validator(mode="after")
    def _probe_pair(self) -> Throttle:
        if (self.probe_sql is None) != (self.probe_max is None):
            raise ValueError("probe_sql and probe_max go together")
        return self


class Options(_Model):
    """Per-plan defaults, overridable per table."""

    strategy: Strategy = Field(Strategy.copy, description="copy | rename")
    batch_size: int = Field(10_000, ge=1, le=1_000_000, description="Rows per copy batch.")
    copy_order: CopyOrder = Field(
        CopyOrder.heap, description="heap: batches are ranges of the source's heap blocks, "
        "read in file order and split between copy_workers; key: batches in key order, one "
        "worker (always used for partitioned tables and past 2^32 transaction ids).",
    )
    copy_workers: int | None = Field(
        None, ge=1, le=64, description="Sessions copying one table side by side (heap order "
        "only); default: the server's max_parallel_workers, at most the CPUs of this machine.",
    )
    lock_timeout_ms: int = Field(500, ge=1, description="lock_timeout for every DDL statement.")
    statement_timeout_ms: int = Field(
        0, ge=0, description="statement_timeout for our statements (0: none)."
    )
    lock_retries: int = Field(10, ge=0, description="Retries of a DDL that timed out on its lock.")
    throttle: Throttle = Field(
        default_factory=Throttle, description="When the copy pauses (see Throttle)."
    )
    compat_view: bool = Field(True, description="Leave a compatibility view under the old name.")
    verify_max_age_h: float = Field(
        24.0, ge=0, description="Hours a full verify pass stays good for cutover: a younger "
        "one is brought up to date by re-checking only the chunks changed since; an older one "
        "is repeated in full first.",
    )
    cutover_window: str | None = Field(
        None, pattern=r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$",
        description="HH:MM-HH:MM, local time of the machine running the orchestrator: swaps "
        "wait for it (cutover --window overrides it).",
    )


HOOK_EVENTS = (
    "before-prepare", "after-prepare", "before-dual_write", "after-dual_write",
    "before-copy", "after-copy", "before-verify", "after-verify", "before-cutover",
    "after-cutover", "before-rename", "after-rename", "before-finalize", "after-finalize",
    "cutover-postponed", "cutover-done", "before-rollback", "rollback", "failure",
    "copy-progress", "*",
)


class Hook(_Model):
    """A command run on the orchestrator's machine when a phase changes. It gets the event as
    JSON on stdin and in ORCHESTRATOR_* environment variables. A before-cutover hook that
    exits non-zero holds the swap (a gate) until it exits 0."""

    # Not `on`: YAML 1.1 reads a bare `on` key as the boolean true.
    events: list[str] = Field(description="Events: before-STAGE, after-STAGE, cutover-postponed, "
                          "cutover-done, before-rollback, rollback, failure, copy-progress, "
                          "or * for all.")
    run: str = Field(description="The command, run by /bin/sh -c.")
    timeout_s: float = Field(30.0, gt=0, description="Seconds before the command is killed "
                             "(a before-cutover hook that times out holds the swap).")
    every_pct: int = Field(10, ge=1, le=100, description="copy-progress: run each time the "
                           "copy passes another this many percent.")
    recheck_s: float = Field(10.0, gt=0, description="before-cutover: seconds between runs "
                             "while it holds the swap.")

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in HOOK_EVENTS]
        if unknown or not v:
            raise ValueError(f"unknown hook event(s) {unknown}: use {', '.join(HOOK_EVENTS)}")
        return v


class TableOptions(_Model):
    """The subset of options a single table may override."""

    copy_order: CopyOrder | None = Field(None, description="heap | key (default: the plan's).")
    copy_workers: int | None = Field(
        None, ge=1, le=64, description="Copy sessions for this table (default: the plan's)."
    )

    strategy: Strategy | None = Field(None, description="copy | rename (default: the plan's).")
    batch_size: int | None = Field(
        None, ge=1, le=1_000_000, description="Rows per copy batch (default: the plan's)."
    )
    lock_timeout_ms: int | None = Field(
        None, ge=1, description="lock_timeout for this table's DDL (default: the plan's)."
    )
    statement_timeout_ms: int | None = Field(
        None, ge=0, description="statement_timeout for this table (default: the plan's)."
    )
    lock_retries: int | None = Field(
        None, ge=0, description="Retries of a DDL that timed out (default: the plan's)."
    )
    compat_view: bool | None = Field(
        None, description="Leave a compatibility view (default: the plan's)."
    )


class ColumnMap(_Model):
    """A column's new name, or a computed column with `up` (source → target) and `down` SQL."""

    rename: Ident | None = Field(None, description="New column name in the target table.")
    up: str | None = Field(
        None, description="SQL expression over the source row's columns giving the target value."
    )
    down: str | None = Field(
        None, description="SQL expression over the target row's columns giving the source value."
    )
    type: str | None = Field(None, description="Target column type when `up` changes it.")

    @field_validator("rename")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        return None if v is None else _check_ident(v)

    @model_validator(mode="after")
    def _pairs(self) -> ColumnMap:
        if (self.up is None) != (self.down is None):
            raise ValueError("`up` and `down` go together: the move must be reversible")
        if self.rename is None and self.up is None:
            raise ValueError("give `rename`, or `up` and `down`")
        return self


class TableGrant(_Model):
    """Privileges a role gets on every moved table of a schema."""

    role: Ident = Field(description="The role that gets the privileges.")
    privileges: list[str] = Field(
        default_factory=lambda: ["SELECT"],
        description="Any of SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER.",
    )

    @field_validator("privileges")
    @classmethod
    def _privs(cls, v: list[str]) -> list[str]:
        allowed = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
        up = [p.upper() for p in v]
        bad = [p for p in up if p not in allowed]
        if bad:
            raise ValueError(f"unknown privilege {bad}; allowed: {sorted(allowed)}")
        return up


class Server(_Model):
    """Another PostgreSQL server a target schema lives on: its tables move there by logical
    replication and back after cutover (docs/cross-server.md); `validate` checks both
    servers."""

    dsn_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The environment variable that "
        "holds the server's connection string (keeps passwords out of the plan).",
    )
    dsn: str | None = Field(None, description="The connection string itself, without a "
                            "password (use dsn_env for one with a password).")
    source_dsn_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The environment variable "
        "holding the connection string this server uses to reach the source (for its "
        "subscription); default: the orchestrator's own.",
    )
    source_dsn: str | None = Field(None, description="The same, as the string itself "
                                   "(without a password).")

    @model_validator(mode="after")
    def _one_dsn(self) -> Server:
        if (self.dsn_env is None) == (self.dsn is None):
            raise ValueError("give exactly one of dsn_env (an environment variable's name) "
                             "and dsn")
        if self.source_dsn_env is not None and self.source_dsn is not None:
            raise ValueError("give at most one of source_dsn_env and source_dsn")
        for text in (self.dsn, self.source_dsn):
            if text is not None and _has_password(text):
                raise ValueError("a connection string in the plan carries a password: put it "
                                 "in an environment variable and name it in dsn_env or "
                                 "source_dsn_env")
        return self


def _has_password(conninfo: str) -> bool:
    from psycopg.conninfo import conninfo_to_dict

    try:
        return bool(conninfo_to_dict(conninfo).get("password"))
    except Exception:  # unparseable: the connection will say why; no password seen here
        return False


class SchemaSpec(_Model):
    """A target schema and who may use it."""

    usage: list[Ident] = Field(default_factory=list, description="Roles granted USAGE.")
    grants: list[TableGrant] = Field(
        default_factory=list, description="Table privileges per role (see TableGrant)."
    )
    server: Ident | None = Field(None, description="The name of the server (see Server) the "
                                 "schema is to live on; default: the source's. Its tables then "
                                 "move by logical replication (docs/cross-server.md).")
    cross_server_keys: Literal["drop"] | None = Field(
        None, description="With `server`: what becomes of a foreign key between this schema's "
        "tables and tables that stay on the source (no server enforces a key across servers). "
        "`drop`: the target never has it, finalize drops it on the source; `orchestrator "
        "audit` reports orphans later. Required when such keys exist.")
    application: Literal["source", "target"] = Field(
        "source", description="With `server`: where the application reaches the moved tables "
        "after cutover. `source`: through the old names on the source (a compatibility view "
        "over postgres_fdw that keeps inserts with defaults working); `target`: it connects "
        "to the new server itself, and the old names refuse writes with an error naming it.")


class TableSpec(_Model):
    """One table to move."""

    name: Ident = Field(description="Table name in the source schema.")
    schema_: Ident = Field(alias="schema", description="Target schema.")
    rename_to: Ident | None = Field(None, description="New table name in the target schema.")
    columns: dict[Ident, ColumnMap] = Field(
        default_factory=dict,
        description="Column mappings, by source column name (see ColumnMap).",
    )
    key: list[Ident] | None = Field(
        None, description="A unique NOT NULL key to use when the table has no primary key."
    )
    options: TableOptions = Field(
        default_factory=TableOptions, description="Overrides of the plan's defaults."
    )
    depends_on: list[Ident] = Field(default_factory=list, description="Tables moved before this.")
    confirm_read_only_columns: bool = Field(
        False,
        description="Acknowledge that `up`/`down` columns are read-only through the compat view.",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name", "schema_", "rename_to")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        return None if v is None else _check_ident(v)

    @property
    def target_name(self) -> str:
        return self.rename_to or self.name


class ViewSpec(_Model):
    """A view created once the tables it reads have moved."""

    name: Ident = Field(description="The view's name.")
    schema_: Ident = Field("public", alias="schema", description="The view's schema.")
    sql: str = Field(description="The SELECT that defines the view.")
    depends_on: list[Ident] = Field(
        default_factory=list, description="Tables and views of the plan it reads."
    )
    security_invoker: bool = Field(
        True, description="Check the querying role's privileges, not the view owner's."
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Plan(_Model):
    """A whole migration plan."""

    version: int = Field(description="Plan format version; only 1 exists.")
    name: Ident = Field(description="The plan's name, unique in the database.")
    source_schema: Ident = Field("public", description="The schema the tables live in now.")
    control_schema: Ident = Field(
        "_orchestrator", description="Where the orchestrator records its state."
    )
    defaults: Options = Field(
        default_factory=Options, description="Options for every table (see Options)."
    )
    schemas: dict[Ident, SchemaSpec] = Field(
        default_factory=dict, description="Target schemas and their grants (see SchemaSpec)."
    )
    servers: dict[Ident, Server] = Field(
        default_factory=dict, description="Other servers target schemas are to live on (see "
        "Server).",
    )
    tables: list[TableSpec] = Field(description="The tables to move (see TableSpec).")
    views: list[ViewSpec] = Field(
        default_factory=list, description="Views created after the move (see ViewSpec)."
    )
    hooks: list[Hook] = Field(
        default_factory=list, description="Commands run on phase changes (see Hook)."
    )
    finalize_quiet_period_s: float = Field(
        900.0, ge=0, description="finalize refuses while a compatibility view was used "
        "within this many seconds (pg_stat_statements counts, live locks); 0 turns the "
        "check off; finalize --force overrides it.",
    )

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only version 1 is supported")
        return v

    @field_validator("name", "source_schema", "control_schema")
    @classmethod
    def _ident(cls, v: str) -> str:
        return _check_ident(v)

    @model_validator(mode="after")
    def _servers(self) -> Plan:
        for name, spec in self.schemas.items():
            if spec.server is not None and spec.server not in self.servers:
                raise ValueError(f"schema {name!r} names server {spec.server!r}, which "
                                 f"servers does not define")
        written = [self.defaults.strategy, *(t.options.strategy for t in self.tables)]
        if Strategy.remote in written:
            raise ValueError("strategy remote is not written in a plan: a table whose schema "
                             "names a server moves by logical replication by itself")
        return self

    def remote_schemas(self) -> dict[str, str]:
        """Target schemas on another server, and that server's name."""
        return {n: s.server for n, s in self.schemas.items() if s.server is not None}

    @model_validator(mode="after")
    def _unique(self) -> Plan:
        seen: set[str] = set()
        for t in self.tables:
            if t.name in seen:
                raise ValueError(f"table {t.name!r} is listed twice")
            seen.add(t.name)
        targets: set[tuple[str, str]] = set()
        for t in self.tables:
            key = (t.schema_, t.target_name)
            if key in targets:
                raise ValueError(f"two tables move to {t.schema_}.{t.target_name}")
            targets.add(key)
        return self

    @property
    def retired_schema(self) -> str:
        """Where cutover keeps source tables until finalize (out of the application's way)."""
        return self.control_schema[:55] + "_retired"

    def locations(self) -> dict[tuple[str, str], str]:
        """Every place a plan table can be during its move, mapped to its plan name."""
        return self._locations

    @cached_property
    def _locations(self) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        for t in self.tables:
            out[(self.source_schema, t.name)] = t.name
            out[(t.schema_, t.target_name)] = t.name
            out[(self.retired_schema, t.name)] = t.name
        return out

    @cached_property
    def table_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tables)

    def table(self, name: str) -> TableSpec:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, TableSpec]:
        return {t.name: t for t in self.tables}

    def options_for(self, table: TableSpec) -> Options:
        """The plan defaults with the table's overrides applied."""
        overrides = {k: v for k, v in table.options.model_dump().items() if v is not None}
        if table.schema_ in self.remote_schemas():
            # A table moving to another server has one way to get there.
            overrides["strategy"] = Strategy.remote
        return self.defaults.model_copy(update=overrides)


class LoadedPlan(_Model):
    """A plan with where it came from and a checksum of its text."""

    plan: Plan
    path: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _node_line(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a 1-based line."""
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == part:
                    nxt = v
                    line = k.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                node = None
        else:
            break
        if node is None:
            break
    return line


def _duplicate_keys(node: yaml.Node | None, path: str) -> list[str]:
    """Keys given twice in one mapping: YAML loaders keep the last silently, we refuse."""
    found: list[tuple[int, str]] = []
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    line = k.start_mark.line + 1
                    if k.value in seen:
                        found.append(
                            (
                                line,
                                f"{path}:{line}: {k.value} is given twice "
                                f"(first at line {seen[k.value]})",
                            )
                        )
                    else:
                        seen[k.value] = line
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return [msg for _, msg in sorted(found)]


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "missing":
        return "is required"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def parse_plan(text: str, path: str = "<plan>") -> LoadedPlan:
    """Parse and validate a plan; raise PlanError listing every problem with its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlanError(
            f"{where}: the plan is not valid YAML: {problem}",
            hint="fix the YAML syntax, then run `orchestrator validate` again",
            problems=[f"{where}: not valid YAML: {problem}"],
        ) from exc
    duplicates = _duplicate_keys(node, path)
    if duplicates:
        raise PlanError(
            "the plan gives a key twice:\n  " + "\n  ".join(duplicates),
            hint="keep one of each key (YAML would otherwise keep the last one silently)",
            problems=duplicates,
        )
    if not isinstance(data, dict):
        raise PlanError(
            f"{path}: a plan is a YAML mapping with version, name and tables",
            hint="see docs/plan-reference.md or `orchestrator plan-schema`",
        )
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if p not in ("__root__",))
            line = _node_line(node, loc)
            field = ".".join(str(p) for p in loc) or "(plan)"
            where = f"{path}:{line}" if line else path
            problems.append(f"{where}: {field} {_describe(dict(err))}")
        raise PlanError(
            "the plan is invalid:\n  " + "\n  ".join(problems),
            hint="fix the fields named above (`orchestrator plan-schema` lists what is allowed)",
            problems=problems,
        ) from exc
    return LoadedPlan(plan=plan, path=path, text=text)


def load_plan(path: str | Path) -> LoadedPlan:
    """Read a plan file; a missing file is a PlanError, not a traceback."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(
            f"{p}: cannot read the plan ({exc.strerror})", hint="check the path to the plan file"
        ) from exc
    return parse_plan(text, str(p))


def plan_json_schema() -> str:
    """The JSON Schema of a plan, for editors."""
    return json.dumps(Plan.model_json_schema(by_alias=True), indent=2)


# --- the human reference (docs/plan-reference.md is this function's output) -------------------

_MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m
    for m in (
        Plan,
        Options,
        Throttle,
        SchemaSpec,
        Server,
        TableGrant,
        TableSpec,
        TableOptions,
        ColumnMap,
        ViewSpec,
        Hook,
    )
}


def _ref_name(schema: dict[str, Any]) -> str:
    return str(schema["$ref"]).rsplit("/", 1)[-1]


def _type_text(schema: dict[str, Any]) -> str:
    """A JSON Schema fragment as an operator reads it: `list of identifier`, `integer >= 1`."""
    if "$ref" in schema:
        name = _ref_name(schema)
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        parts = [_type_text(s) for s in schema["anyOf"] if s.get("type") != "null"]
        nullable = any(s.get("type") == "null" for s in schema["anyOf"])
        return " or ".join(parts) + (" or null" if nullable else "")
    if "enum" in schema:
        return " or ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"list of {_type_text(schema.get('items', {}))}"
    if kind == "object":
        value = schema.get("additionalProperties")
        values = _type_text(value) if isinstance(value, dict) else "any"
        return f"map of identifier to {values}"
    if kind == "string" and schema.get("minLength") == 1:
        return "identifier"
    text = str(kind or "any")
    bounds = [
        f"{op} {schema[key]}"
        for key, op in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if key in schema
    ]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _default_text(model: type[BaseModel], prop: str, required: bool) -> str:
    if required:
        return "required"
    for name, info in model.model_fields.items():
        if (info.alias or name) == prop:
            value = info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                return f"{type(value).__name__} defaults"
            if isinstance(value, StrEnum):
                value = value.value
            return f"`{json.dumps(value, ensure_ascii=False)}`"
    raise KeyError(prop)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """The plan reference, rendered from the models' JSON Schema (deterministic)."""
    schema = Plan.model_json_schema(by_alias=True)
    defs: dict[str, dict[str, Any]] = {"Plan": schema, **schema.get("$defs", {})}
    # Plan first, then every model where the plan first mentions it (depth first).
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            order.append(name)
            for ref in _refs(defs[name].get("properties", {})):
                visit(ref)

    visit("Plan")
    lines = [
        "# Plan reference",
        "",
        "<!-- Generated by orchestrator.plan.reference_markdown(); do not edit by hand. -->",
        "",
        "A plan is a YAML file. Every field is listed below, model by model, starting at the",
        "top of the file. Unknown fields are refused, and so is a key given twice.",
        "An *identifier* is a PostgreSQL name written as it is, without quotes: case, spaces",
        f"and every other character count as written, up to {MAX_IDENT_BYTES} bytes in UTF-8.",
        "`orchestrator plan-schema` prints the same rules as JSON Schema, for editors.",
    ]
    for name in order:
        d = defs[name]
        lines += ["", f"## {name}", ""]
        if d.get("description"):
            lines += [_cell(d["description"]), ""]
        props: dict[str, dict[str, Any]] = d.get("properties", {})
        if not props:
            lines.append(f"Values: {_type_text(d)}.")
            continue
        required = set(d.get("required", []))
        model = _MODELS[name]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for prop, p in props.items():
            lines.append(
                f"| `{prop}` | {_cell(_type_text(p))} | "
                f"{_cell(_default_text(model, prop, prop in required))} | "
                f"{_cell(p.get('description', ''))} |"
            )
    return "\n".join(lines) + "\n"


def _refs(node: Any) -> list[str]:
    """Every model a schema fragment refers to, in the order they appear."""
    if isinstance(node, dict):
        out = [_ref_name(node)] if "$ref" in node else []
        for v in node.values():
            out += _refs(v)
        return out
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []

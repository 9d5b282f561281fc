"""aclitem text (`grantee=privs/grantor`) parsed into GRANT statements."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

PRIVILEGES = {
    "r": "SELECT",
    "a": "INSERT",
    "w": "UPDATE",
    "d": "DELETE",
    "D": "TRUNCATE",
    "x": "REFERENCES",
    "t": "TRIGGER",
    "m": "MAINTAIN",
}


@dataclass(frozen=True)
class Grant:
    grantee: str  # "" is PUBLIC
    privileges: tuple[str, ...]
    grantable: tuple[str, ...]


def _read_name(text: str, i: int) -> tuple[str, int]:
    if i < len(text) and text[i] == '"':
        out = []
        i += 1
        while i < len(text):
            if text[i] == '"':
                if i + 1 < len(text) and text[i + 1] == '"':
                    out.append('"')
                    i += 2
                    continue
                return "".join(out), i + 1
            out.append(text[i])
            i += 1
        return "".join(out), i
    j = i
    while j < len(text) and text[j] not in "=/":
        j += 1
    return text[i:j], j


def parse_aclitem(item: str) -> Grant:
    grantee, i = _read_name(item, 0)
    assert item[i] == "="
    i += 1
    privs: list[str] = []
    grantable: list[str] = []
    while i < len(item) and item[i] != "/":
        name = PRIVILEGES[item[i]]
        privs.append(name)
        if i + 1 < len(item) and item[i + 1] == "*":
            grantable.append(name)
            i += 1
        i += 1
    return Grant(grantee, tuple(privs), tuple(grantable))


def to_grantee(grantee: str) -> sql.Composable:
    """A role, or PUBLIC (the empty grantee of an aclitem)."""
    return sql.SQL("PUBLIC") if grantee == "" else sql.Identifier(grantee)


_TABLE = sql.SQL("TABLE")


def grant_statements(
    acl: tuple[str, ...],
    target: sql.Composable,
    owner: str,
    columns: tuple[str, ...] | None = None,
    kind: sql.SQL = _TABLE,
) -> list[sql.Composed]:
    """GRANTs that give `target` the privileges `acl` gives (the owner's own are implicit)."""
    out: list[sql.Composed] = []
    cols: sql.Composable = sql.SQL("")
    if columns is not None:
        cols = sql.SQL(" ({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    for item in acl:
        g = parse_aclitem(item)
        if g.grantee == owner and columns is None:
            continue
        plain = [p for p in g.privileges if p not in g.grantable]
        for privs, suffix in ((plain, ""), (list(g.grantable), " WITH GRANT OPTION")):
            if not privs:
                continue
            out.append(
                sql.SQL("GRANT {}{} ON {} {} TO {}{}").format(
                    sql.SQL(", ").join(sql.SQL(p) for p in privs),
                    cols,
                    kind,
                    target,
                    to_grantee(g.grantee),
                    sql.SQL(suffix),
                )
            )
    return out


def revoke_defaults(
    target: sql.Composable, grantees: tuple[str, ...], owner: str, kind: sql.SQL = _TABLE
) -> list[sql.Composed]:
    """Undo what our default privileges added to a relation we just created, so that its
    access list ends up exactly the source's (no privilege leak through ALTER DEFAULT
    PRIVILEGES)."""
    return [
        sql.SQL("REVOKE ALL ON {} {} FROM {}").format(kind, target, to_grantee(g))
        for g in grantees
        if g != owner
    ]

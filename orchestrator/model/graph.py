"""The dependency graph: plan tables, plan views and the outside tables that touch them.

An edge A → B means "A moves (or exists) before B": a referenced table before the tables that
reference it, a table before the views that read it, `depends_on` targets before their
dependants. Foreign-key cycles collapse into strongly connected components that move as one
unit; the condensation orders the units, and its topological generations are the waves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import networkx as nx

from orchestrator.model.catalog import Catalog
from orchestrator.plan import Plan


@dataclass(frozen=True)
class Unit:
    """Tables (or one view) that move together."""

    id: int
    members: tuple[str, ...]  # source table names, or view names for view units
    kind: str  # "tables" | "view"
    wave: int

    @property
    def is_cycle(self) -> bool:
        return self.kind == "tables" and len(self.members) > 1


@dataclass(frozen=True)
class Problem:
    subject: str
    message: str
    hint: str


@dataclass
class DependencyGraph:
    graph: nx.DiGraph
    units: list[Unit]
    problems: list[Problem]

    def unit_of(self, table: str) -> Unit:
        return next(u for u in self.units if u.kind == "tables" and table in u.members)

    @property
    def waves(self) -> list[list[Unit]]:
        out: dict[int, list[Unit]] = {}
        for u in self.units:
            out.setdefault(u.wave, []).append(u)
        return [out[k] for k in sorted(out)]

    def outside_tables(self) -> list[str]:
        return sorted(d["name"] for _, d in self.graph.nodes(data=True) if d["kind"] == "outside")

    def dependent_views(self) -> list[str]:
        """Views outside the plan that read plan tables (recreated at cutover)."""
        return sorted(d["name"] for _, d in self.graph.nodes(data=True) if d["kind"] == "dependent")

    def dependants(self, table: str) -> list[str]:
        """Plan tables and views that must move after this table (its descendants)."""
        node = _t(table)
        return sorted(
            self.graph.nodes[n]["name"]
            for n in nx.descendants(self.graph, node)
            if self.graph.nodes[n]["kind"] in ("table", "view")
        )


def _t(name: str) -> str:
    return f"table:{name}"


def _v(name: str) -> str:
    return f"view:{name}"


def build_graph(plan: Plan, catalog: Catalog) -> DependencyGraph:
    """Build the graph from the live catalog and the plan, then its units and waves."""
    g: nx.DiGraph = nx.DiGraph()
    src = plan.source_schema
    names = {t.name for t in plan.tables}
    for t in plan.tables:
        g.add_node(
            _t(t.name), kind="table", name=t.name, schema=src, target=f"{t.schema_}.{t.target_name}"
        )
    # Foreign keys are matched wherever a plan table is now (source, target or retired), so
    # the units stay the same while tables are half-moved.
    where = plan.locations()
    remote = plan.remote_schemas()

    def server(name: str | None) -> str | None:
        return remote.get(plan.table(name).schema_) if name is not None else None

    for fk in catalog.foreign_keys:
        child_name = where.get((fk.schema, fk.table))
        parent_name = where.get((fk.ref_schema, fk.ref_table))
        if child_name is None and parent_name is None:
            continue
        if server(child_name) != server(parent_name):
            continue  # a key across servers orders nothing: the plan drops it (validate)
        child = _t(child_name) if child_name else _outside(g, fk.schema, fk.table)
        parent = _t(parent_name) if parent_name else _outside(g, fk.ref_schema, fk.ref_table)
        if child != parent:
            g.add_edge(parent, child, via="fk", name=fk.name)
        else:
            g.nodes[child]["self_reference"] = True
    for t in plan.tables:
        for dep in t.depends_on:
            if dep in names:
                g.add_edge(_t(dep), _t(t.name), via="depends_on")
    for v in plan.views:
        g.add_node(_v(v.name), kind="view", name=v.name, schema=v.schema_)
        for dep in v.depends_on:
            if dep in names:
                g.add_edge(_t(dep), _v(v.name), via="view")
            elif any(pv.name == dep for pv in plan.views):
                g.add_edge(_v(dep), _v(v.name), via="view")
    for d in catalog.dependents:
        if d.on_schema == src and d.on_table in names and d.kind != "rule" and (
                (d.schema, d.name) not in where):
            node = f"dependent:{d.schema}.{d.name}"
            if node not in g:
                g.add_node(node, kind="dependent", name=f"{d.schema}.{d.name}", schema=d.schema)
            g.add_edge(_t(d.on_table), node, via="view")

    problems = _cycle_problems(g, plan)
    units = _units(g) if not problems else []
    return DependencyGraph(graph=g, units=units, problems=problems)


def _outside(g: nx.DiGraph, schema: str, table: str) -> str:
    node = f"outside:{schema}.{table}"
    if node not in g:
        g.add_node(node, kind="outside", name=f"{schema}.{table}", schema=schema)
    return node


def _movable(g: nx.DiGraph) -> nx.DiGraph:
    return g.subgraph(n for n, d in g.nodes(data=True) if d["kind"] in ("table", "view"))


def _cycle_problems(g: nx.DiGraph, plan: Plan) -> list[Problem]:
    """Cycles the plan cannot satisfy: through a view, through depends_on, or mixed strategies."""
    problems: list[Problem] = []
    sub = _movable(g)
    for comp in nx.strongly_connected_components(sub):
        if len(comp) < 2:
            continue
        names = sorted(g.nodes[n]["name"] for n in comp)
        if any(g.nodes[n]["kind"] == "view" for n in comp):
            problems.append(
                Problem(
                    ", ".join(names),
                    "a view is part of a dependency cycle, so no order can move it",
                    "remove the view's depends_on entry that points back at its own readers",
                )
            )
            continue
        explicit = [
            (a, b)
            for a, b, d in sub.subgraph(comp).edges(data=True)
            if d.get("via") == "depends_on"
        ]
        if explicit:
            a, b = explicit[0]
            problems.append(
                Problem(
                    ", ".join(names),
                    f"depends_on makes a cycle ({g.nodes[a]['name']} before {g.nodes[b]['name']} "
                    "and back again)",
                    "remove one of the depends_on entries; tables in a foreign-key cycle already "
                    "move together",
                )
            )
            continue
        strategies = {plan.options_for(plan.table(g.nodes[n]["name"])).strategy for n in comp}
        if len(strategies) > 1:
            problems.append(
                Problem(
                    ", ".join(names),
                    "these tables reference each other in a foreign-key cycle, so they move as one "
                    "unit, but the plan gives them different strategies",
                    "give every table of the cycle the same strategy",
                )
            )
    return problems


def _units(g: nx.DiGraph) -> list[Unit]:
    sub = _movable(g)
    cond = nx.condensation(sub)
    wave_of: dict[int, int] = {}
    for i, gen in enumerate(nx.topological_generations(cond)):
        for c in gen:
            wave_of[c] = i
    units: list[Unit] = []
    for c in nx.lexicographical_topological_sort(
        cond,
        key=lambda c: (wave_of[c], min(sub.nodes[n]["name"] for n in cond.nodes[c]["members"])),
    ):
        members = sorted(sub.nodes[n]["name"] for n in cond.nodes[c]["members"])
        kinds = {sub.nodes[n]["kind"] for n in cond.nodes[c]["members"]}
        units.append(
            Unit(
                id=len(units) + 1,
                members=tuple(members),
                kind="view" if kinds == {"view"} else "tables",
                wave=wave_of[c],
            )
        )
    return units


def to_json(dg: DependencyGraph) -> str:
    return json.dumps(
        {
            "units": [
                {
                    "id": u.id,
                    "members": list(u.members),
                    "kind": u.kind,
                    "wave": u.wave,
                    "cycle": u.is_cycle,
                }
                for u in dg.units
            ],
            "waves": [[u.id for u in w] for w in dg.waves],
            "outside": dg.outside_tables(),
            "edges": [
                {
                    "from": dg.graph.nodes[a]["name"],
                    "to": dg.graph.nodes[b]["name"],
                    "via": d.get("via"),
                }
                for a, b, d in dg.graph.edges(data=True)
            ],
            "problems": [p.__dict__ for p in dg.problems],
        },
        indent=2,
    )


def _mid(node: str) -> str:
    """A mermaid/dot-safe node id (names may hold any character): ASCII letters and digits only."""
    return "n" + "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):x}_" for c in node)


def _label(text: str) -> str:
    """A DOT quoted string's content."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Mermaid has no backslash escapes: a quote ends the label whatever precedes it, and `;` ends a
# statement. It decodes numeric entities (`#34;`) in labels, so every such character becomes one.
_MERMAID_UNSAFE = set('"#;<>&`')


def _mlabel(text: str) -> str:
    """A mermaid quoted label's content."""
    return "".join(
        f"#{ord(c)};" if c in _MERMAID_UNSAFE or not c.isprintable() else c for c in text
    )


def to_mermaid(dg: DependencyGraph) -> str:
    g = dg.graph
    lines = ["flowchart LR"]
    unit_nodes: set[str] = set()
    for u in dg.units:
        nodes = [(_t(m) if u.kind == "tables" else _v(m)) for m in u.members]
        unit_nodes.update(nodes)
        title = f"unit {u.id} (wave {u.wave}){' cycle' if u.is_cycle else ''}"
        lines.append(f'  subgraph u{u.id}["{_mlabel(title)}"]')
        for n in nodes:
            lines.append(f'    {_mid(n)}["{_mlabel(g.nodes[n]["name"])}"]')
        lines.append("  end")
    for n, d in g.nodes(data=True):
        if n not in unit_nodes:
            lines.append(f'  {_mid(n)}(["{_mlabel(d["name"])} ({d["kind"]})"])')
    for a, b, d in g.edges(data=True):
        arrow = "-.->" if d.get("via") != "fk" else "-->"
        lines.append(f"  {_mid(a)} {arrow} {_mid(b)}")
    return "\n".join(lines)


def to_dot(dg: DependencyGraph) -> str:
    g = dg.graph
    lines = ["digraph plan {", "  rankdir=LR;"]
    for u in dg.units:
        nodes = [(_t(m) if u.kind == "tables" else _v(m)) for m in u.members]
        lines.append(f"  subgraph cluster_u{u.id} {{")
        lines.append(f'    label="unit {u.id} (wave {u.wave}){" cycle" if u.is_cycle else ""}";')
        for n in nodes:
            lines.append(f'    {_mid(n)} [label="{_label(g.nodes[n]["name"])}"];')
        lines.append("  }")
    for n, d in g.nodes(data=True):
        if d["kind"] in ("outside", "dependent"):
            lines.append(f'  {_mid(n)} [label="{_label(d["name"])}", style=dashed];')
    for a, b, d in g.edges(data=True):
        style = "" if d.get("via") == "fk" else " [style=dotted]"
        lines.append(f"  {_mid(a)} -> {_mid(b)}{style};")
    lines.append("}")
    return "\n".join(lines)

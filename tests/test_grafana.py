"""deploy/grafana/flexgw.json: it loads, and every PromQL expression names only series flexgw exports."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client.process_collector import ProcessCollector
from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "flexgw.json"
#: The series each metric family type puts in the exposition, by suffix.
SUFFIXES = {
    "Counter": ("_total",),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "Summary": ("", "_sum", "_count"),
}
#: Labels every series may carry besides its family's own: the supervisor's `worker` (--workers),
#: and the `instance`/`job` Prometheus adds when it scrapes.
COMMON_LABELS = {"worker", "instance", "job"}
#: Words of PromQL that are not series names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}


def _strings(node: ast.AST) -> set[str] | None:
    """The strings of a literal list or tuple of strings; None for anything else."""
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return set(value)
    return None


def _family_name(node: ast.AST) -> str | None:
    """A family's name: a string, or a pattern for an f-string (`flexgw_upstream_address_{name}`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(re.escape(part.value) if isinstance(part, ast.Constant) else "[a-z0-9_]+"
                       for part in node.values)
    return None


@cache
def exported() -> dict[str, set[str]]:
    """series name pattern (a regex) -> its labels, for every metric family flexgw's code builds
    (read from the source: each `*MetricFamily(name, ..., labels=...)` call, `labels` a literal
    or a name bound to one in the same function) and the process collector's."""
    series: dict[str, set[str]] = {}
    for path in (ROOT / "flexgw").rglob("*.py"):
        tree = ast.parse(path.read_text())
        scopes = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.Module))]
        for scope in scopes:
            bound: dict[str, set[str]] = {}
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign) and (strings := _strings(node.value)) is not None:
                    bound.update({t.id: strings for t in node.targets if isinstance(t, ast.Name)})
            for node in ast.walk(scope):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                kind = ast.unparse(node.func).removesuffix("MetricFamily")
                name = _family_name(node.args[0])
                if kind not in SUFFIXES or name is None:
                    continue
                labels: set[str] = set()
                for keyword in node.keywords:
                    if keyword.arg == "labels":
                        value = keyword.value
                        found = bound.get(value.id) if isinstance(value, ast.Name) else _strings(value)
                        assert found is not None, f"{path}:{node.lineno}: labels not read"
                        labels = found
                if kind == "Histogram":
                    labels.add("le")
                for suffix in SUFFIXES[kind]:
                    series[name + suffix] = labels | COMMON_LABELS
    for family in ProcessCollector(registry=None).collect():
        for sample in family.samples:
            series[re.escape(sample.name)] = set(sample.labels) | COMMON_LABELS
    return series


def labels_of(series: dict[str, set[str]], name: str) -> set[str] | None:
    """The labels of series `name` when flexgw exports it, else None."""
    for pattern, labels in series.items():
        if re.fullmatch(pattern, name):
            return labels
    return None


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) for every panel target and every query variable."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]["query"]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\(|\{|\[|\)|,|$|\s|[-+*/]))")


def references(expression: str) -> tuple[set[str], set[str]]:
    """(series names, label names) a PromQL expression (or a label_values() query) refers to."""
    labels: set[str] = set()
    text = _RANGE.sub("", _STRING.sub('""', expression))
    for matchers in _MATCHERS.findall(text):
        labels |= {m.split("=")[0].split("!")[0].strip() for m in matchers.split(",") if m.strip()}
    text = _MATCHERS.sub(" ", text)
    for grouping in _GROUPING.findall(text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    query = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", text)
    if query:
        return {query.group(1)}, {query.group(2)}
    names = {match.group(0) for match in _WORD.finditer(text)
             if match.group(1) != "(" and match.group(0).lower() not in KEYWORDS}
    return names, labels


class GrafanaDashboardTests(SynchronousTestCase):
    """The shipped Grafana dashboard against the metrics flexgw exports."""

    def setUp(self) -> None:
        self.dashboard = json.loads(DASHBOARD.read_text())
        self.series = exported()

    def test_exported_set_is_read_from_the_code(self) -> None:
        """The derived set holds the gateway's families with their suffixes and labels (a sanity
        check of the derivation itself, so an empty set cannot pass the test below)."""
        self.assertIn("le", labels_of(self.series, "flexgw_request_duration_seconds_bucket") or ())
        self.assertIn("status_class", labels_of(self.series, "flexgw_requests_total") or ())
        self.assertIsNotNone(labels_of(self.series, "flexgw_worker_restarts_total"))
        self.assertIsNotNone(labels_of(self.series, "process_resident_memory_bytes"))
        self.assertIsNone(labels_of(self.series, "flexgw_nothing_total"))

    def test_loads_with_panels_and_queries(self) -> None:
        """The file is a Grafana dashboard with panels covering what the issue lists."""
        self.assertEqual(self.dashboard["uid"], "flexgw")
        names: set[str] = set()
        for _title, expression in expressions(self.dashboard):
            names |= references(expression)[0]
        for wanted in ("flexgw_requests_total", "flexgw_request_duration_seconds_bucket",
                       "flexgw_gateway_added_seconds_bucket", "flexgw_upstream_connections_active",
                       "flexgw_config_reloads_total", "flexgw_rate_limit_rejections_total",
                       "process_cpu_seconds_total"):
            self.assertIn(wanted, names)

    def test_every_expression_names_exported_series(self) -> None:
        """Each series name and label in each expression is one flexgw exports."""
        wrong = []
        for title, expression in expressions(self.dashboard):
            names, labels = references(expression)
            self.assertTrue(names, f"{title}: no series found in {expression!r}")
            found = {name: labels_of(self.series, name) for name in sorted(names)}
            wrong += [f"{title}: {name} is not exported" for name, labels in found.items() if labels is None]
            known = set().union(*(labels or set() for labels in found.values()))
            if labels - known:
                wrong.append(f"{title}: no label(s) {sorted(labels - known)} on {sorted(names)}")
        self.assertEqual(wrong, [], "\n" + "\n".join(wrong))

    def test_references_parser(self) -> None:
        """The expression reader finds series and labels, not functions or keywords."""
        names, labels = references(
            'histogram_quantile(0.99, sum by (le, api) (rate(x_bucket{api=~"$api",cause!="none"}[5m])))'
            " / on (api) y_total"
        )
        self.assertEqual(names, {"x_bucket", "y_total"})
        self.assertEqual(labels, {"le", "api", "cause"})

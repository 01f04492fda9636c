"""Helpers for the deployment tests: paths, chart rendering and PromQL parsing."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "convserve"
DASHBOARD = CHART / "dashboards" / "convserve.json"
RELEASE, NAMESPACE = "convserve", "serving"
# The Kubernetes version the rendered manifests must validate against.
KUBE_VERSION = "1.30"


def values_file(helm, name: str) -> dict:
    """A values file of the chart, parsed by Helm itself."""
    return helm.values_from_yaml((CHART / name).read_text())


def render(chart, values: dict | None = None) -> list[dict]:
    """Every manifest the chart renders for `values` (layered on values.yaml)."""
    rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


# Grafana's variables, replaced by what Grafana would send for "All" and a 1-minute window.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
# PromQL functions and aggregation operators the dashboard may call.
PROMQL_CALLS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "group",
    "rate", "irate", "increase", "delta", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "vector", "scalar", "time", "sum_over_time", "avg_over_time",
    "max_over_time", "min_over_time",
}
# PromQL keywords that are neither metrics nor calls.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*,\s*(\w+)\s*\)\s*$")


def grafana_to_promql(expr: str) -> str:
    """The expression as Grafana sends it to Prometheus: variables substituted, and a
    variable query `label_values(selector, label)` reduced to the series it reads."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    match = _LABEL_VALUES.match(expr)
    if match:
        return match.group(1) + (match.group(2) or "")
    return expr


def parse_promql(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to.

    Label names come from matchers and from by/without/on/ignoring clauses. Every other
    bare identifier must be a known call or keyword, else it is taken for a metric, so
    a misspelt metric can never slip through as "a function"."""
    match = _LABEL_VALUES.match(expr)
    if match:  # Grafana's label_values(metric{...}, label)
        labels = {match.group(3)} | _matcher_labels(match.group(2) or "")
        return {match.group(1)}, labels
    expr = grafana_to_promql(expr)
    labels: set[str] = set()
    for matchers in _MATCHERS.findall(_STRING.sub('""', expr)):
        labels |= _matcher_labels("{" + matchers + "}")
    for _, names in _GROUPING.findall(expr):
        labels |= {name.strip() for name in names.split(",") if name.strip()}
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    metrics: set[str] = set()
    for ident in _IDENT.finditer(text):
        word = ident.group()
        follows = text[ident.end():].lstrip()
        if follows.startswith("("):
            if word not in PROMQL_CALLS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
            continue
        if word.lower() in PROMQL_KEYWORDS:
            continue
        metrics.add(word)
    return metrics, labels


def _matcher_labels(matchers: str) -> set[str]:
    inner = _STRING.sub('""', matchers.strip()[1:-1]) if matchers else ""
    return {m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", inner)}


def exposition_series(text: str) -> dict[str, set[str]]:
    """{sample name: label names} of a Prometheus text exposition."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = _IDENT.match(line).group()
        labels = set()
        if line[len(name):].startswith("{"):
            body = _STRING.sub('""', line[len(name) + 1:line.rindex("}")])
            labels = {m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)=", body)}
        series.setdefault(name, set()).update(labels)
    return series

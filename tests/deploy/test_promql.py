"""The small PromQL reader the dashboard tests rely on: it must find every metric and
label an expression names, and never take a misspelt metric for something else."""
from __future__ import annotations

import pytest

from ._deploy import dashboard_expressions, exposition_series, grafana_to_promql, parse_promql


def test_finds_metrics_and_labels():
    expr = ('histogram_quantile(0.99, sum by (le, stage) '
            '(rate(convserve_stage_duration_seconds_bucket{model=~"$model",code!="a{b}"}[$__rate_interval])))')
    assert parse_promql(expr) == ({"convserve_stage_duration_seconds_bucket"}, {"le", "stage", "model", "code"})


def test_ratio_of_two_metrics_and_numbers():
    expr = "sum(rate(nv_inference_count[1m])) / sum(rate(nv_inference_exec_count[1m])) / 1e3 * 1000"
    assert parse_promql(expr) == ({"nv_inference_count", "nv_inference_exec_count"}, set())


def test_a_misspelt_metric_is_still_a_metric():
    assert parse_promql("sum(convserve_request_total) or vector(0)")[0] == {"convserve_request_total"}


def test_an_unknown_function_is_refused():
    with pytest.raises(ValueError, match="rat"):
        parse_promql("rat(convserve_requests_total[5m])")


def test_grafana_variable_query():
    assert parse_promql("label_values(convserve_requests_total, model)") == ({"convserve_requests_total"}, {"model"})
    assert grafana_to_promql("label_values(convserve_requests_total, model)") == "convserve_requests_total"


def test_every_dashboard_expression_parses():
    for expr in dashboard_expressions():
        metrics, _ = parse_promql(expr)
        assert metrics and all(m.startswith(("convserve_", "nv_")) for m in metrics), expr


def test_exposition_series():
    text = ('# HELP x y\n# TYPE a counter\na_total{method="Classify",model="m"} 1.0\n'
            'nv_inference_count{model="m",version="1"} 6\nup 1\n')
    assert exposition_series(text) == {"a_total": {"method", "model"}, "nv_inference_count": {"model", "version"},
                                       "up": set()}

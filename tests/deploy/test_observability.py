"""The dashboard and the metrics behind it, against the live e2e stack: every PromQL
expression uses only metrics (and labels) that the running gateway and Triton export;
promtool accepts the gateway's exposition and every expression; and deploy/observe.sh
runs a real Prometheus on loopback that scrapes both and answers the dashboard's
queries and the README's p99 query."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from helpers import encode, free_port, photo

from ._deploy import ROOT, dashboard_expressions, exposition_series, grafana_to_promql, parse_promql

pytestmark = pytest.mark.e2e

P99_QUERY = "histogram_quantile(0.99, sum by (le) (rate(convserve_request_duration_seconds_bucket[5m])))"
SCRAPE_INTERVAL_S = 1


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def send_traffic(vision, count: int = 3) -> None:
    """OK answers, and one NOT_FOUND so that the errors panel has a series."""
    from service._proto import vision_pb2

    image = vision_pb2.Image(encoded=encode(photo("coffee.png"), "PNG"))
    for _ in range(count):
        vision.Classify(vision_pb2.ClassifyRequest(model="resnet18", images=[image, image]), timeout=60)
    with pytest.raises(grpc.RpcError):
        vision.Classify(vision_pb2.ClassifyRequest(model="no_such_model", images=[image]), timeout=30)


@pytest.fixture(scope="module")
def exported(stack, vision) -> dict[str, set[str]]:
    """{series name: label names} the gateway and Triton export, after real traffic."""
    send_traffic(vision)
    series = exposition_series(scrape(stack.metrics_port))
    for name, labels in exposition_series(scrape(stack.triton_metrics_port)).items():
        series.setdefault(name, set()).update(labels)
    return series


def test_dashboard_uses_only_exported_metrics_and_labels(exported):
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    used = set()
    for expr in expressions:
        metrics, labels = parse_promql(expr)
        assert metrics, f"no metric in {expr!r}"
        missing = metrics - set(exported)
        assert not missing, f"{expr!r} uses metrics nobody exports: {missing}"
        available = set().union(*(exported[m] for m in metrics))
        assert labels <= available, f"{expr!r} uses labels {labels - available} that {metrics} do not have"
        used |= metrics
    # The panels the dashboard promises.
    for name in ("convserve_requests_total", "convserve_stage_duration_seconds_bucket",
                 "convserve_requests_in_flight", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_count", "nv_inference_exec_count"):
        assert name in used, name


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return binary


def test_promtool_accepts_the_gateway_exposition(stack, exported):
    result = subprocess.run([_promtool(), "check", "metrics"], input=scrape(stack.metrics_port),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_expression(tmp_path):
    promtool = _promtool()
    rules = {"groups": [{"name": "convserve-dashboard", "rules": [
        {"record": f"convserve:dashboard:expr{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(dashboard_expressions() + [P99_QUERY])]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _query(listen: str, expr: str) -> list[dict]:
    url = f"http://{listen}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.load(urllib.request.urlopen(url, timeout=10))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait(predicate, timeout_s: float, what: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"observe.sh exited:\n{log.read_text()[-3000:]}"
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} not within {timeout_s}s:\n{log.read_text()[-3000:]}")


def test_observe_runs_prometheus_that_answers_the_dashboard(stack, vision, exported, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    listen = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OBSERVE_GATEWAY": f"127.0.0.1:{stack.metrics_port}",
           "OBSERVE_TRITON": f"127.0.0.1:{stack.triton_metrics_port}", "OBSERVE_LISTEN": listen,
           "OBSERVE_INTERVAL": f"{SCRAPE_INTERVAL_S}s", "OBSERVE_NO_INSTALL": "1", "TMPDIR": str(tmp_path)}
    log = tmp_path / "observe.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", str(ROOT / "deploy" / "observe.sh")], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def targets_up():
            url = f"http://{listen}/api/v1/targets"
            targets = json.load(urllib.request.urlopen(url, timeout=5))["data"]["activeTargets"]
            return sorted((t["labels"]["job"], t["health"]) for t in targets) == [
                ("convserve-gateway", "up"), ("triton", "up")]
        _wait(targets_up, 60, "both scrape targets up", process, log)
        # Traffic between scrapes, so that every rate() has two samples that differ.
        time.sleep(2 * SCRAPE_INTERVAL_S)
        send_traffic(vision)
        time.sleep(3 * SCRAPE_INTERVAL_S)
        _wait(lambda: _query(listen, P99_QUERY), 30, "the p99 query", process, log)
        p99 = float(_query(listen, P99_QUERY)[0]["value"][1])
        assert math.isfinite(p99) and 0 < p99 <= 30
        for expr in dashboard_expressions():
            assert _query(listen, grafana_to_promql(expr)), f"no data for {expr!r}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Its temporary storage is gone with it.
    assert not list(tmp_path.glob("convserve-observe.*"))

"""loadtests/run.py's verdict on Locust's stats CSV: failures, an empty run and the p99 SLO
each fail the run (the smoke test in tests/e2e covers a real, passing run)."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
          "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
          "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("loadtest_run", ROOT / "loadtests" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stats_csv(path: Path, requests: int, failures: int, p99: str) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for kind, name in (("grpc", "Classify/resnet18"), ("", "Aggregated")):
            writer.writerow([kind, name, requests, failures, 40, 41.0, 10.0, 90.0, 151.0, 5.0, 0.0,
                             40, 45, 50, 52, 60, 70, 80, p99, p99, p99, p99])
    return path


@pytest.mark.parametrize("requests, failures, p99, slo, expected", [
    (100, 0, "80", 1000, []),
    (100, 0, "1200", 1000, ["p99 1200 ms is over the SLO of 1000 ms"]),
    (100, 0, "1200", 0, []),                      # 0 turns the latency check off
    (100, 3, "80", 1000, ["3 of 100 requests failed"]),
    (0, 0, "N/A", 1000, ["no request was sent"]),
])
def test_verdict(run_module, tmp_path, requests, failures, p99, slo, expected):
    assert run_module.verdict(stats_csv(tmp_path / "s.csv", requests, failures, p99), slo) == expected


def test_free_port_never_hands_out_a_port_twice(run_module):
    """Servers started side by side (Triton's HTTP, gRPC and metrics ports) each need
    their own port: a repeat made Triton refuse to start."""
    ports = [run_module.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
